"""Attention over a sequence sharded across processes, on torch.distributed (NCCL on GPUs, gloo on CPUs).

- ``ring_attention``: sequence-parallel; ring passing for dense attention, pattern-following sparse exchange for
  dilated and block-sparse attention.
- ``head_parallel_attention``: all-to-all to head shards and back (DeepSpeed-Ulysses).
- ``hybrid_attention``: the 2-D hybrid, head-parallel inside groups of ranks and sequence-parallel across them;
  ``hybrid_groups`` builds its process groups.
- ``SequenceParallel``: the strategy that rewrites a model's attention sites into these.
- ``shard_sequence`` / ``gather_sequence``: cut a whole sequence into this rank's shard and put it back.
- ``count_bytes``: what the ops sent and received on this rank.

Every rank of the group must make the same call (shard shapes, dtypes, strategy, mode, layout, causality, scale);
each call checks that it does, and where the ranks differ every rank raises the same ``ValueError``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .comm import CommCounter, count_bytes, resolve_group
from .head_parallel import head_parallel_attention
from .hybrid import hybrid_attention, hybrid_groups
from .links import LAYOUTS, positions, shard_ranges
from .sequence_parallel import ring_attention
from .strategy import SequenceParallel


def _shard_len(n: int, world: int, layout: str, dim: int) -> int:
    parts = world * (2 if layout == "zigzag" else 1)
    if n % parts:
        raise ValueError(f"sequence length {n} (dim {dim}) must be a multiple of {parts} to shard it over {world} "
                         f"rank(s) with layout={layout!r}")
    return n // world


def _order(order, n: int, device) -> Optional[Tensor]:
    """The permutation ``order`` stands for over ``n`` tokens (None: none): a ``dc.Hilbert`` strategy's curve order
    (``Hilbert.plan``), or a permutation tensor itself."""
    if order is None:
        return None
    if isinstance(order, Tensor):
        perm = order.long()
        if perm.shape != (n,) or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
            raise ValueError(f"order must be a permutation of the {n} sequence positions, got a tensor of shape "
                             f"{tuple(order.shape)} that is not one")
        return perm.to(device)
    from ..strategies.hilbert import Hilbert

    if not isinstance(order, Hilbert):
        raise TypeError(f"order must be None, a dc.Hilbert strategy or a permutation tensor, got {order!r}")
    return order.plan(n)[0].to(device)


def shard_sequence(x: Tensor, *, dim: int = 2, layout: str = "contiguous", group=None, order=None) -> Tensor:
    """This rank's shard of the whole sequence ``x`` along ``dim`` (every rank passes the same ``x``).

    ``order``: shard the sequence in that order (``x`` reordered by it first): a ``dc.Hilbert`` strategy (its curve
    order, how ranks hold the sequence for ``ring_attention(..., strategy=that Hilbert)``) or a permutation tensor
    (``x.index_select(dim, order)`` is the sequence sharded). ``layout`` then cuts the reordered sequence: with
    ``"contiguous"``, rank r holds curve positions ``[r*S, (r+1)*S)``, i.e. tokens ``order[r*S:(r+1)*S]``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _, rank, world = resolve_group(group)
    n = x.shape[dim]
    S = _shard_len(n, world, layout, dim)
    index = positions(shard_ranges(rank, world, S, layout), x.device)
    perm = _order(order, n, x.device)
    return x.index_select(dim, index if perm is None else perm[index])


def gather_sequence(x: Tensor, *, dim: int = 2, layout: str = "contiguous", group=None, order=None) -> Tensor:
    """The whole sequence from every rank's shard ``x`` along ``dim`` (differentiable); ``order`` as the shards
    were made with (``shard_sequence``): the result is back in the sequence's own order."""
    import torch.distributed._functional_collectives as funcol

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    group, rank, world = resolve_group(group)
    S = x.shape[dim]
    whole = funcol.all_gather_tensor_autograd(x.contiguous(), dim, group)
    whole = funcol.wait_tensor(whole) if isinstance(whole, funcol.AsyncCollectiveTensor) else whole
    stored = torch.cat([positions(shard_ranges(b, world, S, layout), x.device) for b in range(world)])
    index = torch.argsort(stored)                 # row of each position of the (reordered) sequence
    perm = _order(order, S * world, x.device)
    return whole.index_select(dim, index if perm is None else index[torch.argsort(perm)])


__all__ = ["CommCounter", "SequenceParallel", "count_bytes", "gather_sequence", "head_parallel_attention",
           "hybrid_attention", "hybrid_groups", "ring_attention", "shard_sequence"]
