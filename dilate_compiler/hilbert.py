"""Curve orders for 2-D and 3-D token grids: generalized Hilbert curves, Z-order, inverses and coordinates.

A grid is a tuple of sides, slowest first: ``(H, W)`` or ``(T, H, W)``; its tokens are numbered row-major
(``(t * H + y) * W + x``). ``curve_order(grid)[c]`` is the row-major position of the ``c``-th cell on the
curve, so ``x[..., curve_order(grid), :]`` puts a sequence into curve order and ``inverse(order)`` undoes it.

**Hilbert (``curve_order``).** Any side lengths, not only powers of two:

- 2-D: the generalized Hilbert ("gilbert") recursion: a rectangle splits in two along its long side when it
  is more than 1.5 times longer than wide, otherwise into three parts (first and last turned), with split
  sizes kept even so the parts join in unit steps. At the top level the major axis is chosen so that the
  start and end corners have the colours the grid's parity requires (a checkerboard argument: a path through
  all cells of an even-sized grid from ``(0, 0)`` to the end of an odd side cannot exist). With that choice
  every step is a unit step on every size (tested exhaustively up to 64 x 64 and by hypothesis beyond).
  Power-of-two squares met in the recursion are emitted at once with the classic bitwise Hilbert map.
- 3-D: the generalized recursion in 3-D (split in two along a long side, else into three or five turned
  parts), trying each assignment of axes to the curve's major/minor directions and keeping the first whose
  steps are all unit steps (always the case when every side is even). When none is (some grids with odd
  sides), the grid is walked as a stack of 2-D curves along its shortest axis, alternately forward and
  backward, which always steps in unit steps; each layer keeps 2-D Hilbert locality.

Work is vectorised (NumPy over each straight run and each power-of-two square); results are cached per grid.

**Z-order (``z_order``).** Morton order: cells sorted by the bit-interleaving of their coordinates. Cheaper
to reason about, not a unit-step walk (it jumps at every power-of-two boundary) and its locality is worse;
offered as a documented alternative.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_grid", "coordinates", "curve_order", "inverse", "z_order"]

CURVES = ("hilbert", "zorder")


def check_grid(grid, name: str = "grid") -> Tuple[int, ...]:
    """``grid`` as a tuple of 2 or 3 positive ints, or a ``ValueError`` naming it."""
    if isinstance(grid, torch.Size):
        grid = tuple(grid)
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3) or any(
            isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in grid):
        raise ValueError(f"{name} must be a tuple of 2 or 3 positive ints ((H, W) or (T, H, W)), got {grid!r}")
    return tuple(int(s) for s in grid)


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _hilbert_square(order: int) -> tuple:
    """Classic Hilbert curve on a ``2**order`` square, from ``(0, 0)`` to ``(2**order - 1, 0)``: (u, v)."""
    n = 1 << order
    t = np.arange(n * n, dtype=np.int64)
    u = np.zeros_like(t)
    v = np.zeros_like(t)
    s = 1
    while s < n:
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        swap = ry == 0
        flip = swap & (rx == 1)
        u = np.where(flip, s - 1 - u, u)
        v = np.where(flip, s - 1 - v, v)
        u, v = np.where(swap, v, u), np.where(swap, u, v)
        u = u + s * rx
        v = v + s * ry
        t //= 4
        s *= 2
    return u, v


def _walk2(out: list, x: int, y: int, ax: int, ay: int, bx: int, by: int) -> None:
    """Append (x, y) points of the curve over the rectangle spanned by (a, b) at (x, y), ending along a."""
    w, h = abs(ax + ay), abs(bx + by)
    dax, day, dbx, dby = _sign(ax), _sign(ay), _sign(bx), _sign(by)
    if h == 1 or w == 1:
        n, dx, dy = (w, dax, day) if h == 1 else (h, dbx, dby)
        i = np.arange(n, dtype=np.int64)
        out.append(np.stack([x + i * dx, y + i * dy], 1))
        return
    if w == h and w & (w - 1) == 0:
        u, v = _hilbert_square(w.bit_length() - 1)
        out.append(np.stack([x + u * dax + v * dbx, y + u * day + v * dby], 1))
        return
    ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
    if 2 * w > 3 * h:
        if abs(ax2 + ay2) % 2 and w > 2:
            ax2, ay2 = ax2 + dax, ay2 + day
        _walk2(out, x, y, ax2, ay2, bx, by)
        _walk2(out, x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
        return
    if abs(bx2 + by2) % 2 and h > 2:
        bx2, by2 = bx2 + dbx, by2 + dby
    _walk2(out, x, y, bx2, by2, ax2, ay2)
    _walk2(out, x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
    _walk2(out, x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), -bx2, -by2, -(ax - ax2), -(ay - ay2))


def _curve2(H: int, W: int) -> np.ndarray:
    """(x, y) points of the 2-D curve; the major axis is picked so the end corner has the right parity."""
    along_x = W >= H
    if W % 2 == 1 and H % 2 == 0:
        along_x = False   # an even count of cells can't end on the far corner of an odd side
    elif H % 2 == 1 and W % 2 == 0:
        along_x = True
    out: list = []
    if along_x:
        _walk2(out, 0, 0, W, 0, 0, H)
    else:
        _walk2(out, 0, 0, 0, H, W, 0)
    return np.concatenate(out)


def _vec(*parts):
    return tuple(sum(c) for c in zip(*parts))


def _neg(v):
    return tuple(-c for c in v)


def _walk3(out: list, p: tuple, a: tuple, b: tuple, c: tuple) -> None:
    """Append the straight runs of the curve over the box spanned by (a, b, c) at p, ending along a."""
    w, h, d = abs(sum(a)), abs(sum(b)), abs(sum(c))
    da, db, dc = (tuple(_sign(t) for t in v) for v in (a, b, c))
    lines = ((h == 1 and d == 1, w, da), (w == 1 and d == 1, h, db), (w == 1 and h == 1, d, dc))
    for is_line, n, step in lines:
        if is_line:
            out.append(p + step + (n,))
            return
    a2, b2, c2 = (tuple(t // 2 for t in v) for v in (a, b, c))
    if abs(sum(a2)) % 2 and w > 2:
        a2 = _vec(a2, da)
    if abs(sum(b2)) % 2 and h > 2:
        b2 = _vec(b2, db)
    if abs(sum(c2)) % 2 and d > 2:
        c2 = _vec(c2, dc)
    a_rest, b_rest, c_rest = _vec(a, _neg(a2)), _vec(b, _neg(b2)), _vec(c, _neg(c2))
    a_end = _vec(a, _neg(da))
    if 2 * w > 3 * h and 2 * w > 3 * d:
        _walk3(out, p, a2, b, c)
        _walk3(out, _vec(p, a2), a_rest, b, c)
    elif 3 * h > 4 * d:
        _walk3(out, p, b2, c, a2)
        _walk3(out, _vec(p, b2), a, b_rest, c)
        _walk3(out, _vec(p, a_end, b2, _neg(db)), _neg(b2), c, _neg(a_rest))
    elif 3 * d > 4 * h:
        _walk3(out, p, c2, a2, b)
        _walk3(out, _vec(p, c2), a, b, c_rest)
        _walk3(out, _vec(p, a_end, c2, _neg(dc)), _neg(c2), _neg(a_rest), b)
    else:
        _walk3(out, p, b2, c2, a2)
        _walk3(out, _vec(p, b2), c, a2, b_rest)
        _walk3(out, _vec(p, b2, _neg(db), c, _neg(dc)), a, _neg(b2), _neg(c_rest))
        _walk3(out, _vec(p, a_end, b2, c, _neg(dc)), _neg(c), _neg(a_rest), b_rest)
        _walk3(out, _vec(p, a_end, b2, _neg(db)), _neg(b2), c2, _neg(a_rest))


def _lines(runs: list) -> np.ndarray:
    """Points of straight runs ``(x, y, z, dx, dy, dz, n)``, vectorised."""
    runs = np.asarray(runs, dtype=np.int64)
    n = runs[:, 6]
    start = np.repeat(runs[:, 0:3], n, axis=0)
    step = np.repeat(runs[:, 3:6], n, axis=0)
    first = np.repeat(np.cumsum(n) - n, n)
    i = np.arange(int(n.sum()), dtype=np.int64) - first
    return start + step * i[:, None]


def _unit_steps(points: np.ndarray) -> bool:
    return len(points) < 2 or bool((np.abs(np.diff(points, axis=0)).sum(1) == 1).all())


def _curve3(T: int, H: int, W: int) -> np.ndarray:
    """(x, y, t) points of the 3-D curve (see the module docstring for the fallback)."""
    sides = (W, H, T)
    axes = sorted(range(3), key=lambda i: -sides[i])   # longest first: the recursion's natural start
    for perm in itertools.permutations(axes):
        if (W * H * T) % 2 == 0 and sides[perm[0]] % 2 == 1:
            continue   # parity: an even count of cells can't end on the far corner of an odd side
        spans = []
        for i in perm:
            v = [0, 0, 0]
            v[i] = sides[i]
            spans.append(tuple(v))
        runs: list = []
        _walk3(runs, (0, 0, 0), *spans)
        points = _lines(runs)
        if _unit_steps(points):
            return points
    # A stack of 2-D curves along the shortest axis, alternately forward and backward.
    short = min(range(3), key=lambda i: sides[i])
    plane = [i for i in (2, 1, 0) if i != short]          # slow-to-fast among the other two: (rows, cols)
    layer = _curve2(sides[plane[0]], sides[plane[1]])     # (col, row) points
    layers = []
    for s in range(sides[short]):
        pts = np.zeros((len(layer), 3), dtype=np.int64)
        pts[:, plane[1]] = layer[:, 0]
        pts[:, plane[0]] = layer[:, 1]
        pts[:, short] = s
        layers.append(pts if s % 2 == 0 else pts[::-1])
    return np.concatenate(layers)


@functools.lru_cache(maxsize=64)
def _hilbert_cached(grid: tuple) -> Tensor:
    if len(grid) == 2:
        H, W = grid
        pts = _curve2(H, W)
        idx = pts[:, 1] * W + pts[:, 0]
    else:
        T, H, W = grid
        pts = _curve3(T, H, W)
        idx = (pts[:, 2] * H + pts[:, 1]) * W + pts[:, 0]
    return torch.from_numpy(np.ascontiguousarray(idx))


@functools.lru_cache(maxsize=64)
def _zorder_cached(grid: tuple) -> Tensor:
    coords = coordinates(grid)                      # [n, A], slowest axis first
    bits = max(max(grid) - 1, 1).bit_length()
    code = torch.zeros(coords.shape[0], dtype=torch.int64)
    A = len(grid)
    for b in range(bits):
        for a in range(A):
            code |= ((coords[:, a] >> b) & 1) << (b * A + (A - 1 - a))
    return torch.argsort(code, stable=True)


def curve_order(grid: Sequence[int], curve: str = "hilbert") -> Tensor:
    """LongTensor permutation of the ``prod(grid)`` row-major positions along the curve (``"hilbert"`` or
    ``"zorder"``): ``order[c]`` is the row-major position of the ``c``-th cell visited."""
    grid = check_grid(grid)
    if curve == "hilbert":
        return _hilbert_cached(grid).clone()
    if curve == "zorder":
        return _zorder_cached(grid).clone()
    raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")


def z_order(grid: Sequence[int]) -> Tensor:
    """Z-order (Morton) permutation of the row-major positions of ``grid``; see ``curve_order``."""
    return curve_order(grid, "zorder")


def inverse(order: Tensor) -> Tensor:
    """The inverse permutation: ``inverse(order)[order[c]] == c``."""
    if not isinstance(order, Tensor) or order.dim() != 1 or order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"order must be a 1-D integer permutation tensor, got {order!r}")
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    return inv


def coordinates(grid: Sequence[int]) -> Tensor:
    """int64 ``[prod(grid), len(grid)]``: each row-major position's grid coordinates, slowest axis first."""
    grid = check_grid(grid)
    mesh = torch.meshgrid(*(torch.arange(s) for s in grid), indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], 1)
