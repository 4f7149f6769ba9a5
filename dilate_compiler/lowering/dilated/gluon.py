"""A warp-specialised dilated forward for Hopper (sm_90), written in Gluon: the op's forward for nested patterns
(``plan.nested_order``), non-causal.

The Triton forward (``dilated.triton``) visits every linked (query, key) pair once and adds the pair's log2
multiplicity to its score (README, "Each linked pair once"). Its key tiles are runs of one walk's keys, whose
multiplicities differ from key to key (they repeat with period ``L / R``), so each score pays for a bias add
and the tiles are gathered with strided pointer loads. Here the key tiles are *one residue class mod L*: the
128 keys ``pos + o + L * m``, ``m < 128``, of class ``o`` in a run of ``L * 128`` positions. The multiplicity
of a pair depends on the key only through ``(o - h) mod L`` (and on the query through its class ``c``), so a
tile has one multiplicity, a scalar that rides on the row max: ``m = max(m, rowmax(s) * scale + b)``,
``p = exp2(s * scale - (m - b))`` costs what dense flash attention's softmax costs. And a class's keys are one
column block of the ``[B * H * N / L, L * D]`` view of K or V, so TMA loads them, as it loads a query tile (its
128 rows of class ``c``, ``L`` positions apart) and stores the output.

A query tile is ``(b, h, t, c)``: the rows ``t * L * 128 + c + L * i``, ``i < 128``, all inside one segment of
the shortest branch. Its keys, walk by walk (walk B: branch B's segment minus branch B-1's; applies when branch
B selects class c), class by class (``o = h mod R_B + k R_B``), run by run (``L * 128`` positions each).

One persistent CTA per SM, as ``block_sparse.gluon`` (partitions, buffers and barriers: ``common.hopper_gluon``): the
producer draws query tiles in (b, h, t, c) order, ``c`` fastest (concurrent CTAs then share their K/V runs in
L2), from a counter in global memory, TMA-loads Q and the key tiles' K and V, and writes each key tile's log2
multiplicity into a slot beside its stage; the consumers are ``common.hopper_gluon.consume`` with that bias.

What it takes (``unsupported_reason``): compute capability 9.0, fp16/bf16, head dim 64, a nested pattern under
LSE mixing, no dropout, no mask, not causal, all queries (``q_offset == 0``, as many rows as k), contiguous q, k,
v, and ``L * 128`` dividing both the shortest segment and N (config A: 1,024), static sizes. Under
``torch.compile``, export and AOTInductor the op reaches it through the opaque ``dilated_attention_forward_hopper``
(``op.py``). The backward is the Triton kernels'.
Gluon has no CPU interpreter: ``tests/lowering/dilated/test_gluon.py`` checks this kernel against float64 on the
GPU. ``DILATE_COMPILER_WARP_SPECIALISED=0`` turns it off (with the block-sparse one).
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..common import hopper_gluon as hg
from ..common.primitives import LOG2E
from .plan import nested_order
from .triton import MAX_BRANCHES

BLOCK = hg.BLOCK     # query rows of a tile and keys of a K/V stage
_BLOCK = gl.constexpr(BLOCK)
_HALF = gl.constexpr(hg.HALF)


@gluon.jit
def _query_tile(tile, T, H, N, L: gl.constexpr, GQA: gl.constexpr):
    """Query tile ``tile`` of the (b, h, t, c) order: its head ``h``, class ``c``, first position, its first
    row in the ``[rows, L * D]`` views of q and out, and its kv head's first row in those of k and v."""
    c = tile % L
    rest = tile // L
    t = rest % T
    bh = rest // T
    h = bh % H
    kv_head = (bh // H) * (H // GQA) + h // GQA
    return h, c, t * (L * _BLOCK) + c, bh * (N // L) + t * _BLOCK, kv_head * (N // L)


@gluon.jit
def _walk_runs(p_first, N, B: gl.constexpr, WS: gl.constexpr, L: gl.constexpr):
    """Walk ``B``'s positions for a query tile starting at ``p_first``: branch B's segment minus branch B-1's,
    as two ranges ``[lo_a, lo_a + L * BLOCK * n_a)`` and ``[lo_b, ...)`` of ``n_a`` and ``n_b`` runs."""
    W: gl.constexpr = WS[B]
    seg_lo = p_first // W * W
    seg_hi = gl.minimum(seg_lo + W, N)
    if B == 0:
        hole = seg_lo
        hole_end = seg_lo
    else:
        W_PREV: gl.constexpr = WS[B - 1]
        hole = p_first // W_PREV * W_PREV
        hole_end = gl.minimum(hole + W_PREV, seg_hi)
    return seg_lo, (hole - seg_lo) // (L * _BLOCK), hole_end, (seg_hi - hole_end) // (L * _BLOCK)


@gluon.jit
def _log2_multiplicity(x, y, B: gl.constexpr, NUM_BRANCHES: gl.constexpr, RS: gl.constexpr):
    """log2 of the number of branches linking keys of class offset ``x = (o - h) mod L`` to queries of
    ``y = (c - h) mod L`` in walk ``B``: 1 + the later branches whose rate divides both."""
    n = x * 0 + 1
    for i in gl.static_range(B + 1, NUM_BRANCHES):
        n += (((x % RS[i]) == 0) & ((y % RS[i]) == 0)).to(gl.int32)
    return gl.log2(n.to(gl.float32))


@gluon.jit
def _key_tiles(p_first, h, c, N, L: gl.constexpr, WS: gl.constexpr, RS: gl.constexpr):
    """How many key tiles a query tile has (walks whose branch selects class ``c``)."""
    y = (c - h % L + L) % L
    n = p_first * 0
    for B in gl.static_range(len(WS)):
        if y % RS[B] == 0:
            lo_a, n_a, lo_b, n_b = _walk_runs(p_first, N, B, WS, L)
            n += (L // RS[B]) * (n_a + n_b)
    return n


@gluon.jit
def _producer(q_desc, k_desc, v_desc, tables, dims, bufs, STAGES: gl.constexpr, GQA: gl.constexpr,
              L: gl.constexpr, WS: gl.constexpr, RS: gl.constexpr):
    Counter, Slots, StageSlots = tables
    total, T, H, N = dims
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    D: gl.constexpr = k_desc.block_type.shape[1]
    NUM_BRANCHES: gl.constexpr = len(WS)
    i = 0
    kv = 0
    tile = gl.atomic_add(Counter, 1)
    while tile < total:
        qs = hg.next_q_buffer(Slots, q_empty, i, tile)
        h, c, p_first, q_row, kv_row = _query_tile(tile, T, H, N, L, GQA)
        mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
        hg.tma_load(q_desc, [q_row, c * D], q_ready.index(qs), q_bufs.index(qs))
        y = (c - h % L + L) % L
        for B in gl.static_range(NUM_BRANCHES):
            if y % RS[B] == 0:
                lo_a, n_a, lo_b, n_b = _walk_runs(p_first, N, B, WS, L)
                for k in range(L // RS[B]):
                    o = h % RS[B] + k * RS[B]
                    lm = _log2_multiplicity((o - h % L + L) % L, y, B, NUM_BRANCHES, RS)
                    for m in range(n_a + n_b):
                        pos = gl.where(m < n_a, lo_a + m * (L * _BLOCK), lo_b + (m - n_a) * (L * _BLOCK))
                        s = hg.next_stage(kv_empty, kv_ready, StageSlots, kv, lm, 2 * k_desc.block_type.nbytes,
                                          STAGES, True)
                        hg.tma_load(k_desc, [kv_row + pos // L, o * D], kv_ready.index(s), k_bufs.index(s))
                        hg.tma_load(v_desc, [kv_row + pos // L, o * D], kv_ready.index(s), v_bufs.index(s))
                        kv += 1
        i += 1
        tile = gl.atomic_add(Counter, 1)
    qs = hg.next_q_buffer(Slots, q_empty, i, -1)
    mbarrier.arrive(q_ready.index(qs))


@gluon.jit
def _tile_rows(tile, dims, PATTERN: gl.constexpr):
    """For ``hopper_gluon.consume``: query tile ``tile``'s number of key tiles and where its output and LSE
    go (its rows are ``L`` positions apart)."""
    L: gl.constexpr = PATTERN[0]
    GQA: gl.constexpr = PATTERN[1]
    T, H, N, D = dims
    h, c, p_first, q_row, kv_row = _query_tile(tile, T, H, N, L, GQA)
    n = _key_tiles(p_first, h, c, N, L, PATTERN[2], PATTERN[3])
    return n, (q_row, c * D, (tile // (L * T)).to(gl.int64) * N + p_first, L)


@gluon.jit
def _consumer(o_desc, Lse, slots, stage_slots, bufs, rows, qk_scale, PATTERN: gl.constexpr, STAGES: gl.constexpr,
              PART: gl.constexpr):
    hg.consume(o_desc, Lse, slots, stage_slots, bufs, rows, qk_scale, _tile_rows, PATTERN, STAGES, True, PART)


@gluon.jit
def _dilated_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, Lse, Counter, total, T, H, N, qk_scale,
                           HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, GQA: gl.constexpr, L: gl.constexpr,
                           WS: gl.constexpr, RS: gl.constexpr):
    """The pattern: ``L`` (the lcm of the rates) and the branches' segment lengths ``WS`` and rates ``RS``, in
    ``nested_order``."""
    bufs, slots, stage_slots = hg.buffers(q_desc, k_desc, v_desc, STAGES)
    tables = (Counter, slots, stage_slots)
    dims = (total, T, H, N)
    rows = (T, H, N, HEAD_DIM)
    PATTERN: gl.constexpr = (L, GQA, WS, RS)
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, tables, dims, bufs, STAGES, GQA, L, WS, RS)),
        (_consumer, (o_desc, Lse, slots, stage_slots, bufs, rows, qk_scale, PATTERN, STAGES, 0)),
        (_consumer, (o_desc, Lse, slots, stage_slots, bufs, rows, qk_scale, PATTERN, STAGES, 1)),
    ], [4, 4], [240, 240])


# --- launcher ----------------------------------------------------------------------------------------------


def unsupported_reason(q, k, v, attn_mask, segment_lengths, dilation_rates, *, is_causal: bool, mixing: str,
                       dropout_p: float, softcap=None) -> str:
    """Why the warp-specialised dilated forward can't run this call (the Triton forward runs instead), or ''."""
    return hg.device_reason(q, (q, k, v)) or call_reason(q, k, v, attn_mask, segment_lengths, dilation_rates,
                                                         is_causal=is_causal, mixing=mixing, dropout_p=dropout_p,
                                                         softcap=softcap)


def call_reason(q, k, v, attn_mask, segment_lengths, dilation_rates, *, is_causal: bool, mixing: str,
                dropout_p: float, softcap=None) -> str:
    """What of the call itself (dtype, shapes, pattern, layout; not the device) the forward doesn't take, or ''."""
    reason = hg.dtype_reason(q)
    if reason:
        return reason
    if softcap is not None:
        return f"soft-capping of the scores (softcap={softcap}; the warp-specialised forward has no score modifier)"
    if is_causal or attn_mask is not None or dropout_p != 0.0:
        return "causal, a mask or dropout"
    chain = nested_order(segment_lengths, dilation_rates, mixing, dropout_p)
    if chain is None or len(chain[0]) > MAX_BRANCHES:
        return (f"segments {list(segment_lengths)}, rates {list(dilation_rates)}, mixing {mixing!r} (a nested "
                "pattern under mixing='lse': each segment length and rate dividing the next)")
    L = math.lcm(*dilation_rates)
    N = k.shape[2]
    if q.shape[2] != N:
        return (f"queries that are the last {q.shape[2]} of {N} key positions (the warp-specialised forward runs "
                f"queries at every key position)")
    if chain[0][0] % (L * BLOCK) or N % (L * BLOCK):
        return (f"N {N}, shortest segment {chain[0][0]} (L * {BLOCK} = {L * BLOCK} dividing N and the shortest "
                f"segment)")
    if not all(t.is_contiguous() for t in (q, k, v)):
        return "q, k, v not contiguous"
    return ""


def _descriptor(t: torch.Tensor, L: int, rows: int) -> TensorDescriptor:
    """TMA descriptor of contiguous ``[B, H, N, D]`` ``t`` seen as ``[B * H * N / L, L * D]`` (row ``r``: the
    positions ``r * L .. r * L + L - 1`` of the flattened heads), in blocks of ``rows`` rows by ``D`` columns:
    one residue class mod L of ``rows`` consecutive view rows."""
    d = t.shape[-1]
    flat = t.view(-1, L * d)
    return TensorDescriptor(flat, list(flat.shape), [L * d, 1], [rows, d],
                            hg.smem_layout(rows, d, t.dtype == torch.bfloat16))


def dilated_attn_fwd_ws(q, k, v, segment_lengths, dilation_rates, *, scale: float):
    """``(out, lse)`` as ``triton.dilated_attn_fwd`` returns them (non-causal, mixing "lse"), for a call
    that ``unsupported_reason`` accepts."""
    B, H, N, D = q.shape
    ws, rs = nested_order(segment_lengths, dilation_rates, "lse")
    L = math.lcm(*rs)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    T = N // (L * BLOCK)
    total = B * H * T * L
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    programs = min(hg.programs(q.device.index), total)
    with torch.cuda.device(q.device):
        _dilated_fwd_ws_kernel[(programs,)](
            _descriptor(q, L, BLOCK), _descriptor(k, L, BLOCK), _descriptor(v, L, BLOCK), _descriptor(out, L, hg.HALF),
            lse, counter, total, T, H, N, scale * LOG2E.value, HEAD_DIM=D, STAGES=hg.STAGES,
            GQA=H // k.shape[1], L=L, WS=ws, RS=rs, num_warps=4)
    return out, lse
