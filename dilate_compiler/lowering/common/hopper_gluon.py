"""What the warp-specialised Hopper forwards (``block_sparse.gluon``, ``dilated.gluon``) share: their shared-memory
buffers and mbarriers, the consumers' loop over a query tile's key tiles and its epilogue, and the checks of the
device and the call's context.

Both kernels run one persistent CTA per SM in three partitions:

- a producer (4 warps, 24 registers; one thread issues) draws query tiles of 128 rows from a counter in global
  memory and TMA-loads each tile's Q into one of two buffers and its key tiles' K and V into a ring of
  ``STAGES`` buffers, running ahead across tiles. It tells the consumers which tile a Q buffer holds through a
  small shared-memory slot written before the buffer's barrier is armed (the arrive releases the write); a slot
  holding -1 ends the consumers' loop. The dilated producer also writes each key tile's log2 multiplicity into
  a slot beside its stage;
- two consumers (one warpgroup each, 240 registers) own the top and bottom 64 rows of a tile (``consume``):
  asynchronous wgmma for Q Kᵀ and P V, the online softmax in base 2, each key tile's P V issued with the next
  tile's Q Kᵀ so that it runs during that tile's softmax, a stage released (one arrive per consumer) once the
  P V that reads it retires. Key tiles run back to back across query tiles: a query tile's last P V runs under
  the next query tile's first softmax, and its output then leaves by TMA, its LSE by stores.

Eager calls launch them directly; traced calls (``torch.compile``, export, AOTInductor) through opaque ops that
launch them when the graph runs (``traced``), so a compiled graph runs the forward eager mode runs.
Gluon has no CPU interpreter: the kernels are checked against float64 on the GPU only.
``DILATE_COMPILER_WARP_SPECIALISED=0`` turns both off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .launch import INTERPRET
from .primitives import LN2

# TMA copies: async_load / async_store in newer Gluon (Triton 3.9 has only these), async_copy_* in Triton 3.6
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

_SETTING = os.environ.get("DILATE_COMPILER_WARP_SPECIALISED", "1")
if _SETTING not in ("0", "1"):
    raise ValueError(f"DILATE_COMPILER_WARP_SPECIALISED must be '0' (off) or '1' (on, the default), got {_SETTING!r}")
ENABLED = _SETTING == "1"

BLOCK = 128          # query rows of a tile and keys of a K/V stage
_BLOCK = gl.constexpr(BLOCK)
HALF = 64            # query rows per consumer warpgroup
_HALF = gl.constexpr(HALF)
STAGES = 3           # K/V ring depth (two stages are live in a consumer; the third lets the producer run ahead)
HEAD_DIMS = (64,)    # at 128 the K/V ring doesn't fit in shared memory beside two Q buffers
SLOT_LAYOUT = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))   # one value, across a 4-warp partition


@contextlib.contextmanager
def turned_off():
    """Within the block the ops run their Triton forwards, as with ``DILATE_COMPILER_WARP_SPECIALISED=0``."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def traced(tensors) -> bool:
    """Whether the op runs inside a trace (``torch.compile``, export, AOTInductor): the call's ``tensors`` are
    fake or functional ones. A traced call reaches a warp-specialised forward through an opaque op that launches
    it when the compiled graph runs (``dilated_attention_forward_hopper``, ``block_sparse_attention_forward_hopper``):
    Gluon kernels are not Triton kernels Inductor can inline."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def device_reason(q, tensors) -> str:
    """Why a warp-specialised forward can't run on ``q``'s device in this context (the Triton forward runs
    instead), or ''. ``tensors``: the call's tensor arguments."""
    if not ENABLED:
        return "turned off (DILATE_COMPILER_WARP_SPECIALISED=0)"
    if (q.device.type != "cuda" or not torch.cuda.is_available()
            or torch.cuda.get_device_capability(q.device) != (9, 0)):
        return f"device {q.device} (the warp-specialised forward is written for compute capability 9.0)"
    if INTERPRET:
        return "TRITON_INTERPRET=1 (Gluon has no interpreter)"
    if any(isinstance(n, torch.SymInt) for t in tensors for n in t.shape):
        return "dynamic shapes (the warp-specialised forward's tiling is fixed by the sizes when a graph is traced)"
    return ""


