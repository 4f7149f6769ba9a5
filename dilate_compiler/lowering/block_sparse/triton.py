"""Triton kernels for block-sparse attention: static block lists, masking only where a block needs it.

A forward (and dQ) program owns ``BLOCK_M`` query rows of one ``(b, h)`` inside query block ``I`` and walks the
key blocks ``kv_idx[h, I]`` (FlexAttention's ``kv_num_blocks``/``kv_indices`` idea): first the partial ones,
where each tile evaluates the token predicate (the block's term bits, causality, the sequence end), then the
full ones, with no mask at all. Empty blocks are never visited. All blocks of a row feed one online softmax
(one softmax over the union of allowed keys). The dK/dV program owns ``BLOCK_N`` keys of one kv head inside
key block ``J``, loops over the query heads of its GQA group and walks the transposed lists ``q_idx[h, J]``.

Loops: one flat loop per list part with one ``BLOCK_N`` (``BLOCK_M``) tile per iteration, the next tile's block
read one iteration ahead, so the tile loads pipeline with as many buffers as a contiguous walk's; and the
partial tiles' term test has no branch on the block's term bits (a branch kept the whole mask tile live and
made the 128 x 128 tile spill). Both were found with a profile against FlexAttention's kernel on the same blocks.

Specialisation: layout block size, head dim, causality, GQA ratio, per-head layout, the number of terms and
the set of term-table columns that some term bounds (``checks``) are constexprs; the lists and the term
intervals are tensors, so one compiled kernel serves every layout of a pattern family. Whether N is a multiple
of the block size (``RAGGED``) and whether positions go through an index table (``PERMUTED``, the op's
``order``) are constexprs too. Block tiles (``BLOCK_M``, ``BLOCK_N``) divide the layout block size and are
autotuned.

Scheduling: programs start heaviest block rows first (longest-processing-time order), and programs of equal
work launch in (head, block) order. The launcher sorts all (program head, block row) pairs (block columns, for
dK/dV) by list length, descending and stable (``TileOrder``, one packed ``head * NB + block`` entry per pair), and
a program's linear launch index reads its pair there. A row that visits every key block (a global token's) then
starts in the first wave instead of at its head's turn in the grid, where it ran alone at the end (local + global
at 256K: a 2048-block row against rows of 16). Rows of equal work run neighbouring blocks of one head at a time
rather than one block of every head (measured on an H200: no change in time for the sliding window).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...patterns.algebra import GRID_AXES, TERM_COLUMNS
from ..common.dispatch import tensor_unsupported_reason
from ..common.autotune import autotune
from ..common.key_padding import key_padding_args, key_range, keys_kept
from ..common.launch import (autotune_configs, head_shape, launch_device, rows_addressable, rows_fit, runner,
                             softcap_args, tile_configs)
from ..common.primitives import LN2, LOG2E, score_scale, soft_cap, softmax_step

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)  # 256 unrolls past the H100's shared memory at D=128
_KEY = ["N", "HEAD_DIM", "BS", "IS_CAUSAL", "GQA", "PER_HEAD", "NUM_TERMS", "CHECKS", "PERMUTED", "KEY_MASK",
        "SOFTCAP"]
assert TERM_COLUMNS == 12 and GRID_AXES == 3   # _token_ok reads the term table and coordinates with these


@triton.jit
def _within(ok, x, row, on, COL: tl.constexpr, CHECKS: tl.constexpr, CAUSAL: tl.constexpr = False):
    """``ok`` and ``x`` inside the interval in columns ``COL, COL + 1`` of a term row; only the ends that some
    term bounds (bits of ``CHECKS``) are compiled. ``on`` (the block's bit for this term, a scalar) is folded into
    the first bounded column's bounds (an empty interval when off), so the tile needs no vector AND with it.
    ``CAUSAL`` (column 0, ``x = p - j``, with a lower end): causality rides on the lower end, ``max(lo, 0)``."""
    FIRST: tl.constexpr = (CHECKS & ((1 << COL) - 1)) == 0
    if ((CHECKS >> COL) & 3) == 3:   # lo <= x <= hi as one unsigned compare: (x - lo) < (hi - lo + 1)
        lo = tl.load(row + COL)
        if CAUSAL:   # lo >= 0 and hi <= INF: no overflow; an interval wholly before 0 is empty
            lo = tl.maximum(lo, 0)
            count = tl.maximum(tl.load(row + COL + 1) - lo + 1, 0).to(tl.uint32, bitcast=True)
        else:
            count = (tl.load(row + COL + 1) - lo + 1).to(tl.uint32, bitcast=True)
        if FIRST:
            count = tl.where(on, count, 0)
        ok = ok & ((x - lo).to(tl.uint32, bitcast=True) < count)
    elif (CHECKS >> COL) & 1:
        lo = tl.load(row + COL)
        if CAUSAL:
            lo = tl.maximum(lo, 0)
        if FIRST:
            lo = tl.where(on, lo, 2147483647)
        ok = ok & (x >= lo)
    elif (CHECKS >> (COL + 1)) & 1:
        hi = tl.load(row + COL + 1)
        if FIRST:
            hi = tl.where(on, hi, -2147483648)
        ok = ok & (x <= hi)
    return ok


@triton.jit
def _coord_diff(d, Coords, pc, jc, AXIS: tl.constexpr, CHECKS: tl.constexpr):
    """``c(p) - c(j)`` along grid axis ``AXIS``, loaded only when some term bounds it (else ``d``, unread)."""
    if (CHECKS >> (6 + 2 * AXIS)) & 3:
        d = tl.load(Coords + pc + AXIS) - tl.load(Coords + jc + AXIS)
    return d


@triton.jit
def _token_ok(Terms, Coords, bits, p2, j2, N, IS_CAUSAL: tl.constexpr, NUM_TERMS: tl.constexpr,
              CHECKS: tl.constexpr, RAGGED: tl.constexpr, SKIP_ROW0: tl.constexpr = False):
    """Token mask of a partial tile; ``p2``/``j2`` are query/key positions already broadcast to 2-D.
    Term rows are ``(d, p, j, g0, g1, g2)`` intervals (12 ints), ``g`` bounding the difference of the tokens'
    grid coordinates (``Coords``, 3 ints per position). ``CHECKS``: the columns some term bounds; the others
    are never loaded nor compared (a grid neighbourhood compiles 4 comparisons). A term's bit rides on its first
    bounded column (``_within``), so terms join with one OR and no AND with a broadcast bit; a causal mask rides
    on the lower end of ``p - j`` where every term tests it (forward partial loops 16-34% shorter in SASS at the
    larger tiles, full ones unchanged; predicates no longer packed into registers). ``SKIP_ROW0``: row 0, always
    true in every table (``term_table``; ``term_checks`` refuses others), applies on the block's bit alone. The
    backward's loops skip its bounds (with the causal mask apart, which came out shorter there); the forward
    tests them, with causality riding on them."""
    d = p2 - j2
    ok = d != d
    pc = tl.minimum(p2, N - 1) * 3
    jc = tl.minimum(j2, N - 1) * 3
    dc0 = _coord_diff(d, Coords, pc, jc, 0, CHECKS)
    dc1 = _coord_diff(d, Coords, pc, jc, 1, CHECKS)
    dc2 = _coord_diff(d, Coords, pc, jc, 2, CHECKS)
    # causality on the lower end of p - j, which every term then tests (not where row 0 is skipped: its test
    # would come back)
    CAUSAL_IN_TERMS: tl.constexpr = IS_CAUSAL and (CHECKS & 1) != 0 and not SKIP_ROW0
    for t in tl.static_range(NUM_TERMS):
        row = Terms + t * 12
        on = ((bits >> t) & 1) != 0
        if (t == 0 and SKIP_ROW0) or (CHECKS & 4095) == 0:   # row 0 is always true (term_table); no bounds
            ok = ok | on
        else:
            term = d == d
            term = _within(term, d, row, on, 0, CHECKS, CAUSAL_IN_TERMS)
            term = _within(term, p2, row, on, 2, CHECKS)
            term = _within(term, j2, row, on, 4, CHECKS)
            term = _within(term, dc0, row, on, 6, CHECKS)
            term = _within(term, dc1, row, on, 8, CHECKS)
            term = _within(term, dc2, row, on, 10, CHECKS)
            ok = ok | term   # no branch on the block's bits: a branch materialises the whole mask tile in
            # registers (128 x 128 tiles then spilled)
    if RAGGED:
        ok = ok & (j2 < N) & (p2 < N)
    if IS_CAUSAL and not CAUSAL_IN_TERMS:
        ok = ok & (j2 <= p2)
    return ok


@triton.jit
def _rows(Rows, p, N, PERMUTED: tl.constexpr, RAGGED: tl.constexpr):
    """The memory rows of sequence positions ``p``: ``rows[p]`` when the kernel runs in a permuted order
    (positions past the end of a ragged sequence read the last entry; their loads and stores are masked)."""
    if PERMUTED:
        if RAGGED:
            p = tl.minimum(p, N - 1)
        p = tl.load(Rows + p)
    return p


@triton.jit
def _query_rows(Rows, p, N, Q_LO, PERMUTED: tl.constexpr, RAGGED: tl.constexpr):
    """The rows of q, out, lse, dout and dq that hold query positions ``p``, which of them exist, and how many rows
    those tensors have. ``Q_LO`` None: every position is a query (row ``rows[p]`` when ``PERMUTED``); an int: q
    holds the last ``N - Q_LO`` positions (decoding), row ``p - Q_LO``, and rows before ``Q_LO`` don't exist."""
    if Q_LO is None:
        r = _rows(Rows, p, N, PERMUTED, RAGGED)
        ok = p < N
        n_rows = N
    else:
        tl.static_assert(not PERMUTED)
        r = p - Q_LO
        ok = (p < N) & (p >= Q_LO)
        n_rows = N - Q_LO
    return r, ok, n_rows


@triton.jit
def _before_queries(pid, Q_LO, BLOCK: tl.constexpr):
    """Whether sub-tile ``pid`` (``BLOCK`` positions) lies wholly before the first query position ``Q_LO``."""
    return (pid + 1) * BLOCK <= Q_LO


@triton.jit
def _load_kv(k_base, v_base, Rows, j, stride_kn, N, MASK: tl.constexpr, RAGGED: tl.constexpr,
             PERMUTED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V at positions ``j`` (``[BLOCK_N, HEAD_DIM]``); bounds-checked only on partial blocks of a ragged
    sequence."""
    offs = _rows(Rows, j, N, PERMUTED, RAGGED)[:, None] * stride_kn + tl.arange(0, HEAD_DIM)[None, :]
    if MASK and RAGGED:
        k = tl.load(k_base + offs, mask=(j < N)[:, None], other=0.0)
        v = tl.load(v_base + offs, mask=(j < N)[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs)
        v = tl.load(v_base + offs)
    return k, v


@triton.jit
def _list_entry(Idx, Bits, e, ok, MASK: tl.constexpr):
    """Block ``Idx[e]`` of a list row and its term bits (``MASK``; else 0); 0 where ``ok`` is false."""
    blk = tl.load(Idx + e, mask=ok, other=0)
    bits = 0
    if MASK:
        bits = tl.load(Bits + e, mask=ok, other=0)
    return blk, bits


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, p, Idx, Bits, lo, hi, k_base, v_base, Rows, stride_kn, Terms, Coords, N, qk_scale,
                MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, NUM_TERMS: tl.constexpr, CHECKS: tl.constexpr,
                RAGGED: tl.constexpr, PERMUTED: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
                softcap, SOFTCAP: tl.constexpr):
    """The key blocks of list entries ``[lo, hi)`` of row ``Idx`` / ``Bits``, one ``BLOCK_N`` tile per iteration.
    The next tile's block is read one iteration ahead, so the K and V loads pipeline as a contiguous walk's do
    (a load whose address comes from a load of the same iteration gets one buffer fewer)."""
    SUB: tl.constexpr = BS // BLOCK_N
    last = tl.maximum(hi - 1, lo)
    blk, bits = _list_entry(Idx, Bits, lo, lo < hi, MASK)
    for t in range(lo * SUB, hi * SUB):
        j = blk * BS + (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, Rows, j, stride_kn, N, MASK, RAGGED, PERMUTED, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)).to(tl.float32)          # raw: scaled inside the step, one multiply-add per score
        s_scale = qk_scale
        if SOFTCAP:     # capped before the masks, in base 2: scaled already
            s, _ = soft_cap(s * qk_scale, softcap)
            s_scale = 1.0
        if MASK:
            ok = _token_ok(Terms, Coords, bits, p[:, None], j[None, :], N, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED)
            s = tl.where(ok, s, float("-inf"))
        if KEY_MASK:   # key padding is per memory row
            kept = keys_kept(keep_base, _rows(Rows, j, N, PERMUTED, RAGGED), kv_lo, kv_hi, holes) & (j < N)
            s = tl.where(kept[None, :], s, float("-inf"))
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, s_scale, v, MASK or KEY_MASK)
        blk, bits = _list_entry(Idx, Bits, tl.minimum((t + 1) // SUB, last), True, MASK)
    return acc, m_i, l_i


@triton.jit
def _heavy_first(TileOrder, NB, BS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (tile, head index): launch index ``lin`` -> the (head, block) pair at ``lin // SUB`` of the
    pairs sorted by work (``TileOrder``: ``head * NB + block``), sub-tile ``lin % SUB`` of that block."""
    lin = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    SUB: tl.constexpr = BS // BLOCK
    pair = tl.load(TileOrder + lin // SUB)
    return (pair % NB) * SUB + lin % SUB, pair // NB


@triton.jit
def _query_tile(KvCount, pid_m, bh, H, NB, PER_HEAD: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query program's (b, h), its rows, its list row and that row's (partial, total) key-block counts."""
    b = (bh // H).to(tl.int64)                     # int64 base offsets: B * H * N * D may pass 2**31
    h = (bh % H).to(tl.int64)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hl = h if PER_HEAD else 0
    row = hl * NB + pid_m * BLOCK_M // BS
    n_part = tl.load(KvCount + row * 2)
    n_tot = tl.load(KvCount + row * 2 + 1)
    return b, h, p, row, n_part, n_tot


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, Terms, Coords, Rows, KvCount, KvIdx, KvBits, TileOrder, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_on,
    H, N, NB, KW, Keep, KeyRange, stride_keep, Q_LO,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA: tl.constexpr,
    PER_HEAD: tl.constexpr, NUM_TERMS: tl.constexpr, CHECKS: tl.constexpr, RAGGED: tl.constexpr,
    PERMUTED: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    softcap, SOFTCAP: tl.constexpr,
):
    pid_m, bh = _heavy_first(TileOrder, NB, BS, BLOCK_M)
    if pid_m * BLOCK_M >= N:   # a sub-tile past the end of the last (partial) block
        return
    if Q_LO is not None:
        if _before_queries(pid_m, Q_LO, BLOCK_M):   # the first query block's rows before the first query
            return
    b, h, p, row, n_part, n_tot = _query_tile(KvCount, pid_m, bh, H, NB, PER_HEAD, BS, BLOCK_M)
    r, row_ok, n_rows = _query_rows(Rows, p, N, Q_LO, PERMUTED, RAGGED)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + r[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    k_base = K + b * stride_kb + (h // GQA) * stride_kh
    v_base = V + b * stride_kb + (h // GQA) * stride_kh
    sm_scale, qk_scale = score_scale(sm_scale)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    idx, bits = KvIdx + row * KW, KvBits + row * KW
    kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
    keep_base = Keep + b * stride_keep
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, p, idx, bits, 0, n_part, k_base, v_base, Rows, stride_kn, Terms,
                                Coords, N, qk_scale, True, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED, PERMUTED, BS, BLOCK_N,
                                HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, p, idx, bits, n_part, n_tot, k_base, v_base, Rows, stride_kn, Terms,
                                Coords, N, qk_scale, False, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED, PERMUTED, BS,
                                BLOCK_N, HEAD_DIM, keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0.0, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + r[:, None] * stride_on + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + (b * H + h) * n_rows + r, lse, mask=row_ok)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, p, Idx, Bits, lo, hi, k_base, v_base, Rows, stride_kn, Terms, Coords, N,
               qk_scale, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, NUM_TERMS: tl.constexpr, CHECKS: tl.constexpr,
               RAGGED: tl.constexpr, PERMUTED: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, keep_base, kv_lo, kv_hi, holes, KEY_MASK: tl.constexpr,
               softcap, SOFTCAP: tl.constexpr):
    """dQ over the key blocks of list entries ``[lo, hi)`` (the loop of ``_fwd_blocks``)."""
    SUB: tl.constexpr = BS // BLOCK_N
    last = tl.maximum(hi - 1, lo)
    blk, bits = _list_entry(Idx, Bits, lo, lo < hi, MASK)
    for t in range(lo * SUB, hi * SUB):
        j = blk * BS + (t % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, Rows, j, stride_kn, N, MASK, RAGGED, PERMUTED, HEAD_DIM)
        s = (tl.dot(q, tl.trans(k)) * qk_scale).to(tl.float32)
        if SOFTCAP:
            s, dcap = soft_cap(s, softcap)
        pr = tl.exp2(s - lse2[:, None])
        if MASK:
            ok = _token_ok(Terms, Coords, bits, p[:, None], j[None, :], N, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED,
                           True)
            pr = tl.where(ok, pr, 0.0)
        if KEY_MASK:
            kept = keys_kept(keep_base, _rows(Rows, j, N, PERMUTED, RAGGED), kv_lo, kv_hi, holes) & (j < N)
            pr = tl.where(kept[None, :], pr, 0.0)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = pr * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq)
        blk, bits = _list_entry(Idx, Bits, tl.minimum((t + 1) // SUB, last), True, MASK)
    return dq


@triton.jit
def _block_sparse_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Terms, Coords, Rows, KvCount, KvIdx, KvBits, TileOrder, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_on,
    H, N, NB, KW, Keep, KeyRange, stride_keep, Q_LO,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA: tl.constexpr,
    PER_HEAD: tl.constexpr, NUM_TERMS: tl.constexpr, CHECKS: tl.constexpr, RAGGED: tl.constexpr,
    PERMUTED: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    softcap, SOFTCAP: tl.constexpr,
):
    pid_m, bh = _heavy_first(TileOrder, NB, BS, BLOCK_M)
    if pid_m * BLOCK_M >= N:   # a sub-tile past the end of the last (partial) block
        return
    if Q_LO is not None:
        if _before_queries(pid_m, Q_LO, BLOCK_M):   # the first query block's rows before the first query
            return
    b, h, p, row, n_part, n_tot = _query_tile(KvCount, pid_m, bh, H, NB, PER_HEAD, BS, BLOCK_M)
    r, row_ok, n_rows = _query_rows(Rows, p, N, Q_LO, PERMUTED, RAGGED)
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = b * stride_qb + h * stride_qh + r[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + r[:, None] * stride_on + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + (b * H + h) * n_rows + r, mask=row_ok, other=0.0) * LOG2E
    if KEY_MASK:   # a row that keeps no key: every key is masked below
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    delta = tl.load(Delta + (b * H + h) * n_rows + r, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + (h // GQA) * stride_kh
    v_base = V + b * stride_kb + (h // GQA) * stride_kh
    sm_scale, qk_scale = score_scale(sm_scale)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    idx, bits = KvIdx + row * KW, KvBits + row * KW
    kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
    keep_base = Keep + b * stride_keep
    dq = _dq_blocks(dq, q, do, lse2, delta, p, idx, bits, 0, n_part, k_base, v_base, Rows, stride_kn, Terms, Coords,
                    N, qk_scale, True, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED, PERMUTED, BS, BLOCK_N, HEAD_DIM,
                    keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    dq = _dq_blocks(dq, q, do, lse2, delta, p, idx, bits, n_part, n_tot, k_base, v_base, Rows, stride_kn, Terms,
                    Coords, N, qk_scale, False, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED, PERMUTED, BS, BLOCK_N, HEAD_DIM,
                    keep_base, kv_lo, kv_hi, holes, KEY_MASK, softcap, SOFTCAP)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, j, p, bits, q_base, do_base, lse_base, delta_base, Rows, stride_qn, stride_on, Terms,
               Coords, N, Q_LO, qk_scale, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, NUM_TERMS: tl.constexpr,
               CHECKS: tl.constexpr, RAGGED: tl.constexpr, PERMUTED: tl.constexpr, HEAD_DIM: tl.constexpr,
               KEY_MASK: tl.constexpr, softcap, SOFTCAP: tl.constexpr):
    """dK, dV from the query positions ``p`` (one ``BLOCK_M`` tile); rows that don't exist (past a ragged end, or
    before the first query ``Q_LO``) load as zeros and add nothing."""
    offs_d = tl.arange(0, HEAD_DIM)
    r, p_ok, _ = _query_rows(Rows, p, N, Q_LO, PERMUTED, RAGGED)
    if (MASK and RAGGED) or Q_LO is not None:
        q = tl.load(q_base + r[:, None] * stride_qn + offs_d[None, :], mask=p_ok[:, None], other=0.0)
        do = tl.load(do_base + r[:, None] * stride_on + offs_d[None, :], mask=p_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + r, mask=p_ok, other=0.0) * LOG2E
        delta = tl.load(delta_base + r, mask=p_ok, other=0.0)
    else:
        q = tl.load(q_base + r[:, None] * stride_qn + offs_d[None, :])
        do = tl.load(do_base + r[:, None] * stride_on + offs_d[None, :])
        lse2 = tl.load(lse_base + r) * LOG2E
        delta = tl.load(delta_base + r)
    st = (tl.dot(k, tl.trans(q)) * qk_scale).to(tl.float32)           # [BLOCK_N, BLOCK_M]
    if SOFTCAP:
        st, dcap = soft_cap(st, softcap)
    if KEY_MASK:   # a query row that keeps no key weighs 0
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    pt = tl.exp2(st - lse2[None, :])
    if MASK:
        ok = _token_ok(Terms, Coords, bits, p[None, :], j[:, None], N, IS_CAUSAL, NUM_TERMS, CHECKS, RAGGED, True)
        pt = tl.where(ok, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dpt = tl.dot(v, tl.trans(do)).to(tl.float32)
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * dcap
    dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_blocks(dk, dv, k, v, j, Idx, Bits, lo, hi, q_base, do_base, lse_base, delta_base, Rows, stride_qn,
                 stride_on, Terms, Coords, N, Q_LO, qk_scale, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 NUM_TERMS: tl.constexpr, CHECKS: tl.constexpr, RAGGED: tl.constexpr, PERMUTED: tl.constexpr,
                 BS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, KEY_MASK: tl.constexpr,
                 softcap, SOFTCAP: tl.constexpr):
    """dK, dV from the query blocks of list entries ``[lo, hi)`` of a transposed list row, one ``BLOCK_M`` tile
    per iteration (the next tile's block read one iteration ahead, as in ``_fwd_blocks``). With ``Q_LO`` (q holds
    the positions from ``Q_LO`` on) tiles wholly before it are skipped."""
    SUB: tl.constexpr = BS // BLOCK_M
    last = tl.maximum(hi - 1, lo)
    blk, bits = _list_entry(Idx, Bits, lo, lo < hi, MASK)
    for t in range(lo * SUB, hi * SUB):
        p = blk * BS + (t % SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        if Q_LO is None:
            dk, dv = _dkdv_tile(dk, dv, k, v, j, p, bits, q_base, do_base, lse_base, delta_base, Rows, stride_qn,
                                stride_on, Terms, Coords, N, Q_LO, qk_scale, MASK, IS_CAUSAL, NUM_TERMS, CHECKS,
                                RAGGED, PERMUTED, HEAD_DIM, KEY_MASK, softcap, SOFTCAP)
        else:
            if not _before_queries(blk * SUB + t % SUB, Q_LO, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, j, p, bits, q_base, do_base, lse_base, delta_base, Rows,
                                    stride_qn, stride_on, Terms, Coords, N, Q_LO, qk_scale, MASK, IS_CAUSAL,
                                    NUM_TERMS, CHECKS, RAGGED, PERMUTED, HEAD_DIM, KEY_MASK, softcap, SOFTCAP)
        blk, bits = _list_entry(Idx, Bits, tl.minimum((t + 1) // SUB, last), True, MASK)
    return dk, dv


@triton.jit
def _block_sparse_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Terms, Coords, Rows, QCount, QIdx, QBits, TileOrder, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh, stride_on,
    H, N, NB, QW, Keep, KeyRange, stride_keep, Q_LO,
    HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr, GQA: tl.constexpr,
    PER_HEAD: tl.constexpr, NUM_TERMS: tl.constexpr, CHECKS: tl.constexpr, RAGGED: tl.constexpr,
    PERMUTED: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    softcap, SOFTCAP: tl.constexpr,
):
    HKV = H // GQA
    pid_n, bkh = _heavy_first(TileOrder, NB, BS, BLOCK_N)
    if pid_n * BLOCK_N >= N:
        return
    b = (bkh // HKV).to(tl.int64)                  # int64 base offsets, as in _query_tile
    kh = (bkh % HKV).to(tl.int64)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = j < N
    J = pid_n * BLOCK_N // BS
    offs_d = tl.arange(0, HEAD_DIM)
    rows = _rows(Rows, j, N, PERMUTED, RAGGED)
    kv_off = b * stride_kb + kh * stride_kh + rows[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(K + kv_off, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=key_ok[:, None], other=0.0)
    sm_scale, qk_scale = score_scale(sm_scale)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GQA):
        h = kh * GQA + g
        hl = h if PER_HEAD else 0
        col = hl * NB + J
        n_part = tl.load(QCount + col * 2)
        n_tot = tl.load(QCount + col * 2 + 1)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_ob + h * stride_oh
        n_rows = N if Q_LO is None else N - Q_LO
        lse_base = Lse + (b * H + h) * n_rows
        delta_base = Delta + (b * H + h) * n_rows
        idx, bits = QIdx + col * QW, QBits + col * QW
        dk, dv = _dkdv_blocks(dk, dv, k, v, j, idx, bits, 0, n_part, q_base, do_base, lse_base, delta_base, Rows,
                              stride_qn, stride_on, Terms, Coords, N, Q_LO, qk_scale, True, IS_CAUSAL, NUM_TERMS,
                              CHECKS, RAGGED, PERMUTED, BS, BLOCK_M, HEAD_DIM, KEY_MASK, softcap, SOFTCAP)
        dk, dv = _dkdv_blocks(dk, dv, k, v, j, idx, bits, n_part, n_tot, q_base, do_base, lse_base, delta_base, Rows,
                              stride_qn, stride_on, Terms, Coords, N, Q_LO, qk_scale, False, IS_CAUSAL, NUM_TERMS,
                              CHECKS, RAGGED, PERMUTED, BS, BLOCK_M, HEAD_DIM, KEY_MASK, softcap, SOFTCAP)
    if KEY_MASK:   # dropped keys get no gradient
        kv_lo, kv_hi, holes = key_range(KeyRange, b, N, KEY_MASK)
        kept = keys_kept(Keep + b * stride_keep, rows, kv_lo, kv_hi, holes)
        dk = tl.where(kept[:, None], dk, 0.0)
        dv = tl.where(kept[:, None], dv, 0.0)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# --- launchers -------------------------------------------------------------------------------------------


def tile_space(kind: str, bs: int) -> list:
    """Every tile configuration of the GPU autotuning space ``kind`` ("fwd" or "bwd") whose tiles divide the
    layout block size ``bs``, pinned or not."""
    if kind == "fwd":   # 128 x 128, 8 warps, 3 stages held to 128 registers: two CTAs per SM (tile_configs)
        space = ((128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 4, 3), (128, 128, 8, 3, 128), (128, 64, 8, 3),
                 (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2),
                 (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 3), (16, 16, 4, 2))
    else:   # the last two: the dilated kernels' split (long resident tiles against short, deeply pipelined ones)
        space = ((64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2), (16, 16, 4, 2),
                 (128, 32, 4, 5), (32, 128, 4, 5))
    return tile_configs(t for t in space if t[0] <= bs and t[1] <= bs)


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, bs: int):
    fn, name, streamed = {"fwd": (_block_sparse_fwd_kernel, "block-sparse forward", ("BLOCK_N", 2)),
                          "dq": (_block_sparse_bwd_dq_kernel, "block-sparse backward dQ", ("BLOCK_N", 2)),
                          "dkdv": (_block_sparse_bwd_dkdv_kernel, "block-sparse backward dK/dV", ("BLOCK_M", 2))}[kind]
    return autotune(autotune_configs(tile_space("fwd" if kind == "fwd" else "bwd", bs)), key=_KEY,
                    name=f"{name} (block size {bs})", streamed=streamed)(fn)


def _kernel(kind: str, bs: int):
    """The autotuned kernel for one layout block size (tiles must divide it), wrapped per launch: a
    ``wrap_triton`` wrapper indexes a kernel table that each compilation resets, so it must not be cached."""
    return runner(_autotuned(kind, bs))


def kernel_unsupported_reason(q, block_size: int, softcap=None) -> str:
    """Why the Triton kernels can't run this call (the exact PyTorch path runs instead), or ''. Soft-capping
    (``softcap``) they run."""
    reason = tensor_unsupported_reason(q)
    if reason:
        return reason
    if block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size {block_size} (kernels: {SUPPORTED_BLOCK_SIZES})"
    return ""


def _grid(n: int, bs: int, block: str, programs: int, first: int = 0):
    """Every sub-tile of the layout blocks from ``first`` on (those past N return at once), times ``programs``
    heads."""
    return lambda META: ((triton.cdiv(n, bs) - first) * (bs // META[block]), programs)


def keepable(t) -> bool:
    """Whether a value derived from tensor ``t`` can be kept on it (``kept_on``): a plain tensor with a version
    counter (not an inference tensor, not a subclass such as a fake tensor), outside tracing."""
    return type(t) is torch.Tensor and not t.is_inference() and not torch.compiler.is_compiling()


def kept_on(t, key: str, compute):
    """``compute()``, kept on tensor ``t`` under ``key`` until ``t`` changes in place (its version counter): a
    layout reused across calls computes once. Where ``t`` isn't ``keepable``, ``compute()`` runs on every call. A
    None result is not kept."""
    if not keepable(t):
        return compute()
    entry = t.__dict__.get(key)
    if entry is not None and entry[0] == t._version:
        return entry[1]
    value = compute()
    if value is not None:
        t.__dict__[key] = (t._version, value)
    return value


def tile_order(count, heads: int, programs: int, first: int = 0) -> torch.Tensor:
    """``[programs * (NB - first)]`` int32: the launch order of the (program head, block) pairs of the blocks from
    ``first`` on, packed ``head * NB + block``: most work (list length, ``count[..., 1]``) first; equal work in
    (head, block) order (a stable sort). Program head ``x`` reads layout head ``x % heads``. ``heads`` < the
    layout's heads (a per-head layout under GQA, seen from a kv head) sums the counts of each group of consecutive
    heads. ``first`` > 0: the query blocks holding the last queries of a decoding call.

    Kept on ``count`` per ``(heads, programs, first)`` and ``count``'s version (``kept_on``; an in-place change
    sorts again): a layout reused across calls sorts once, not on every launch (a sort is a few small kernels,
    about 20 us)."""
    def sort():
        work = count[..., 1]
        if work.shape[0] > heads:
            work = work.view(heads, -1, work.shape[-1]).sum(1)
        nb = work.shape[-1]
        idx = torch.arange(programs, device=work.device) % work.shape[0]
        order = torch.argsort(work[idx, first:].flatten(), descending=True, stable=True)
        if first:
            order = order // (nb - first) * nb + first + order % (nb - first)
        return order.to(torch.int32)

    key = f"_tile_order_{heads}_{programs}" + (f"_{first}" if isinstance(first, int) and first else "")
    return kept_on(count, key, sort)


def _flags(q, k, kv_idx, terms, order, checks, block_size, is_causal, seq_len: int):
    H, Hkv, D = head_shape(q, k)
    return dict(HEAD_DIM=D, BS=block_size, IS_CAUSAL=bool(is_causal), GQA=H // Hkv,
                PER_HEAD=kv_idx.shape[0] > 1, NUM_TERMS=terms.shape[0], CHECKS=int(checks),
                RAGGED=seq_len % block_size != 0, PERMUTED=order is not None and order.numel() > 0)


def layout_length(k, order, seq_len) -> int:
    """The layout's sequence length: k's rows, or ``seq_len`` when the rows hold only some of the layout's
    positions; then ``order`` (an index table of ``seq_len`` entries) must map every position to a row."""
    if seq_len is None or seq_len == k.shape[2]:
        return k.shape[2]
    if order is None or order.numel() != seq_len or seq_len < k.shape[2]:
        raise ValueError(f"seq_len={seq_len} with k of {k.shape[2]} rows needs an order table of seq_len entries "
                         f"(every position's row), got {None if order is None else order.numel()} entries")
    return seq_len


def query_offset(q, k, order) -> tuple:
    """``(Q_LO, first)``: the kernels' first query position (None when q holds all of k's positions) and the first
    query block's index, for q holding the last ``Nq`` of k's ``Nk`` positions (decoding). ``order`` (a permuted
    layout) only with ``Nq == Nk``."""
    q_lo = k.shape[2] - q.shape[2]
    if q_lo == 0:
        return None, 0
    if order is not None and order.numel() > 0:
        raise NotImplementedError(
            f"a permuted layout (order) with queries that are the last {q.shape[2]} of {k.shape[2]} key positions; "
            f"accepted: order=None or empty, or as many queries as keys")
    return q_lo, q_lo


def _table_arg(t, q, dummy_len: int):
    """An index table (``order``, ``coords``) as the kernels read it: int32, contiguous; a ``dummy_len`` zero
    table when it is None or empty (the kernels then never read it)."""
    if t is None or t.numel() == 0:
        return torch.zeros(dummy_len, dtype=torch.int32, device=q.device)
    return t.to(torch.int32).contiguous()


def _per_head_entries(t, n: int):
    """``t [B, H, rows]`` contiguous, in a ``[B, H, n]`` buffer when ``n`` > rows (the kernels read ``n`` entries
    per head; the entries past ``rows`` are never read)."""
    if t.shape[2] >= n:
        return t.contiguous()
    buf = t.new_zeros(t.shape[:2] + (n,))
    buf[:, :, :t.shape[2]] = t
    return buf


def block_sparse_attn_fwd(q, k, v, terms, kv_count, kv_idx, kv_bits, block_size: int, is_causal: bool,
                          scale: float, coords, checks: int, order=None, key_keep=None, softcap=None,
                          seq_len=None):
    """Forward kernel: ``out [B, Hq, Nq, D]`` and ``lse [B, Hq, Nq]`` (float32, natural log).

    k and v hold the ``N`` positions the layout was built for; q holds all of them, or the last ``Nq`` (decoding:
    only the query blocks holding them are launched). ``order``: sequence position ``p`` of the layout is memory
    row ``order[p]`` of q, k, v, out and lse (the attention runs in that order with no gather; None or empty: the
    identity; only with ``Nq == N``). ``key_keep``: bool ``[B or 1, N]``, the memory rows whose keys attend (key
    padding, ``common.key_padding``). ``softcap``: scores ``c * tanh(scale * q.k / c)`` (Gemma2's soft-capping;
    None: uncapped), capped before the masks.

    ``seq_len``: the layout's sequence length when q, k and v hold fewer rows than it has positions (a rank of a
    sequence-parallel call: its queries and the keys it holds); ``order`` then maps each of the ``seq_len``
    positions to a row, several positions may share a row whose results are not used, and ``lse`` is a view of a
    ``[B, H, seq_len]`` buffer (the kernels address it by row within ``seq_len`` entries per head)."""
    B, H, Nq, D = q.shape
    N = layout_length(k, order, seq_len)
    q_lo, first = query_offset(q, k, order)
    q = rows_addressable(q)
    if k.stride() != v.stride() or not rows_fit(k):   # v is read with k's strides
        k, v = k.contiguous(), v.contiguous()
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N if q_lo is None else Nq), dtype=torch.float32, device=q.device)
    nb = kv_idx.shape[1]
    keep, key_range_t, stride_keep, key_mask = key_padding_args(key_keep, B, k.shape[2], q.device)
    with launch_device(q):
        _kernel("fwd", block_size)[_grid(N, block_size, "BLOCK_M", B * H, first // block_size)](
            q, k, v, out, lse, terms, _table_arg(coords, q, GRID_AXES), _table_arg(order, q, 1), kv_count, kv_idx,
            kv_bits, tile_order(kv_count, kv_count.shape[0], B * H, first // block_size), scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            out.stride(0), out.stride(1), out.stride(2), H, N, nb, kv_idx.shape[2], keep, key_range_t, stride_keep,
            q_lo, KEY_MASK=key_mask, **softcap_args(softcap), **_flags(q, k, kv_idx, terms, order, checks,
                                                                       block_size, is_causal, N))
    return out, (lse if lse.shape[2] == Nq else lse[:, :, :Nq])


def block_sparse_attn_bwd(dout, q, k, v, out, lse, terms, kv_count, kv_idx, kv_bits, q_count, q_idx, q_bits,
                          coords, order, checks: int, block_size: int, is_causal: bool, scale: float, *, delta=None,
                          key_keep=None, softcap=None, seq_len=None):
    """Backward kernels: ``(dq, dk, dv)`` (``order`` and q's rows as in ``block_sparse_attn_fwd``; ``order`` may be
    empty; dk and dv: the gradients of all N keys from the queries q holds). ``delta``: ``rowsum(dout * out)``
    ``[B, H, Nq]`` when the caller has it (a ring step, whose softmax spans more keys than these; ``out`` is then
    unused), else computed from ``out``. ``seq_len``: as in ``block_sparse_attn_fwd`` (the rows past q's in each
    head's ``seq_len`` entries of ``lse`` and ``delta`` are never read)."""
    B, H, Nq, D = q.shape
    Hkv, N = k.shape[1], layout_length(k, order, seq_len)
    q_lo, first = query_offset(q, k, order)
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    if delta is None:
        delta = (dout.float() * out.float()).sum(-1)
    delta, lse = (_per_head_entries(t.float(), N if q_lo is None else Nq) for t in (delta, lse))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    nb = kv_idx.shape[1]
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               dout.stride(0), dout.stride(1), dout.stride(2))
    flags = dict(_flags(q, k, kv_idx, terms, order, checks, block_size, is_causal, N), **softcap_args(softcap))
    coords = _table_arg(coords, q, GRID_AXES)
    rows = _table_arg(order, q, 1)
    kv_heads = Hkv if q_count.shape[0] > 1 else 1
    keep, key_range_t, stride_keep, key_mask = key_padding_args(key_keep, B, k.shape[2], q.device)
    with launch_device(q):
        _kernel("dq", block_size)[_grid(N, block_size, "BLOCK_M", B * H, first // block_size)](
            q, k, v, dout, lse, delta, dq, terms, coords, rows, kv_count, kv_idx, kv_bits,
            tile_order(kv_count, kv_count.shape[0], B * H, first // block_size), scale, *strides, H, N, nb,
            kv_idx.shape[2], keep, key_range_t, stride_keep, q_lo, KEY_MASK=key_mask, **flags)
        _kernel("dkdv", block_size)[_grid(N, block_size, "BLOCK_N", B * Hkv)](   # every key block
            q, k, v, dout, lse, delta, dk, dv, terms, coords, rows, q_count, q_idx, q_bits,
            tile_order(q_count, kv_heads, B * Hkv), scale, *strides, H, N, nb, q_idx.shape[2], keep, key_range_t,
            stride_keep, q_lo, KEY_MASK=key_mask, **flags)
    return dq, dk, dv
