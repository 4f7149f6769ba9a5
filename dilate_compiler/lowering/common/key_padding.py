"""Key padding in the kernels: which keys of each batch row attend.

The ops take ``key_keep``, bool ``[B or 1, N]`` (True: the key attends; a model's padding mask). The launchers
turn it into what the kernels read (``key_padding_args``): the keep flags as int8 and, per batch row, the range
``[lo, hi)`` from the first kept key to the last and whether keys inside it are dropped too ("holes")::

    key_keep  [[0, 0, 1, 1, 1, 1],          -> key_range [[2, 6, 0],      (left padding: no holes)
               [1, 1, 0, 1, 0, 0]]                        [0, 4, 1]]      (a hole at key 2)

A kernel skips whole key tiles outside ``[lo, hi)`` (``clip_tiles``) and masks the keys of a tile that straddles
it (``keys_kept``); the flags themselves are read only for batch rows with holes (the load is predicated off
otherwise), so left and right padding cost two integer compares per key. Rows that keep no key get the ops' value
for an empty row: output 0, log-sum-exp -inf.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


def check_key_keep(key_keep: Optional[Tensor], batch: int, num_keys: int, device) -> Optional[Tensor]:
    """``key_keep`` as bool ``[B or 1, N]`` on ``device``, or a ``ValueError`` naming what is accepted."""
    if key_keep is None:
        return None
    if not isinstance(key_keep, Tensor):
        raise TypeError(f"key_keep must be a bool Tensor [B or 1, N] or None, got {type(key_keep).__name__}")
    if key_keep.dtype != torch.bool:
        raise TypeError(f"key_keep must be bool (True: the key attends), got dtype {key_keep.dtype}")
    if key_keep.dim() != 2 or key_keep.shape[0] not in (1, batch) or key_keep.shape[1] != num_keys:
        raise ValueError(f"key_keep must have shape [B or 1, N] = [{batch} or 1, {num_keys}], got "
                         f"{tuple(key_keep.shape)}")
    if key_keep.device != device:
        raise ValueError(f"key_keep is on {key_keep.device} but q is on {device}; accepted: a tensor on q's device")
    return key_keep


def key_padding_args(key_keep: Optional[Tensor], batch: int, num_keys: int, device) -> tuple:
    """``(keep, key_range, stride_b, KEY_MASK)`` for a kernel launch: the int8 flags ``[B', N]`` and their batch
    stride (0 when B' == 1), int32 ``[B, 3]`` rows ``(lo, hi, holes)``, and the constexpr. Device ops only: no
    host sync."""
    if key_keep is None:
        return (torch.zeros(1, dtype=torch.int8, device=device), torch.zeros(1, dtype=torch.int32, device=device), 0,
                False)
    kept = key_keep.contiguous()
    pos = torch.arange(num_keys, device=device, dtype=torch.int32)
    lo = torch.where(kept, pos, num_keys).amin(-1)
    hi = torch.where(kept, pos + 1, 0).amax(-1)
    holes = kept.sum(-1, dtype=torch.int32) != (hi - lo).clamp_min(0)
    key_range = torch.stack([lo, hi, holes.to(torch.int32)], -1).to(torch.int32).expand(batch, 3).contiguous()
    return kept.to(torch.int8), key_range, (num_keys if kept.shape[0] > 1 else 0), True


@triton.jit
def key_range(KeyRange, b, N, KEY_MASK: tl.constexpr):
    """``(lo, hi, holes)`` of batch row ``b``; every key, no holes, when not ``KEY_MASK``."""
    if KEY_MASK:
        lo = tl.load(KeyRange + b * 3)
        hi = tl.load(KeyRange + b * 3 + 1)
        holes = tl.load(KeyRange + b * 3 + 2)
    else:
        lo = N * 0
        hi = N
        holes = N * 0
    return lo, hi, holes


@triton.jit
def keys_kept(keep_base, j, lo, hi, holes):
    """Whether keys ``j`` attend: inside ``[lo, hi)`` and, in a row with holes, kept by its flags."""
    inside = (j >= lo) & (j < hi)
    flag = tl.load(keep_base + j, mask=inside & ((j * 0 + holes) != 0), other=1)   # holes as a vector: the
    return inside & (flag != 0)                                                      # interpreter's masks need one


@triton.jit
def clip_tiles(lo, hi, j0, R, kv_lo, kv_hi, BLOCK: tl.constexpr):
    """Tiles ``[lo, hi)`` of the keys ``j0 + R * m`` (tiles start at ``lo + k * BLOCK``) without the whole tiles
    that hold only keys outside ``[kv_lo, kv_hi)``; the tiles kept start where they did."""
    m_lo = tl.cdiv(tl.maximum(kv_lo - j0, 0), R)
    m_hi = tl.cdiv(tl.maximum(kv_hi - j0, 0), R)
    new_lo = lo + tl.maximum(m_lo - lo, 0) // BLOCK * BLOCK
    new_hi = tl.minimum(hi, lo + tl.cdiv(tl.maximum(m_hi - lo, 0), BLOCK) * BLOCK)
    return new_lo, tl.maximum(new_hi, new_lo)
