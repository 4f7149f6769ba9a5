"""A strategy seen on global positions: which keys each query links to, and which keys a set of queries needs.

When the sequence is sharded, a rank holds queries and keys at known global positions (``positions``). The
distributed ops never build an N x N mask: they ask a ``Links`` object

- ``count(h, p, j)``: how many times key ``j`` counts in the softmax of query ``p`` of head ``h`` (0: not
  linked; the dilated ``lse`` mixing counts a key once per linking branch), on broadcast index tensors;
- ``needed(heads, ranges, j)``: for each head and key position, whether any query position in ``ranges``
  (half-open ``(lo, hi)`` position ranges) links to it. Computed per key in O(heads x keys x ranges), which is
  how a rank decides what to send to whom and which keys a chunk of queries must read.

Key position ``-1`` marks padding and never links.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..patterns import EMPTY, FULL, PARTIAL, BlockLayout, Pattern, partial_mask
from ..lowering.dilated.plan import clip_segment
from ..strategies.block_sparse import BlockSparse
from ..strategies.dilated import Dilated

LAYOUTS = ("contiguous", "zigzag")


def shard_ranges(rank: int, world_size: int, shard_len: int, layout: str) -> list[tuple[int, int]]:
    """Global position ranges ``[lo, hi)`` of ``rank``'s shard, in the order its rows are stored.

    ``contiguous``: rank r holds ``[r*S, (r+1)*S)``. ``zigzag`` (load balance for causal attention): the sequence
    is cut into ``2P`` chunks of ``S/2`` and rank r holds chunks ``r`` and ``2P-1-r``.
    """
    if layout == "contiguous":
        return [(rank * shard_len, (rank + 1) * shard_len)]
    if layout == "zigzag":
        if shard_len % 2:
            raise ValueError(f"layout='zigzag' needs an even shard length, got {shard_len}")
        c = shard_len // 2
        return [(rank * c, (rank + 1) * c), ((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c)]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def positions(ranges: Sequence[tuple[int, int]], device=None) -> Tensor:
    return torch.cat([torch.arange(lo, hi, device=device) for lo, hi in ranges])


def runs(pos: Tensor) -> list[tuple[int, int]]:
    """The maximal runs of consecutive positions in ``pos`` (sorted within each run), as ``[lo, hi)``."""
    if pos.numel() == 0:
        return []
    cut = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
    starts, stops = [0] + cut, cut + [pos.numel()]
    return [(int(pos[a]), int(pos[b - 1]) + 1) for a, b in zip(starts, stops)]


class Links:
    """Base: every key links once to every query (dense attention), causal optional."""

    output_scale = 1.0

    def __init__(self, seq_len: int, num_heads: int, is_causal: bool):
        self.seq_len, self.num_heads, self.is_causal = seq_len, num_heads, is_causal

    def _pair(self, h: Tensor, p: Tensor, j: Tensor) -> Tensor:
        return torch.ones(torch.broadcast_shapes(h.shape, p.shape, j.shape), dtype=torch.int64, device=p.device)

    def count(self, h: Tensor, p: Tensor, j: Tensor) -> Tensor:
        m = self._pair(h, p, j.clamp(min=0)) * (j >= 0)
        if self.is_causal:
            m = m * (j <= p)
        return m

    def _needed(self, heads: Tensor, lo: int, hi: int, j: Tensor) -> Tensor:
        return torch.ones(heads.shape[0], j.shape[-1], dtype=torch.bool, device=j.device)

    def needed(self, heads: Tensor, ranges: Sequence[tuple[int, int]], j: Tensor) -> Tensor:
        """bool ``[len(heads), K]``; ``j`` is ``[K]`` or ``[len(heads), K]`` key positions (-1: padding)."""
        j = j.expand(heads.shape[0], j.shape[-1])
        out = torch.zeros(heads.shape[0], j.shape[-1], dtype=torch.bool, device=j.device)
        for lo, hi in ranges:
            if hi <= lo:
                continue
            got = self._needed(heads, lo, hi, j)
            if self.is_causal:
                got = got & (j <= hi - 1)
            out |= got
        return out & (j >= 0)


class DilatedLinks(Links):
    """``Dilated`` on global positions (both mixings)."""

    def __init__(self, strategy: Dilated, seq_len: int, num_heads: int, is_causal: bool):
        super().__init__(seq_len, num_heads, is_causal)
        self.strategy = strategy
        self.output_scale = 1.0 / strategy.num_branches if strategy.mixing == "head_groups" else 1.0
        self.branches = []   # (segment, rate, residue of each head or -1 when the branch doesn't serve it)
        s = strategy
        bounds = s.head_group_bounds(num_heads)
        for i, (w, r) in enumerate(zip(s.segment_lengths, s.dilation_rates)):
            self.branches.append((clip_segment(w, r, seq_len), r, i, bounds[i]))

    def _pair(self, h, p, j):
        return self.strategy.link_count(h, p, j, self.num_heads)

    def _needed(self, heads, lo, hi, j):
        out = torch.zeros(j.shape, dtype=torch.bool, device=j.device)
        h = heads.view(-1, 1)
        for w, r, i, (start, stop) in self.branches:
            if self.strategy.mixing == "lse":
                residue, serves = h % r, torch.ones_like(h, dtype=torch.bool)
            else:
                residue, serves = torch.full_like(h, i % r), (h >= start) & (h < stop)
            seg_lo = (j // w) * w
            first_p = torch.clamp(seg_lo, min=lo)
            if self.is_causal:
                first_p = torch.maximum(first_p, j)
            last_p = torch.clamp(seg_lo + w - 1, max=hi - 1)
            first_p = first_p + (residue - first_p) % r      # first query position of the head's residue class
            out |= serves & (j % r == residue) & (first_p <= last_p)
        return out


class BlockSparseLinks(Links):
    """A block-sparse layout (built for the whole sequence) on global positions."""

    def __init__(self, layout: BlockLayout, num_heads: int):
        super().__init__(layout.seq_len, num_heads, layout.is_causal)
        self.layout = layout
        self.bs = layout.block_size
        bits = torch.zeros(layout.state.shape, dtype=torch.int32, device=layout.state.device)
        e = torch.arange(layout.kv_idx.shape[-1], device=bits.device)
        partial = e.view(1, 1, -1) < layout.kv_count[..., 0:1]
        bits.scatter_(-1, layout.kv_idx.long(), torch.where(partial, layout.kv_bits, 0))
        self.bits = bits

    def _head(self, h: Tensor) -> Tensor:
        return h if self.layout.num_heads > 1 else torch.zeros_like(h)

    def _pair(self, h, p, j):
        hl = self._head(h)
        pb, jb = p // self.bs, j // self.bs
        state = self.layout.state[hl, pb, jb]
        ok = partial_mask(self.layout.terms, self.bits[hl, pb, jb], p, j, self.layout.coords)
        ok = (state == FULL) | ((state == PARTIAL) & ok)
        return (ok & (j < self.seq_len) & (p < self.seq_len)).long()

    def _needed(self, heads, lo, hi, j):
        rows = self.layout.state[self._head(heads)][:, lo // self.bs:(hi - 1) // self.bs + 1]   # [H, I, nb]
        blocks = (rows != EMPTY).any(1)                                                          # [H, nb]
        return blocks.gather(1, (j.clamp(min=0) // self.bs).clamp(max=blocks.shape[1] - 1))


def check_strategy(strategy, name: str = "strategy") -> None:
    """The strategies the distributed ops take: None (dense), ``Dilated``, ``BlockSparse`` with a fixed pattern."""
    if strategy is not None and not isinstance(strategy, (Dilated, BlockSparse)):
        raise TypeError(f"{name} must be None (dense), dc.Dilated or dc.BlockSparse, got {strategy!r}")
    if isinstance(strategy, Dilated) and strategy.head_offsets != "interleaved":
        raise NotImplementedError(f"distributed dilated attention with head_offsets={strategy.head_offsets!r}: the "
                                  f"links, windows and head shards here read a head's rows as h % r; pass "
                                  f"head_offsets='interleaved' or run the single-process op")
    if isinstance(strategy, BlockSparse) and not isinstance(strategy.pattern, Pattern):
        raise ValueError(f"{name}=BlockSparse('auto') reads a site's mask over one shard only; distributed attention "
                         f"needs a fixed pattern (dc.BlockSparse(pattern))")


def links_for(strategy, seq_len: int, num_heads: int, is_causal: bool, device=None) -> Links:
    """The ``Links`` of ``strategy`` (None: dense) over ``seq_len`` global positions and ``num_heads`` query heads."""
    check_strategy(strategy)
    if strategy is None:
        return Links(seq_len, num_heads, is_causal)
    if isinstance(strategy, Dilated):
        return DilatedLinks(strategy, seq_len, num_heads, is_causal)
    layout = strategy.layout(strategy.pattern, seq_len, num_heads, is_causal, device)
    return BlockSparseLinks(layout, num_heads)


def lcm_of_rates(strategy: Optional[Dilated]) -> int:
    return math.lcm(*strategy.dilation_rates) if isinstance(strategy, Dilated) else 1
