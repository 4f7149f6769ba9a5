"""Per-rank compute of sequence-parallel dilated attention with the Triton kernels: a rank's queries against the
window of key positions around them.

A branch with segment ``w`` links a query only to keys of the query's own segment. For a run of queries at
global positions ``[lo, hi)`` every such segment lies inside the window ``[a, e)``::

    W = lcm of the branches' segment lengths (clipped to N)
    a = floor(lo / W) * W        e = min(N, ceil(hi / W) * W)

``a`` is a multiple of every segment length, hence of every rate, so a position keeps its segment and its
residue class in window coordinates (``p - a``), and the single-process kernels run unchanged on the window:
the queries hold rows ``[lo - a, hi - a)`` of it (the kernels' ``q_offset``), the keys all of it.

The rank fills the window's K/V rows from what it holds: its own shard and the rows the sparse exchange (or the
ring) brought. Rows it does not hold stay zero; no query of the run links to them (the exchange sends every
linked row), so they never enter a softmax of these queries and their gradients come out zero.

Key padding (a model's padding mask) comes with the held keys, a flag per held key; the window's rows take the
flags of the positions they hold (``fill_key_keep``), the rows the rank doesn't hold are dropped.

Memory: the window buffer, ``(e - a)`` rows per kv head, ``<= S + 2 W`` for a contiguous shard of S rows; no
buffer at all when the window is exactly the run's own rows (a shard made of whole segments of every branch,
the usual case: then the shard sends and receives nothing either). A branch whose segment covers the whole
sequence makes the window the whole sequence: every rank then holds N rows of K and V, as LongNet's all-gather
of such a branch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..lowering.common.dispatch import interpreter_runs, kernels_apply
from ..lowering.dilated.op import gluon, warp_specialised_reason
from ..lowering.dilated.triton import MAX_BRANCHES, dilated_attn_bwd, dilated_attn_fwd, kernel_unsupported_reason
from ..strategies.dilated import Dilated


# Calls of ``forward`` / ``backward`` (tests read them to see that the kernels ran).
CALLS = {"forward": 0, "backward": 0}


@dataclass(frozen=True)
class Window:
    """One run of a rank's queries: its rows ``[row, row + hi - lo)`` of the local shard hold global positions
    ``[lo, hi)``; its keys are the global positions ``[a, e)``."""

    row: int
    lo: int
    hi: int
    a: int
    e: int

    @property
    def length(self) -> int:
        return self.e - self.a


def windows(span: int, seq_len: int, ranges) -> list[Window]:
    """The windows of a rank whose shard holds the global position ranges ``ranges`` (in storage order); ``span``:
    the strategy's ``key_window_span`` (for ``Dilated``, the lcm of the clipped segment lengths)."""
    out, row = [], 0
    for lo, hi in ranges:
        out.append(Window(row, lo, hi, lo // span * span, min(seq_len, -(-hi // span) * span)))
        row += hi - lo
    return out


def kernel_reason(strategy: Dilated, q: Tensor) -> str:
    """Why the window kernels can't run this call (the exact path of ``attend.py`` runs), or ''. Under
    ``TRITON_INTERPRET=1`` they run on CPU tensors too (float16 / float32), as the kernel tests run them."""
    if interpreter_runs(q) and strategy.num_branches <= MAX_BRANCHES:
        return ""
    return kernel_unsupported_reason(q, None, 0.0, strategy.num_branches)


def use_window_kernels(strategy: Dilated, q: Tensor) -> bool:
    """True when a rank's dilated attention (a strategy with a ``key_window_span``) runs the kernels on key windows
    (logged once on CUDA when not)."""
    return kernels_apply("sequence-parallel dilated attention", q, kernel_reason(strategy, q))


def _rows_in(win: Window, pos: Tensor) -> Tensor:
    """Window row of each key position (``pos [Hkv, K]``, -1 padding); ``win.length`` (a spare row) outside."""
    inside = (pos >= win.a) & (pos < win.e)
    return torch.where(inside, pos - win.a, win.length)


def _own_rows(win: Window, shard_len: int, pos: Tensor) -> bool:
    """True when the window is exactly this run's rows and the rank received nothing (``pos`` holds just the
    shard): the kernels then read the shard in place."""
    return win.a == win.lo and win.e == win.hi and pos.shape[1] == shard_len


def fill(win: Window, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """``k, v [B, Hkv, K, D]`` rows at global positions ``pos [Hkv, K]`` placed into a zeroed window: views
    ``[B, Hkv, length, D]`` of one buffer (with a spare row that collects what falls outside, never read)."""
    B, Hkv, _, D = k.shape
    buf = k.new_zeros(2, B, Hkv, win.length + 1, D)
    idx = _rows_in(win, pos).view(1, Hkv, -1, 1).expand(k.shape)
    buf[0].scatter_(2, idx, k)
    buf[1].scatter_(2, idx, v)
    return buf[0, :, :, :win.length], buf[1, :, :, :win.length]


def fill_key_keep(win: Window, key_keep: Tensor, pos: Tensor) -> Tensor:
    """Key padding of the held keys, ``key_keep [B', Hkv or 1, K]`` (keys at global positions ``pos [Hkv, K]``), as
    the flags of the window's rows ``[B', length]``. A position's flag is the same for every kv head that holds it;
    a row the rank doesn't hold is dropped (no query of the run links to it)."""
    Bk, (Hkv, K) = key_keep.shape[0], pos.shape
    flags = key_keep.expand(Bk, Hkv, K).reshape(Bk, Hkv * K).to(torch.uint8)   # uint8: scatter_reduce on any device
    rows = torch.zeros(Bk, win.length + 1, dtype=torch.uint8, device=key_keep.device)
    rows.scatter_reduce_(1, _rows_in(win, pos).reshape(1, -1).expand(Bk, -1), flags, "amax")
    return rows[:, :win.length].bool()


def _window_keys(win: Window, k: Tensor, v: Tensor, pos: Tensor, shard_len: int, key_keep: Optional[Tensor]):
    """``(k, v, key_keep, q_offset, own)`` for the kernels: the shard's rows (and flags) in place when the window
    is exactly the run (``own``), else a filled window buffer and its rows' flags."""
    if _own_rows(win, shard_len, pos):
        rows = slice(win.row, win.row + win.hi - win.lo)
        return k[:, :, rows], v[:, :, rows], None if key_keep is None else key_keep[:, 0, rows], 0, True
    kw, vw = fill(win, k, v, pos)
    keep = None if key_keep is None else fill_key_keep(win, key_keep, pos)
    return kw, vw, keep, win.lo - win.a, False


def forward(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, wins: list[Window], strategy: Dilated, is_causal: bool,
            scale: float, key_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Queries ``q [B, H, S, D]`` (runs ``wins``) against the keys the rank holds: ``k, v [B, Hkv, K, D]`` at
    global positions ``pos [Hkv, K]``; ``key_keep``: optional bool ``[B or 1, Hkv or 1, K]``, which of them attend
    (key padding). Returns ``out`` (q's dtype, output scale applied) and ``lse`` (float32; a query that keeps no
    key: out 0, lse -inf)."""
    CALLS["forward"] += 1
    outs, lses = [], []
    segments, rates = strategy.segment_lengths, strategy.dilation_rates
    for win in wins:
        kw, vw, keep, off, own = _window_keys(win, k, v, pos, q.shape[2], key_keep)
        qw = q[:, :, win.row:win.row + win.hi - win.lo]
        if own and keep is None and not warp_specialised_reason(qw, kw, vw, None, segments, rates, is_causal,
                                                                strategy.mixing, 0.0):
            # the run is a whole sequence of its own: the single-process op's warp-specialised Hopper forward
            o, l = gluon.dilated_attn_fwd_ws(qw, kw, vw, segments, rates, scale=scale)
        else:
            o, l = dilated_attn_fwd(qw, kw, vw, segments, rates, is_causal=is_causal, scale=scale,
                                    mixing=strategy.mixing, q_offset=off, key_keep=keep)
        outs.append(o)
        lses.append(l)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 2), torch.cat(lses, 2)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, out: Tensor, lse: Tensor,
             wins: list[Window], strategy: Dilated, is_causal: bool, scale: float,
             key_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``forward`` (``key_keep`` as there): ``dq [B, H, S, D]`` (q's dtype) and ``dk, dv [B, Hkv,
    K, D]``, the gradients of the held key rows from this rank's queries, in ``k``'s row order (dropped keys: 0)."""
    CALLS["backward"] += 1
    S = q.shape[2]
    if len(wins) == 1 and _own_rows(wins[0], S, pos):   # the kernels' own outputs, no accumulation buffers
        return dilated_attn_bwd(dout, q, k, v, out, lse, strategy.segment_lengths, strategy.dilation_rates,
                                is_causal=is_causal, scale=scale, mixing=strategy.mixing,
                                key_keep=None if key_keep is None else key_keep[:, 0])
    dqs = []
    dk_all = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_all = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for win in wins:
        rows = slice(win.row, win.row + win.hi - win.lo)
        kw, vw, keep, off, own = _window_keys(win, k, v, pos, S, key_keep)
        dq, dk, dv = dilated_attn_bwd(dout[:, :, rows], q[:, :, rows], kw, vw, out[:, :, rows], lse[:, :, rows],
                                      strategy.segment_lengths, strategy.dilation_rates, is_causal=is_causal,
                                      scale=scale, mixing=strategy.mixing, q_offset=off, key_keep=keep)
        dqs.append(dq)
        if own:
            dk_all[:, :, rows] += dk
            dv_all[:, :, rows] += dv
        else:
            idx = _rows_in(win, pos).view(1, *pos.shape, 1).expand(k.shape)
            for acc, g in ((dk_all, dk), (dv_all, dv)):
                g = torch.cat((g.float(), g.new_zeros(g.shape[:2] + (1, g.shape[3]), dtype=torch.float32)), 2)
                acc += torch.gather(g, 2, idx)                   # the spare row is zero
    return (dqs[0] if len(dqs) == 1 else torch.cat(dqs, 2)), dk_all, dv_all
