"""Block layouts: a pattern's terms compiled for one (N, block size, heads, causal) into the index lists the kernels
walk, by interval arithmetic on each block's ranges of ``p``, ``j``, ``p - j`` and (from each block's bounding box
of coordinates) ``c(p) - c(j)``, never by evaluating an N x N mask. Each block is *empty*, *full* (every token
pair allowed: the kernels skip masking) or *partial* (the kernels evaluate the terms whose bit is set for that
block, plus causality and the sequence end, token by token).

Causal masking (``is_causal``) is applied on top of any pattern: blocks above the diagonal are dropped,
diagonal blocks are partial. On a CUDA device the lists of patterns whose block sets depend on ``I - J`` only
are built by Triton kernels (``lowering.block_sparse.layout_triton``), equal to PyTorch's slot for slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..hilbert import curve_order, inverse
from ..lowering.block_sparse.layout_triton import build_lists
from .algebra import EMPTY, FULL, GRID_AXES, PARTIAL, UNBOUNDED, Term, partial_mask, term_checks, term_table


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A pattern compiled for one (N, block size, heads, causal): index lists the kernels walk.

    ``kv_idx[h, I, :kv_count[h, I, 1]]`` are the key blocks of query block ``I`` (the first
    ``kv_count[h, I, 0]`` partial, then full ones); ``kv_bits`` the term bits of each partial entry.
    ``q_idx``/``q_count``/``q_bits`` are the same lists transposed (query blocks of each key block), for the
    dK/dV pass. ``terms``: int32 ``[T, TERM_COLUMNS]`` intervals ``(d, p, j, g_0, g_1, g_2)`` (lo, hi each),
    row 0 always true. ``coords``: int32 ``[N, GRID_AXES]`` grid coordinates of each position (``[0, ...]``
    when no term uses them). ``state``: int8 ``[Hl, nb, nb]`` (0 empty, 1 partial, 2 full).
    ``schedule``: the order of each list inside its partial and full parts (see ``build_layout``).
    ``checks``: the columns of ``terms`` that some term bounds (``term_checks``; a compile-time constant of
    the kernels).
    """

    seq_len: int
    block_size: int
    is_causal: bool
    state: Tensor
    terms: Tensor
    kv_count: Tensor
    kv_idx: Tensor
    kv_bits: Tensor
    q_count: Tensor
    q_idx: Tensor
    q_bits: Tensor
    coords: Tensor
    schedule: str = "row"
    checks: Optional[int] = None

    def __post_init__(self):
        if self.checks is None:
            object.__setattr__(self, "checks", term_checks(self.terms))

    @property
    def num_heads(self) -> int:
        return self.state.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.state.shape[1]

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs computed."""
        return (self.state > 0).float().mean().item()

    def tensors(self) -> tuple:
        """The op's layout tensors, in order."""
        return (self.terms, self.kv_count, self.kv_idx, self.kv_bits, self.q_count, self.q_idx, self.q_bits,
                self.coords)

    def args(self, order: Optional[Tensor] = None) -> tuple:
        """The op's layout arguments, in order: the tensors, ``order`` (empty for the identity), ``checks``."""
        if order is None:
            order = torch.empty(0, dtype=torch.int32, device=self.terms.device)
        return self.tensors() + (order, self.checks)

    def to(self, device) -> "BlockLayout":
        moved = {name: getattr(self, name).to(device) for name in LAYOUT_TENSORS}
        return BlockLayout(self.seq_len, self.block_size, self.is_causal, schedule=self.schedule, checks=self.checks,
                           **moved)

    def token_mask(self) -> Tensor:
        """bool ``[Hl, N, N]`` expanded from the index lists (O(N^2), for tests)."""
        return expand_lists(self.terms, self.kv_count, self.kv_idx, self.kv_bits, self.seq_len, self.block_size,
                            self.is_causal, self.coords)


LAYOUT_TENSORS = ("state", "terms", "kv_count", "kv_idx", "kv_bits", "q_count", "q_idx", "q_bits", "coords")
SCHEDULES = ("row", "hilbert")


def _interval_state(lo_x: Tensor, hi_x: Tensor, iv: tuple):
    """For value ranges [lo_x, hi_x]: (possible, always) under the inclusive interval ``iv``."""
    if iv == UNBOUNDED:
        return None, None
    possible = (hi_x >= iv[0]) & (lo_x <= iv[1])
    always = (lo_x >= iv[0]) & (hi_x <= iv[1])
    return possible, always


def _block_boxes(coords: Tensor, nb: int, bs: int):
    """Per block: the min and max of its tokens' coordinates, ``[nb, GRID_AXES]`` each (O(N))."""
    N = coords.shape[0]
    c = coords.long()
    c = torch.cat([c, c[-1:].expand(nb * bs - N, GRID_AXES)]).view(nb, bs, GRID_AXES)   # pad with a real token
    return c.amin(1), c.amax(1)


