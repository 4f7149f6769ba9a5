"""Does a warp-specialised forward (Gluon, Hopper) hide a short block row's fixed cost? A probe on shared,
unmasked block lists, outside the project's kernels. GPU only (sm_90): Gluon has no CPU interpreter.

    python benchmarks/gluon_rows_probe.py [--ks 8] [--n 65536] [--local-global 16384,65536,262144]
        [--stages 2,3] [--out DIR]

The project's block-sparse forward (Triton; two 8-warp CTAs per SM, one per (block row, head)) pays about 2.5
block iterations per row beyond its key blocks (``row_length_sweep.py``, ``persistent_rows_probe.py``). Here the
forward is one persistent CTA per SM, split into warp partitions that talk through mbarriers:
- a producer partition (the default, 4 warps, one thread issuing) walks the program's (block row, head) tiles
  (``persistent_rows_probe.lpt_schedule``: longest first, each to the least-loaded program) and TMA-loads each
  tile's Q into one of two Q buffers and its key blocks' K and V into a ring of ``STAGES`` buffers. It runs ahead
  of the consumers across tiles, so the next row's Q and first K/V are in shared memory when a row ends;
- two consumer partitions (one warpgroup each, 240 registers) own the top and bottom 64 query rows of the tile:
  asynchronous wgmma for Q Kᵀ and P V, the online softmax in base 2 (as the project's kernels), each releasing a
  K/V stage with one mbarrier arrive, and the output stored by TMA.
No CTA-wide barrier in the loop, no launch per row. Prints each variant's time (``triton.testing.do_bench`` and
replayed from a CUDA graph), its computed-block TFLOP/s against dense flash SDPA's in the same run, and its max
difference from the project's op (pinned to its tile) and from a float64 reference on a slice of heads.
``tests/lowering/test_gluon_rows_probe.py`` (marked ``gpu``) checks it against float64. Measured results:
RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fused_heads_probe import check_shared_lists   # benchmarks/, beside this script
from persistent_rows_probe import persistent_schedule

HALF = gl.constexpr(64)   # query rows per consumer warpgroup


@gluon.jit
def _producer(q_desc, k_desc, v_desc, tiles, KvIdx, KW, bufs, BS: gl.constexpr, STAGES: gl.constexpr):
    TRow, THead, TLen, Count, W, N = tiles
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    base = gl.program_id(0) * W
    kv = 0
    for i in range(gl.load(Count + gl.program_id(0))):
        row = gl.load(TRow + base + i)
        h = gl.load(THead + base + i)
        n = gl.load(TLen + base + i)
        qs = i % 2
        mbarrier.wait(q_empty.index(qs), ((i // 2) & 1) ^ 1)       # a fresh barrier passes parity 1 at once
        mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [h * N + row * BS, 0], q_ready.index(qs), q_bufs.index(qs))
        for t in range(n):
            blk = gl.load(KvIdx + row * KW + t)
            s = kv % STAGES
            mbarrier.wait(kv_empty.index(s), ((kv // STAGES) & 1) ^ 1)
            mbarrier.expect(kv_ready.index(s), 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [h * N + blk * BS, 0], kv_ready.index(s), k_bufs.index(s))
            tma.async_copy_global_to_shared(v_desc, [h * N + blk * BS, 0], kv_ready.index(s), v_bufs.index(s))
            kv += 1


@gluon.jit
def _softmax_block(qk, m_i, l_i, qk_scale):
    """One key block of the online softmax in base 2, as the project's kernels: (m, l, p, alpha)."""
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return m_new, l_i * alpha + gl.sum(p, axis=1), p, alpha


