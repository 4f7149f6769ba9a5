"""A warp-specialised block-sparse forward for Hopper (sm_90), written in Gluon: the op's forward on layouts whose
blocks are all full.

Why: the Triton forward (``block_sparse_triton``) walks a block row's list at dense flash attention's rate, but
each (block row, head) program pays about 2.5 block iterations to start and finish, which short rows (local +
global's 16 blocks) feel (``benchmarks/RESULTS.md``). Here one persistent CTA per SM hides that cost:

- a producer partition (4 warps, 24 registers; one thread issues) draws tiles, (block row, head) pairs in the
  launcher's heaviest-first order (``tile_order``), from a counter in global memory, and TMA-loads each tile's Q
  into one of two Q buffers and its key blocks' K and V into a ring of ``STAGES`` buffers. It runs ahead across
  tiles, so the next tile's Q and first K/V are in shared memory when a tile ends. Drawing at run time (not a
  static schedule) lets the SMs that finish first take more tiles;
- two consumer partitions (one warpgroup each, 240 registers) own the top and bottom 64 query rows of a tile:
  asynchronous wgmma for Q Kᵀ and P V, the online softmax in base 2 (as the Triton kernels), each block's P V
  issued with the next block's Q Kᵀ so that it runs during that block's softmax; a K/V stage is released (one
  mbarrier arrive per consumer) once the P V that reads it retires. The output leaves by TMA, the LSE by stores.

The producer tells the consumers which tile a Q buffer holds through a small shared-memory slot written before
the Q buffer's barrier is armed (its arrive releases the write); a slot holding -1 ends the consumers' loop.

What it takes (``unsupported_reason``): an H100/H200-class GPU (compute capability 9.0), fp16/bf16, head dim 64
(at 128 the K/V ring doesn't fit), layout block size 128, N a multiple of it, no causal mask, no position order,
contiguous q, k, v, and every block of the layout full (``all_blocks_full``: no token mask anywhere). GQA, per-head
layouts, any batch (a layout built under ``torch.inference_mode`` has no version counter to keep that check on,
and runs the Triton forward). The op runs it in eager mode only: under ``torch.compile`` or export the Triton forward
runs, which Inductor sees and schedules (a Gluon kernel can't be wrapped for Inductor). Gluon has no CPU
interpreter: ``tests/lowering/test_block_sparse_gluon.py`` checks this kernel against float64 on the GPU.
``DILATE_COMPILER_WARP_SPECIALISED=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .block_sparse_triton import keepable, kept_on
from .dilated_triton import INTERPRET

# TMA copies: async_load / async_store in newer Gluon (Triton 3.9 has only these), async_copy_* in Triton 3.6
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

_SETTING = os.environ.get("DILATE_COMPILER_WARP_SPECIALISED", "1")
if _SETTING not in ("0", "1"):
    raise ValueError(f"DILATE_COMPILER_WARP_SPECIALISED must be '0' (off) or '1' (on, the default), got {_SETTING!r}")
ENABLED = _SETTING == "1"

BLOCK = 128          # query rows of a tile (the layout block) and keys of a K/V stage
_BLOCK = gl.constexpr(BLOCK)
HALF = 64            # query rows per consumer warpgroup
_HALF = gl.constexpr(HALF)
STAGES = 3           # K/V ring depth (two stages are live in a consumer; the third lets the producer run ahead)
HEAD_DIMS = (64,)
_SLOT_LAYOUT = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))   # a tile index, across a 4-warp partition


@gluon.jit
def _tile(TileOrder, KvCount, tile, NB, H, LH, N, GQA: gl.constexpr):
    """Tile ``tile`` of the heaviest-first order: its first Q row and K/V row in the flat ``[rows, D]`` views, its
    list row in the layout and that row's block count."""
    pair = gl.load(TileOrder + tile)
    row = pair % NB
    bh = pair // NB
    lrow = (bh % LH) * NB + row
    kv_head = (bh // H) * (H // GQA) + (bh % H) // GQA
    return bh * N + row * _BLOCK, kv_head * N, lrow, gl.load(KvCount + lrow * 2 + 1)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, tables, dims, bufs, STAGES: gl.constexpr, GQA: gl.constexpr):
    TileOrder, KvCount, KvIdx, Counter, Slots = tables
    total, NB, H, LH, N, KW = dims
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    i = 0
    kv = 0
    tile = gl.atomic_add(Counter, 1)
    while tile < total:
        qs = i % 2
        mbarrier.wait(q_empty.index(qs), ((i // 2) & 1) ^ 1)       # a fresh barrier passes parity 1 at once
        Slots.index(qs).store(gl.full([1], tile, gl.int32, _SLOT_LAYOUT))
        q_row, kv_row, lrow, n = _tile(TileOrder, KvCount, tile, NB, H, LH, N, GQA)
        mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row, 0], q_ready.index(qs), q_bufs.index(qs))
        for t in range(n):
            blk = gl.load(KvIdx + lrow * KW + t)
            s = kv % STAGES
            mbarrier.wait(kv_empty.index(s), ((kv // STAGES) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(s), 2 * k_desc.block_type.nbytes)
            _tma_load(k_desc, [kv_row + blk * _BLOCK, 0], kv_ready.index(s), k_bufs.index(s))
            _tma_load(v_desc, [kv_row + blk * _BLOCK, 0], kv_ready.index(s), v_bufs.index(s))
            kv += 1
        i += 1
        tile = gl.atomic_add(Counter, 1)
    qs = i % 2
    mbarrier.wait(q_empty.index(qs), ((i // 2) & 1) ^ 1)
    Slots.index(qs).store(gl.full([1], -1, gl.int32, _SLOT_LAYOUT))
    mbarrier.arrive(q_ready.index(qs))


@gluon.jit
def _softmax_block(qk, m_i, l_i, qk_scale):
    """One key block of the online softmax in base 2, as the Triton kernels: (m, l, p, alpha)."""
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return m_new, l_i * alpha + gl.sum(p, axis=1), p, alpha


@gluon.jit
def _read_slot(Slots, q_ready, i):
    """Wait for Q buffer ``i % 2``'s tile and read which tile it is (-1: no more)."""
    mbarrier.wait(q_ready.index(i % 2), (i // 2) & 1)
    return gl.max(Slots.index(i % 2).load(_SLOT_LAYOUT), axis=0)


@gluon.jit
def _consumer(o_desc, Lse, tables, dims, bufs, qk_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              GQA: gl.constexpr, PART: gl.constexpr):
    """Query rows ``[PART * HALF, (PART + 1) * HALF)`` of each tile."""
    TileOrder, KvCount, KvIdx, Counter, Slots = tables
    total, NB, H, LH, N, KW = dims
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, _BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_smem = gl.allocate_shared_memory(dtype, [_HALF, HEAD_DIM], o_desc.layout)
    i = 0
    kv = 0
    tile = _read_slot(Slots, q_ready, i)
    while tile >= 0:
        q_row, kv_row, lrow, n = _tile(TileOrder, KvCount, tile, NB, H, LH, N, GQA)
        q = q_bufs.index(i % 2).slice(PART * _HALF, _HALF, dim=0)
        m_i = gl.full([_HALF], float("-inf"), gl.float32, layout=rows)
        l_i = gl.zeros([_HALF], gl.float32, layout=rows)
        acc = gl.zeros([_HALF, HEAD_DIM], gl.float32, layout=o_layout)
        if n > 0:
            s = kv % STAGES
            mbarrier.wait(kv_ready.index(s), (kv // STAGES) & 1)
            qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)), gl.zeros([_HALF, _BLOCK], gl.float32, s_layout),
                               use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            m_i, l_i, p, alpha = _softmax_block(qk, m_i, l_i, qk_scale)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            kv += 1
            for t in range(1, n):
                s = kv % STAGES
                sp = (kv - 1) % STAGES
                mbarrier.wait(kv_ready.index(s), (kv // STAGES) & 1)
                qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)),
                                   gl.zeros([_HALF, _BLOCK], gl.float32, s_layout), use_acc=False, is_async=True)
                acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)     # block t - 1's P V
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
                m_i, l_i, p, alpha = _softmax_block(qk, m_i, l_i, qk_scale)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(sp))
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                kv += 1
            sp = (kv - 1) % STAGES
            acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(sp))
        mbarrier.arrive(q_empty.index(i % 2))
        l_safe = gl.where(l_i > 0.0, l_i, 1.0)
        lse = gl.where(l_i > 0.0, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        out = acc / gl.convert_layout(l_safe, o_rows)[:, None]
        tma.store_wait(pendings=0)                 # the previous tile's store has read o_smem
        o_smem.store(out.to(dtype))
        fence_async_shared()
        _tma_store(o_desc, [q_row + PART * _HALF, 0], o_smem)
        gl.store(Lse + q_row + PART * _HALF + gl.arange(0, _HALF, layout=rows), lse)
        i += 1
        tile = _read_slot(Slots, q_ready, i)
    tma.store_wait(pendings=0)


@gluon.jit
def _block_sparse_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, Lse, TileOrder, KvCount, KvIdx, Counter, total, NB,
                                H, LH, N, KW, qk_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                                GQA: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [2, _BLOCK, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, _BLOCK, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    slots = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for j in gl.static_range(2):
        mbarrier.init(q_ready.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=2)
    for j in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(j), count=1)
        mbarrier.init(kv_empty.index(j), count=2)
    bufs = (q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty)
    tables = (TileOrder, KvCount, KvIdx, Counter, slots)
    dims = (total, NB, H, LH, N, KW)
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, tables, dims, bufs, STAGES, GQA)),
        (_consumer, (o_desc, Lse, tables, dims, bufs, qk_scale, HEAD_DIM, STAGES, GQA, 0)),
        (_consumer, (o_desc, Lse, tables, dims, bufs, qk_scale, HEAD_DIM, STAGES, GQA, 1)),
    ], [4, 4], [240, 240])


# --- launcher ----------------------------------------------------------------------------------------------


def all_blocks_full(kv_count: torch.Tensor) -> bool | None:
    """Whether no block row of the layout has a partial block (``kv_count[..., 0]`` all zero). Read from the
    device once per ``kv_count`` version and kept on the tensor (``kept_on``, as ``tile_order`` keeps its sort);
    None when it isn't known and can't be read now (while a CUDA graph captures, or on tensors with no version
    counter)."""
    if not keepable(kv_count):
        return None

    def read():
        if kv_count.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        return not bool(kv_count[..., 0].any())

    return kept_on(kv_count, "_all_blocks_full", read)


def unsupported_reason(q, k, v, kv_count, block_size: int, is_causal: bool, order) -> str:
    """Why the warp-specialised forward can't run this call (the Triton forward runs instead), or ''. Reads
    the layout's partial counts once per layout (``all_blocks_full``)."""
    if not ENABLED:
        return "turned off (DILATE_COMPILER_WARP_SPECIALISED=0)"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return f"device {q.device} (the warp-specialised forward is written for compute capability 9.0)"
    if INTERPRET:
        return "TRITON_INTERPRET=1 (Gluon has no interpreter)"
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in (q, k, v, kv_count)):
        return "traced (a compiled graph runs the Triton forward, which Inductor sees)"
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return f"dtype {q.dtype}, head dim {q.shape[-1]} (float16/bfloat16, head dim in {HEAD_DIMS})"
    if block_size != BLOCK or q.shape[2] % BLOCK:
        return f"block size {block_size}, N {q.shape[2]} (block size {BLOCK}, N a multiple of it)"
    if is_causal or (order is not None and order.numel()):
        return "causal or ordered"
    if not all(t.is_contiguous() for t in (q, k, v)):
        return "q, k, v not contiguous"
    if not all_blocks_full(kv_count):
        return "partial blocks (a token mask), or not known while a CUDA graph captures"
    return ""


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, head_dim: int, bf16: bool):
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.bfloat16 if bf16 else gl.float16)


