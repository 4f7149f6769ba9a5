"""Head-parallel attention (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards and back.

Each rank passes its sequence shard of every head and gets it back; in between, each rank holds the *whole*
sequence of a contiguous group of kv heads (and their query heads) and runs the single-process op on it, with
its Triton kernels on GPUs. Two all-to-alls each way (q, then k and v together) move ``(P - 1) / P`` of the
local q/k/v; the backward is the same all-to-alls reversed (functional collectives, so torch.compile can
trace them). Heads need not divide evenly: the first ``Hkv % P`` ranks take one kv head more.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns.layouts import head_slice as slice_layout_heads  # noqa: F401  (the distributed tests' name)
from . import comm
from .agreement import check_call, raise_on_every_rank
from .links import LAYOUTS, check_strategy, shard_ranges, sharded_strategy
from .sequence_parallel import _CONFIGS, Config, check_inputs, local_attention, register


def head_split(num_kv_heads: int, world_size: int) -> list[int]:
    """kv heads per rank: contiguous, the first ``num_kv_heads % world_size`` ranks one more."""
    if num_kv_heads < world_size:
        raise ValueError(f"head-parallel attention needs at least one kv head per rank: {num_kv_heads} kv head(s) "
                         f"on {world_size} ranks; use ring_attention (sequence-parallel) instead")
    base, extra = divmod(num_kv_heads, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


class _Shuffle:
    """Moves ``[H_t, R, S, D]`` sequence shards of all heads to ``[h_r, R, N, D]`` whole sequences of this
    rank's heads (``to_heads``) and back (``to_shards``), in natural position order."""

    def __init__(self, group, rank, world, counts, shard_len, layout, device):
        self.group, self.rank, self.world, self.counts = group, rank, world, counts
        self.mine = counts[rank]
        self.stored = self.order = None                      # contiguous shards are already in natural order
        if layout != "contiguous":
            stored = [p for b in range(world) for lo, hi in shard_ranges(b, world, shard_len, layout)
                      for p in range(lo, hi)]
            self.stored = torch.tensor(stored, device=device)
            self.order = torch.tensor(sorted(range(len(stored)), key=stored.__getitem__), device=device)

    def to_heads(self, x: Tensor) -> Tensor:
        H, R, S, D = x.shape
        y = comm.all_to_all(x, [self.mine] * self.world, self.counts, self.group, "heads")
        y = y.view(self.world, self.mine, R, S, D).permute(1, 2, 0, 3, 4).reshape(self.mine, R, self.world * S, D)
        return y if self.order is None else y.index_select(2, self.order)

    def to_shards(self, y: Tensor) -> Tensor:
        h, R, N, D = y.shape
        if self.stored is not None:
            y = y.index_select(2, self.stored)
        S = N // self.world
        x = y.reshape(h, R, self.world, S, D).permute(2, 0, 1, 3, 4).reshape(self.world * h, R, S, D)
        return comm.all_to_all(x, self.counts, [self.mine] * self.world, self.group, "heads")


def _attend_heads(q, k, v, strategy, first_head: int, num_heads: int, is_causal: bool, scale):
    """The single-process op on query heads ``first_head ..`` of a ``num_heads``-head model, whole sequence: the
    strategy's kernels (``attend_heads``), else the exact path."""
    if strategy is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    out = strategy.attend_heads(q, k, v, first_head=first_head, num_heads=num_heads, is_causal=is_causal,
                                scale=scale)
    if out is None:
        out = local_attention(q, k, v, strategy, first_head=first_head, num_heads=num_heads, is_causal=is_causal,
                              scale=scale)
    return out


@torch.library.custom_op("dilate_compiler::head_parallel_pack", mutates_args=())
def head_parallel_pack(q: Tensor, k: Tensor, v: Tensor, config: str) -> tuple[Tensor, Tensor]:
    """What the all-to-alls send, heads first: q ``[B, H, S, D]`` as ``[H, B, S, D]`` and k, v as
    ``[Hkv, 2, B, S, D]`` (new contiguous tensors), once every rank's call agrees (``agreement.check_call``; an op,
    so the check runs eagerly in compiled graphs too, before the first all-to-all)."""
    check_call(q, k, v, _CONFIGS[config])
    return (q.transpose(0, 1).clone(memory_format=torch.contiguous_format),
            torch.stack((k.transpose(0, 1), v.transpose(0, 1)), dim=1))


@head_parallel_pack.register_fake
def _(q, k, v, config):
    B, H, S, D = q.shape
    return q.new_empty(H, B, S, D), k.new_empty(k.shape[1], 2, B, S, D)


def _pack_backward(ctx, dq, dkv):
    return (None if dq is None else dq.transpose(0, 1), None if dkv is None else dkv[:, 0].transpose(0, 1),
            None if dkv is None else dkv[:, 1].transpose(0, 1), None)


head_parallel_pack.register_autograd(_pack_backward)


def head_parallel_attention(q: Tensor, k: Tensor, v: Tensor, strategy=None, *, is_causal: bool = False,
                            group=None, scale: Optional[float] = None, layout: str = "contiguous") -> Tensor:
    """Head-parallel attention over a sequence sharded across ``group``: same arguments and result as
    ``ring_attention`` (this rank's output shard), computed by all-to-all to head shards and back. Every rank of
    ``group`` must make the same call, as for ``ring_attention``."""
    group, rank, world = comm.resolve_group(group)
    try:
        check_inputs(q, k, v)
        check_strategy(strategy)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        sharded_strategy(strategy, q.shape[2] * world, bool(is_causal))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise_on_every_rank(e, group, q, k, v, strategy, "head_parallel", layout, is_causal, scale)
    key = register(Config(strategy, group, "head_parallel", layout, bool(is_causal), scale))
    q_sent, kv_sent = torch.ops.dilate_compiler.head_parallel_pack(q, k, v, key)   # [H, B, S, D], [Hkv, 2, B, S, D]
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    kv_counts = head_split(Hkv, world)   # after the check: the same on every rank
    q_counts = [c * g for c in kv_counts]
    first_head = sum(q_counts[:rank])
    q_shuffle = _Shuffle(group, rank, world, q_counts, S, layout, q.device)
    kv_shuffle = _Shuffle(group, rank, world, kv_counts, S, layout, q.device)
    qh = q_shuffle.to_heads(q_sent).transpose(0, 1)                                     # [B, h, N, D]
    kvh = kv_shuffle.to_heads(kv_sent.view(Hkv, 2 * B, S, D))
    kvh = kvh.view(kv_counts[rank], 2, B, world * S, D).permute(1, 2, 0, 3, 4)
    out = _attend_heads(qh, kvh[0], kvh[1], strategy, first_head, H, is_causal, scale)
    return q_shuffle.to_shards(out.transpose(0, 1)).transpose(0, 1)


def head_parallel_by_key(q: Tensor, k: Tensor, v: Tensor, config: str) -> Tensor:
    """``head_parallel_attention`` with the arguments registered under ``config`` (what rewritten graphs call:
    FX code can only hold plain values)."""
    cfg = _CONFIGS[config]
    return head_parallel_attention(q, k, v, cfg.strategy, is_causal=cfg.is_causal, group=cfg.group, scale=cfg.scale,
                                   layout=cfg.layout)
