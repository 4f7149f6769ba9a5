"""The algebra block-sparse patterns are written in: terms, their block sets and intervals, grids, the term table,
and the token predicate the kernels and the exact path evaluate. Pure: it imports no kernel.

A pattern (``pattern.Pattern``) says which keys ``j`` a query ``p`` (of head ``h``) may attend, as a union of
*terms*; a term is a set of allowed ``(query block, key block)`` pairs (all pairs when the term has none)
intersected with integer intervals on ``p - j``, ``p``, ``j`` and, for grid patterns, on the difference of
the two tokens' grid coordinates along each axis (``c(p) - c(j)``, from the pattern's coordinate table)::

    allowed(h, p, j) = OR_t [ (p // bs, j // bs) in blocks_t(h)  and  d_lo <= p - j <= d_hi
                              and  p_lo <= p <= p_hi  and  j_lo <= j <= j_hi
                              and  g_lo[a] <= c(p)[a] - c(j)[a] <= g_hi[a] for each grid axis a ]

Terms intersect (``Term.__and__``: block sets joined, intervals met); a union of terms is their concatenation.
The term table (``term_table``) is how layouts and kernels carry the intervals: one int32 row of
``TERM_COLUMNS`` per term, row 0 always true; ``partial_mask`` evaluates it token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..hilbert import coordinates

# Interval bounds standing for "unbounded" (they fit int32, the kernels' index type).
INF = 2**30
UNBOUNDED = (-INF, INF)
MAX_TERMS = 31  # a partial block carries its terms as bits of an int32; bit 0 is the always-true term
GRID_AXES = 3    # coordinate columns of a grid pattern (a 2-D grid's cells leave the first one 0)
TERM_COLUMNS = 6 + 2 * GRID_AXES
# Coordinates of tokens outside the grid (e.g. a CLS token before it): token i sits at -FAR * (i + 1) on every
# axis, so no coordinate interval (|radius| < FAR) on any axis links it to another token (only to itself).
FAR = 1 << 20
MAX_EXTRA_TOKENS = 1000

EMPTY, PARTIAL, FULL = 0, 1, 2


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --- block sets: the block-granular part of a term ----------------------------------------------------------


class BlockSet:
    """A set of (query block, key block) pairs; ``mask`` returns bool ``[Hl, nb, nb]`` (Hl: 1 or num_heads)."""

    def mask(self, num_blocks: int, num_heads: int, device) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__}.mask")

    def diagonal(self, delta: Tensor) -> Optional[Tensor]:
        """bool, per block offset ``delta = I - J``: whether the set holds the pairs on that diagonal, when the
        set depends on ``I - J`` only; else None."""
        return None


def _block_grid(num_blocks: int, device):
    i = torch.arange(num_blocks, device=device).view(1, -1, 1)
    j = torch.arange(num_blocks, device=device).view(1, 1, -1)
    return i, j


@dataclass(frozen=True)
class LocalBlocks(BlockSet):
    window_blocks: int

    def mask(self, num_blocks, num_heads, device):
        i, j = _block_grid(num_blocks, device)
        return (i - j).abs() < self.window_blocks

    def diagonal(self, delta):
        return delta.abs() < self.window_blocks


@dataclass(frozen=True)
class DilatedBlocks(BlockSet):
    rates: tuple

    def mask(self, num_blocks, num_heads, device):
        i, j = _block_grid(num_blocks, device)
        m = torch.zeros(1, num_blocks, num_blocks, dtype=torch.bool, device=device)
        for r in self.rates:
            m |= (i - j) % r == 0
        return m

    def diagonal(self, delta):
        on = torch.zeros_like(delta, dtype=torch.bool)
        for r in self.rates:
            on |= delta % r == 0
        return on


@dataclass(frozen=True)
class RandomBlocks(BlockSet):
    blocks_per_row: int
    seed: int
    per_head: bool

    def mask(self, num_blocks, num_heads, device):
        heads = num_heads if self.per_head else 1
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        keys = torch.rand(heads, num_blocks, num_blocks, generator=gen)
        chosen = keys.argsort(dim=-1)[..., : min(self.blocks_per_row, num_blocks)]
        m = torch.zeros(heads, num_blocks, num_blocks, dtype=torch.bool)
        m.scatter_(-1, chosen, True)
        return m.to(device)


@dataclass(frozen=True, eq=False)
class LayoutBlocks(BlockSet):
    layout: Tensor  # bool [Hl, nb, nb]

    def mask(self, num_blocks, num_heads, device):
        hl, nb, nb2 = self.layout.shape
        if nb != num_blocks or nb2 != num_blocks:
            raise ValueError(
                f"from_layout: the layout has {nb} x {nb2} blocks but the sequence has {num_blocks} blocks "
                f"(ceil(N / block_size))")
        if hl not in (1, num_heads):
            raise ValueError(f"from_layout: the layout's head dim must be 1 or num_heads={num_heads}, got {hl}")
        return self.layout.to(device)


# --- terms ---------------------------------------------------------------------------------------------------


def _meet(a: tuple, b: tuple) -> tuple:
    return (max(a[0], b[0]), min(a[1], b[1]))


@dataclass(frozen=True)
class Term:
    """Block sets (all must hold; none = every block) and inclusive intervals on ``p - j``, ``p``, ``j`` and
    (``g``, one per grid axis) on ``c(p) - c(j)``."""

    blocks: tuple = ()
    d: tuple = UNBOUNDED
    p: tuple = UNBOUNDED
    j: tuple = UNBOUNDED
    g: tuple = (UNBOUNDED,) * GRID_AXES

    def __and__(self, other: "Term") -> "Term":
        return Term(self.blocks + other.blocks, _meet(self.d, other.d), _meet(self.p, other.p),
                    _meet(self.j, other.j), tuple(_meet(a, b) for a, b in zip(self.g, other.g)))

    def is_void(self) -> bool:
        return any(lo > hi for lo, hi in (self.d, self.p, self.j) + self.g)

    @property
    def uses_grid(self) -> bool:
        return any(iv != UNBOUNDED for iv in self.g)

    def token_mask(self, p: Tensor, j: Tensor, coords: Optional[Tensor] = None) -> Tensor:
        """``coords``: the coordinate table ``[N, GRID_AXES]`` (needed when the term uses the grid)."""
        d = p - j
        ok = ((d >= self.d[0]) & (d <= self.d[1]) & (p >= self.p[0]) & (p <= self.p[1])
              & (j >= self.j[0]) & (j <= self.j[1]))
        if self.uses_grid:
            for a, (lo, hi) in enumerate(self.g):
                if (lo, hi) != UNBOUNDED:
                    da = _coord(coords, p, a) - _coord(coords, j, a)
                    ok = ok & (da >= lo) & (da <= hi)
        return ok


def _coord(coords: Tensor, pos: Tensor, axis: int) -> Tensor:
    """Coordinate ``axis`` of positions ``pos`` (positions past the table, i.e. padding, read its last row)."""
    return coords[:, axis].to(pos.device)[pos.clamp(0, coords.shape[0] - 1)]


@dataclass(frozen=True, eq=False)
class Grid:
    """Where a pattern's tokens sit on a grid: the last ``prod(shape)`` of the sequence's tokens are grid cells,
    in the order ``order`` (``order[c]``: the row-major cell of the ``c``-th grid token; None: row-major); tokens
    before them are outside the grid (see ``FAR``)."""

    shape: tuple
    order: Optional[Tensor] = None

    @property
    def cells(self) -> int:
        return math.prod(self.shape)

    def same_as(self, other: "Grid") -> bool:
        if self.shape != other.shape:
            return False
        if self.order is None or other.order is None:
            return self.order is None and other.order is None
        return bool(torch.equal(self.order.cpu(), other.order.cpu()))

    def table(self, seq_len: int, device=None) -> Tensor:
        """int32 ``[seq_len, GRID_AXES]``: each position's coordinates."""
        extra = seq_len - self.cells
        if extra < 0 or extra > MAX_EXTRA_TOKENS:
            raise ValueError(f"a pattern on the grid {self.shape} ({self.cells} cells) needs seq_len between "
                             f"{self.cells} and {self.cells + MAX_EXTRA_TOKENS} (tokens outside the grid come "
                             f"first), got seq_len={seq_len}")
        cells = coordinates(self.shape)
        if self.order is not None:
            cells = cells[self.order.cpu()]
        out = torch.zeros(seq_len, GRID_AXES, dtype=torch.int64)
        out[extra:, GRID_AXES - len(self.shape):] = cells
        out[:extra, :] = -FAR * torch.arange(1, extra + 1).view(-1, 1)
        return out.to(torch.int32).to(device)


