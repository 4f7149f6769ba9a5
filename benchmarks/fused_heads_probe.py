"""Does one program walking a block row for several heads in a row cut what a row costs beyond its key blocks? A
probe on shared, unmasked block lists (``local(k)``, not causal), outside the project's kernels.

    python benchmarks/fused_heads_probe.py [--n 65536] [--ks 1,4,8,32] [--heads-per-program 1,2,4] [--out DIR]

The block-sparse forward (one program per (block row, head)) pays about 2.5 block iterations per row beyond its
blocks (``row_length_sweep.py``); local + global's rows of 16 blocks feel it. Here a program owns one block row and
``HPP`` consecutive heads, which share the row's list, in one of two loop forms (``FORMS``):
- ``loop``: a plain loop over the heads around the block loop (each head's pipeline starts and drains);
- ``flattened``: the same nest as ``tl.range(0, HPP, flatten=True)``, which Triton fuses into one loop (its
  bounds don't depend on the head), so the next head's K and V loads can be in flight during this head's epilogue.
Each variant runs the project's forward's tile (128 x 128, 8 warps, 3 stages, 128 registers) beside the project's
op pinned to that tile and dense flash SDPA, B=1, H=16, D=64, bf16, block size 128. Prints each time, its computed
TFLOP/s against dense, and each output's max difference from the op's; ``tests/lowering/test_fused_heads_probe.py``
checks both forms against float64 under the interpreter. Measured results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

from dilate_compiler.lowering.dilated_triton import INTERPRET, softmax_step

FORMS = ("loop", "flattened")


@triton.jit
def _row_blocks(q, idx, n_blocks, k_base, v_base, stride_n, qk_scale, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """One head's online softmax over the ``n_blocks`` key blocks of list ``idx`` (the next block read one
    iteration ahead, as the project's kernels do): (acc, l)."""
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    last = tl.maximum(n_blocks - 1, 0)
    blk = tl.load(idx)
    for t in tl.range(0, n_blocks):
        offs = (blk * BS + tl.arange(0, BS))[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :]
        k = tl.load(k_base + offs)
        v = tl.load(v_base + offs)
        s = tl.dot(q, tl.trans(k)).to(tl.float32)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, qk_scale, v, False)
        blk = tl.load(idx + tl.minimum(t + 1, last))
    return acc, l_i


@triton.jit
def _head(Q, K, V, Out, h, offs, idx, n_blocks, stride_h, stride_n, qk_scale, BS: tl.constexpr,
          HEAD_DIM: tl.constexpr):
    """Head ``h`` of the program's block row: load Q, walk the row, store the output."""
    h = h.to(tl.int64)
    q = tl.load(Q + h * stride_h + offs)
    acc, l_i = _row_blocks(q, idx, n_blocks, K + h * stride_h, V + h * stride_h, stride_n, qk_scale, BS, BS,
                           HEAD_DIM)
    tl.store(Out + h * stride_h + offs, (acc / l_i[:, None]).to(Out.dtype.element_ty))


