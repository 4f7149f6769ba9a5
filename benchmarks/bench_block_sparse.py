"""Block-sparse attention on the GPU, side by side with FlexAttention on the same mask and dense SDPA, one run.

    python benchmarks/bench_block_sparse.py --out DIR [--ns 16384,65536,262144] [--backward] [--compiled]
        [--methods ours,ours-triton,flex,dense] [--cuda-graph]

Patterns (B=1, H=16, D=64, bf16, block size 128):
- window:       causal sliding window of 4096 tokens (Mistral-style: p - 4096 < j <= p), token-exact.
- local+global: local(8) (query block I sees key blocks |I - J| < 8) | global_tokens(128) (one global block),
                not causal.
Methods: ours (dc.ops.block_sparse_attention with a prebuilt layout; each row's "ours_forward" says whether its
forward ran the warp-specialised Hopper kernel or why not); ours-triton (the same with the warp-specialised forward
off: the Triton forward); flex (flex_attention compiled, with the same mask_mod); dense
(F.scaled_dot_product_attention, flash, full attention); with --compiled also ours-compiled (the same call under
torch.compile: the kernels as Inductor emits them, after one compiling call).
Flex's block mask: --flex-mask create builds it with create_block_mask(_compile=True) once per N (its first
call, which compiles, and its steady-state build are timed separately); --flex-mask from-layout hands Flex
our layout's block lists (BlockMask.from_kv_blocks, the same partial/full split and mask_mod), which skips
create_block_mask's minutes-long first compile and measures the kernels on identical block structure.
Layout build: ours = pattern.layout(...) on the GPU (median of 5, after one warm call; that first call, which
compiles the list kernels, is timed separately).
Useful FLOPs: 4*D*H per allowed (query, key) pair; "computed" FLOPs count every token pair of a visited block.
Times: medians of triton.testing.do_bench (which zeroes a 256 MB buffer before each call; a call whose host side
takes longer than its kernels leaves the GPU idle in between, counted). With --cuda-graph each forward is also
timed replaying a CUDA graph of it (triton.testing.do_bench_cudagraph, median; no host work and no L2 flush
between calls): the kernels' own time. Written as {method}_fwd_graph_ms beside {method}_fwd_ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
import triton

import dilate_compiler as dc
from bench_dilated import bench, flex_block_mask, triton_forward, tuned_configs
from dilate_compiler import patterns as P
from dilate_compiler.lowering.block_sparse.op import warp_specialised_reason

H, D, BS, WINDOW = 16, 64, 128, 4096


def cases():
    return {
        "window": (P.sliding_window(WINDOW), True,
                   lambda b, h, q, kv: (q - kv < WINDOW) & (kv <= q)),
        "local+global": (P.local(8) | P.global_tokens(BS), False,
                         lambda b, h, q, kv: ((q // BS - kv // BS).abs() < 8) | (q < BS) | (kv < BS)),
    }


def allowed_pairs(layout) -> tuple[int, int]:
    """(allowed token pairs, token pairs of visited blocks) of one head, from the layout (partial blocks
    evaluated token by token in chunks; O(partial blocks * bs^2))."""
    N, bs = layout.seq_len, layout.block_size
    st = layout.state[0]
    full = int((st == P.FULL).sum()) * bs * bs
    visited = int((st != P.EMPTY).sum()) * bs * bs
    I, J = torch.nonzero(st == P.PARTIAL, as_tuple=True)
    bits = torch.zeros_like(I, dtype=torch.int32)
    # bits of each partial block, from the kv lists
    cnt = layout.kv_count[0].long()
    for e in range(layout.kv_idx.shape[-1]):
        sel = (layout.kv_idx[0, I, e].long() == J) & (e < cnt[I, 0])
        bits = torch.where(sel, layout.kv_bits[0, I, e], bits)
    r = torch.arange(bs, device=st.device)
    partial = 0
    for c in range(0, I.numel(), 2048):
        i, j, b = I[c:c + 2048], J[c:c + 2048], bits[c:c + 2048]
        p = (i.view(-1, 1, 1) * bs + r.view(1, -1, 1))
        k = (j.view(-1, 1, 1) * bs + r.view(1, 1, -1))
        m = P.partial_mask(layout.terms, b.view(-1, 1, 1), p, k) & (p < N) & (k < N)
        if layout.is_causal:
            m &= k <= p
        partial += int(m.sum())
    return full + partial, visited


def flex_block_mask_from_layout(layout, mask_mod):
    """FlexAttention's BlockMask with our layout's block lists: partial blocks (mask_mod applied) and full ones."""
    return flex_block_mask(layout.kv_count[0], layout.kv_idx[0], layout.block_size, layout.seq_len, mask_mod)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ns", default="16384,65536,262144")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--flex-mask", default="create", choices=("create", "from-layout"))
    ap.add_argument("--patterns", default="window,local+global")
    ap.add_argument("--compiled", action="store_true", help="also time ours under torch.compile (ours-compiled)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time each forward replaying a CUDA graph of it ({method}_fwd_graph_ms)")
    ap.add_argument("--methods", default="ours,flex,dense",
                    help="which of ours, ours-triton, flex, dense to time (ours always runs; without flex no Flex "
                         "block mask)")
    a = ap.parse_args()
    methods = set(a.methods.split(",")) | {"ours"}
    if not methods <= {"ours", "ours-triton", "flex", "dense"}:
        raise SystemExit(f"--methods {a.methods!r}: accepted are ours, ours-triton, flex, dense (comma-separated)")
    os.makedirs(a.out, exist_ok=True)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = torch.cuda.get_device_name()
    print(f"device={dev} torch={torch.__version__} triton={triton.__version__}", flush=True)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name, (pattern, causal, mask_mod) in cases().items():
        if name not in a.patterns.split(","):
            continue
        for N in (int(n) for n in a.ns.split(",")):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=a.backward)
                       for _ in range(3))
            row = {"pattern": name, "N": N, "H": H, "D": D, "block_size": BS, "causal": causal}
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pattern.layout(N, BS, is_causal=causal, device="cuda")    # the first call compiles the list kernels
            torch.cuda.synchronize()
            row["ours_layout_first_call_s"] = time.perf_counter() - t0
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                lay = pattern.layout(N, BS, is_causal=causal, device="cuda")
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row["ours_layout_ms"] = 1e3 * statistics.median(times)
            useful, visited = allowed_pairs(lay)
            row["density"] = lay.density
            row["useful_flop"] = 4 * D * H * useful
            row["flex_mask"] = a.flex_mask
            if "flex" not in methods:
                bm = None
            elif a.flex_mask == "create":
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                bm = create_block_mask(mask_mod, None, None, N, N, device="cuda", BLOCK_SIZE=BS, _compile=True)
                torch.cuda.synchronize()
                row["flex_mask_first_call_s"] = time.perf_counter() - t0
                times = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    bm = create_block_mask(mask_mod, None, None, N, N, device="cuda", BLOCK_SIZE=BS, _compile=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row["flex_mask_ms"] = 1e3 * statistics.median(times)
            else:
                bm = flex_block_mask_from_layout(lay, mask_mod)
            if bm is not None:
                row["flex_sparsity"] = bm.sparsity() / 100.0
            ours = lambda: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS, is_causal=causal)  # noqa: E731
            fns = {
                "ours": ours,
                "ours-triton": triton_forward(ours),
                "flex": lambda: flex(q, k, v, block_mask=bm),
                "dense": lambda: F.scaled_dot_product_attention(q, k, v),
            }
            fns = {m: fn for m, fn in fns.items() if m in methods}
            row["ours_forward"] = warp_specialised_reason(q, k, v, lay.kv_count, BS, causal, None) or "warp-specialised"
            if a.compiled:
                ours_c = torch.compile(lambda q, k, v: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS,
                                                                                     is_causal=causal),
                                       fullgraph=True, dynamic=False)
                fns["ours-compiled"] = lambda: ours_c(q, k, v)
            with torch.no_grad():   # ours' output stays alive: another method's output can't reuse its memory
                ours_out = fns["ours"]()
                if "flex" in fns:
                    row["flex_vs_ours_max_abs"] = (fns["flex"]() - ours_out).abs().max().item()
                if "ours-triton" in fns:
                    row["ours_triton_vs_ours_max_abs"] = (fns["ours-triton"]() - ours_out).abs().max().item()
                if a.compiled:
                    row["compiled_vs_ours_max_abs"] = (fns["ours-compiled"]() - ours_out).abs().max().item()
                del ours_out
            for m, fn in fns.items():
                with torch.no_grad():
                    ms = bench(fn)
                row[f"{m}_fwd_ms"] = ms
                flops = 4 * D * H * N * N if m == "dense" else row["useful_flop"]
                row[f"{m}_fwd_tflops"] = flops / ms / 1e9
                if a.cuda_graph:
                    try:
                        with torch.no_grad():
                            ms_g = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
                    except RuntimeError as e:   # a method that can't be captured: say so, time the others
                        row[f"{m}_fwd_graph_error"] = str(e)[:300]
                        ms_g = float("nan")
                    row[f"{m}_fwd_graph_ms"] = ms_g
                    row[f"{m}_fwd_graph_tflops"] = flops / ms_g / 1e9
                if a.backward:
                    ms_b = bench(fn, backward=True, inputs=(q, k, v))
                    row[f"{m}_fwdbwd_ms"] = ms_b
                    row[f"{m}_fwdbwd_tflops"] = 3.5 * flops / ms_b / 1e9
            for m in ("ours", "ours-triton"):
                if m in fns:
                    row[f"{m}_fwd_tflops_computed_blocks"] = 4 * D * H * visited / row[f"{m}_fwd_ms"] / 1e9
                    if a.cuda_graph:
                        row[f"{m}_fwd_graph_tflops_computed_blocks"] = (4 * D * H * visited
                                                                        / row[f"{m}_fwd_graph_ms"] / 1e9)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del q, k, v, lay, bm
            torch.cuda.empty_cache()
    from dilate_compiler.lowering.block_sparse.triton import _autotuned

    tuned = tuned_configs({kind: _autotuned(kind, BS) for kind in ("fwd", "dq", "dkdv")})
    print("autotuned configs:", json.dumps(tuned, indent=1), flush=True)
    with open(os.path.join(a.out, "bench_block_sparse.json"), "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "triton": triton.__version__, "rows": rows,
                   "tuned": tuned}, f, indent=1)
    print("\npattern        N        ours ms  flex ms  dense ms  x flex  ours TF/s(useful/computed) dense TF/s"
          "  layout ms  flex mask ms (first call s)")
    nan = float("nan")
    for r in rows:
        print(f"{r['pattern']:<14} {r['N']:<8} {r['ours_fwd_ms']:7.3f}  {r.get('flex_fwd_ms', nan):7.3f}  "
              f"{r.get('dense_fwd_ms', nan):8.2f}  {r.get('flex_fwd_ms', nan) / r['ours_fwd_ms']:6.2f}  "
              f"{r['ours_fwd_tflops']:6.0f} / {r['ours_fwd_tflops_computed_blocks']:6.0f}            "
              f"{r.get('dense_fwd_tflops', nan):6.0f}"
              f"  {r['ours_layout_ms']:9.2f}  {r.get('flex_mask_ms', nan):8.2f} "
              f"({r.get('flex_mask_first_call_s', nan):.1f})")
    if a.cuda_graph:
        print("\nin a CUDA graph: pattern  N  ours ms  flex ms  dense ms  ours computed-block TF/s / dense TF/s")
        for r in rows:
            ratio = r["ours_fwd_graph_tflops_computed_blocks"] / r.get("dense_fwd_graph_tflops", nan)
            print(f"{r['pattern']:<14} {r['N']:<8} {r['ours_fwd_graph_ms']:7.3f}  "
                  f"{r.get('flex_fwd_graph_ms', nan):7.3f}  {r.get('dense_fwd_graph_ms', nan):8.2f}  "
                  f"{r['ours_fwd_graph_tflops_computed_blocks']:6.0f} / {r.get('dense_fwd_graph_tflops', nan):6.0f}"
                  f" = {ratio:.2f}")


if __name__ == "__main__":
    main()
