"""A warp-specialised block-sparse forward for Hopper (sm_90), written in Gluon: the op's forward on layouts whose
blocks are all full.

Why: the Triton forward (``block_sparse.triton``) walks a block row's list at dense flash attention's rate, but
each (block row, head) program pays about 2.5 block iterations to start and finish, which short rows (local +
global's 16 blocks) feel (``docs/design-notes.md``). Here one persistent CTA per SM hides that cost: its producer
draws tiles, (block row, head) pairs in the launcher's heaviest-first order (``tile_order``), from a counter in
global memory (at run time, not a static schedule, so the SMs that finish first take more tiles) and loads each
tile's key blocks from the layout's lists; the consumers are ``common.hopper_gluon.consume``. The partitions, buffers
and barriers are described in ``common.hopper_gluon``.

What it takes (``unsupported_reason``): an H100/H200-class GPU (compute capability 9.0), fp16/bf16, head dim 64
(at 128 the K/V ring doesn't fit), layout block size 128, N a multiple of it, no causal mask, no position order,
contiguous q, k, v, and every block of the layout full (``all_blocks_full``: no token mask anywhere). GQA, per-head
layouts, any batch (a layout built under ``torch.inference_mode`` has no version counter to keep that check on,
and runs the Triton forward). Under ``torch.compile``, export and AOTInductor the op reaches it through the opaque
``block_sparse_attention_forward_hopper`` (a Gluon kernel can't be wrapped for Inductor), which reads the layout
when the graph runs and chooses as eager mode does. Gluon has no CPU
interpreter: ``tests/lowering/block_sparse/test_gluon.py`` checks this kernel against float64 on the GPU.
``DILATE_COMPILER_WARP_SPECIALISED=0`` turns it off.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..common import hopper_gluon as hg
from ..common.primitives import LOG2E
from .triton import keepable, kept_on

BLOCK = hg.BLOCK     # query rows of a tile (the layout block) and keys of a K/V stage
_BLOCK = gl.constexpr(BLOCK)
_HALF = gl.constexpr(hg.HALF)


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
        qs = hg.next_q_buffer(Slots, q_empty, i, tile)
        q_row, kv_row, lrow, n = _tile(TileOrder, KvCount, tile, NB, H, LH, N, GQA)
        mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
        hg.tma_load(q_desc, [q_row, 0], q_ready.index(qs), q_bufs.index(qs))
        for t in range(n):
            blk = gl.load(KvIdx + lrow * KW + t)
            s = hg.next_stage(kv_empty, kv_ready, None, kv, 0.0, 2 * k_desc.block_type.nbytes, STAGES, False)
            hg.tma_load(k_desc, [kv_row + blk * _BLOCK, 0], kv_ready.index(s), k_bufs.index(s))
            hg.tma_load(v_desc, [kv_row + blk * _BLOCK, 0], kv_ready.index(s), v_bufs.index(s))
            kv += 1
        i += 1
        tile = gl.atomic_add(Counter, 1)
    qs = hg.next_q_buffer(Slots, q_empty, i, -1)
    mbarrier.arrive(q_ready.index(qs))


@gluon.jit
def _tile_rows(tile, dims, GQA: gl.constexpr):
    """For ``hopper_gluon.consume``: tile ``tile``'s number of key blocks and where its output and LSE go."""
    TileOrder, KvCount, total, NB, H, LH, N, KW = dims
    q_row, kv_row, lrow, n = _tile(TileOrder, KvCount, tile, NB, H, LH, N, GQA)
    return n, (q_row, 0, q_row, 1)


@gluon.jit
def _consumer(o_desc, Lse, slots, bufs, rows, qk_scale, GQA: gl.constexpr, STAGES: gl.constexpr, PART: gl.constexpr):
    hg.consume(o_desc, Lse, slots, None, bufs, rows, qk_scale, _tile_rows, GQA, STAGES, False, PART)


@gluon.jit
def _block_sparse_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, Lse, TileOrder, KvCount, KvIdx, Counter, total, NB,
                                H, LH, N, KW, qk_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                                GQA: gl.constexpr):
    bufs, slots, _ = hg.buffers(q_desc, k_desc, v_desc, STAGES)
    tables = (TileOrder, KvCount, KvIdx, Counter, slots)
    dims = (total, NB, H, LH, N, KW)
    rows = (TileOrder, KvCount) + dims
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, tables, dims, bufs, STAGES, GQA)),
        (_consumer, (o_desc, Lse, slots, bufs, rows, qk_scale, GQA, STAGES, 0)),
        (_consumer, (o_desc, Lse, slots, bufs, rows, qk_scale, GQA, STAGES, 1)),
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


def unsupported_reason(q, k, v, kv_count, block_size: int, is_causal: bool, order, softcap=None) -> str:
    """Why the warp-specialised forward can't run this call (the Triton forward runs instead), or ''. Reads
    the layout's partial counts once per layout (``all_blocks_full``); a traced call can't read them, and leaves
    that check to ``block_sparse_attention_forward_hopper`` when the graph runs."""
    reason = hg.device_reason(q, (q, k, v, kv_count)) or hg.dtype_reason(q)
    if reason:
        return reason
    if softcap is not None:
        return f"soft-capping of the scores (softcap={softcap}; the warp-specialised forward has no score modifier)"
    if q.shape[2] != k.shape[2]:
        return (f"queries that are the last {q.shape[2]} of {k.shape[2]} key positions (the warp-specialised forward "
                f"runs as many queries as keys)")
    if block_size != BLOCK or q.shape[2] % BLOCK:
        return f"block size {block_size}, N {q.shape[2]} (block size {BLOCK}, N a multiple of it)"
    if is_causal or (order is not None and order.numel()):
        return "causal or ordered"
    if not all(t.is_contiguous() for t in (q, k, v)):
        return "q, k, v not contiguous"
    if hg.traced((q, k, v, kv_count)):
        return ""
    if not all_blocks_full(kv_count):
        return "partial blocks (a token mask), or not known while a CUDA graph captures"
    return ""


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of ``[B, H, N, D]`` ``t`` seen as ``[B * H * N, D]``, in ``rows``-row blocks."""
    d = t.shape[-1]
    flat = t.view(-1, d)
    return TensorDescriptor(flat, [flat.shape[0], d], [d, 1], [rows, d],
                            hg.smem_layout(rows, d, t.dtype == torch.bfloat16))


def block_sparse_attn_fwd_ws(q, k, v, kv_count, kv_idx, tile_order, scale: float):
    """``(out, lse)`` as ``triton.block_sparse_attn_fwd`` returns them, for a call that
    ``unsupported_reason`` accepts; ``tile_order``: its ``tile_order(kv_count, kv_count.shape[0], B * H)``."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    nb = kv_idx.shape[1]
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    programs = min(hg.programs(q.device.index), B * H * nb)
    with torch.cuda.device(q.device):
        _block_sparse_fwd_ws_kernel[(programs,)](
            _descriptor(q, BLOCK), _descriptor(k, BLOCK), _descriptor(v, BLOCK), _descriptor(out, hg.HALF), lse,
            tile_order, kv_count, kv_idx, counter, B * H * nb, nb, H, kv_count.shape[0], N, kv_idx.shape[2],
            scale * LOG2E.value, HEAD_DIM=D, STAGES=hg.STAGES, GQA=H // k.shape[1], num_warps=4)
    return out, lse