def dtype_reason(q) -> str:
    """What of q's dtype and head dim the warp-specialised forwards don't take, or ''."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return f"dtype {q.dtype}, head dim {q.shape[-1]} (float16/bfloat16, head dim in {HEAD_DIMS})"
    return ""


@functools.lru_cache(maxsize=None)
def smem_layout(rows: int, head_dim: int, bf16: bool):
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.bfloat16 if bf16 else gl.float16)


@functools.lru_cache(maxsize=None)
def programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@gluon.jit
def buffers(q_desc, k_desc, v_desc, STAGES: gl.constexpr):
    """The kernel's shared memory: ``(q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty)``, the Q
    buffers' tile slots and the K/V stages' value slots, barriers initialised."""
    dtype: gl.constexpr = q_desc.dtype
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    q_bufs = gl.allocate_shared_memory(dtype, [2, _BLOCK, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    slots = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    stage_slots = gl.allocate_shared_memory(gl.float32, [STAGES, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for j in gl.static_range(2):
        mbarrier.init(q_ready.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=2)
    for j in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(j), count=1)
        mbarrier.init(kv_empty.index(j), count=2)
    return (q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty), slots, stage_slots


@gluon.jit
def next_q_buffer(Slots, q_empty, i, tile):
    """Producer: wait until Q buffer ``i % 2`` is free and tell the consumers it will hold ``tile`` (-1: no more;
    the caller then arms the buffer's barrier, which releases the write); returns the buffer's index."""
    qs = i % 2
    mbarrier.wait(q_empty.index(qs), ((i // 2) & 1) ^ 1)       # a fresh barrier passes parity 1 at once
    Slots.index(qs).store(gl.full([1], tile, gl.int32, SLOT_LAYOUT))
    return qs


@gluon.jit
def next_stage(kv_empty, kv_ready, StageSlots, kv, value, nbytes, STAGES: gl.constexpr, BIASED: gl.constexpr):
    """Producer: wait until K/V stage ``kv % STAGES`` is free, with ``BIASED`` write ``value`` (the key tile's
    log2 multiplicity) into its slot, and arm its barrier for ``nbytes``; returns the stage's index."""
    s = kv % STAGES
    mbarrier.wait(kv_empty.index(s), ((kv // STAGES) & 1) ^ 1)
    if BIASED:
        StageSlots.index(s).store(gl.full([1], value, gl.float32, SLOT_LAYOUT))
    mbarrier.expect(kv_ready.index(s), nbytes)
    return s


@gluon.jit
def read_slot(Slots, q_ready, i):
    """Consumer: wait for Q buffer ``i % 2``'s tile and read which tile it is (-1: no more)."""
    mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
    return gl.max(Slots.index(i % 2).load(SLOT_LAYOUT), axis=0)


@gluon.jit
def _ready_stage(kv_ready, StageSlots, kv, STAGES: gl.constexpr, BIASED: gl.constexpr):
    """Wait for K/V stage ``kv % STAGES``; with ``BIASED``, read its key tile's log2 multiplicity."""
    s = kv % STAGES
    mbarrier.wait(kv_ready.index(s), (kv // STAGES) & 1)
    lm = 0.0
    if BIASED:
        lm = gl.max(StageSlots.index(s).load(SLOT_LAYOUT), axis=0)
    return s, lm


@gluon.jit
def _softmax_tile(qk, m_i, l_i, qk_scale, lm, BIASED: gl.constexpr):
    """One key tile of the online softmax in base 2, as the Triton kernels: (m, l, p, alpha). With ``BIASED``
    every score carries the tile's log2 multiplicity ``lm``, which rides on the row max."""
    if BIASED:
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale + lm)
        p = gl.exp2(qk * qk_scale - (m_new - lm)[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
        p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return m_new, l_i * alpha + gl.sum(p, axis=1), p, alpha


@gluon.constexpr_function
def score_layout():
    """A consumer warpgroup's scores ``[HALF, BLOCK]``, as wgmma leaves them."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])


@gluon.constexpr_function
def out_layout(head_dim):
    """A consumer warpgroup's output accumulator ``[HALF, head_dim]``."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, head_dim, 16])


@gluon.constexpr_function
def p_layout(head_dim):
    """P as the register A operand of P V."""
    return gl.DotOperandLayout(operand_index=0, parent=out_layout(head_dim), k_width=2)


@gluon.jit
def _first_tile(q, bufs, StageSlots, kv, qk_scale, STAGES: gl.constexpr, BIASED: gl.constexpr):
    """A query tile's first key tile when no P V is pending: Q Kᵀ, then the softmax from scratch;
    returns ``(m, l, P as a P V operand, kv)``."""
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    s, lm = _ready_stage(kv_ready, StageSlots, kv, STAGES, BIASED)
    qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)), gl.zeros([_HALF, _BLOCK], gl.float32, score_layout()),
                       use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    m_i = gl.full([_HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, score_layout()))
    m_i, l_i, p, alpha = _softmax_tile(qk, m_i, gl.zeros_like(m_i), qk_scale, lm, BIASED)
    return m_i, l_i, gl.convert_layout(p.to(q.dtype), p_layout(q.shape[1])), kv + 1


@gluon.jit
def _next_tiles(q, acc, m_i, l_i, p_op, bufs, StageSlots, kv, n, qk_scale, STAGES: gl.constexpr,
                BIASED: gl.constexpr):
    """Key tiles 1 .. n-1 of a query tile: each tile's Q Kᵀ issued with the previous tile's P V, which runs
    during this tile's softmax; a stage released once its P V retires. The last tile's P V stays pending:
    returns ``(acc, m, l, its P, kv)``."""
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    HEAD_DIM: gl.constexpr = q.shape[1]
    for t in range(1, n):
        sp = (kv - 1) % STAGES
        s, lm = _ready_stage(kv_ready, StageSlots, kv, STAGES, BIASED)
        qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)),
                           gl.zeros([_HALF, _BLOCK], gl.float32, score_layout()), use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)     # tile t - 1's P V
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
        m_i, l_i, p, alpha = _softmax_tile(qk, m_i, l_i, qk_scale, lm, BIASED)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(sp))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, out_layout(HEAD_DIM)))[:, None]
        p_op = gl.convert_layout(p.to(q.dtype), p_layout(HEAD_DIM))
        kv += 1
    return acc, m_i, l_i, p_op, kv