@triton.jit
def _fused_heads_kernel(Q, K, V, Out, KvCount, KvIdx, sm_scale, stride_h, stride_n, KW, HPP: tl.constexpr,
                        FLATTEN: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Block row ``program_id(0)`` (``BS`` queries) of heads ``program_id(1) * HPP + [0, HPP)``."""
    row = tl.program_id(0)
    n_blocks = tl.load(KvCount + row * 2 + 1)      # bounds fixed before the head loop: Triton may fuse the nest
    idx = KvIdx + row * KW
    qk_scale = sm_scale * 1.4426950408889634
    offs = (row * BS + tl.arange(0, BS))[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :]
    if FLATTEN:
        for hh in tl.range(0, HPP, flatten=True):
            _head(Q, K, V, Out, tl.program_id(1) * HPP + hh, offs, idx, n_blocks, stride_h, stride_n, qk_scale, BS,
                  HEAD_DIM)
    else:
        for hh in tl.range(0, HPP):
            _head(Q, K, V, Out, tl.program_id(1) * HPP + hh, offs, idx, n_blocks, stride_h, stride_n, qk_scale, BS,
                  HEAD_DIM)


def check_shared_lists(q, k, v, layout):
    """What the probes' kernels need (this one's and ``persistent_rows_probe.py``'s): the layout's lists shared by
    the heads, no partial blocks, N a multiple of its block size, and q, k, v contiguous. Not checked while a CUDA
    graph captures (reading the counts would synchronise): the probes check before they capture."""
    N = q.shape[2]
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if layout.kv_idx.shape[0] != 1 or int(layout.kv_count[..., 0].sum()) or N % layout.block_size:
        raise ValueError("layout must be shared by the heads, with no partial blocks, and N a multiple of its "
                         f"block size (got {layout.kv_idx.shape[0]} list heads, block size {layout.block_size})")
    if not all(t.is_contiguous() for t in (q, k, v)):
        raise ValueError("q, k, v must be contiguous")


def launch_options(num_warps: int, num_stages: int, maxnreg: int | None) -> dict:
    """Launch keywords of a probe kernel: ``maxnreg`` only on the GPU (the interpreter takes no register cap)."""
    extra = {"maxnreg": maxnreg} if maxnreg and not INTERPRET else {}
    return dict(num_warps=num_warps, num_stages=num_stages, **extra)


def fused_heads_attention(q, k, v, layout, heads_per_program: int, form: str, num_warps: int = 8,
                          num_stages: int = 3, maxnreg: int | None = 128):
    """Attention of ``q, k, v`` (``[1, H, N, D]``, contiguous) over ``layout``'s block lists (shared by the heads,
    no partial blocks, block size = the program's rows), ``heads_per_program`` heads per program."""
    _, H, N, D = q.shape
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if H % heads_per_program:
        raise ValueError(f"heads_per_program ({heads_per_program}) must divide the heads ({H})")
    check_shared_lists(q, k, v, layout)
    out = torch.empty_like(q)
    bs = layout.block_size
    _fused_heads_kernel[(N // bs, H // heads_per_program)](
        q, k, v, out, layout.kv_count.to(torch.int32), layout.kv_idx.to(torch.int32), D ** -0.5, q.stride(1),
        q.stride(2), layout.kv_idx.shape[2], HPP=heads_per_program, FLATTEN=form == "flattened", BS=bs,
        HEAD_DIM=D, **launch_options(num_warps, num_stages, maxnreg))
    return out


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests.lowering.pinning
    import torch.nn.functional as F

    import dilate_compiler as dc
    from dilate_compiler import patterns as P
    from dilate_compiler.lowering import block_sparse_triton as bt
    from pinned_tiles import parse_tile
    from tests.lowering.pinning import pinned

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--ks", default="1,4,8,32")
    ap.add_argument("--heads-per-program", default="1,2,4")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    n, H, D = a.n, 16, 64
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} N={n}", flush=True)
    dense = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
    dense_tf = 4 * D * H * n * n / dense / 1e9
    print(f"dense flash SDPA {dense:.3f} ms, {dense_tf:.0f} TFLOP/s", flush=True)
    rows = []
    for kk in (int(x) for x in a.ks.split(",")):
        lay = P.local(kk).layout(n, 128, device="cuda")
        flops = 4 * D * H * int(lay.kv_count[0, :, 1].sum()) * 128 * 128
        with torch.no_grad(), pinned([bt._autotuned("fwd", 128)], parse_tile("128x128/8w/3s@128")):
            ref = dc.ops.block_sparse_attention(q, k, v, lay, block_size=128)
            ms = triton.testing.do_bench(lambda: dc.ops.block_sparse_attention(q, k, v, lay, block_size=128))
        variants = [("op", ms, 0.0)]
        for hpp in (int(x) for x in a.heads_per_program.split(",")):
            for form in FORMS:
                err = (fused_heads_attention(q, k, v, lay, hpp, form).float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(lambda: fused_heads_attention(q, k, v, lay, hpp, form))
                variants.append((f"{hpp} heads, {form}", ms, err))
        for name, ms, err in variants:
            ratio = flops / ms / 1e9 / dense_tf
            print(f"local({kk}) {name:<20} {ms:8.4f} ms  {ratio:.3f}x dense  max diff {err:.4g}", flush=True)
            rows.append({"k": kk, "variant": name, "ms": ms, "computed_vs_dense": ratio, "max_diff_vs_op": err,
                         "dense_ms": dense, "N": n})
    if a.out:
        with open(os.path.join(a.out, "fused_heads_probe.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