def layout_of_terms(terms: Sequence[Term], coords: Tensor, seq_len: int, block_size: int, *, num_heads: int,
                    is_causal: bool, device, schedule: str) -> BlockLayout:
    """The layout of a union of ``terms`` (checked by ``pattern.build_layout``, which documents the arguments);
    ``coords``: the coordinate table of the ``seq_len`` positions (``[0, GRID_AXES]`` without a grid)."""
    N, bs = seq_len, block_size
    nb = -(-N // bs)
    table = term_table(terms)
    checks = term_checks(table)
    if _lists_on_gpu(terms, device, schedule):
        diag = _diagonals(terms, nb)
        table = table.to(device)
        lists = build_lists(table, None if diag is None else diag.to(device), N, bs, is_causal)
        return BlockLayout(N, bs, bool(is_causal), lists[0], table, *lists[1:], coords, schedule, checks)
    blk = torch.arange(nb, device=device, dtype=torch.int32)   # positions < INF = 2**30: int32 pairs
    lo = blk * bs
    hi = torch.clamp(lo + bs - 1, max=N - 1)
    p_lo, p_hi = lo.view(nb, 1), hi.view(nb, 1)
    j_lo, j_hi = lo.view(1, nb), hi.view(1, nb)
    d_lo, d_hi = p_lo - j_hi, p_hi - j_lo
    g_ranges = []
    if coords.shape[0]:
        c_min, c_max = _block_boxes(coords, nb, bs)
        lo_g = c_min.view(nb, 1, GRID_AXES) - c_max.view(1, nb, GRID_AXES)   # [nb, nb, axes] coordinate
        hi_g = c_max.view(nb, 1, GRID_AXES) - c_min.view(1, nb, GRID_AXES)   # differences' ranges per block pair
        g_ranges = [(lo_g[..., a], hi_g[..., a]) for a in range(GRID_AXES)]

    full = torch.zeros(1, nb, nb, dtype=torch.bool, device=device)
    bits = torch.zeros(1, nb, nb, dtype=torch.int32, device=device)
    for t_index, term in enumerate(terms, start=1):
        possible = torch.ones(1, nb, nb, dtype=torch.bool, device=device)
        always = torch.ones(1, nb, nb, dtype=torch.bool, device=device)
        ranges = [(d_lo, d_hi, term.d), (p_lo, p_hi, term.p), (j_lo, j_hi, term.j)]
        if term.uses_grid:
            ranges += [(g_lo, g_hi, iv) for (g_lo, g_hi), iv in zip(g_ranges, term.g)]
        for lo_x, hi_x, iv in ranges:
            pos, alw = _interval_state(lo_x, hi_x, iv)
            if pos is not None:
                possible = possible & pos
                always = always & alw
        for bset in term.blocks:
            possible = possible & bset.mask(nb, num_heads, device)
        full = full | (possible & always)
        bits = bits | ((possible & ~always).to(torch.int32) << t_index)
    # Blocks a full block must still mask token by token: the causal diagonal and the ragged end.
    edge = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    if is_causal:
        above = j_lo > p_hi
        full = full & ~above
        bits = torch.where(above, 0, bits)
        edge = edge | (j_hi > p_lo)
    if N % bs:
        edge[-1, :] = True
        edge[:, -1] = True
    demote = full & edge
    bits = torch.where(demote, bits | 1, bits)
    full = full & ~demote
    state = torch.where(full, FULL, torch.where(bits != 0, PARTIAL, EMPTY)).to(torch.int8)
    bits = torch.where(full, 0, bits)
    rank = _schedule_rank(schedule, nb, device)
    kv_count, kv_idx, kv_bits = block_lists(state, bits, rank)
    q_count, q_idx, q_bits = block_lists(state.transpose(1, 2), bits.transpose(1, 2),
                                         None if rank is None else rank.t())
    return BlockLayout(N, bs, bool(is_causal), state, table.to(device), kv_count, kv_idx, kv_bits,
                       q_count, q_idx, q_bits, coords, schedule, checks)


def _diagonals(terms: Sequence[Term], nb: int) -> Optional[Tensor]:
    """int8 ``[1 + len(terms), 2 nb - 1]`` (CPU): row ``t`` the block diagonals ``I - J`` (at ``I - J + nb - 1``)
    that term ``t``'s block sets allow; None when no term has block sets."""
    if not any(t.blocks for t in terms):
        return None
    delta = torch.arange(-(nb - 1), nb)
    rows = [torch.ones_like(delta, dtype=torch.bool)]
    for t in terms:
        on = torch.ones_like(delta, dtype=torch.bool)
        for bset in t.blocks:
            on &= bset.diagonal(delta)
        rows.append(on)
    return torch.stack(rows).to(torch.int8)


def _lists_on_gpu(terms: Sequence[Term], device, schedule: str) -> bool:
    """Whether a layout of ``terms`` is built by the list kernels (``lowering.block_sparse.layout_triton``): a
    CUDA device, outside a traced graph, the row schedule, no grid terms and block sets that depend on ``I - J``
    only."""
    if device is None or torch.device(device).type != "cuda" or schedule != "row" or torch.compiler.is_compiling():
        return False
    probe = torch.zeros(1, dtype=torch.long)
    return all(not t.uses_grid and all(b.diagonal(probe) is not None for b in t.blocks) for t in terms)


def _schedule_rank(schedule: str, nb: int, device) -> Optional[Tensor]:
    """``rank[I, J]``: visiting rank of block pair (I, J) inside a list (None: by block index)."""
    if schedule == "row":
        return None
    return inverse(curve_order((nb, nb))).view(nb, nb).to(device)


def block_lists(state: Tensor, bits: Tensor, rank: Optional[Tensor] = None):
    """Per row of ``state``: its non-empty columns, partial ones first, as int32 index lists; inside each part
    by column index, or by ``rank[row, col]`` when given. The list width is the longest row's (one host sync);
    slots past a row's count hold its empty columns in index order (never read by the kernels).

    By column index, each column's slot is a running count (partial: partials before it; full: all partials,
    then fulls before it; empty: all non-empty, then empties before it), so the lists come from three prefix
    sums and one scatter, with no sort (a segmented sort of the nb x nb pairs took 80% of the build)."""
    nb = state.shape[-1]
    part, full = state == PARTIAL, state == FULL
    n_partial = part.sum(-1, dtype=torch.int32)
    n_total = n_partial + full.sum(-1, dtype=torch.int32)
    width = max(int(n_total.max().item()), 1)
    if rank is None:                                      # [.., nb, nb] temporaries in int32: half the bytes
        col = torch.arange(nb, device=state.device, dtype=torch.int32)
        c_part, c_full = part.cumsum(-1, dtype=torch.int32), full.cumsum(-1, dtype=torch.int32)
        slot = torch.where(part, c_part, torch.where(full, n_partial.unsqueeze(-1) + c_full,
                                                     n_total.unsqueeze(-1) + (col + 1) - c_part - c_full)) - 1
        idx = torch.empty(state.shape[:-1] + (width + 1,), dtype=torch.int32, device=state.device)
        idx.scatter_(-1, slot.clamp_(max=width).long(), col.expand_as(slot))  # slots >= width: a spare column
        idx = idx[..., :width]
    else:
        kind = torch.where(part, 0, torch.where(full, 1, 2)).to(torch.int64)
        idx = (kind * nb * nb + rank.long()).argsort(dim=-1)[..., :width].to(torch.int32)
    count = torch.stack((n_partial, n_total), dim=-1).contiguous()
    return count, idx.contiguous(), bits.gather(-1, idx.long()).to(torch.int32).contiguous()


def expand_lists(terms, kv_count, kv_idx, kv_bits, seq_len: int, block_size: int, is_causal: bool,
                 coords: Optional[Tensor] = None) -> Tensor:
    hl, nb, _ = kv_idx.shape
    bs = block_size
    out = torch.zeros(hl, nb * bs, nb * bs, dtype=torch.bool, device=kv_idx.device)
    r = torch.arange(bs, device=kv_idx.device)
    for h in range(hl):
        for i in range(nb):
            n_part, n_tot = kv_count[h, i].tolist()
            p = (i * bs + r).view(-1, 1)
            for e in range(n_tot):
                jb = int(kv_idx[h, i, e])
                j = (jb * bs + r).view(1, -1)
                if e < n_part:
                    m = partial_mask(terms, kv_bits[h, i, e], p, j, coords) & (j < seq_len) & (p < seq_len)
                    if is_causal:
                        m = m & (j <= p)
                else:
                    m = torch.ones(bs, bs, dtype=torch.bool, device=kv_idx.device)
                out[h, i * bs:(i + 1) * bs, jb * bs:(jb + 1) * bs] = m
    return out[:, :seq_len, :seq_len]


def head_slice(layout: BlockLayout, start: int, stop: int) -> BlockLayout:
    """The layout of query heads ``start:stop`` (a layout shared by all heads is returned as is)."""
    if layout.num_heads == 1:
        return layout
    cut = {name: getattr(layout, name)[start:stop] for name in
           ("state", "kv_count", "kv_idx", "kv_bits", "q_count", "q_idx", "q_bits")}
    return BlockLayout(layout.seq_len, layout.block_size, layout.is_causal, terms=layout.terms,
                       coords=layout.coords, schedule=layout.schedule, checks=layout.checks, **cut)
