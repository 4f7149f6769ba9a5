"""Shards on global positions: which positions a rank holds (``shard_ranges``, ``positions``, ``runs``), and the
link model of a strategy there (``links_for``: the strategy's ``Links``, ``strategies.links``)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..strategies.contract import DistributedStrategy
from ..strategies.links import BlockSparseLinks, DilatedLinks, Links

__all__ = ["LAYOUTS", "BlockSparseLinks", "DilatedLinks", "Links", "check_strategy", "links_for", "positions",
           "runs", "shard_ranges", "sharded_strategy"]

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


def check_strategy(strategy, name: str = "strategy") -> None:
    """The strategies the distributed ops take: None (dense), or one that implements the contract's
    ``DistributedStrategy`` (``Dilated``, ``BlockSparse`` with a fixed pattern, ``Hilbert`` around either) and says
    it can run sharded."""
    if strategy is None:
        return
    if not isinstance(strategy, DistributedStrategy):
        raise TypeError(f"{name} must be None (dense), dc.Dilated, dc.BlockSparse or dc.Hilbert, got {strategy!r}")
    strategy.check_distributed(name)


def sharded_strategy(strategy, seq_len: int, is_causal: bool):
    """The strategy the ranks run on the ``seq_len`` positions as they hold them (None: dense), from the contract's
    ``DistributedStrategy.sharded``: the strategy itself, or ``Hilbert``'s inner strategy in curve order. Raises
    ``ValueError`` where the strategy can't run on that sequence."""
    return None if strategy is None else strategy.sharded(seq_len, is_causal)


def links_for(strategy, seq_len: int, num_heads: int, is_causal: bool, device=None) -> Links:
    """The ``Links`` of ``strategy`` (None: dense) over ``seq_len`` global positions and ``num_heads`` query heads."""
    check_strategy(strategy)
    if strategy is None:
        return Links(seq_len, num_heads, is_causal)
    return strategy.links(seq_len, num_heads, is_causal, device)
