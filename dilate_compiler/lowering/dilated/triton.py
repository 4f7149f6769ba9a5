"""Triton kernels for dilated attention: zero-copy strided tiles, all branches in one online softmax.

Specialisation: each kernel takes one description of the pattern, as constexprs: the tuples ``WS`` (segment
lengths) and ``RS`` (rates), indexed by branch, ``SS`` (where each branch's head group starts under
``mixing="head_groups"``, and where the last ends), ``L`` (the lcm of the rates), ``MIXING_LSE`` and ``GROUPED``
(head offsets ``h // ceil(H / R)``, torchscale's LongNet, instead of ``h % R``; per-branch blocks only); with
causality and the head dim, so Triton compiles one kernel per pattern; no source is generated. Up to
``MAX_BRANCHES`` branches.

Tiling (forward and dQ): a program owns ``BLOCK_M`` query rows of one residue class ``c`` (mod ``L``) of one
``(b, h)``: rows ``p = c + L * (t * BLOCK_M + i)``, a strided view loaded in place. A branch ``(W, R)``
selects the class iff ``c % R == offset(h)``; for each selecting branch the program walks the branch's keys in
the segments its rows touch, ``j = seg * W + offset + R * m`` (strided pointers, no gather), inside one online
softmax, so a key linked by two branches counts twice (LongNet's mixing) and the output and the log-sum-exp
are written once. The dK/dV kernel mirrors it: a program owns ``BLOCK_N`` keys of one class of one kv head
and loops over the query heads of its GQA group and their selecting branches.

Split-K (flash-decoding) in the forward: a program walks all of its rows' key tiles one after another, so a call
with few query rows (a decode step: ``Nq`` rows at the end of ``N`` keys, a handful of programs per head) leaves
the card with a few long serial loops. When the query tiles are short and the programs too few to fill the card
(``forward_splits``, ``choose_splits``), the grid gains a third axis of ``SPLITS`` programs per query tile: they
deal the program's key tiles round themselves, tile ``k`` of the program's loops (every branch block, walk,
partial tail tile and causal diagonal, after key-padding clipping) to split ``k % SPLITS`` (``_split_tiles``).
Each split writes its normalised partial output and base-2 log-sum-exp to an fp32 workspace (a split given no
linked key: lse ``-inf``), and ``_dilated_attn_fwd_combine_kernel`` merges them per row with their softmax masses.
``SPLITS == 1`` compiles the kernel without any of this; split calls run no walk-0 kernel, and dropout runs unsplit.

Log-sum-exps are kept in base 2 inside the kernels (``exp2``, ``common.primitives``); the op stores natural-log
LSE.

Dropout (constexpr ``DROPOUT``: 0 off, 1 on, 2 on with every branch's ``W / R`` a multiple of 4, so the
forward's and dQ's key tiles start on a group of 4): the keep flag of a (query, key) pair in one branch is
regenerated from the positions by ``_dropout_keep`` (counter-based Philox, one call per 4 keys of a query) in
the forward, dQ and dK/dV kernels alike; dropped pairs leave the normaliser unchanged and ``1 / (1 - p)`` rides
on ``out_scale``.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..common.dispatch import tensor_unsupported_reason
from ..common.autotune import autotune
from ..common.key_padding import clip_tiles, key_padding_args, key_range, keys_kept
from ..common.launch import (INTERPRET, autotune_configs, head_shape, launch_device, rows_addressable, rows_fit,
                             runner, softcap_args, tile_configs)
from ..common.primitives import LN2, LOG2E, score_scale, soft_cap, softmax_step, softmax_weights
from .plan import check_head_offsets, head_group_bounds, nested_order, offsets_coincide

MAX_BRANCHES = 8   # the kernels unroll one block (or walk) per branch; longer patterns run the exact path


def tile_space(kind: str) -> list:
    """Every tile configuration of the GPU autotuning space ``kind`` ("fwd", "walk0" or "bwd"), pinned or
    not."""
    if kind == "walk0":   # causal flash attention inside the shortest segment: the key tile divides the row tile
        space = ((128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3, 128), (128, 128, 8, 3),
                 (64, 64, 4, 3), (128, 32, 4, 4))
    elif kind == "fwd":
        space = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3, 128), (128, 128, 8, 2), (128, 128, 4, 3),
                 (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 4), (128, 32, 8, 4, 128))
    else:   # the last two: long-resident tiles against short, deeply pipelined ones (dQ: 128 rows x 32 keys;
        # dK/dV: 128 keys x 32 queries), the split of Triton's fused-attention backward
        space = ((64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3),
                 (128, 32, 4, 5), (32, 128, 4, 5))
    return tile_configs(space)


_KEY = ["N", "HEAD_DIM", "L", "IS_CAUSAL", "MIXING_LSE", "GQA", "DROPOUT", "WALKS", "WS", "RS", "KEY_MASK", "GROUPED",
        "SOFTCAP"]
_KEY_WALK0 = ["N", "HEAD_DIM", "L", "GQA", "WS", "RS", "KEY_MASK", "SOFTCAP"]


@triton.jit
def _branch_offset(h, BRANCH: tl.constexpr, R: tl.constexpr, HG_START: tl.constexpr, HG_STOP: tl.constexpr,
                   MIXING_LSE: tl.constexpr, c, H, GROUPED: tl.constexpr):
    """(offset, selected) of a branch for head h of H and residue class c. Under LSE mixing the offset is h % R, or
    with GROUPED h // ceil(H / R) (contiguous head groups)."""
    if MIXING_LSE:
        if GROUPED:
            o = h // ((H + R - 1) // R)
        else:
            o = h % R
        sel = (c % R) == o
    else:
        o = BRANCH % R
        sel = ((c % R) == o) & (h >= HG_START) & (h < HG_STOP)
    return o, sel


@triton.jit
def _dropout_keep(seed, p, u, stream, drop_thr):
    """Dropout keep flags of the (query ``p``, key) pairs (broadcast) in one stream (``(b * H + h) *
    NUM_BRANCHES + branch``). ``u = j // R`` is the key's index in its branch's residue class. One
    Philox-4x32-10 call keyed by ``seed`` on the counter ``(p, u // 4, stream, 0)`` gives four words, one per key
    ``u`` of the group (word ``u % 4``); a pair is kept when the word's top 31 bits are ``>= drop_thr``
    (``round(dropout_p * 2**31)``). The flags are a function of the positions alone, so the forward and both
    backward kernels regenerate the same ones. This form evaluates one call per pair (the dK/dV tiling)."""
    pp = p + u * 0
    uu = u + p * 0
    zero = pp * 0
    r0, r1, r2, r3 = tl.philox(seed, pp, uu >> 2, zero + stream, zero)
    w = uu & 3
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return (r >> 1).to(tl.int32, bitcast=True) >= drop_thr


@triton.jit
def _dropout_keep_rows(seed, p, u0, stream, drop_thr, BLOCK_N: tl.constexpr):
    """``_dropout_keep`` for query rows ``p`` against the keys ``u0 .. u0 + BLOCK_N - 1`` of a branch, ``u0`` a
    multiple of 4 (the forward's and dQ's key tiles): one Philox call per four pairs, its words interleaved."""
    g = u0 // 4 + tl.arange(0, BLOCK_N // 4)
    pp = p[:, None] + g[None, :] * 0
    gg = g[None, :] + p[:, None] * 0
    zero = pp * 0
    r0, r1, r2, r3 = tl.philox(seed, pp, gg, zero + stream, zero)
    # [BLOCK_M, BLOCK_N // 4, 2, 2] with word 2a + b at [.., a, b] -> row-major [BLOCK_M, BLOCK_N]: word u % 4
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (p.shape[0], BLOCK_N))
    return (r >> 1).to(tl.int32, bitcast=True) >= drop_thr


