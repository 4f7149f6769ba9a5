"""Per-rank compute of sequence-parallel block-sparse attention with the Triton kernels: a rank's queries against
the key rows it holds, on the whole sequence's layout.

The kernels run the layout of all N positions (the strategy's, built once) with the lists of every query block
outside the rank's shard emptied (``plan``), so only the rank's query blocks do work and the token predicate is
evaluated on global positions, as in the single-process op. They address rows through an index table of N
entries (the kernels' ``order``): the rank's rows are its S queries (rows ``0..S-1``; it holds their keys too),
then the other key rows it holds (received in the sparse exchange, or kept from the ring), then one spare row,
where every position the rank doesn't hold points. q and dO are zero past row S, so the query positions of other
ranks that share a block with this rank's queries compute into rows nobody reads and add nothing to any key's
gradient; the spare row's results are dropped. A rank that holds every position has no spare row, and where its
rows are the positions in order (the only rank of a group) the kernels read them with no table, exactly as the
single-process op does.

Every key a local query links to is held: the exchange sends, and the ring keeps, every key block some local
query block lists (``Links.needed``). A listed key that isn't held (causal: past the rank's last query) is masked
for every local query by causality, so it never enters their softmax.

Key padding (a model's padding mask) is read by row, as the kernels read it: each held row carries the flag of the
key it holds (``key_keep [B', held]``, the shard's flags first, then those of the received or kept rows), the spare
row is dropped, so a position the rank doesn't hold never attends.

Memory beyond the held rows: the table (N int32) and the kernels' log-sum-exp and ``rowsum(dO * O)`` buffers (N
floats per batch and head; the kernels address them by row within N entries per head).

Kernels: CUDA float16/bfloat16, head dims 32/64/128, the strategy's block size in 16..128; under
``TRITON_INTERPRET=1`` CPU float16/float32 too (how the tests run them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..lowering.block_sparse.op import gluon, warp_specialised_reason
from ..lowering.block_sparse.triton import (SUPPORTED_BLOCK_SIZES, block_sparse_attn_bwd, block_sparse_attn_fwd,
                                            kernel_unsupported_reason, tile_order)
from ..lowering.common.dispatch import interpreter_runs, kernels_apply
from ..patterns import EMPTY, BlockLayout
from ..patterns.layouts import block_lists
from ..strategies.links import BlockSparseLinks

# Calls of ``forward`` / ``backward`` (tests read them to see that the kernels ran).
CALLS = {"forward": 0, "backward": 0}


@dataclass(frozen=True, eq=False)
class HeldRows:
    """What the kernels need to run one rank's queries: the layout (lists of the rank's query blocks only), the
    row of each of the N positions (``table``, int32; ``held`` for positions not held), and the row counts."""

    layout: BlockLayout
    table: Tensor
    queries: int   # S: rows 0..S-1 are the rank's queries (and their keys)
    held: int      # key rows held, the queries' own first; row ``held`` is the spare row
    in_order: bool  # row p holds position p for every position

    @property
    def order(self):
        """The kernels' index table, or None when the rows are the positions in order (a rank holding the whole
        sequence: no table to read)."""
        return None if self.in_order else self.table

    @property
    def rows(self) -> int:
        """Rows of every buffer the kernels read or write: the held rows, and the spare row unless every position
        is held."""
        return self.held + (self.held < self.layout.seq_len)


def _query_blocks(links: BlockSparseLinks, mine: Tensor) -> BlockLayout:
    """``links.layout`` with the lists of the query blocks not in ``mine`` (bool ``[nb]``) emptied."""
    lay = links.layout
    mine = mine.view(1, -1, 1)
    state = torch.where(mine, lay.state, EMPTY).to(lay.state.dtype)
    bits = torch.where(mine, links.bits, 0)
    kv_lists = block_lists(state, bits)
    q_lists = block_lists(state.transpose(1, 2), bits.transpose(1, 2))
    return BlockLayout(lay.seq_len, lay.block_size, lay.is_causal, state, lay.terms, *kv_lists, *q_lists, lay.coords,
                       lay.schedule, lay.checks)


def plan(links: BlockSparseLinks, q_pos: Tensor, other_pos: Tensor) -> HeldRows:
    """The rank's ``HeldRows``: queries at global positions ``q_pos`` (their keys held in the same rows), the other
    held keys at ``other_pos`` (distinct, none of ``q_pos``), in the order their rows are stored."""
    lay = links.layout
    mine = torch.zeros(lay.num_blocks, dtype=torch.bool, device=lay.state.device)
    mine[torch.unique(q_pos // lay.block_size).to(mine.device)] = True
    local = lay if bool(mine.all()) else _query_blocks(links, mine)
    pos = torch.cat([q_pos, other_pos.to(q_pos.device)]).to(lay.state.device)
    table = torch.full((lay.seq_len,), pos.numel(), dtype=torch.int32, device=pos.device)
    table[pos] = torch.arange(pos.numel(), dtype=torch.int32, device=pos.device)
    in_order = pos.numel() == lay.seq_len and bool((pos == torch.arange(pos.numel(), device=pos.device)).all())
    return HeldRows(local, table, q_pos.numel(), pos.numel(), in_order)


def kernel_reason(block_size: int, q: Tensor) -> str:
    """Why the kernels can't run this rank's block-sparse attention (the exact path of ``attend.py`` runs), or ''."""
    if interpreter_runs(q) and block_size in SUPPORTED_BLOCK_SIZES:
        return ""
    return kernel_unsupported_reason(q, block_size)


def use_kernels(block_size: int, q: Tensor) -> bool:
    """True when a rank's block-sparse attention runs the kernels (logged once on CUDA when not)."""
    return kernels_apply("sequence-parallel block-sparse attention", q, kernel_reason(block_size, q))


