"""Block-sparse patterns: the named unions of terms users build (``local``, ``sliding_window``, ``dilated``,
``global_tokens``, ``random``, ``from_layout``, ``neighborhood``), combined with ``|`` (``union``: terms
concatenated) and ``&`` (``intersection``: terms paired), and compiled into block layouts (``build_layout``,
``Pattern.layout``).

This covers block-granular patterns (``local``, ``dilated``, ``random``, ``from_layout``), token-exact ones
(``sliding_window``, ``global_tokens``) and grid neighbourhoods (``neighborhood``). The terms' algebra is
``algebra``; the compilation into lists is ``layouts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..hilbert import check_grid
from .algebra import (FAR, GRID_AXES, MAX_TERMS, UNBOUNDED, DilatedBlocks, Grid, LayoutBlocks, LocalBlocks,
                      RandomBlocks, Term, _positive_int)
from .layouts import SCHEDULES, BlockLayout, layout_of_terms


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
    return layout_of_terms(pattern.terms, pattern.coordinates(seq_len, device), seq_len, block_size,
                           num_heads=num_heads, is_causal=is_causal, device=device, schedule=schedule)