@functools.lru_cache(maxsize=None)
def _programs(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of ``[B, H, N, D]`` ``t`` seen as ``[B * H * N, D]``, in ``rows``-row blocks."""
    d = t.shape[-1]
    flat = t.view(-1, d)
    return TensorDescriptor(flat, [flat.shape[0], d], [d, 1], [rows, d],
                            _smem_layout(rows, d, t.dtype == torch.bfloat16))


def block_sparse_attn_fwd_ws(q, k, v, kv_count, kv_idx, tile_order, scale: float):
    """``(out, lse)`` as ``block_sparse_triton.block_sparse_attn_fwd`` returns them, for a call that
    ``unsupported_reason`` accepts; ``tile_order``: its ``tile_order(kv_count, kv_count.shape[0], B * H)``."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    nb = kv_idx.shape[1]
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    programs = min(_programs(q.device.index), B * H * nb)
    with torch.cuda.device(q.device):
        _block_sparse_fwd_ws_kernel[(programs,)](
            _descriptor(q, BLOCK), _descriptor(k, BLOCK), _descriptor(v, BLOCK), _descriptor(out, HALF), lse,
            tile_order, kv_count, kv_idx, counter, B * H * nb, nb, H, kv_count.shape[0], N, kv_idx.shape[2],
            scale * 1.4426950408889634, HEAD_DIM=D, STAGES=STAGES, GQA=H // k.shape[1], num_warps=4)
    return out, lse