@gluon.jit
def _consumer(o_desc, tiles, qk_scale, bufs, BS: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              DEFER_PV: gl.constexpr, PART: gl.constexpr):
    """Query rows ``[PART * HALF, (PART + 1) * HALF)`` of each tile."""
    TRow, THead, TLen, Count, W, N = tiles
    q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty = bufs
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BS, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_smem = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], o_desc.layout)
    base = gl.program_id(0) * W
    kv = 0
    for i in range(gl.load(Count + gl.program_id(0))):
        row = gl.load(TRow + base + i)
        h = gl.load(THead + base + i)
        n = gl.load(TLen + base + i)
        qs = i % 2
        mbarrier.wait(q_ready.index(qs), (i // 2) & 1)
        q = q_bufs.index(qs).slice(PART * HALF, HALF, dim=0)
        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
        if DEFER_PV:
            # P V of block t - 1 runs on the tensor cores while block t's softmax runs: issued with block t's
            # Q K^T, retired after the softmax (then its stage is released and acc rescaled).
            s = kv % STAGES
            mbarrier.wait(kv_ready.index(s), (kv // STAGES) & 1)
            qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)), gl.zeros([HALF, BS], gl.float32, s_layout),
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
                                   gl.zeros([HALF, BS], gl.float32, s_layout), use_acc=False, is_async=True)
                acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
                m_i, l_i, p, alpha = _softmax_block(qk, m_i, l_i, qk_scale)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(sp), count=1)
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                kv += 1
            sp = (kv - 1) % STAGES
            acc = warpgroup_mma(p_op, v_bufs.index(sp), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(kv_empty.index(sp), count=1)
        else:
            for t in range(n):
                s = kv % STAGES
                mbarrier.wait(kv_ready.index(s), (kv // STAGES) & 1)
                qk = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)),
                                   gl.zeros([HALF, BS], gl.float32, s_layout), use_acc=False, is_async=True)
                qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
                m_i, l_i, p, alpha = _softmax_block(qk, m_i, l_i, qk_scale)
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_bufs.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(s), count=1)
                kv += 1
        mbarrier.arrive(q_empty.index(qs), count=1)
        out = acc / gl.convert_layout(l_i, o_rows)[:, None]
        tma.store_wait(pendings=0)                 # the previous tile's store has read o_smem
        o_smem.store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [h * N + row * BS + PART * HALF, 0], o_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _gluon_rows_kernel(q_desc, k_desc, v_desc, o_desc, TRow, THead, TLen, Count, KvIdx, KW, W, N, qk_scale,
                       BS: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, DEFER_PV: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [2, BS, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BS, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BS, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(2):
        mbarrier.init(q_ready.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=2)
    for j in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(j), count=1)
        mbarrier.init(kv_empty.index(j), count=2)
    bufs = (q_bufs, k_bufs, v_bufs, q_ready, q_empty, kv_ready, kv_empty)   # passed as one tuple
    tiles = (TRow, THead, TLen, Count, W, N)
    gl.warp_specialize([
        (_producer, (q_desc, k_desc, v_desc, tiles, KvIdx, KW, bufs, BS, STAGES)),
        (_consumer, (o_desc, tiles, qk_scale, bufs, BS, HEAD_DIM, STAGES, DEFER_PV, 0)),
        (_consumer, (o_desc, tiles, qk_scale, bufs, BS, HEAD_DIM, STAGES, DEFER_PV, 1)),
    ], [4, 4], [240, 240])


def descriptors(q, k, v, out, bs: int):
    """TMA descriptors of ``[1, H, N, D]`` tensors seen as ``[H * N, D]``: Q and K/V in ``bs``-row blocks, the
    output in ``HALF``-row blocks (one per consumer)."""
    D = q.shape[-1]
    flat = [t.reshape(-1, D) for t in (q, k, v, out)]
    lay = gl.NVMMASharedLayout.get_default_for([bs, D], gl.bfloat16)
    half = gl.NVMMASharedLayout.get_default_for([HALF.value, D], gl.bfloat16)
    return ([TensorDescriptor(t, list(t.shape), list(t.stride()), [bs, D], lay) for t in flat[:3]]
            + [TensorDescriptor(flat[3], list(flat[3].shape), list(flat[3].stride()), [HALF.value, D], half)])


def check_inputs(q, k, v, stages: int):
    """What the kernel takes, without reading the layout on the device (``rows_schedule`` does that)."""
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"the Gluon probe takes D in (64, 128), got D={q.shape[-1]}")
    if not 2 <= stages <= 4 // (q.shape[-1] // 64):
        raise ValueError(f"stages must be in [2, {4 // (q.shape[-1] // 64)}] at D={q.shape[-1]} (shared memory), "
                         f"got {stages}")
    if not all(t.is_contiguous() and t.shape == q.shape and t.dtype == q.dtype for t in (q, k, v)):
        raise ValueError("q, k, v must be contiguous, of one shape and dtype")
    if q.shape[0] != 1 or q.dtype != torch.bfloat16 or not q.is_cuda:
        raise ValueError(f"the Gluon probe takes bf16 CUDA tensors with B=1; got {q.dtype} on {q.device}, "
                         f"B={q.shape[0]}")


def rows_schedule(q, k, v, layout, programs: int):
    """The tiles of ``programs`` persistent programs (``persistent_rows_probe.persistent_schedule``), after the
    checks that read the layout: lists shared by the heads, no partial blocks, block size 128, no empty row."""
    check_shared_lists(q, k, v, layout)
    if layout.block_size != 128:
        raise ValueError(f"the Gluon probe takes block size 128, got {layout.block_size}")
    if not bool((layout.kv_count[0, :, 1] > 0).all()):
        raise ValueError("the Gluon probe needs every block row to have at least one key block")
    return persistent_schedule(layout, q.shape[1], programs)