@gluon.jit
def _store_rows(acc, m_i, l_i, o_smem, o_desc, Lse, where, PART: gl.constexpr):
    """Normalise ``acc`` and store it by TMA at ``[o_row + PART * HALF, o_col]`` of ``o_desc`` (through
    ``o_smem``, once the previous store has read it), and the rows' LSE (natural log) at ``Lse + lse_base +
    row * lse_step``; rows that link nothing (``l == 0``) get output 0 and LSE -inf."""
    o_row, o_col, lse_base, lse_step = where
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    lse = gl.where(l_i > 0.0, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
    out = acc / gl.convert_layout(l_safe, o_rows)[:, None]
    tma.store_wait(pendings=0)                 # the previous store has read o_smem
    o_smem.store(out.to(o_desc.dtype))
    fence_async_shared()
    tma_store(o_desc, [o_row + PART * _HALF, o_col], o_smem)
    rows_i = PART * _HALF + gl.arange(0, _HALF, layout=lse.type.layout)
    gl.store(Lse + lse_base + rows_i * lse_step, lse)


@gluon.jit
def consume(o_desc, Lse, Slots, StageSlots, bufs, dims, qk_scale, TILE: gl.constexpr, PATTERN: gl.constexpr,
            STAGES: gl.constexpr, BIASED: gl.constexpr, PART: gl.constexpr):
    """Consumer partition: rows ``[PART * HALF, (PART + 1) * HALF)`` of every query tile the producer streams.
    ``TILE(tile, dims, PATTERN)`` gives a tile's number of key tiles and where its output and LSE go,
    ``(n, (o_row, o_col, lse_base, lse_step))``. Key tiles run back to back across query tiles: the last P V of
    one query tile is issued with the next one's first Q Kᵀ and runs during that tile's softmax; then the
    first one's output is stored. ``BIASED``: every key tile's scores carry the log2 multiplicity in its stage
    slot."""
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    HEAD_DIM: gl.constexpr = o_desc.block_type.shape[1]
    rows: gl.constexpr = gl.SliceLayout(1, score_layout())
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [_HALF, HEAD_DIM], o_desc.layout)
    no_max = gl.full([_HALF], float("-inf"), gl.float32, layout=rows)
    no_sum = gl.zeros([_HALF], gl.float32, layout=rows)
    no_acc = gl.zeros([_HALF, HEAD_DIM], gl.float32, layout=out_layout(HEAD_DIM))
    i = 0
    kv = 0
    tile = read_slot(Slots, q_ready, i)
    n, where = TILE(gl.maximum(tile, 0), dims, PATTERN)
    while (tile >= 0) & (n == 0):             # tiles that link nothing, before the first that links keys
        mbarrier.arrive(q_empty.index(i % 2))
        _store_rows(no_acc, no_max, no_sum, o_smem, o_desc, Lse, where, PART)
        i += 1
        tile = read_slot(Slots, q_ready, i)
        n, where = TILE(gl.maximum(tile, 0), dims, PATTERN)
    if tile >= 0:
        q = q_bufs.index(i % 2).slice(PART * _HALF, _HALF, dim=0)
        m_i, l_i, p_op, kv = _first_tile(q, bufs, StageSlots, kv, qk_scale, STAGES, BIASED)
        acc, m_i, l_i, p_op, kv = _next_tiles(q, no_acc, m_i, l_i, p_op, bufs, StageSlots, kv, n, qk_scale, STAGES,
                                              BIASED)
        mbarrier.arrive(q_empty.index(i % 2))
        pending = where                      # the query tile whose last P V is pending
        i += 1
        tile = read_slot(Slots, q_ready, i)
        while tile >= 0:
            n, where = TILE(tile, dims, PATTERN)
            if n == 0:
                _store_rows(no_acc, no_max, no_sum, o_smem, o_desc, Lse, where, PART)
            else:
                q = q_bufs.index(i % 2).slice(PART * _HALF, _HALF, dim=0)
                sp = (kv - 1) % STAGES
                s, lm = _ready_stage(kv_ready, StageSlots, kv, STAGES, BIASED)
                qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)),
                                   gl.zeros([_HALF, _BLOCK], gl.float32, score_layout()), use_acc=False,
                                   is_async=True)
                acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)   # the pending tile's last P V
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
                m_n, l_n, p, alpha = _softmax_tile(qk, no_max, no_sum, qk_scale, lm, BIASED)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(sp))
                _store_rows(acc, m_i, l_i, o_smem, o_desc, Lse, pending, PART)
                p_op = gl.convert_layout(p.to(q.dtype), p_layout(HEAD_DIM))
                acc, m_i, l_i, p_op, kv = _next_tiles(q, no_acc, m_n, l_n, p_op, bufs, StageSlots, kv + 1, n,
                                                      qk_scale, STAGES, BIASED)
                pending = where
            mbarrier.arrive(q_empty.index(i % 2))
            i += 1
            tile = read_slot(Slots, q_ready, i)
        sp = (kv - 1) % STAGES
        acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(sp))
        _store_rows(acc, m_i, l_i, o_smem, o_desc, Lse, pending, PART)
    tma.store_wait(pendings=0)
