"""Block-sparse attention patterns and the block layouts built from them.

A pattern says which keys ``j`` a query ``p`` (of head ``h``) may attend. Every pattern is stored as a union
of *terms*; a term is a set of allowed ``(query block, key block)`` pairs (all pairs when the term has none)
intersected with integer intervals on ``p - j``, ``p``, ``j`` and, for grid patterns, on the difference of
the two tokens' grid coordinates along each axis (``c(p) - c(j)``, from the pattern's coordinate table)::

    allowed(h, p, j) = OR_t [ (p // bs, j // bs) in blocks_t(h)  and  d_lo <= p - j <= d_hi
                              and  p_lo <= p <= p_hi  and  j_lo <= j <= j_hi
                              and  g_lo[a] <= c(p)[a] - c(j)[a] <= g_hi[a] for each grid axis a ]

This covers block-granular patterns (``local``, ``dilated``, ``random``, ``from_layout``), token-exact
ones (``sliding_window``, ``global_tokens``) and grid neighbourhoods (``neighborhood``), and is closed under
``union`` (``|``: terms concatenated) and ``intersection`` (``&``: terms paired). A layout is built from the
terms by interval arithmetic on each block's ranges of ``p``, ``j``, ``p - j`` and (from each block's bounding
box of coordinates) ``c(p) - c(j)``, never by evaluating an N x N mask: each block is *empty*,
*full* (every token pair allowed: the kernels skip masking) or *partial* (the kernels evaluate the terms
whose bit is set for that block, plus causality and the sequence end, token by token).

Causal masking (``is_causal``) is applied on top of any pattern: blocks above the diagonal are dropped,
diagonal blocks are partial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

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


# --- terms and patterns -------------------------------------------------------------------------------------


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
        from .hilbert import coordinates

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


@dataclass(frozen=True, eq=False)
class Pattern:
    """A block-sparse attention pattern: a union of :class:`Term`. Combine with ``|`` and ``&``.

    ``grid``: where the tokens sit on a grid, for terms on coordinate differences (``neighborhood``).
    """

    terms: tuple
    name: str = field(default="pattern")
    grid: Optional[Grid] = None

    def __or__(self, other: "Pattern") -> "Pattern":
        return union(self, other)

    def __and__(self, other: "Pattern") -> "Pattern":
        return intersection(self, other)

    def __repr__(self) -> str:
        return self.name

    def layout(self, seq_len: int, block_size: int, *, num_heads: int = 1, is_causal: bool = False,
               device=None, schedule: str = "row") -> "BlockLayout":
        """The block layout for ``seq_len`` tokens in blocks of ``block_size``, in O(blocks)."""
        return build_layout(self, seq_len, block_size, num_heads=num_heads, is_causal=is_causal, device=device,
                            schedule=schedule)

    def coordinates(self, seq_len: int, device=None) -> Tensor:
        """int32 ``[seq_len, GRID_AXES]`` grid coordinates of each position (``[0, GRID_AXES]`` without a grid)."""
        if self.grid is None:
            return torch.zeros(0, GRID_AXES, dtype=torch.int32, device=device)
        return self.grid.table(seq_len, device)

    def reordered(self, grid: Grid) -> "Pattern":
        """The same pattern with its grid tokens placed as ``grid`` says (a ``Grid`` of the same shape)."""
        if self.grid is None:
            raise ValueError(f"pattern {self.name} has no grid to reorder")
        if grid.shape != self.grid.shape:
            raise ValueError(f"pattern {self.name} is on the grid {self.grid.shape}, not {grid.shape}")
        return Pattern(self.terms, self.name, grid)

    def token_mask(self, seq_len: int, block_size: int, *, num_heads: int = 1, is_causal: bool = False,
                   device=None) -> Tensor:
        """bool ``[Hl, N, N]`` from the definition, token by token: O(N^2), for tests and references."""
        nb = -(-seq_len // block_size)
        p = torch.arange(seq_len, device=device).view(1, -1, 1)
        j = torch.arange(seq_len, device=device).view(1, 1, -1)
        coords = self.coordinates(seq_len, device)
        out = torch.zeros(1, seq_len, seq_len, dtype=torch.bool, device=device)
        for t in self.terms:
            m = t.token_mask(p, j, coords)
            for bs in t.blocks:
                blocks = bs.mask(nb, num_heads, device)
                m = m & blocks.repeat_interleave(block_size, 1)[:, :seq_len].repeat_interleave(
                    block_size, 2)[:, :, :seq_len]
            out = out | m
        if is_causal:
            out = out & (j <= p)
        return out


def _pattern(name: str, *terms: Term, grid: Optional[Grid] = None) -> Pattern:
    terms = tuple(t for t in terms if not t.is_void())
    return Pattern(terms, name, grid if any(t.uses_grid for t in terms) else None)


def local(window_blocks: int) -> Pattern:
    """Query block ``I`` attends key blocks ``J`` with ``|I - J| < window_blocks`` (1: the block diagonal)."""
    _positive_int("window_blocks", window_blocks)
    return _pattern(f"local({window_blocks})", Term((LocalBlocks(window_blocks),)))


def sliding_window(window_tokens: int) -> Pattern:
    """Token-exact band: query ``p`` attends key ``j`` iff ``|p - j| < window_tokens``.

    With ``is_causal`` this is Mistral's sliding window: ``p - window_tokens < j <= p``.
    """
    _positive_int("window_tokens", window_tokens)
    w = window_tokens - 1
    return _pattern(f"sliding_window({window_tokens})", Term(d=(-w, w)))


def dilated(rates: Sequence[int]) -> Pattern:
    """Query block ``I`` attends key blocks ``I ± k * rate`` for every ``k >= 0`` and each rate in ``rates``."""
    if isinstance(rates, int):
        rates = (rates,)
    rates = tuple(rates)
    if not rates:
        raise ValueError("dilated: rates must be non-empty")
    for r in rates:
        _positive_int(f"dilated: each rate (rates={rates!r})", r)
    return _pattern(f"dilated({rates})", Term((DilatedBlocks(rates),)))


def global_tokens(n: int) -> Pattern:
    """The first ``n`` tokens are global: they attend every key and every query attends them."""
    _positive_int("n", n)
    return _pattern(f"global_tokens({n})", Term(p=(0, n - 1)), Term(j=(0, n - 1)))


def random(blocks_per_row: int, seed: int = 0, *, per_head: bool = False) -> Pattern:
    """``blocks_per_row`` distinct key blocks per query block, drawn with ``torch.Generator(seed)`` (BigBird's
    random attention). Deterministic for a given (seed, number of blocks, heads); ``per_head`` draws per head."""
    _positive_int("blocks_per_row", blocks_per_row)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return _pattern(f"random({blocks_per_row}, seed={seed})", Term((RandomBlocks(blocks_per_row, seed, per_head),)))


def from_layout(layout: Tensor) -> Pattern:
    """A given block layout: bool ``[nb, nb]`` or ``[Hl, nb, nb]`` (Hl: 1 or the number of query heads)."""
    if not isinstance(layout, Tensor) or layout.dtype != torch.bool:
        raise TypeError(f"layout must be a bool tensor [Hl, nb, nb], got {getattr(layout, 'dtype', type(layout))}")
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    if layout.dim() != 3 or layout.shape[1] != layout.shape[2]:
        raise ValueError(f"layout must have shape [nb, nb] or [Hl, nb, nb], got {tuple(layout.shape)}")
    return _pattern(f"from_layout({tuple(layout.shape)})", Term((LayoutBlocks(layout),)))


def neighborhood(grid: Sequence[int], radius) -> Pattern:
    """Grid neighbourhood attention: the last ``prod(grid)`` tokens are the cells of ``grid`` in row-major
    order, and a cell attends the cells at most ``radius`` away along every axis (``|dy| <= r and |dx| <= r``;
    ``radius`` is an int or one int per axis). Tokens before the grid (a CLS token) attend only themselves and
    no cell attends them: combine with ``global_tokens``. Inside ``dc.Hilbert`` the same mask runs in curve
    order."""
    from .hilbert import check_grid

    grid = check_grid(grid)
    radii = (radius,) * len(grid) if isinstance(radius, int) and not isinstance(radius, bool) else radius
    if not isinstance(radii, (tuple, list)) or len(radii) != len(grid) or any(
            isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < FAR for r in radii):
        raise ValueError(f"radius must be an int in [0, {FAR}) or one per axis of the grid {grid}, got {radius!r}")
    g = (UNBOUNDED,) * (GRID_AXES - len(grid)) + tuple((-r, r) for r in radii)
    name = f"neighborhood({'x'.join(map(str, grid))}, {radius})"
    return _pattern(name, Term(g=g), grid=Grid(grid))


def union(*patterns: Pattern) -> Pattern:
    """Keys allowed by any of ``patterns`` (one softmax over the union)."""
    grid = _check_patterns(patterns)
    return _pattern(" | ".join(p.name for p in patterns), *(t for p in patterns for t in p.terms), grid=grid)


def intersection(*patterns: Pattern) -> Pattern:
    """Keys allowed by all of ``patterns``."""
    grid = _check_patterns(patterns)
    terms = list(patterns[0].terms)
    for p in patterns[1:]:
        terms = [a & b for a in terms for b in p.terms]
    return _pattern(" & ".join(f"({p.name})" for p in patterns), *terms, grid=grid)


def _check_patterns(patterns) -> Optional[Grid]:
    """Checks the patterns; returns their common grid (patterns on different grids can't combine)."""
    if not patterns:
        raise ValueError("expected at least one pattern")
    grid = None
    for p in patterns:
        if not isinstance(p, Pattern):
            raise TypeError(f"expected dilate_compiler.patterns patterns, got {p!r}")
        if p.grid is not None:
            if grid is not None and not grid.same_as(p.grid):
                raise ValueError(f"patterns on different grids can't combine: {grid.shape} and {p.grid.shape} "
                                 f"(or the same shape in different token orders)")
            grid = p.grid
    return grid


# --- layouts ------------------------------------------------------------------------------------------------


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


def build_layout(pattern: Pattern, seq_len: int, block_size: int, *, num_heads: int = 1, is_causal: bool = False,
                 device=None, schedule: str = "row") -> BlockLayout:
    """Compile ``pattern`` into block lists in O(blocks) (plus O(N) for a grid pattern's coordinate boxes).

    ``schedule`` orders each query block's key blocks (and each key block's query blocks), inside the partial
    and the full part of its list: ``"row"`` by block index; ``"hilbert"`` by the position of the pair
    ``(I, J)`` on a Hilbert curve over the ``nb x nb`` block grid, so consecutive pairs a kernel visits are
    neighbours on that grid (a locality schedule for L2 reuse; results are equal up to rounding order).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a dilate_compiler.patterns pattern, got {pattern!r}")
    _positive_int("seq_len", seq_len)
    _positive_int("block_size", block_size)
    _positive_int("num_heads", num_heads)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if len(pattern.terms) > MAX_TERMS - 1:
        raise ValueError(f"pattern {pattern.name} has {len(pattern.terms)} terms; at most {MAX_TERMS - 1} "
                         f"are supported (intersections multiply terms)")
    N, bs = seq_len, block_size
    nb = -(-N // bs)
    table = term_table(pattern.terms)
    checks = term_checks(table)
    if _lists_on_gpu(pattern, device, schedule):
        diag = _diagonals(pattern.terms, nb)
        from .lowering.layout_triton import build_lists

        table = table.to(device)
        lists = build_lists(table, None if diag is None else diag.to(device), N, bs, is_causal)
        return BlockLayout(N, bs, bool(is_causal), lists[0], table, *lists[1:], pattern.coordinates(N, device),
                           schedule, checks)
    blk = torch.arange(nb, device=device, dtype=torch.int32)   # positions < INF = 2**30: int32 pairs
    lo = blk * bs
    hi = torch.clamp(lo + bs - 1, max=N - 1)
    p_lo, p_hi = lo.view(nb, 1), hi.view(nb, 1)
    j_lo, j_hi = lo.view(1, nb), hi.view(1, nb)
    d_lo, d_hi = p_lo - j_hi, p_hi - j_lo
    coords = pattern.coordinates(N, device)
    g_ranges = []
    if coords.shape[0]:
        c_min, c_max = _block_boxes(coords, nb, bs)
        lo_g = c_min.view(nb, 1, GRID_AXES) - c_max.view(1, nb, GRID_AXES)   # [nb, nb, axes] coordinate
        hi_g = c_max.view(nb, 1, GRID_AXES) - c_min.view(1, nb, GRID_AXES)   # differences' ranges per block pair
        g_ranges = [(lo_g[..., a], hi_g[..., a]) for a in range(GRID_AXES)]

    full = torch.zeros(1, nb, nb, dtype=torch.bool, device=device)
    bits = torch.zeros(1, nb, nb, dtype=torch.int32, device=device)
    for t_index, term in enumerate(pattern.terms, start=1):
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


def _lists_on_gpu(pattern: Pattern, device, schedule: str) -> bool:
    """Whether ``build_layout`` runs the list kernels (``lowering.layout_triton``): a CUDA device, outside a
    traced graph, the row schedule, no grid terms and block sets that depend on ``I - J`` only."""
    if device is None or torch.device(device).type != "cuda" or schedule != "row" or torch.compiler.is_compiling():
        return False
    probe = torch.zeros(1, dtype=torch.long)
    return all(not t.uses_grid and all(b.diagonal(probe) is not None for b in t.blocks) for t in pattern.terms)


def _schedule_rank(schedule: str, nb: int, device) -> Optional[Tensor]:
    """``rank[I, J]``: visiting rank of block pair (I, J) inside a list (None: by block index)."""
    if schedule == "row":
        return None
    from .hilbert import curve_order, inverse

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


__all__ = [
    "BlockLayout", "Grid", "Pattern", "Term", "block_lists", "build_layout", "dilated", "from_layout", "global_tokens",
    "intersection", "local", "neighborhood", "random", "sliding_window", "union",
]