def with_rows(t: Tensor, rows: int) -> Tensor:
    """``t [B, H, n, D]`` (n <= rows) in a zeroed ``[B, H, rows, D]`` buffer (``t`` itself when n == rows)."""
    if t.shape[2] == rows:
        return t
    buf = t.new_zeros(t.shape[:2] + (rows,) + t.shape[3:])
    buf[:, :, :t.shape[2]] = t
    return buf


def _first_rows(t: Tensor, n: int) -> Tensor:
    """Rows ``:n`` of ``t`` along dim 2 (``t`` itself when it has no more)."""
    return t if t.shape[2] == n else t[:, :, :n]


def _whole_sequence(held: HeldRows) -> bool:
    """Whether the rank's queries and keys are the whole sequence in order (the only rank of a group): then it
    runs exactly the single-process op's kernels, the warp-specialised Hopper forward where that op runs it."""
    return held.in_order and held.queries == held.layout.seq_len


def _row_flags(key_keep: Optional[Tensor], rows: int) -> Optional[Tensor]:
    """Key padding of the held rows ``[B', n]`` (n <= rows) as the kernels read it, ``[B', rows]``: the rows past
    ``n`` (the spare row) dropped. None without key padding."""
    if key_keep is None or key_keep.shape[1] == rows:
        return key_keep
    return torch.cat((key_keep, key_keep.new_zeros(key_keep.shape[0], rows - key_keep.shape[1])), 1)


def forward(q: Tensor, k: Tensor, v: Tensor, held: HeldRows, scale: float,
            key_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Queries ``q [B, H, S, D]`` against the held keys ``k, v [B, Hkv, held or held.rows, D]`` (rows as ``held``
    orders them); ``key_keep``: optional bool ``[B or 1, held or held.rows]``, which of those rows' keys attend (key
    padding, by row as k). Returns ``out [B, H, S, D]`` (q's dtype) and ``lse [B, H, S]`` (float32; a query that
    keeps no key: out 0, lse -inf)."""
    CALLS["forward"] += 1
    lay, n = held.layout, held.rows
    if (_whole_sequence(held) and key_keep is None
            and not warp_specialised_reason(q, k, v, lay.kv_count, lay.block_size, lay.is_causal, None)):
        order = tile_order(lay.kv_count, lay.kv_count.shape[0], q.shape[0] * q.shape[1])
        return gluon.block_sparse_attn_fwd_ws(q, k, v, lay.kv_count, lay.kv_idx, order, scale)
    out, lse = block_sparse_attn_fwd(with_rows(q, n), with_rows(k, n), with_rows(v, n), lay.terms, lay.kv_count,
                                     lay.kv_idx, lay.kv_bits, lay.block_size, lay.is_causal, scale, lay.coords,
                                     lay.checks, order=held.order, key_keep=_row_flags(key_keep, n),
                                     seq_len=lay.seq_len)
    return _first_rows(out, held.queries), _first_rows(lse, held.queries)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, held: HeldRows,
             scale: float, key_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``forward`` (``key_keep`` as there): ``dq [B, H, S, D]`` (q's dtype) and ``dk, dv [B, Hkv,
    held.rows, D]``, the gradients of the held key rows from this rank's queries (the spare row, if any, and
    dropped keys zero)."""
    CALLS["backward"] += 1
    lay, n = held.layout, held.rows
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = block_sparse_attn_bwd(with_rows(dout.to(q.dtype), n), with_rows(q, n), with_rows(k, n),
                                       with_rows(v, n), None, with_rows(lse.float().unsqueeze(-1), n).squeeze(-1),
                                       *lay.tensors(), held.order, lay.checks, lay.block_size, lay.is_causal, scale,
                                       delta=with_rows(delta.unsqueeze(-1), n).squeeze(-1),
                                       key_keep=_row_flags(key_keep, n), seq_len=lay.seq_len)
    if held.rows > held.held:
        dk[:, :, held.held] = 0
        dv[:, :, held.held] = 0
    return _first_rows(dq, held.queries), dk, dv