def gluon_rows_attention(q, k, v, layout, *, programs: int | None = None, stages: int = 3, defer_pv: bool = False,
                         schedule=None):
    """Attention of ``q, k, v`` (``[1, H, N, D]`` bf16, contiguous) over ``layout``'s shared block lists: one
    persistent warp-specialised CTA per SM (``programs``) over the tiles of ``rows_schedule`` (pass ``schedule``
    to reuse one: the call then reads nothing back from the device). ``defer_pv``: each block's P V is issued
    with the next block's Q Kᵀ and runs during its softmax."""
    check_inputs(q, k, v, stages)
    _, H, N, D = q.shape
    programs = programs or torch.cuda.get_device_properties(q.device).multi_processor_count
    rows, hs, lens, cnt = schedule if schedule is not None else rows_schedule(q, k, v, layout, programs)
    idx = layout.kv_idx.to(torch.int32)
    out = torch.empty_like(q)
    _gluon_rows_kernel[(programs,)](*descriptors(q, k, v, out, layout.block_size), rows, hs, lens, cnt, idx,
                                    idx.shape[2], rows.shape[1], N, D ** -0.5 * 1.4426950408889634,
                                    BS=layout.block_size, HEAD_DIM=D, STAGES=stages, DEFER_PV=defer_pv,
                                    num_warps=4)
    return out


def reference(q, k, v, layout, heads: int = 2):
    """float64 attention of the first ``heads`` heads over ``layout`` (its token mask built densely)."""
    from dilate_compiler import patterns as P

    bs = layout.block_size
    mask = layout.state[0].ne(P.EMPTY).repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    qq, kk, vv = (t[:, :heads].double() for t in (q, k, v))
    s = (qq @ kk.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vv


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests.lowering.pinning
    import torch.nn.functional as F

    import dilate_compiler as dc
    from dilate_compiler import patterns as P
    from dilate_compiler.lowering import block_sparse_triton as bt
    from pinned_tiles import parse_tile
    from tests.lowering.pinning import pinned

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536, help="N of the local(k) layouts")
    ap.add_argument("--ks", default="8,64")
    ap.add_argument("--local-global", default="16384,65536,262144", help="N of the local(8) | global(128) runs")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    H, D, BS = 16, 64, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} SMs {sms}",
          flush=True)
    cases = [(f"local({kk})", P.local(kk), a.n) for kk in (int(x) for x in a.ks.split(",") if x)]
    cases += [("local+global", P.local(8) | P.global_tokens(BS), int(n)) for n in a.local_global.split(",") if n]
    rows, dense = [], {}
    for name, pattern, n in cases:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if n not in dense:
            ms = triton.testing.do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q, k, v))
            dense[n] = (ms, 4 * D * H * n * n / ms / 1e9)
            print(f"N={n} dense flash SDPA (graph) {ms:.3f} ms, {dense[n][1]:.0f} TFLOP/s", flush=True)
        lay = pattern.layout(n, BS, device="cuda")
        flops = 4 * D * H * int(lay.kv_count[0, :, 1].sum()) * BS * BS
        exact = reference(q, k, v, lay) if n <= 16384 else None
        with torch.no_grad(), pinned([bt._autotuned("fwd", BS)], parse_tile("128x128/8w/3s@128")):
            ref = dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS)
            fn = lambda: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS)   # noqa: E731
            results = [("op", triton.testing.do_bench(fn), triton.testing.do_bench_cudagraph(fn), ref)]
        sched = rows_schedule(q, k, v, lay, sms)
        for stages in (int(x) for x in a.stages.split(",")):
            for defer in (False, True):
                fn = lambda: gluon_rows_attention(q, k, v, lay, stages=stages, defer_pv=defer,   # noqa: E731
                                                  schedule=sched)
                out = fn()
                results.append((f"gluon {stages} stages{', P V deferred' if defer else ''}",
                                triton.testing.do_bench(fn), triton.testing.do_bench_cudagraph(fn), out))
        for label, ms, graph_ms, out in results:
            ratio, graph_ratio = (flops / t / 1e9 / dense[n][1] for t in (ms, graph_ms))
            diff = (out.float() - ref.float()).abs().max().item()
            err = (out[:, :2].double() - exact).abs().max().item() if exact is not None else float("nan")
            print(f"{name} N={n} {label:<30} {ms:8.4f} ms ({ratio:.3f}x dense), graph {graph_ms:8.4f} ms "
                  f"({graph_ratio:.3f}x)  max diff vs op {diff:.3g}, vs float64 {err:.3g}", flush=True)
            rows.append({"case": name, "N": n, "variant": label, "ms": ms, "graph_ms": graph_ms,
                         "computed_vs_dense": ratio, "graph_computed_vs_dense": graph_ratio,
                         "max_diff_vs_op": diff, "max_err_vs_float64": err, "dense_graph_ms": dense[n][0]})
    if a.out:
        with open(os.path.join(a.out, "gluon_rows_probe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "sms": sms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