@triton.jit
def _keep_tile(seed, p, j, j0, start, stream, drop_thr, R: tl.constexpr, BLOCK_N: tl.constexpr,
               DROPOUT: tl.constexpr):
    """Keep flags ``[BLOCK_M, BLOCK_N]`` of a forward / dQ tile (keys ``j = j0 + R * (start + arange)``);
    ``DROPOUT == 2``: the tile's first key index is a multiple of 4 (grouped Philox)."""
    if DROPOUT == 2:
        keep = _dropout_keep_rows(seed, p, j0 // R + start, stream, drop_thr, BLOCK_N)
    else:
        keep = _dropout_keep(seed, p[:, None], (j // R)[None, :], stream, drop_thr)
    return keep


@triton.jit
def _query_tile(i_tile, Q_LO, N_Q, L: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query rows of a forward / dQ program: ``BLOCK_M`` positions ``p`` of residue class ``c`` (mod ``L``)
    among the queries at positions ``[Q_LO, Q_LO + N_Q)`` of the key sequence (q holds those rows only, row
    ``p - Q_LO``). Returns ``c, p, row_ok, p_first, p_last`` and the number of rows left (``<= 0``: none)."""
    c = i_tile % L
    t = i_tile // L
    i_lo = tl.cdiv(tl.maximum(Q_LO - c, 0), L)                          # first row of class c at or after Q_LO
    i_hi = tl.cdiv(tl.maximum(Q_LO + N_Q - c, 0), L)
    i_first = i_lo + t * BLOCK_M
    i_row = i_first + tl.arange(0, BLOCK_M)
    p = c + i_row * L                                                   # query positions: a strided view
    p_last = c + (tl.minimum(i_hi, i_first + BLOCK_M) - 1) * L
    return c, p, i_row < i_hi, c + i_first * L, p_last, i_hi - i_first


@triton.jit
def _split_tiles(lo, hi, split, turn, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Split-K: where split ``split`` of ``SPLITS`` starts in the tiles ``[lo, hi)`` (tiles at ``lo + k * BLOCK``;
    it then takes every ``SPLITS``-th), and the program's tile count past them. ``turn`` counts the tiles of the
    program's loops before this one: tile ``k`` is the program's tile ``turn + k`` and goes to split ``(turn + k) %
    SPLITS``, so each tile of every loop goes to exactly one split, dealt round the splits in turn across loops.
    ``SPLITS == 1``: ``(lo, turn)``."""
    if SPLITS > 1:
        first = lo + (split + SPLITS - turn % SPLITS) % SPLITS * BLOCK
        turn = turn + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK)
    else:
        first = lo
    return first, turn


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, p, k_base, v_base, stride_kn, j0, lo, hi, n_keys, qk_scale,
               W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, seed, drop_thr, stream, DROPOUT: tl.constexpr,
               keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr,
               split, turn, SPLITS: tl.constexpr):
    """Key blocks ``[lo, hi)`` of one branch; ``MASK`` only on boundary blocks (segment edges, causal diagonal).
    Dropout zeroes dropped pairs in ``P @ V`` only (the normaliser keeps them; ``1 / (1 - p)`` is in out_scale).
    ``KEY_MASK``: key padding (``common.key_padding``): tiles of dropped keys only are skipped, the others masked.
    ``SPLITS > 1``: split ``split``'s share of the blocks (``_split_tiles``); returns the program's tile count
    ``turn`` past these blocks."""
    offs_d = tl.arange(0, HEAD_DIM)
    if KEY_MASK:
        lo, hi = clip_tiles(lo, hi, j0, R, kv_lo, kv_hi, BLOCK_N)
    first, turn = _split_tiles(lo, hi, split, turn, SPLITS, BLOCK_N)
    for start in range(first, hi, SPLITS * BLOCK_N):
        m = start + tl.arange(0, BLOCK_N)
        j = j0 + m * R                                                   # key positions: a strided view
        if MASK:
            k_ok = m < n_keys
            k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)).to(tl.float32)          # [BLOCK_M, BLOCK_N], raw: see softmax_weights
        s_scale = qk_scale
        if SOFTCAP:     # capped before the masks, in base 2: scaled already
            s, _ = soft_cap(s * qk_scale, softcap)
            s_scale = 1.0
        if MASK:
            ok = k_ok[None, :] & ((j[None, :] // W) == (p[:, None] // W))
            if IS_CAUSAL:
                ok = ok & (j[None, :] <= p[:, None])
            s = tl.where(ok, s, float("-inf"))
        if KEY_MASK:
            s = tl.where(keys_kept(keep_base, j, kv_lo, kv_hi, holes)[None, :], s, float("-inf"))
        m_new, alpha, pr = softmax_weights(m_i, s, s_scale, MASK or KEY_MASK)
        l_i = l_i * alpha + tl.sum(pr, 1)
        if DROPOUT:
            pr = tl.where(_keep_tile(seed, p, j, j0, start, stream, drop_thr, R, BLOCK_N, DROPOUT), pr, 0.0)
        acc = tl.dot(pr.to(v.dtype), v, acc * alpha[:, None])           # [BLOCK_M, HEAD_DIM]
        m_i = m_new
    return acc, m_i, l_i, turn


@triton.jit
def _key_range(p_first, p_last, o, N, W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """For query rows in ``[p_first, p_last]`` and a branch: first key position, key count, and how many
    leading keys (a multiple of BLOCK_N) are linked to every row, so need no mask."""
    seg_lo = p_first // W
    seg_hi = p_last // W
    j0 = seg_lo * W + o
    j_end = tl.minimum((seg_hi + 1) * W, N)
    if IS_CAUSAL:
        j_end = tl.minimum(j_end, p_last + 1)
    n_keys = tl.cdiv(tl.maximum(j_end - j0, 0), R)
    n_all = n_keys
    if IS_CAUSAL:
        n_all = tl.minimum(n_keys, tl.maximum(p_first - j0, -1) // R + 1)
    n_full = tl.where(seg_lo == seg_hi, n_all // BLOCK_N * BLOCK_N, 0)
    return j0, n_keys, n_full


@triton.jit
def _fwd_branch(acc, m_i, l_i, q, p, p_first, p_last, k_base, v_base, stride_kn, o, N, qk_scale,
                W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, seed, drop_thr, stream, DROPOUT: tl.constexpr,
                keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr,
                split, turn, SPLITS: tl.constexpr):
    """Online softmax over one branch's keys for the query rows ``p`` (scores in base 2)."""
    j0, n_keys, n_full = _key_range(p_first, p_last, o, N, W, R, IS_CAUSAL, BLOCK_N)
    acc, m_i, l_i, turn = _fwd_inner(acc, m_i, l_i, q, p, k_base, v_base, stride_kn, j0, 0, n_full, n_keys, qk_scale,
                                     W, R, IS_CAUSAL, False, BLOCK_N, HEAD_DIM, seed, drop_thr, stream, DROPOUT,
                                     keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP, split, turn, SPLITS)
    acc, m_i, l_i, turn = _fwd_inner(acc, m_i, l_i, q, p, k_base, v_base, stride_kn, j0, n_full, n_keys, n_keys,
                                     qk_scale, W, R, IS_CAUSAL, True, BLOCK_N, HEAD_DIM, seed, drop_thr, stream,
                                     DROPOUT, keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP, split, turn,
                                     SPLITS)
    return acc, m_i, l_i, turn


# --- nested patterns: every distinct (query, key) pair once, weighted by how many branches link it ---------
#
# Under mixing="lse" a pair linked by m branches counts m times in one softmax (DESIGN.md §2), so a kernel may
# visit it once and add log2(m) to its score instead of visiting it m times. When the branches, sorted by
# segment length, form a chain (each segment length and each rate divides the next; the launcher sorts them,
# ``plan.nested_order``), the branches that select a residue class are a prefix 0..B_c-1, and a program
# whose rows lie inside one segment of the shortest branch (hence one of every branch) splits its keys into
# walks: walk B visits the keys of branch B (offset h % R_B, stride R_B) inside B's segment but outside branch
# B-1's, so each linked key is visited exactly once, by the walk of the shortest branch that links it. Its
# multiplicity is 1 + the number of longer branches i selecting both ends (R_i divides j - h and c - h).
# Config A (segments 2K..16K, rates 1..8): 2,944 keys per query on average instead of 3,840. Programs whose
# rows span segments, dropout (one keep flag per branch and pair) and head_groups mixing walk per branch. The
# multiplicity vector is computed once per walk (``_fwd_run``); which paths a kernel compiles is the constexpr
# ``WALKS`` (``walks``).


@triton.jit
def _walk_log2_mult(x, y, B: tl.constexpr, NUM_BRANCHES: tl.constexpr, RS: tl.constexpr):
    """log2 of the multiplicity of the pairs of walk ``B``: ``x`` = the walked positions minus h (a vector),
    ``y`` = the program's residue class minus h; branch ``i > B`` (rate ``RS[i]``) counts when its rate divides
    both."""
    n = (x * 0 + 1).to(tl.float32)
    for i in tl.static_range(B + 1, NUM_BRANCHES):
        n += (((x % RS[i]) == 0) & ((y % RS[i]) == 0)).to(tl.float32)
    return tl.log2(n)


@triton.jit
def _walk_split(x0, lo, hi, valid_hi, h, y, B: tl.constexpr, R: tl.constexpr, NUM_BRANCHES: tl.constexpr,
                RS: tl.constexpr, BLOCK: tl.constexpr):
    """For the tiles ``[lo, hi)`` of a walk over positions ``x0 + R * m`` (``hi <= valid_hi``): the log2
    multiplicities of a tile's positions and where the whole tiles end (the partial one follows). A position's
    multiplicity depends on its index mod L / R, and BLOCK is a multiple of L, so one vector, computed once per
    run, serves every tile (computed per tile it doubled the kernel's time)."""
    lm = _walk_log2_mult(x0 + (lo + tl.arange(0, BLOCK)) * R - h, y, B, NUM_BRANCHES, RS)
    whole = lo + tl.maximum(tl.minimum(hi, valid_hi) - lo, 0) // BLOCK * BLOCK
    return lm, whole


@triton.jit
def _one_segment(first, last, W0: tl.constexpr, WALKS: tl.constexpr, WALKED: tl.constexpr, L: tl.constexpr):
    """Whether a program whose rows are positions ``first..last`` walks (see ``walks``): always (2), when the
    rows share a segment of the shortest branch and the walked tile ``WALKED`` is a multiple of L (1), never
    (0)."""
    if WALKS == 2:
        same = first == first
    elif WALKS == 1 and (WALKED % L == 0):
        same = (first // W0) == (last // W0)
    else:
        same = first != first
    return same


@triton.jit
def _walk_keys(p_first, p_last, o, N, B: tl.constexpr, WS: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Walk ``B``'s keys ``j0 + R * m`` for query rows ``[p_first, p_last]`` inside one segment of every branch:
    ``[0, a_hi)`` lie before branch B-1's segment, ``[b_lo, b_hi)`` after it (or, for B == 0, the whole
    segment) and need no row mask; ``[b_hi, n_keys)`` is the causal diagonal (masked per pair)."""
    W: tl.constexpr = WS[B]
    seg = p_first // W
    j0 = seg * W + o
    j_end = tl.minimum(seg * W + W, N)
    if IS_CAUSAL:
        j_end = tl.minimum(j_end, p_last + 1)
    n_keys = tl.cdiv(tl.maximum(j_end - j0, 0), R)
    if B == 0:
        a_hi = n_keys * 0
        b_lo = n_keys * 0
        if IS_CAUSAL:
            b_hi = tl.minimum(n_keys, (p_first - j0) // R + 1) // BLOCK_N * BLOCK_N
        else:
            b_hi = n_keys
    else:
        W_PREV: tl.constexpr = WS[B - 1]
        hole = p_first // W_PREV * W_PREV
        a_hi = tl.cdiv(hole - j0, R)
        if IS_CAUSAL:                                                   # keys after the hole are all > p_last
            b_lo = n_keys
            b_hi = n_keys
        else:
            b_lo = tl.cdiv(hole + W_PREV - j0, R)
            b_hi = n_keys
    return j0, a_hi, b_lo, b_hi, n_keys


@triton.jit
def _walk_key_tile(q, k_base, v_base, stride_kn, j0, start, valid_hi, lm, qk_scale, R: tl.constexpr,
                   TAIL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi,
                   holes, KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """The key tile at ``start`` of a walk (keys ``j0 + R * m``): positions, K, V and the scores in base 2 with
    the keys' log2 multiplicities ``lm`` added (``SOFTCAP``: capped first), and the cap's derivative (1.0
    without). ``TAIL``: the last, partial tile, whose keys ``>= valid_hi`` are
    read at the last valid one and weigh 0."""
    m = start + tl.arange(0, BLOCK_N)
    if TAIL:
        j = j0 + tl.minimum(m, valid_hi - 1) * R
        lmt = tl.where(m < valid_hi, lm, float("-inf"))
    else:
        j = j0 + m * R
        lmt = lm
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :])
    v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :])
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
    dcap = 1.0
    if SOFTCAP:
        s, dcap = soft_cap(s, softcap)
    s = s + lmt[None, :]
    if KEY_MASK:
        s = tl.where(keys_kept(keep_base, j, kv_lo, kv_hi, holes)[None, :], s, float("-inf"))
    return j, k, v, s, dcap


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, p, k_base, v_base, stride_kn, j0, lo, hi, valid_hi, lm, qk_scale, R: tl.constexpr,
               MASK: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, keep_base,
               kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr, split, turn,
               SPLITS: tl.constexpr):
    """Key tiles ``[lo, hi)`` of a walk (``_walk_key_tile``); ``MASK``: the causal diagonal. ``SPLITS > 1``:
    split ``split``'s share of them (``_split_tiles``); returns the program's tile count ``turn`` past them."""
    first, turn = _split_tiles(lo, hi, split, turn, SPLITS, BLOCK_N)
    for start in range(first, hi, SPLITS * BLOCK_N):
        j, k, v, s, dcap = _walk_key_tile(q, k_base, v_base, stride_kn, j0, start, valid_hi, lm, qk_scale, R, TAIL,
                                    BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
        if MASK:
            s = tl.where(j[None, :] <= p[:, None], s, float("-inf"))
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, 1.0, v, MASK or KEY_MASK)
    return acc, m_i, l_i, turn


@triton.jit
def _fwd_run(acc, m_i, l_i, q, p, h, y, k_base, v_base, stride_kn, j0, lo, hi, valid_hi, qk_scale,
             B: tl.constexpr, R: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             NUM_BRANCHES: tl.constexpr, RS: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
             softcap, SOFTCAP: tl.constexpr, split, turn, SPLITS: tl.constexpr):
    """Key tiles ``[lo, hi)`` of a walk (``hi <= valid_hi``): whole tiles, then the partial one."""
    if KEY_MASK:
        lo, hi = clip_tiles(lo, hi, j0, R, kv_lo, kv_hi, BLOCK_N)
    lm, whole = _walk_split(j0, lo, hi, valid_hi, h, y, B, R, NUM_BRANCHES, RS, BLOCK_N)
    acc, m_i, l_i, turn = _fwd_tiles(acc, m_i, l_i, q, p, k_base, v_base, stride_kn, j0, lo, whole, valid_hi, lm,
                                     qk_scale, R, MASK, False, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes,
                                     KEY_MASK, softcap, SOFTCAP, split, turn, SPLITS)
    acc, m_i, l_i, turn = _fwd_tiles(acc, m_i, l_i, q, p, k_base, v_base, stride_kn, j0, whole, hi, valid_hi, lm,
                                     qk_scale, R, MASK, True, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes,
                                     KEY_MASK, softcap, SOFTCAP, split, turn, SPLITS)
    return acc, m_i, l_i, turn


@triton.jit
def _fwd_walk(acc, m_i, l_i, q, p, p_first, p_last, h, c, k_base, v_base, stride_kn, N, qk_scale,
              B: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
              softcap, SOFTCAP: tl.constexpr, split, turn, SPLITS: tl.constexpr):
    """Walk ``B`` of a forward program (see the section comment), if branch ``B`` selects class ``c``."""
    R: tl.constexpr = RS[B]
    NUM_BRANCHES: tl.constexpr = len(RS)
    if (c % R) == (h % R):
        j0, a_hi, b_lo, b_hi, n_keys = _walk_keys(p_first, p_last, h % R, N, B, WS, R, IS_CAUSAL, BLOCK_N)
        y = c - h
        if B > 0:
            acc, m_i, l_i, turn = _fwd_run(acc, m_i, l_i, q, p, h, y, k_base, v_base, stride_kn, j0, 0, a_hi, a_hi,
                                           qk_scale, B, R, False, BLOCK_N, HEAD_DIM, NUM_BRANCHES, RS, keep_base,
                                           kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP, split, turn, SPLITS)
        acc, m_i, l_i, turn = _fwd_run(acc, m_i, l_i, q, p, h, y, k_base, v_base, stride_kn, j0, b_lo, b_hi, n_keys,
                                       qk_scale, B, R, False, BLOCK_N, HEAD_DIM, NUM_BRANCHES, RS, keep_base, kv_lo,
                                       kv_hi, holes, KEY_MASK, softcap, SOFTCAP, split, turn, SPLITS)
        if IS_CAUSAL and B == 0:
            acc, m_i, l_i, turn = _fwd_run(acc, m_i, l_i, q, p, h, y, k_base, v_base, stride_kn, j0, b_hi, n_keys,
                                           n_keys, qk_scale, B, R, True, BLOCK_N, HEAD_DIM, NUM_BRANCHES, RS,
                                           keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP, split, turn,
                                           SPLITS)
    return acc, m_i, l_i, turn


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, p, k_base, v_base, stride_kn, j0, lo, hi, valid_hi, lm, qk_scale, out_scale,
              R: tl.constexpr, MASK: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
              softcap, SOFTCAP: tl.constexpr):
    """dQ over key tiles ``[lo, hi)`` of a walk (as ``_fwd_tiles``): P = m * exp2(S - LSE), dS = P * (dP - delta)."""
    for start in range(lo, hi, BLOCK_N):
        j, k, v, s, dcap = _walk_key_tile(q, k_base, v_base, stride_kn, j0, start, valid_hi, lm, qk_scale, R, TAIL,
                                    BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
        pr = tl.exp2(s - lse2[:, None])
        if MASK:
            pr = tl.where(j[None, :] <= p[:, None], pr, 0.0)
        dp = (tl.dot(do, tl.trans(v)) * out_scale).to(tl.float32)
        ds = pr * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_run(dq, q, do, lse2, delta, p, h, y, k_base, v_base, stride_kn, j0, lo, hi, valid_hi, qk_scale, out_scale,
            B: tl.constexpr, R: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
            NUM_BRANCHES: tl.constexpr, RS: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
            softcap, SOFTCAP: tl.constexpr):
    """dQ over key tiles ``[lo, hi)`` of a walk: whole tiles, then the partial one (as ``_fwd_run``)."""
    if KEY_MASK:
        lo, hi = clip_tiles(lo, hi, j0, R, kv_lo, kv_hi, BLOCK_N)
    lm, whole = _walk_split(j0, lo, hi, valid_hi, h, y, B, R, NUM_BRANCHES, RS, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, p, k_base, v_base, stride_kn, j0, lo, whole, valid_hi, lm, qk_scale,
                   out_scale, R, MASK, False, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK,
                   softcap, SOFTCAP)
    dq = _dq_tiles(dq, q, do, lse2, delta, p, k_base, v_base, stride_kn, j0, whole, hi, valid_hi, lm, qk_scale,
                   out_scale, R, MASK, True, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK,
                   softcap, SOFTCAP)
    return dq


@triton.jit
def _dq_walk(dq, q, do, lse2, delta, p, p_first, p_last, h, c, k_base, v_base, stride_kn, N, qk_scale, out_scale,
             B: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
             softcap, SOFTCAP: tl.constexpr):
    """Walk ``B`` of a dQ program, if branch ``B`` selects class ``c``."""
    R: tl.constexpr = RS[B]
    NUM_BRANCHES: tl.constexpr = len(RS)
    if (c % R) == (h % R):
        j0, a_hi, b_lo, b_hi, n_keys = _walk_keys(p_first, p_last, h % R, N, B, WS, R, IS_CAUSAL, BLOCK_N)
        y = c - h
        if B > 0:
            dq = _dq_run(dq, q, do, lse2, delta, p, h, y, k_base, v_base, stride_kn, j0, 0, a_hi, a_hi, qk_scale,
                         out_scale, B, R, False, BLOCK_N, HEAD_DIM, NUM_BRANCHES, RS, keep_base, kv_lo, kv_hi, holes,
                         KEY_MASK, softcap, SOFTCAP)
        dq = _dq_run(dq, q, do, lse2, delta, p, h, y, k_base, v_base, stride_kn, j0, b_lo, b_hi, n_keys, qk_scale,
                     out_scale, B, R, False, BLOCK_N, HEAD_DIM, NUM_BRANCHES, RS, keep_base, kv_lo, kv_hi, holes,
                     KEY_MASK, softcap, SOFTCAP)
        if IS_CAUSAL and B == 0:
            dq = _dq_run(dq, q, do, lse2, delta, p, h, y, k_base, v_base, stride_kn, j0, b_hi, n_keys, n_keys,
                         qk_scale, out_scale, B, R, True, BLOCK_N, HEAD_DIM, NUM_BRANCHES, RS, keep_base, kv_lo,
                         kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    return dq


@triton.jit
def _dkdv_tiles(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0, lo, hi, valid_hi,
                lm, qk_scale, out_scale, R: tl.constexpr, MASK: tl.constexpr, TAIL: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """dK, dV from query tiles ``[lo, hi)`` of a walk (queries ``p0 + R * m``, ``lm`` their log2
    multiplicities), riding on the row's log-sum-exp: P = exp2(S - (LSE - log2 m)). ``TAIL``: the partial tile,
    whose queries ``>= valid_hi`` are read at the last valid one and weigh 0; ``MASK``: the causal diagonal."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        if TAIL:
            p = p0 + tl.minimum(m, valid_hi - 1) * R
        else:
            p = p0 + m * R
        q = tl.load(q_base + p[:, None] * stride_qn + offs_d[None, :])
        do = tl.load(do_base + p[:, None] * stride_on + offs_d[None, :])
        shift = tl.load(lse_base + p) * LOG2E - lm
        if TAIL:
            shift = tl.where(m < valid_hi, shift, float("inf"))
        delta = tl.load(delta_base + p)
        st = (tl.dot(k, tl.trans(q)) * qk_scale).to(tl.float32)           # [BLOCK_N, BLOCK_M]
        if SOFTCAP:
            st, dcap = soft_cap(st, softcap)
        pt = tl.exp2(st - shift[None, :])
        if MASK:
            pt = tl.where(j[:, None] <= p[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = (tl.dot(v, tl.trans(do)) * out_scale).to(tl.float32)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * dcap
        dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_run(dk, dv, k, v, j, h, y, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0, lo, hi,
              valid_hi, qk_scale, out_scale, B: tl.constexpr, R: tl.constexpr, MASK: tl.constexpr,
              BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BRANCHES: tl.constexpr, RS: tl.constexpr,
              softcap, SOFTCAP: tl.constexpr):
    """dK, dV from query tiles ``[lo, hi)`` of a walk (``hi <= valid_hi``): whole tiles, then the partial one."""
    lm, whole = _walk_split(p0, lo, hi, valid_hi, h, y, B, R, NUM_BRANCHES, RS, BLOCK_M)
    dk, dv = _dkdv_tiles(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0, lo, whole,
                         valid_hi, lm, qk_scale, out_scale, R, MASK, False, BLOCK_M, HEAD_DIM, softcap, SOFTCAP)
    dk, dv = _dkdv_tiles(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0, whole, hi,
                         valid_hi, lm, qk_scale, out_scale, R, MASK, True, BLOCK_M, HEAD_DIM, softcap, SOFTCAP)
    return dk, dv


@triton.jit
def _dkdv_walk(dk, dv, k, v, j, j_first, j_last, h, c, q_base, do_base, lse_base, delta_base, stride_qn, stride_on,
               Q_LO, Q_HI, qk_scale, out_scale, B: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr,
               IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """Walk ``B`` of a dK/dV program whose keys ``[j_first, j_last]`` (class ``c``) lie inside one segment of
    every branch, if branch ``B`` selects the class: its queries inside B's segment but outside branch B-1's,
    among those q holds (``[Q_LO, Q_HI)``)."""
    W: tl.constexpr = WS[B]
    R: tl.constexpr = RS[B]
    NUM_BRANCHES: tl.constexpr = len(RS)
    if (c % R) == (h % R):
        seg = j_first // W
        p0 = seg * W + h % R
        p0 = p0 + tl.cdiv(tl.maximum(Q_LO - p0, 0), R) * R              # the class's first query at or after Q_LO
        n_q = tl.cdiv(tl.maximum(tl.minimum(seg * W + W, Q_HI) - p0, 0), R)
        y = c - h
        if B == 0:
            full_lo = 0
            if IS_CAUSAL:                                               # queries before the keys: none linked
                m_begin = tl.minimum(tl.maximum(j_first - p0, 0) // R // BLOCK_M * BLOCK_M, n_q)
                full_lo = tl.minimum(tl.cdiv(tl.cdiv(tl.maximum(j_last - p0, 0), R), BLOCK_M) * BLOCK_M, n_q)
                dk, dv = _dkdv_run(dk, dv, k, v, j, h, y, q_base, do_base, lse_base, delta_base, stride_qn,
                                   stride_on, p0, m_begin, full_lo, n_q, qk_scale, out_scale, B, R, True, BLOCK_M,
                                   HEAD_DIM, NUM_BRANCHES, RS, softcap, SOFTCAP)
            dk, dv = _dkdv_run(dk, dv, k, v, j, h, y, q_base, do_base, lse_base, delta_base, stride_qn, stride_on,
                               p0, full_lo, n_q, n_q, qk_scale, out_scale, B, R, False, BLOCK_M, HEAD_DIM,
                               NUM_BRANCHES, RS, softcap, SOFTCAP)
        else:
            W_PREV: tl.constexpr = WS[B - 1]
            hole = j_first // W_PREV * W_PREV
            if not IS_CAUSAL:                                           # queries before the hole precede the keys
                a_hi = tl.minimum(tl.cdiv(tl.maximum(hole - p0, 0), R), n_q)
                dk, dv = _dkdv_run(dk, dv, k, v, j, h, y, q_base, do_base, lse_base, delta_base, stride_qn,
                                   stride_on, p0, 0, a_hi, a_hi, qk_scale, out_scale, B, R, False, BLOCK_M,
                                   HEAD_DIM, NUM_BRANCHES, RS, softcap, SOFTCAP)
            b_lo = tl.cdiv(tl.maximum(hole + W_PREV - p0, 0), R)
            dk, dv = _dkdv_run(dk, dv, k, v, j, h, y, q_base, do_base, lse_base, delta_base, stride_qn, stride_on,
                               p0, b_lo, n_q, n_q, qk_scale, out_scale, B, R, False, BLOCK_M, HEAD_DIM,
                               NUM_BRANCHES, RS, softcap, SOFTCAP)
    return dk, dv


@triton.jit
def _head_rows(Q, K, V, b, h, pq, row_ok, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
               GQA: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A forward program's query rows ``pq`` of head ``h`` (0 where not ``row_ok``) and the K and V bases of its
    kv head."""
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b * stride_qb + h.to(tl.int64) * stride_qh
    kh = (h // GQA).to(tl.int64)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_kb + kh * stride_kh
    q = tl.load(q_base + pq[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    return q, k_base, v_base


@triton.jit
def _program_head(H):
    """The query head of a program on a ``(tiles, B * H)`` grid: ``(i_bh, b, h)``, ``b`` in int64 (base offsets
    may pass 2**31)."""
    i_bh = tl.program_id(1)
    return i_bh, (i_bh // H).to(tl.int64), i_bh % H


@triton.jit
def _program_scales(sm_scale, out_scale, Seed, DROPOUT: tl.constexpr):
    """``(sm_scale, out_scale, qk_scale, seed)`` of a forward, dQ or dK/dV program: the scales as float32
    (``score_scale``) and the dropout seed (read on the device: no host sync; unread without dropout)."""
    sm_scale, qk_scale = score_scale(sm_scale)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    return sm_scale, tl.cast(out_scale, tl.float32), qk_scale, seed


@autotune(autotune_configs(tile_space("fwd")), key=_KEY + ["SEEDED", "SPLITS"], name="dilated forward",
          streamed=("BLOCK_N", 2))
@triton.jit
def _dilated_attn_fwd_kernel(
    Q, K, V, Out, Lse, Out0, Lse0, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on, H, N, Q_LO, N_Q, out_scale, Seed, drop_thr, Keep, KeyRange, stride_keep,
    HEAD_DIM: tl.constexpr, L: tl.constexpr, MIXING_LSE: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr,
    SS: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA: tl.constexpr, DROPOUT: tl.constexpr, WALKS: tl.constexpr,
    SEEDED: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPED: tl.constexpr, softcap, SOFTCAP: tl.constexpr, SPLITS: tl.constexpr,
):
    """Program ``(t, b * H + h[, s])``: query tile ``t`` (``_query_tile``) of head ``h``. ``SPLITS > 1`` (split-K,
    module docstring): split ``s`` walks its share of the key tiles and writes its partial output and base-2
    log-sum-exp to the fp32 workspaces ``Out [SPLITS, B * H, N_Q, HEAD_DIM]`` and ``Lse [SPLITS, B * H, N_Q]``
    (``_dilated_attn_fwd_combine_kernel`` merges them)."""
    NUM_BRANCHES: tl.constexpr = len(WS)
    tl.static_assert(NUM_BRANCHES <= 8)   # MAX_BRANCHES
    tl.static_assert(not SEEDED or WALKS == 2)
    tl.static_assert(SPLITS == 1 or (not SEEDED and not DROPOUT))
    i_tile = tl.program_id(0)
    i_bh, b, h = _program_head(H)
    if SPLITS > 1:
        split = tl.program_id(2)
    else:
        split = 0
    turn = i_bh * 0                                     # key tiles walked so far (split-K's deal, _split_tiles)
    c, p, row_ok, p_first, p_last, n_left = _query_tile(i_tile, Q_LO, N_Q, L, BLOCK_M)
    if n_left <= 0:
        return
    if SEEDED:      # rows inside one shortest segment, of one class: all or none have later walks
        if not _later_walks(p_first, h, NUM_BRANCHES, WS, RS):
            return      # the walk-0 kernel wrote their output
    pq = p - Q_LO                                       # rows of q, out and lse
    offs_d = tl.arange(0, HEAD_DIM)
    q, k_base, v_base = _head_rows(Q, K, V, b, h, pq, row_ok, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                   GQA, HEAD_DIM)
    sm_scale, out_scale, qk_scale, seed = _program_scales(sm_scale, out_scale, Seed, DROPOUT)
    stream = i_bh * NUM_BRANCHES
    kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
    keep_base = Keep + b * stride_keep
    if SEEDED:      # walk 0 ran in _dilated_attn_fwd_walk0_kernel: its normalised output and base-2 lse
        o0_base = Out0 + b * stride_ob + h.to(tl.int64) * stride_oh
        acc = tl.load(o0_base + pq[:, None] * stride_on + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        acc = acc.to(tl.float32)
        m_i = tl.load(Lse0 + i_bh.to(tl.int64) * N_Q + pq, mask=row_ok, other=0.0)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if KEY_MASK:    # a row whose walk-0 keys are all dropped seeds an empty softmax
            l_i = tl.where(m_i == float("-inf"), 0.0, l_i)
    else:
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Nested pattern, rows inside one segment: each linked key once, weighted (see the section above);
    # otherwise one block per branch (constexpr-unrolled), each adding its keys to the same online softmax.
    if _one_segment(p_first, p_last, WS[0], WALKS, BLOCK_N, L):
        if WALKS > 0:   # constexpr: kernels whose programs never walk compile no walk
            for B in tl.static_range(SEEDED, NUM_BRANCHES):   # walk B: branch B's segment outside branch B-1's
                acc, m_i, l_i, turn = _fwd_walk(acc, m_i, l_i, q, p, p_first, p_last, h, c, k_base, v_base,
                                                stride_kn, N, qk_scale, B, WS, RS, IS_CAUSAL, BLOCK_N, HEAD_DIM,
                                                keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP, split,
                                                turn, SPLITS)
    else:
        if WALKS < 2:   # constexpr: kernels whose programs all walk compile no per-branch block
            for B in tl.static_range(NUM_BRANCHES):   # one block per branch, each adding its keys
                o, sel = _branch_offset(h, B, RS[B], SS[B], SS[B + 1], MIXING_LSE, c, H, GROUPED)
                if sel:
                    acc, m_i, l_i, turn = _fwd_branch(acc, m_i, l_i, q, p, p_first, p_last, k_base, v_base,
                                                      stride_kn, o, N, qk_scale, WS[B], RS[B], IS_CAUSAL, BLOCK_M,
                                                      BLOCK_N, HEAD_DIM, seed, drop_thr, stream + B, DROPOUT,
                                                      keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP,
                                                      split, turn, SPLITS)
    # Epilogue: rows no branch links have l_i == 0 -> output 0, lse -inf (a split given none of a row's keys too).
    linked = l_i > 0.0
    out = (acc / tl.where(linked, l_i, 1.0)[:, None] * out_scale).to(tl.float32)
    if SPLITS > 1:  # the split's partial: fp32 output and base-2 lse, row (split * B * H + b * H + h) * N_Q + pq
        part = (split * tl.num_programs(1) + i_bh).to(tl.int64) * N_Q + pq
        lse2 = tl.where(linked, m_i + tl.log2(tl.where(linked, l_i, 1.0)), float("-inf"))
        tl.store(Out + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(Lse + part, lse2, mask=row_ok)
    else:
        lse = tl.where(linked, (m_i + tl.log2(tl.where(linked, l_i, 1.0))) * LN2, float("-inf"))
        o_base = Out + b * stride_ob + h.to(tl.int64) * stride_oh
        tl.store(o_base + pq[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(Lse + i_bh.to(tl.int64) * N_Q + pq, lse, mask=row_ok)


@triton.jit
def _dilated_attn_fwd_combine_kernel(Part, PartLse, Out, Lse, N_Q, stride_ob, stride_oh, stride_on, H,
                                     HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Split-K's merge: program ``(t, b * H + h)`` combines the ``SPLITS`` partials (``Part [SPLITS, B * H, N_Q,
    HEAD_DIM]`` fp32, normalised; ``PartLse`` their base-2 log-sum-exps, ``-inf`` where a split linked nothing) of
    rows ``t * BLOCK_R ..`` into ``out = sum_s 2^(lse_s - m) out_s / sum_s 2^(lse_s - m)`` (``m`` the largest
    ``lse_s``) and ``lse = m + log2(sum_s 2^(lse_s - m))``, stored as the natural log; a row no split links gets
    output 0 and lse ``-inf``. The partials carry ``out_scale`` already (a weighted mean commutes with it)."""
    i_bh = tl.program_id(1)
    bh = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N_Q
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        part = (s * bh + i_bh).to(tl.int64) * N_Q + rows
        m = tl.maximum(m, tl.load(PartLse + part, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        part = (s * bh + i_bh).to(tl.int64) * N_Q + rows
        w = tl.exp2(tl.load(PartLse + part, mask=row_ok, other=float("-inf")) - m_safe)   # 0 for an empty split
        o = tl.load(Part + part[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        acc += w[:, None] * o
        l_i += w
    linked = l_i > 0.0
    out = acc / tl.where(linked, l_i, 1.0)[:, None]
    lse = tl.where(linked, (m_safe + tl.log2(tl.where(linked, l_i, 1.0))) * LN2, float("-inf"))
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + i_bh.to(tl.int64) * N_Q + rows, lse, mask=row_ok)


# --- causal nested patterns: walk 0 over contiguous query rows ------------------------------------------------
#
# Walk 0 of a causal nested pattern whose shortest branch has rate 1 is causal attention inside each segment of
# that branch. In the forward kernel a program's rows are one residue class (stride L), so they span L *
# BLOCK_M positions and walk 0's masked diagonal is that wide: at 128 rows and L = 8, half of walk 0's tiles
# (config A: 1.347x the distinct pairs overall). This kernel runs walk 0 over contiguous rows instead, as causal
# flash attention in segments (masked diagonal BLOCK_M wide), with each pair's log2 multiplicity
# ``log2 min(k(p - h), k(j - h))``, ``k(x)`` = the number of branches whose rate divides x (the rates form a
# chain, so those are a prefix of the branches). Rows that link no key beyond walk 0 get their output and lse
# here; for the others its normalised output and base-2 log-sum-exp seed the forward kernel's online softmax
# (``SEEDED``), which walks branches 1.. only and skips the programs of the first kind. See ``walk0_applies``.
# The seed is a workspace of out's shape and dtype plus an fp32 row vector (O(N); the forward reads, never
# writes it, so autotuning may rerun the forward). The partial output's rounding to out's dtype weighs by walk
# 0's share of the softmax mass: in float16 tests it raised the RMS error by 3% and left the max error as is
# (an fp32 workspace: 0.3%, at twice the memory traffic).


@triton.jit
def _later_walks(p, h, NUM_BRANCHES: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr):
    """Whether causal rows ``p`` (vector or scalar) link keys beyond walk 0: some branch B > 0 selects them and
    they lie past the first branch-(B-1) segment of their branch-B segment (walk B's keys before the hole)."""
    more = p < 0
    for i in tl.static_range(1, NUM_BRANCHES):
        more = more | ((((p - h) % RS[i]) == 0) & ((p % WS[i]) >= WS[i - 1]))
    return more


@triton.jit
def _walk0_tiles(acc, m_i, l_i, q, p, lkp, lkj, k_base, v_base, stride_kn, N, lo, hi, qk_scale,
                 MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi, holes,
                 KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """Contiguous key tiles ``[lo, hi)`` (``hi - lo`` a multiple of BLOCK_N, every tile starting at the same
    position mod L, so the keys' log2 counts ``lkj`` serve each); ``MASK``: the causal diagonal."""
    offs_d = tl.arange(0, HEAD_DIM)
    if KEY_MASK:
        lo, hi = clip_tiles(lo, hi, 0, 1, kv_lo, kv_hi, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jr = j
        if MASK:   # rows past the end may reach keys past N: read at N - 1, seen only by those rows (causal)
            jr = tl.minimum(j, N - 1)
        k = tl.load(k_base + jr[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_base + jr[:, None] * stride_kn + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
        if SOFTCAP:
            s, _ = soft_cap(s, softcap)
        s = s + tl.minimum(lkp[:, None], lkj[None, :])
        if KEY_MASK:   # a row may keep no past key: its future keys must be -inf, not only far below
            ok = keys_kept(keep_base, j, kv_lo, kv_hi, holes)[None, :]
            if MASK:
                ok = ok & (j[None, :] <= p[:, None])
            s = tl.where(ok, s, float("-inf"))
        elif MASK:   # causal as a bias (0 or below -1e30), not a compare and select per score: ptxas packed those
            # predicates into registers. Positions relative to lo (the diagonal's first key) are small, so exact
            # in float32 at any N.
            s = s + tl.minimum((p - lo).to(tl.float32)[:, None] - (j - lo).to(tl.float32)[None, :], 0.0) * 1e30
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, 1.0, v, KEY_MASK)
    return acc, m_i, l_i


@autotune(autotune_configs(tile_space("walk0")), key=_KEY_WALK0, name="dilated forward, shortest branch",
          streamed=("BLOCK_N", 2))
@triton.jit
def _dilated_attn_fwd_walk0_kernel(
    Q, K, V, Out, Lse, Out0, Lse0, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on, H, N, Q_LO, N_Q, Keep, KeyRange, stride_keep,
    HEAD_DIM: tl.constexpr, L: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr, GQA: tl.constexpr,
    KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, softcap, SOFTCAP: tl.constexpr,
):
    """Walk 0 of a causal nested pattern (section above): program ``(t, b * H + h)`` owns the BLOCK_M
    contiguous positions from ``(Q_LO // BLOCK_M + t) * BLOCK_M`` (inside one segment: WS[0] % BLOCK_M == 0).
    Rows that link nothing beyond walk 0 (``_later_walks``; config A: about 2 in 3) get their final output and
    lse here, in Out and Lse; the others their seed, in Out0 and Lse0."""
    NUM_BRANCHES: tl.constexpr = len(WS)
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    tl.static_assert(BLOCK_N % L == 0)
    tl.static_assert(WS[0] % BLOCK_M == 0)
    tl.static_assert(RS[0] == 1)
    i_bh, b, h = _program_head(H)
    r0 = (Q_LO // BLOCK_M + tl.program_id(0)) * BLOCK_M
    p = r0 + tl.arange(0, BLOCK_M)
    row_ok = (p >= Q_LO) & (p < Q_LO + N_Q)
    pq = p - Q_LO
    offs_d = tl.arange(0, HEAD_DIM)
    q, k_base, v_base = _head_rows(Q, K, V, b, h, pq, row_ok, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                                   GQA, HEAD_DIM)
    sm_scale, qk_scale = score_scale(sm_scale)
    s0 = r0 // WS[0] * WS[0]                                         # the segment's first position
    # log2 k(x): with rate 1 first, walk 0's multiplicity of a pair (x, x) counts the branches dividing x
    lkp = _walk_log2_mult(p - h, p - h, 0, NUM_BRANCHES, RS)
    lkj = _walk_log2_mult(s0 + tl.arange(0, BLOCK_N) - h, s0 + tl.arange(0, BLOCK_N) - h, 0, NUM_BRANCHES, RS)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
    keep_base = Keep + b * stride_keep
    acc, m_i, l_i = _walk0_tiles(acc, m_i, l_i, q, p, lkp, lkj, k_base, v_base, stride_kn, N, s0, r0, qk_scale,
                                 False, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    acc, m_i, l_i = _walk0_tiles(acc, m_i, l_i, q, p, lkp, lkj, k_base, v_base, stride_kn, N, r0, r0 + BLOCK_M,
                                 qk_scale, True, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK,
                                 softcap, SOFTCAP)
    more = _later_walks(p, h, NUM_BRANCHES, WS, RS)
    if KEY_MASK:    # rows whose keys are all dropped: output 0, lse -inf
        linked = l_i > 0.0
        out = (acc / tl.where(linked, l_i, 1.0)[:, None]).to(Out.dtype.element_ty)
        lse2 = tl.where(linked, m_i + tl.log2(tl.where(linked, l_i, 1.0)), float("-inf"))
    else:
        out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
        lse2 = m_i + tl.log2(l_i)
    o_off = b * stride_ob + h.to(tl.int64) * stride_oh + pq[:, None] * stride_on + offs_d[None, :]
    tl.store(Out + o_off, out, mask=(row_ok & ~more)[:, None])
    tl.store(Out0 + o_off, out, mask=(row_ok & more)[:, None])
    tl.store(Lse + i_bh.to(tl.int64) * N_Q + pq, lse2 * LN2, mask=row_ok & ~more)
    tl.store(Lse0 + i_bh.to(tl.int64) * N_Q + pq, lse2, mask=row_ok & more)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, p, k_base, v_base, stride_kn, j0, lo, hi, n_keys, qk_scale, out_scale,
                  W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, seed, drop_thr, stream, DROPOUT: tl.constexpr,
                  keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    if KEY_MASK:
        lo, hi = clip_tiles(lo, hi, j0, R, kv_lo, kv_hi, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        m = start + tl.arange(0, BLOCK_N)
        j = j0 + m * R
        if MASK:
            k_ok = m < n_keys
            k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
            v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + j[:, None] * stride_kn + offs_d[None, :])
        s = (tl.dot(q, tl.trans(k)) * qk_scale).to(tl.float32)            # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            s, dcap = soft_cap(s, softcap)
        pr = tl.exp2(s - lse2[:, None])
        if MASK:
            ok = k_ok[None, :] & ((j[None, :] // W) == (p[:, None] // W))
            if IS_CAUSAL:
                ok = ok & (j[None, :] <= p[:, None])
            pr = tl.where(ok, pr, 0.0)
        if KEY_MASK:
            pr = tl.where(keys_kept(keep_base, j, kv_lo, kv_hi, holes)[None, :], pr, 0.0)
        dp = (tl.dot(do, tl.trans(v)) * out_scale).to(tl.float32)         # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            dp = tl.where(_keep_tile(seed, p, j, j0, start, stream, drop_thr, R, BLOCK_N, DROPOUT), dp, 0.0)
        ds = pr * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq)                                   # [BLOCK_M, HEAD_DIM]
    return dq


@triton.jit
def _bwd_dq_branch(dq, q, do, lse2, delta, p, p_first, p_last, k_base, v_base, stride_kn, o, N, qk_scale,
                   out_scale, W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, seed, drop_thr, stream, DROPOUT: tl.constexpr,
                   keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """dQ over one branch's keys: P = exp2(S - LSE_merged), dS = P * (dP - delta)."""
    j0, n_keys, n_full = _key_range(p_first, p_last, o, N, W, R, IS_CAUSAL, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, p, k_base, v_base, stride_kn, j0, 0, n_full, n_keys, qk_scale,
                       out_scale, W, R, IS_CAUSAL, False, BLOCK_N, HEAD_DIM, seed, drop_thr, stream, DROPOUT,
                       keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, p, k_base, v_base, stride_kn, j0, n_full, n_keys, n_keys, qk_scale,
                       out_scale, W, R, IS_CAUSAL, True, BLOCK_N, HEAD_DIM, seed, drop_thr, stream, DROPOUT,
                       keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    return dq


@autotune(autotune_configs(tile_space("bwd")), key=_KEY, name="dilated backward dQ", streamed=("BLOCK_N", 2))
@triton.jit
def _dilated_attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on, H, N, Q_LO, N_Q, out_scale, Seed, drop_thr, Keep, KeyRange, stride_keep,
    HEAD_DIM: tl.constexpr, L: tl.constexpr, MIXING_LSE: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr,
    SS: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA: tl.constexpr, DROPOUT: tl.constexpr, WALKS: tl.constexpr,
    KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr,
    softcap, SOFTCAP: tl.constexpr,
):
    NUM_BRANCHES: tl.constexpr = len(WS)
    i_tile = tl.program_id(0)
    i_bh, b, h = _program_head(H)
    c, p, row_ok, p_first, p_last, n_left = _query_tile(i_tile, Q_LO, N_Q, L, BLOCK_M)
    if n_left <= 0:
        return
    pq = p - Q_LO                                       # rows of q, dout, lse, delta and dq
    offs_d = tl.arange(0, HEAD_DIM)
    kh = (h // GQA).to(tl.int64)
    k_base = K + b * stride_kb + kh * stride_kh
    v_base = V + b * stride_kb + kh * stride_kh
    q_off = b * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(Q + q_off + pq[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_ob + h.to(tl.int64) * stride_oh + pq[:, None] * stride_on + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + i_bh.to(tl.int64) * N_Q + pq, mask=row_ok, other=0.0) * LOG2E
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    delta = tl.load(Delta + i_bh.to(tl.int64) * N_Q + pq, mask=row_ok, other=0.0)
    sm_scale, out_scale, qk_scale, seed = _program_scales(sm_scale, out_scale, Seed, DROPOUT)
    stream = i_bh * NUM_BRANCHES
    kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
    keep_base = Keep + b * stride_keep
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if _one_segment(p_first, p_last, WS[0], WALKS, BLOCK_N, L):
        if WALKS > 0:   # constexpr: kernels whose programs never walk compile no walk
            for B in tl.static_range(NUM_BRANCHES):
                dq = _dq_walk(dq, q, do, lse2, delta, p, p_first, p_last, h, c, k_base, v_base, stride_kn, N, qk_scale,
                              out_scale, B, WS, RS, IS_CAUSAL, BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes,
                              KEY_MASK, softcap, SOFTCAP)
    else:
        if WALKS < 2:   # constexpr, as in the forward
            for B in tl.static_range(NUM_BRANCHES):
                o, sel = _branch_offset(h, B, RS[B], SS[B], SS[B + 1], MIXING_LSE, c, H, GROUPED)
                if sel:
                    dq = _bwd_dq_branch(dq, q, do, lse2, delta, p, p_first, p_last, k_base, v_base, stride_kn, o, N,
                                        qk_scale, out_scale, WS[B], RS[B], IS_CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM,
                                        seed, drop_thr, stream + B, DROPOUT, keep_base, kv_lo, kv_hi, holes,
                                        KEY_MASK, softcap, SOFTCAP)
    dq = (dq * sm_scale).to(tl.float32)
    tl.store(DQ + q_off + pq[:, None] * stride_qn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0, lo, hi, n_q,
                    qk_scale, out_scale, W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    MASK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, seed, drop_thr, stream,
                    DROPOUT: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        p = p0 + m * R                                                   # query positions: a strided view
        if MASK:
            q_ok = m < n_q
            q = tl.load(q_base + p[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            do = tl.load(do_base + p[:, None] * stride_on + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            lse2 = tl.load(lse_base + p, mask=q_ok, other=0.0) * LOG2E
            delta = tl.load(delta_base + p, mask=q_ok, other=0.0)
        else:
            q = tl.load(q_base + p[:, None] * stride_qn + offs_d[None, :])
            do = tl.load(do_base + p[:, None] * stride_on + offs_d[None, :])
            lse2 = tl.load(lse_base + p) * LOG2E
            delta = tl.load(delta_base + p)
        st = (tl.dot(k, tl.trans(q)) * qk_scale).to(tl.float32)           # [BLOCK_N, BLOCK_M]
        if SOFTCAP:
            st, dcap = soft_cap(st, softcap)
        pt = tl.exp2(st - lse2[None, :])
        if MASK:
            ok = q_ok[None, :] & ((j[:, None] // W) == (p[None, :] // W))
            if IS_CAUSAL:
                ok = ok & (j[:, None] <= p[None, :])
            pt = tl.where(ok, pt, 0.0)
        dpt = (tl.dot(v, tl.trans(do)) * out_scale).to(tl.float32)        # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            keep = _dropout_keep(seed, p[None, :], (j // R)[:, None], stream, drop_thr)
            dv = tl.dot(tl.where(keep, pt, 0.0).to(do.dtype), do, dv)        # [BLOCK_N, HEAD_DIM]
            dpt = tl.where(keep, dpt, 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv)                             # [BLOCK_N, HEAD_DIM]
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * dcap
        dk = tl.dot(dst.to(q.dtype), q, dk)                                  # [BLOCK_N, HEAD_DIM]
    return dk, dv


@triton.jit
def _bwd_dkdv_branch(dk, dv, k, v, j, j_first, j_last, q_base, do_base, lse_base, delta_base, stride_qn, stride_on,
                     o, Q_LO, Q_HI, qk_scale, out_scale, W: tl.constexpr, R: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, seed, drop_thr, stream,
                     DROPOUT: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """dK, dV of the keys ``j`` from one branch's queries (transposed scores, as FlashAttention-2).

    Query blocks split into: masked ones at the causal diagonal, unmasked ones linked to every key of the tile,
    and a masked partial tail (segment or sequence end). Only the queries q holds count: positions
    ``[Q_LO, Q_HI)``, inside the ``N`` key positions."""
    seg_lo = j_first // W
    seg_hi = j_last // W
    p0 = seg_lo * W + o
    p0 = p0 + tl.cdiv(tl.maximum(Q_LO - p0, 0), R) * R                  # the class's first query at or after Q_LO
    p_end = tl.minimum((seg_hi + 1) * W, Q_HI)
    n_q = tl.cdiv(tl.maximum(p_end - p0, 0), R)
    m_begin = 0
    full_lo = 0
    if IS_CAUSAL:
        m_begin = tl.maximum(j_first - p0, 0) // R // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.cdiv(tl.maximum(j_last - p0, 0), R), BLOCK_M) * BLOCK_M
    full_hi = n_q // BLOCK_M * BLOCK_M
    full_lo = tl.where(seg_lo == seg_hi, tl.minimum(tl.maximum(full_lo, m_begin), n_q), n_q)
    full_hi = tl.maximum(tl.where(seg_lo == seg_hi, full_hi, n_q), full_lo)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0,
                             m_begin, full_lo, n_q, qk_scale, out_scale, W, R, IS_CAUSAL, True, BLOCK_M, HEAD_DIM,
                             seed, drop_thr, stream, DROPOUT, softcap, SOFTCAP)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0,
                             full_lo, full_hi, n_q, qk_scale, out_scale, W, R, IS_CAUSAL, False, BLOCK_M, HEAD_DIM,
                             seed, drop_thr, stream, DROPOUT, softcap, SOFTCAP)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, j, q_base, do_base, lse_base, delta_base, stride_qn, stride_on, p0,
                             full_hi, n_q, n_q, qk_scale, out_scale, W, R, IS_CAUSAL, True, BLOCK_M, HEAD_DIM,
                             seed, drop_thr, stream, DROPOUT, softcap, SOFTCAP)
    return dk, dv


@autotune(autotune_configs(tile_space("bwd")), key=_KEY, name="dilated backward dK/dV",
          streamed=("BLOCK_M", 2))
@triton.jit
def _dilated_attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh, stride_on, H, N, Q_LO, N_Q, out_scale, Seed, drop_thr, Keep, KeyRange, stride_keep,
    HEAD_DIM: tl.constexpr, L: tl.constexpr, MIXING_LSE: tl.constexpr, WS: tl.constexpr, RS: tl.constexpr,
    SS: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA: tl.constexpr, DROPOUT: tl.constexpr, WALKS: tl.constexpr,
    KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr,
    softcap, SOFTCAP: tl.constexpr,
):
    NUM_BRANCHES: tl.constexpr = len(WS)
    i_tile = tl.program_id(0)
    i_bkh = tl.program_id(1)
    HKV = H // GQA
    b = i_bkh // HKV
    kh = i_bkh % HKV
    c = i_tile % L
    t = i_tile // L
    n_keys = tl.cdiv(tl.maximum(N - c, 0), L)
    if t * BLOCK_N >= n_keys:
        return
    i_key = t * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = i_key < n_keys
    j = c + i_key * L                                                    # key positions: a strided view
    j_first = c + t * BLOCK_N * L
    j_last = c + (tl.minimum(n_keys, (t + 1) * BLOCK_N) - 1) * L
    offs_d = tl.arange(0, HEAD_DIM)
    kv_off = b.to(tl.int64) * stride_kb + kh.to(tl.int64) * stride_kh + j[:, None] * stride_kn + offs_d[None, :]
    if KEY_MASK:    # dropped keys get no gradient; a program whose keys are all dropped only writes zeros
        kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
        kept = keys_kept(Keep + b * stride_keep, j, kv_lo, kv_hi, holes) & key_ok
        if (j_last < kv_lo) | (j_first >= kv_hi):
            zero = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
            tl.store(DK + kv_off, zero.to(DK.dtype.element_ty), mask=key_ok[:, None])
            tl.store(DV + kv_off, zero.to(DV.dtype.element_ty), mask=key_ok[:, None])
            return
    k = tl.load(K + kv_off, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=key_ok[:, None], other=0.0)
    sm_scale, out_scale, qk_scale, seed = _program_scales(sm_scale, out_scale, Seed, DROPOUT)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_hi = Q_LO + N_Q
    nested = _one_segment(j_first, j_last, WS[0], WALKS, BLOCK_M, L)
    for g in range(GQA):                                                 # query heads reading this kv head
        h = kh * GQA + g
        stream = (b * H + h) * NUM_BRANCHES
        # bases shifted by Q_LO rows: q, dout, lse and delta hold the queries at [Q_LO, Q_LO + N_Q) only
        q_base = Q + (b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh - Q_LO * stride_qn)
        do_base = DO + (b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh - Q_LO * stride_on)
        lse_base = Lse + ((b * H + h).to(tl.int64) * N_Q - Q_LO)
        delta_base = Delta + ((b * H + h).to(tl.int64) * N_Q - Q_LO)
        if nested:
            if WALKS > 0:   # constexpr, as in the forward
                for B in tl.static_range(NUM_BRANCHES):
                    dk, dv = _dkdv_walk(dk, dv, k, v, j, j_first, j_last, h, c, q_base, do_base, lse_base, delta_base,
                                        stride_qn, stride_on, Q_LO, q_hi, qk_scale, out_scale, B, WS, RS, IS_CAUSAL,
                                        BLOCK_M, HEAD_DIM, softcap, SOFTCAP)
        else:
            if WALKS < 2:   # constexpr, as in the forward
                for B in tl.static_range(NUM_BRANCHES):
                    o, sel = _branch_offset(h, B, RS[B], SS[B], SS[B + 1], MIXING_LSE, c, H, GROUPED)
                    if sel:
                        dk, dv = _bwd_dkdv_branch(
                            dk, dv, k, v, j, j_first, j_last, q_base, do_base, lse_base, delta_base, stride_qn,
                            stride_on, o, Q_LO, q_hi, qk_scale, out_scale, WS[B], RS[B], IS_CAUSAL, BLOCK_M, BLOCK_N,
                            HEAD_DIM, seed, drop_thr, stream + B, DROPOUT, softcap, SOFTCAP)
    dk = (dk * sm_scale).to(tl.float32)
    dv = (dv * out_scale).to(tl.float32)                                                 # dV = P^T (out_scale * dO)
    if KEY_MASK:    # a dropped key's column of P is 0 (also where an empty row's lse made it NaN)
        dk = tl.where(kept[:, None], dk, 0.0)
        dv = tl.where(kept[:, None], dv, 0.0)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# --- launchers -------------------------------------------------------------------------------------------


def kernel_unsupported_reason(q, attn_mask, dropout_p, num_branches, softcap=None) -> str:
    """Why the Triton kernels can't run this call (the exact PyTorch path runs instead), or ''. Soft-capping
    (``softcap``) they run."""
    reason = tensor_unsupported_reason(q)
    if reason:
        return reason
    if attn_mask is not None:
        return "attn_mask (the kernels take the pattern and causality only)"
    if num_branches > MAX_BRANCHES:
        return f"{num_branches} branches (kernels: at most {MAX_BRANCHES})"
    return ""


def pattern_constexprs(segment_lengths, dilation_rates, mixing: str, num_heads: int,
                       head_offsets: str = "interleaved") -> dict:
    """The constexprs that describe one pattern to the kernels: ``L``, ``MIXING_LSE``, the tuples ``WS``,
    ``RS`` (one entry per branch) and ``SS`` (the head-group starts, then the last group's end), and ``GROUPED``
    (head offsets ``h // ceil(H / r)`` instead of ``h % r``)."""
    bounds = head_group_bounds(len(segment_lengths), num_heads)
    meta = {"L": math.lcm(*dilation_rates), "MIXING_LSE": mixing == "lse",
            "WS": tuple(int(w) for w in segment_lengths), "RS": tuple(int(r) for r in dilation_rates),
            "SS": tuple(start for start, _ in bounds) + (bounds[-1][1],), "GROUPED": head_offsets == "grouped"}
    return meta


def _launch_pattern(segment_lengths, dilation_rates, mixing: str, num_heads: int,
                    dropout_p: float, head_offsets: str = "interleaved") -> tuple[dict, float, bool]:
    """The pattern's constexprs (branches in ``nested_order`` when they form a chain), its output scale
    (1 / number of branches under head_groups) and whether they form a chain. Grouped offsets that equal the
    interleaved ones for this head count (``offsets_coincide``) launch as interleaved."""
    check_head_offsets(head_offsets, mixing)
    if head_offsets == "grouped" and offsets_coincide(dilation_rates, num_heads):
        head_offsets = "interleaved"
    out_scale = 1.0 if mixing == "lse" else 1.0 / len(segment_lengths)
    chain = nested_order(segment_lengths, dilation_rates, mixing, dropout_p, head_offsets)
    if chain is not None:
        segment_lengths, dilation_rates = chain
    meta = pattern_constexprs(segment_lengths, dilation_rates, mixing, num_heads, head_offsets)
    return meta, out_scale, chain is not None


def walks(nested: bool, w0: int, L: int, owned: int, walked: int, offset: int) -> int:
    """Which code one tile configuration needs: a program owns ``owned`` positions of one residue class (stride
    L) starting at ``offset`` + a multiple of L * owned, and walks tiles of ``walked`` positions. 0: per-branch
    blocks only (not nested, the walked tile not a multiple of L, or a program's rows span more than the
    shortest segment, so none can walk); 2: walks only (every program's rows lie inside one shortest segment);
    1: both, chosen per program."""
    span = L * owned
    if not nested or walked % L or L * (owned - 1) + 1 > w0:
        return 0
    return 2 if w0 % span == 0 and offset % span == 0 else 1


def _walks_constexpr(kernel, owner: str, meta: dict, nested: bool, offset: int) -> int:
    """The constexpr ``WALKS`` of an autotuned ``kernel`` over its configurations: 2 (or 0) when
    every configuration needs the walks only (the per-branch blocks only), else 1 (both compiled, chosen per
    program). Compiling one path instead of both halves the first call's compile time. ``owner``: "rows"
    (forward, dQ: query tiles own rows from ``offset`` on, key tiles are walked) or "keys" (dK/dV: key tiles of
    all N own the rows, query tiles are walked)."""
    tiles = tuple((cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) for cfg in kernel.configs)
    if not isinstance(offset, int):   # a symbolic offset (torch.compile, dynamic shapes): the choice made per program
        return min(_walks_over_space(tiles, owner, nested, meta["WS"][0], meta["L"], 0), 1)
    return _walks_over_space(tiles, owner, nested, meta["WS"][0], meta["L"], offset)


@functools.lru_cache(maxsize=1024)
def _walks_over_space(tiles: tuple, owner: str, nested: bool, w0: int, L: int, offset: int) -> int:
    found = set()
    for bm, bn in tiles:
        owned, walked, start = (bm, bn, offset) if owner == "rows" else (bn, bm, 0)
        found.add(walks(nested, w0, L, owned, walked, start))
    return found.pop() if len(found) == 1 else 1


def walk0_applies(meta: dict, nested: bool, is_causal: bool, walks_fwd: int) -> bool:
    """Whether the forward runs walk 0 in ``_dilated_attn_fwd_walk0_kernel`` and seeds the forward kernel with it:
    a causal nested pattern whose shortest branch has rate 1, every forward program walking (``walks_fwd ==
    2``), and each tile of the walk-0 space fitting (its row tile divides the shortest segment, its key tile is
    a multiple of L)."""
    if not (is_causal and nested and walks_fwd == 2 and meta["RS"][0] == 1):
        return False
    return all(meta["WS"][0] % cfg.kwargs["BLOCK_M"] == 0 and cfg.kwargs["BLOCK_N"] % meta["L"] == 0
               for cfg in _dilated_attn_fwd_walk0_kernel.configs)


def _rows_grid(n: int, L: int, block: str, programs_b: int, splits: int = 1):
    if splits > 1:
        return lambda META: (L * triton.cdiv(triton.cdiv(n, L), META[block]), programs_b, splits)
    return lambda META: (L * triton.cdiv(triton.cdiv(n, L), META[block]), programs_b)


# --- split-K ------------------------------------------------------------------------------------------------

MAX_SPLITS = 16       # splits the launcher chooses at most (``choose_splits``)
MAX_FORCED_SPLITS = 64
SPLIT_FILL = 4        # split while the forward has fewer programs than SPLIT_FILL per SM
INTERPRETER_SMS = 4   # the "card" the interpreter stands for: the tests' decode-sized calls split
_COMBINE_ROWS = 16    # rows per program of the combine kernel


def _forced_splits_from_env():
    """``DILATE_COMPILER_FWD_SPLITS``: the split-K count of every forward without dropout (None: unset, chosen per
    call by ``forward_splits``)."""
    value = os.environ.get("DILATE_COMPILER_FWD_SPLITS", "")
    if value == "":
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_FORCED_SPLITS:
        raise ValueError(f"DILATE_COMPILER_FWD_SPLITS must be an integer in [1, {MAX_FORCED_SPLITS}] (the forward's "
                         f"split-K count) or unset (chosen per call), got {value!r}")
    return int(value)


FORCED_SPLITS = _forced_splits_from_env()


def choose_splits(programs: int, key_tiles: int, sm_count: int) -> int:
    """How many splits (split-K) a forward with short query tiles runs: 1 (none) or ``S`` in ``[2, MAX_SPLITS]``.

    ``programs``: the forward's programs that own rows (query tiles x B x H); ``key_tiles``: how many key tiles
    a row links at most; ``sm_count``: the card's SMs. A forward program walks all of its rows' key tiles one after
    another, so with few programs (a decode step: one query row per head) the card holds a few long serial loops
    and waits on their loads. S splits give each program's key tiles to S programs, at the cost of an fp32 partial
    output per split and a combine launch. Split while there are fewer than ``SPLIT_FILL`` programs per SM:
    ``S = ceil(SPLIT_FILL * sm_count / programs)``, at most ``MAX_SPLITS`` and at most ``key_tiles`` (a split
    with no tile to walk only costs)."""
    if programs <= 0 or programs >= SPLIT_FILL * sm_count or key_tiles < 2:
        return 1
    return max(1, min(MAX_SPLITS, key_tiles, -(-SPLIT_FILL * sm_count // programs)))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """The SMs of CUDA device ``device_index`` (its properties, read once: no host sync)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _keys_per_row(segment_lengths, dilation_rates, mixing: str, n) -> int:
    """A bound of the keys one query row links: under ``mixing="lse"`` each branch's keys in its segment (a
    segment clipped to ``n`` keys when ``n`` is an int), summed; under ``"head_groups"`` the largest branch's."""
    per_branch = [-(-(min(w, n) if isinstance(n, int) else w) // r) for w, r in zip(segment_lengths, dilation_rates)]
    return sum(per_branch) if mixing == "lse" else max(per_branch)


def forward_splits(num_splits, *, batch, num_heads: int, n_q, n, L: int, segment_lengths, dilation_rates,
                   mixing: str, dropout_p: float, device) -> int:
    """The split-K count of one forward launch. ``num_splits``, an int in ``[1, MAX_FORCED_SPLITS]``, forces it
    (with dropout only 1: the kernel with dropout runs unsplit); None leaves it to ``DILATE_COMPILER_FWD_SPLITS``
    where set (dropout: 1), else to ``choose_splits``, which splits only where every residue class's query rows
    fit one query tile of the tile space (short query tiles: decode steps) and only on a GPU or the interpreter.
    Under ``torch.compile`` with dynamic shapes a symbolic batch or query count is not split unless forced: the
    choice reads static facts only, so it adds no guard (a symbolic key count ``n`` bounds a row's keys by the
    segments alone)."""
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_FORCED_SPLITS:
            raise ValueError(f"num_splits must be None (chosen per call) or an int in [1, {MAX_FORCED_SPLITS}], got "
                             f"{num_splits!r}")
        if num_splits > 1 and dropout_p > 0.0:
            raise NotImplementedError(f"split-K (num_splits={num_splits}) with dropout (dropout_p={dropout_p}): the "
                                      f"forward with dropout runs unsplit; accepted: num_splits=1 or None")
        return num_splits
    if dropout_p > 0.0:
        return 1
    if FORCED_SPLITS is not None:
        return FORCED_SPLITS
    configs = _dilated_attn_fwd_kernel.configs
    block_m = min(cfg.kwargs["BLOCK_M"] for cfg in configs)
    block_n = max(cfg.kwargs["BLOCK_N"] for cfg in configs)
    if not isinstance(batch, int) or not isinstance(n_q, int) or -(-n_q // L) > block_m:
        return 1
    if device.type == "cuda":
        sm_count = _sm_count(device.index)
    elif INTERPRET:
        sm_count = INTERPRETER_SMS
    else:
        return 1
    key_tiles = -(-_keys_per_row(segment_lengths, dilation_rates, mixing, n) // block_n)
    return choose_splits(batch * num_heads * min(n_q, L), key_tiles, sm_count)


def _dropout_args(dropout_p: float, seed, dummy, segment_lengths, dilation_rates) -> tuple:
    """``(Seed, drop_thr, 1 / (1 - p), DROPOUT)`` kernel arguments. ``seed`` is the op's int64 scalar tensor (any
    device; the kernels read it on q's device, so no host sync)."""
    if dropout_p == 0.0:
        return dummy, 0, 1.0, 0
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"dropout_p > 0 needs seed, an int64 tensor of one element, got {seed!r}")
    grouped = all((w // r) % 4 == 0 for w, r in zip(segment_lengths, dilation_rates))
    return seed.reshape(1).to(dummy.device), round(dropout_p * 2**31), 1.0 / (1.0 - dropout_p), 2 if grouped else 1


def _query_offset(q_offset, n_q: int, n: int) -> int:
    """Check that queries ``[q_offset, q_offset + n_q)`` lie inside the ``n`` key positions (a symbolic offset,
    read from the shapes under ``torch.compile``, passes as it is)."""
    if isinstance(q_offset, torch.SymInt):
        return q_offset
    if not isinstance(q_offset, int) or q_offset < 0 or q_offset + n_q > n:
        raise ValueError(f"q_offset must be an int with 0 <= q_offset and q_offset + (query rows {n_q}) <= "
                         f"(key rows {n}), got {q_offset!r}")
    return q_offset


def dilated_attn_fwd(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool, scale: float, mixing: str,
                     dropout_p: float = 0.0, seed=None, q_offset: int = 0, key_keep=None, softcap=None,
                     head_offsets: str = "interleaved", num_splits=None):
    """Launch the forward kernel: ``out [B, Hq, Nq, D]`` (q's dtype) and ``lse [B, Hq, Nq]`` (float32, natural log).

    k and v hold the ``N`` positions of the sequence; q holds ``Nq`` of them, the positions
    ``[q_offset, q_offset + Nq)`` (default: all, ``Nq == N``). Sequence-parallel attention runs a rank's queries
    against the window of keys around them this way.

    With ``dropout_p > 0`` each branch's probabilities are dropped pairwise (``_dropout_keep``: a function of
    the seed, (b, h), branch, query and key positions) and the kept ones scaled by ``1 / (1 - dropout_p)``; the
    LSE is that of the undropped softmax. ``key_keep``: bool ``[B or 1, N]``, the keys that attend (key padding,
    ``common.key_padding``). ``head_offsets``: ``"interleaved"`` or ``"grouped"`` (``plan.head_offset``; H is q's
    head count). ``softcap``: scores ``c * tanh(scale * q.k / c)`` (Gemma2's soft-capping; None: uncapped), capped
    before the pattern's multiplicities and masks. ``num_splits``: split-K's count (``forward_splits``; None:
    chosen per call)."""
    B, Nq, N = q.shape[0], q.shape[2], k.shape[2]
    H, Hkv, D = head_shape(q, k)
    q_offset = _query_offset(q_offset, Nq, N)
    q = rows_addressable(q)
    if k.stride() != v.stride() or not rows_fit(k):  # the kernel reads v with k's strides
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    meta, out_scale, nested = _launch_pattern(segment_lengths, dilation_rates, mixing, H, dropout_p, head_offsets)
    seed_t, drop_thr, rdrop, dropout = _dropout_args(dropout_p, seed, lse, segment_lengths, dilation_rates)
    walks_fwd = _walks_constexpr(_dilated_attn_fwd_kernel, "rows", meta, nested, q_offset)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               out.stride(0), out.stride(1), out.stride(2), H, N, q_offset, Nq)
    splits = forward_splits(num_splits, batch=B, num_heads=H, n_q=Nq, n=N, L=meta["L"],
                            segment_lengths=segment_lengths, dilation_rates=dilation_rates, mixing=mixing,
                            dropout_p=dropout_p, device=q.device)
    seeded = splits == 1 and walk0_applies(meta, nested, is_causal, walks_fwd)
    keep, key_range_t, stride_keep, key_mask = key_padding_args(key_keep, B, N, q.device)
    cap = softcap_args(softcap)
    out0, lse0 = out, lse                               # unread unless seeded
    part, part_lse = out, lse                           # what the forward kernel writes: out and lse unless split
    if splits > 1:
        part = torch.empty((splits, B, H, Nq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, B, H, Nq), dtype=torch.float32, device=q.device)
    with launch_device(q):
        if seeded:
            out0, lse0 = torch.empty_like(out), torch.empty_like(lse)
            grid = lambda META: (triton.cdiv(q_offset + Nq, META["BLOCK_M"]) - q_offset // META["BLOCK_M"], B * H)
            runner(_dilated_attn_fwd_walk0_kernel)[grid](
                q, k, v, out, lse, out0, lse0, scale, *strides, keep, key_range_t, stride_keep, HEAD_DIM=D,
                GQA=H // Hkv, KEY_MASK=key_mask, **cap, **{key: meta[key] for key in _KEY_WALK0 if key in meta})
        runner(_dilated_attn_fwd_kernel)[_rows_grid(Nq, meta["L"], "BLOCK_M", B * H, splits)](
            q, k, v, part, part_lse, out0, lse0, scale, *strides, out_scale * rdrop, seed_t, drop_thr, keep,
            key_range_t, stride_keep, HEAD_DIM=D, IS_CAUSAL=is_causal, GQA=H // Hkv, DROPOUT=dropout,
            WALKS=walks_fwd, SEEDED=int(seeded), KEY_MASK=key_mask, **cap, **meta, SPLITS=splits)
        if splits > 1:
            runner(_dilated_attn_fwd_combine_kernel)[(triton.cdiv(Nq, _COMBINE_ROWS), B * H)](
                part, part_lse, out, lse, Nq, out.stride(0), out.stride(1), out.stride(2), H, HEAD_DIM=D,
                SPLITS=splits, BLOCK_R=_COMBINE_ROWS)
    return out, lse


def dilated_attn_bwd(dout, q, k, v, out, lse, segment_lengths, dilation_rates, *, is_causal: bool, scale: float,
                     mixing: str, dropout_p: float = 0.0, seed=None, q_offset: int = 0, key_keep=None,
                     softcap=None, head_offsets: str = "interleaved"):
    """Launch the backward kernels: ``(dq, dk, dv)``; ``dropout_p``, ``seed``, ``q_offset``, ``key_keep``,
    ``softcap`` and ``head_offsets`` as in the forward call (dk and dv: the gradients of all ``N`` key rows from
    the ``Nq`` queries q holds)."""
    B, Nq, N = q.shape[0], q.shape[2], k.shape[2]
    H, Hkv, D = head_shape(q, k)
    q_offset = _query_offset(q_offset, Nq, N)
    # dq/dk/dv are stored with q's and k's strides, and v is read with k's: all contiguous here.
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    delta = (dout.float() * out.float()).sum(-1).contiguous()            # rowsum(dO * O), [B, H, Nq]
    lse = lse.contiguous()
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, N, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, N, D), dtype=v.dtype, device=v.device)
    meta, out_scale, nested = _launch_pattern(segment_lengths, dilation_rates, mixing, H, dropout_p, head_offsets)
    seed_t, drop_thr, rdrop, dropout = _dropout_args(dropout_p, seed, lse, segment_lengths, dilation_rates)
    keep, key_range_t, stride_keep, key_mask = key_padding_args(key_keep, B, N, q.device)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              dout.stride(0), dout.stride(1), dout.stride(2), H, N, q_offset, Nq, out_scale * rdrop, seed_t, drop_thr,
              keep, key_range_t, stride_keep)
    flags = dict(HEAD_DIM=D, IS_CAUSAL=is_causal, GQA=H // Hkv, DROPOUT=dropout, KEY_MASK=key_mask,
                 **softcap_args(softcap), **meta)
    walks_dq = _walks_constexpr(_dilated_attn_bwd_dq_kernel, "rows", meta, nested, q_offset)
    walks_dkdv = _walks_constexpr(_dilated_attn_bwd_dkdv_kernel, "keys", meta, nested, 0)
    with launch_device(q):
        runner(_dilated_attn_bwd_dq_kernel)[_rows_grid(Nq, meta["L"], "BLOCK_M", B * H)](
            q, k, v, dout, lse, delta, dq, scale, *common, WALKS=walks_dq, **flags)
        runner(_dilated_attn_bwd_dkdv_kernel)[_rows_grid(N, meta["L"], "BLOCK_N", B * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, scale, *common, WALKS=walks_dkdv, **flags)
    return dq, dk, dv