# --- the term table ----------------------------------------------------------------------------------------


def term_checks(terms: Tensor) -> int:
    """Bit ``c`` set when some row of the term table bounds column ``c`` (a lower or upper end of an interval).
    The kernels compile only those comparisons (a grid neighbourhood tests 4 of the 12)."""
    unbounded = torch.tensor(UNBOUNDED * (3 + GRID_AXES), dtype=terms.dtype)
    rows = terms.detach().cpu()
    if rows.ndim != 2 or rows.shape[0] == 0 or not torch.equal(rows[0], unbounded):
        raise ValueError(f"terms must be a table whose row 0 is the always-true row {unbounded.tolist()} "
                         f"(term_table; the kernels rely on it), got {rows[:1].tolist()}")
    used = (rows != unbounded).any(0).tolist()
    return sum(1 << c for c, u in enumerate(used) if u)


def term_table(terms: Sequence[Term], device=None) -> Tensor:
    """int32 ``[1 + len(terms), TERM_COLUMNS]``: row 0 always true, then each term's intervals."""
    rows = [UNBOUNDED * (3 + GRID_AXES)] + [t.d + t.p + t.j + sum(t.g, ()) for t in terms]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def partial_mask(terms: Tensor, bits: Tensor, p: Tensor, j: Tensor, coords: Optional[Tensor] = None) -> Tensor:
    """Token mask of partial blocks: OR over the terms whose bit is set. ``bits`` broadcasts against p, j;
    ``coords`` is the layout's coordinate table (read only by terms on grid coordinates)."""
    d = p - j
    ok = torch.zeros(torch.broadcast_shapes(bits.shape, p.shape, j.shape), dtype=torch.bool, device=p.device)
    for t in range(terms.shape[0]):
        row = [int(x) for x in terms[t].tolist()]
        dl, dh, pl, ph, jl, jh = row[:6]
        on = ((bits >> t) & 1).bool()
        term_ok = on & (d >= dl) & (d <= dh) & (p >= pl) & (p <= ph) & (j >= jl) & (j <= jh)
        for a in range(GRID_AXES):
            gl, gh = row[6 + 2 * a], row[7 + 2 * a]
            if (gl, gh) != UNBOUNDED:
                da = _coord(coords, p, a) - _coord(coords, j, a)
                term_ok = term_ok & (da >= gl) & (da <= gh)
        ok = ok | term_ok
    return ok
