"""Per-rank compute of dense sequence-parallel attention with Triton kernels: a rank's queries against one K/V
shard (a ring step).

A shard is one or more runs of consecutive global positions (two under the zigzag layout), cut here into pieces
of the runs' common length. A pair (query piece, key piece) is visible whole (not causal, or every key before
every query), invisible (every key after every query), or the causal diagonal (the same positions). Each
visible pair is one launch of the block-sparse kernels with a layout of every block (causal on the diagonal):
they return the log-sum-exp, so pairs and ring steps merge exactly (``attend.merge``), and their backward takes
the log-sum-exp and ``rowsum(dO * O)`` of the whole softmax, as a ring attention's backward must. A step whose
pieces pair up any other way (overlapping without being equal) returns None and runs the exact path of
``attend.py``. Key padding (the visiting shard's flags) goes to each launch with its key piece.

Kernels: CUDA float16/bfloat16, head dims 32/64/128, layout block size ``BLOCK_SIZE``; under
``TRITON_INTERPRET=1`` CPU float16/float32 too, with ``INTERPRET_BLOCK_SIZE`` (how the tests run them). A whole
pair's forward runs the warp-specialised Hopper forward where the single-process block-sparse op would run it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import patterns as P
from ..lowering.block_sparse.op import gluon, warp_specialised_reason
from ..lowering.block_sparse.triton import (SUPPORTED_BLOCK_SIZES, block_sparse_attn_bwd, block_sparse_attn_fwd,
                                            kernel_unsupported_reason, tile_order)
from ..lowering.common.dispatch import interpreter_runs, kernels_apply, lse_dtype
from .attend import merge
from .links import runs

BLOCK_SIZE = 128
INTERPRET_BLOCK_SIZE = 16
# Calls of ``forward`` / ``backward`` that ran the kernels (tests read them).
CALLS = {"forward": 0, "backward": 0}


def _block_size(q: Tensor) -> int:
    return INTERPRET_BLOCK_SIZE if q.device.type == "cpu" else BLOCK_SIZE


def kernel_reason(q: Tensor) -> str:
    """Why the kernels can't run this rank's dense steps (the exact path runs), or ''."""
    return "" if interpreter_runs(q) else kernel_unsupported_reason(q, BLOCK_SIZE)


def use_kernels(q: Tensor) -> bool:
    """True when dense ring steps run the kernels (logged once on CUDA when they can't)."""
    return kernels_apply("dense sequence-parallel attention", q, kernel_reason(q))


def _pieces(pos: Tensor, size: int) -> list[tuple[int, int, int]]:
    """``(row, lo, hi)``: the runs of ``pos`` cut into pieces of ``size`` positions (``row``: the piece's first
    row in the shard)."""
    out, row = [], 0
    for lo, hi in runs(pos):
        out += [(row + a - lo, a, a + size) for a in range(lo, hi, size)]
        row += hi - lo
    return out


def pairs(q_pos: Tensor, k_pos: Tensor, is_causal: bool) -> Optional[list[tuple[int, int, int, int, bool]]]:
    """The visible (query piece, key piece) pairs of a step as ``(q_row0, q_row1, k_row0, k_row1, diagonal)``
    (rows of the local shards), or None when some pair is neither whole, empty nor the diagonal. Pieces: the
    runs of both shards cut to the runs' common length (the zigzag layout's two chunks per rank, adjacent on
    some ranks), so every pair is square."""
    lengths = [hi - lo for lo, hi in runs(q_pos) + runs(k_pos)]
    size = math.gcd(*lengths) if lengths else 0
    out = []
    for q_row, q_lo, q_hi in _pieces(q_pos, size) if size else []:
        for k_row, k_lo, k_hi in _pieces(k_pos, size):
            rows = (q_row, q_row + size, k_row, k_row + size)
            if not is_causal or k_hi <= q_lo:
                out.append(rows + (False,))
            elif k_lo >= q_hi:
                continue
            elif k_lo == q_lo:
                out.append(rows + (True,))
            else:
                return None
    return out


@functools.lru_cache(maxsize=64)
def _layout(n: int, diagonal: bool, block_size: int, device: str) -> P.BlockLayout:
    """Every block of an ``n x n`` attention (causal on the diagonal)."""
    return P.build_layout(P.local(-(-n // block_size)), n, block_size, is_causal=diagonal, device=device)


def _piece_keep(key_keep: Optional[Tensor], c0: int, c1: int) -> Optional[Tensor]:
    """The key padding of key rows ``c0:c1`` of the shard (None without)."""
    return None if key_keep is None else key_keep[:, c0:c1]


def forward(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, is_causal: bool, scale: float,
            key_keep: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor]]:
    """``(out, lse)`` of q's rows over this K/V shard (float32 accumulation dtype; ``lse = -inf``, ``out = 0``
    where no key is visible or kept), or None when the runs don't pair up (see ``pairs``). ``key_keep``: optional
    bool ``[B or 1, S]``, which of the shard's keys attend (key padding)."""
    todo = pairs(q_pos, k_pos, is_causal)
    if todo is None:
        return None
    B, H, S, D = q.shape
    dt = lse_dtype(q.dtype)
    out = torch.zeros(B, H, S, D, dtype=dt, device=q.device)
    lse = torch.full((B, H, S), float("-inf"), dtype=dt, device=q.device)
    bs = _block_size(q)
    for r0, r1, c0, c1, diagonal in todo:
        lay = _layout(r1 - r0, diagonal, bs, str(q.device))
        qp, kp, vp = q[:, :, r0:r1], k[:, :, c0:c1], v[:, :, c0:c1]
        keep = _piece_keep(key_keep, c0, c1)
        if keep is None and not warp_specialised_reason(qp, kp, vp, lay.kv_count, bs, diagonal, None):
            order = tile_order(lay.kv_count, lay.kv_count.shape[0], B * H)   # the op's Hopper forward
            o, l_ = gluon.block_sparse_attn_fwd_ws(qp, kp, vp, lay.kv_count, lay.kv_idx, order, scale)
        else:
            o, l_ = block_sparse_attn_fwd(qp, kp, vp, lay.terms, lay.kv_count, lay.kv_idx, lay.kv_bits, bs, diagonal,
                                          scale, lay.coords, lay.checks, key_keep=keep)
        out[:, :, r0:r1], lse[:, :, r0:r1] = merge(out[:, :, r0:r1], lse[:, :, r0:r1], o.to(dt), l_.to(dt))
    CALLS["forward"] += 1
    return out, lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, q_pos: Tensor,
             k_pos: Tensor, is_causal: bool, scale: float,
             key_keep: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """This shard's share of ``(dq, dk, dv)`` (float32), given the ``lse`` and ``delta = rowsum(dout * out)`` of
    the whole softmax (``key_keep`` as for ``forward``), or None when the runs don't pair up."""
    todo = pairs(q_pos, k_pos, is_causal)
    if todo is None:
        return None
    dt = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    bs = _block_size(q)
    dout, lse, delta = dout.to(q.dtype), lse.to(torch.float32), delta.to(torch.float32)
    for r0, r1, c0, c1, diagonal in todo:
        lay = _layout(r1 - r0, diagonal, bs, str(q.device))
        g = block_sparse_attn_bwd(dout[:, :, r0:r1], q[:, :, r0:r1], k[:, :, c0:c1], v[:, :, c0:c1], None,
                                  lse[:, :, r0:r1], *lay.tensors(), None, lay.checks, bs, diagonal, scale,
                                  delta=delta[:, :, r0:r1], key_keep=_piece_keep(key_keep, c0, c1))
        dq[:, :, r0:r1] += g[0]
        dk[:, :, c0:c1] += g[1]
        dv[:, :, c0:c1] += g[2]
    CALLS["backward"] += 1
    return dq, dk, dv


assert INTERPRET_BLOCK_SIZE in SUPPORTED_BLOCK_SIZES and BLOCK_SIZE in SUPPORTED_BLOCK_SIZES
