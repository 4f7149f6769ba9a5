"""Neighbourhood attention on a 2-D token grid, row-major vs Hilbert order, ours vs FlexAttention vs dense, one run.

    python benchmarks/bench_hilbert.py --out DIR [--side 256] [--skip-flex] [--flex-build]

Problem (issue figures): grid 256 x 256 (N = 65,536 tokens), B=1, H=16, D=64, bf16, forward; a cell attends
the cells with |dy| <= 16 and |dx| <= 16 (dc.patterns.neighborhood(grid, 16)); block size 128.
Methods:
- ours row-major: dc.ops.block_sparse_attention on the neighbourhood pattern in row-major order;
- ours Hilbert: the same mask in Hilbert order (dc.Hilbert(grid, BlockSparse(neighborhood))): q, k, v gathered
  into curve order, the kernel, the output gathered back; timed with the gathers ("+ reorder") and without;
  also with the Hilbert locality schedule of the block lists (layout schedule="hilbert"), and with the order
  fused into the kernels' loads and stores (op argument order=perm, no gathers: dc.Hilbert(reorder="fused"));
- flex row-major / flex Hilbert: flex_attention (compiled) with the same mask_mod (coordinates from index
  tables) on the block lists of our layout (BlockMask.from_kv_blocks: identical partial/full blocks);
  --flex-build also times Flex's own compiled create_block_mask (first call and steady state);
- dense: F.scaled_dot_product_attention (flash), full attention.
- model: 4 transformer blocks (E=1024) rewritten with dc.Hilbert, reorder="once" vs "per_site" vs "fused"
  (forward).
Empty-block ratio over 128 x 128 blocks; useful TFLOP/s = 4 * D * H * allowed pairs / time.
Times: medians of triton.testing.do_bench on CUDA (``--device cpu``: a dry run at a small ``--side``, float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dilate_compiler as dc  # noqa: E402
import harness  # noqa: E402
from dilate_compiler import patterns as P  # noqa: E402
from dilate_compiler.hilbert import coordinates, curve_order, inverse  # noqa: E402

H, D, BS, R = 16, 64, 128, 16


def useful_pairs(grid, r):
    c = coordinates(grid)
    span = lambda x, n: (torch.clamp(x + r, max=n - 1) - torch.clamp(x - r, min=0) + 1)  # noqa: E731
    return int((span(c[:, 0], grid[0]) * span(c[:, 1], grid[1])).sum())


class Block(nn.Module):
    def __init__(self, E, heads):
        super().__init__()
        self.h = heads
        self.n1, self.n2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.m1, self.m2 = nn.Linear(E, 4 * E), nn.Linear(4 * E, E)

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, self.h, E // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, E))
        return x + self.m2(F.gelu(self.m1(self.n2(x))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--skip-flex", action="store_true")
    ap.add_argument("--flex-build", action="store_true", help="also time Flex's compiled create_block_mask")
    ap.add_argument("--device", default=harness.default_device())
    a = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = harness.check_device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    grid = (a.side, a.side)
    N = a.side * a.side
    results = harness.Results("bench_hilbert", a.out, harness.environment(dev))
    results.env.update(grid=grid, N=N, H=H, D=D, radius=R)
    pairs = useful_pairs(grid, R)
    useful = 4 * D * H * pairs
    rows = results.rows
    bench = lambda fn: harness.measure_ms(fn, dev, rep_ms=100.0)  # noqa: E731

    def record(method, ms, attention=True, **extra):
        row = {"method": method, "ms": ms, **extra}
        if attention:
            row["useful_tflops"] = useful / ms / 1e9
        results.row(row)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    pattern = P.neighborhood(grid, R)
    order = curve_order(grid)
    perm = order.to(dev)
    perm32 = perm.to(torch.int32)
    inv = inverse(order).to(dev)
    hil_pattern = pattern.reordered(P.Grid(grid, order))

    for name, pat, bs in (("row-major", pattern, BS), ("hilbert", hil_pattern, BS), ("hilbert", hil_pattern, 64)):
        t0 = time.perf_counter()
        lay = pat.layout(N, bs, device=dev)
        harness.sync(dev)
        build = (time.perf_counter() - t0) * 1e3
        stats = dict(block_size=bs, empty_blocks=round(1 - lay.density, 4),
                     partial_blocks=int((lay.state == P.PARTIAL).sum()), full_blocks=int((lay.state == P.FULL).sum()))
        fn = lambda lay=lay, bs=bs: dc.ops.block_sparse_attention(q, k, v, lay, block_size=bs)  # noqa: E731
        if name == "row-major":
            record("ours row-major", bench(fn), layout_ms=round(build, 1), **stats)
            continue
        record(f"ours hilbert bs={bs} (kernel only)", bench(fn), layout_ms=round(build, 1), **stats)

        def reordered(lay=lay, bs=bs):
            qp, kp, vp = (t.index_select(2, perm) for t in (q, k, v))
            return dc.ops.block_sparse_attention(qp, kp, vp, lay, block_size=bs).index_select(2, inv)

        record(f"ours hilbert bs={bs} + reorder", bench(reordered), **stats)
        fused = lambda lay=lay, bs=bs: dc.ops.block_sparse_attention(q, k, v, lay, block_size=bs,  # noqa: E731
                                                                     order=perm32)
        record(f"ours hilbert bs={bs}, order fused into the kernels' loads", bench(fused), **stats)
        lay_s = pat.layout(N, bs, device=dev, schedule="hilbert")
        record(f"ours hilbert bs={bs}, hilbert schedule (kernel only)",
               bench(lambda lay_s=lay_s, bs=bs: dc.ops.block_sparse_attention(q, k, v, lay_s, block_size=bs)))
    record("reorder alone (3 gathers of q, k, v)", bench(lambda: [t.index_select(2, perm) for t in (q, k, v)]),
           attention=False)

    # correctness of the timed Hilbert path against row-major on the same mask
    lay_r = pattern.layout(N, BS, device=dev)
    lay_h = hil_pattern.layout(N, BS, device=dev)
    qs, ks, vs = (t[:, :2] for t in (q, k, v))
    o_r = dc.ops.block_sparse_attention(qs, ks, vs, lay_r, block_size=BS)
    o_h = dc.ops.block_sparse_attention(*(t.index_select(2, perm) for t in (qs, ks, vs)), lay_h,
                                        block_size=BS).index_select(2, inv)
    results.env["max_abs_diff_hilbert_vs_rowmajor"] = float((o_r.float() - o_h.float()).abs().max())
    o_f = dc.ops.block_sparse_attention(qs, ks, vs, lay_h, block_size=BS, order=perm32)
    results.env["max_abs_diff_fused_order_vs_rowmajor"] = float((o_r.float() - o_f.float()).abs().max())
    print("hilbert vs row-major max abs diff", results.env["max_abs_diff_hilbert_vs_rowmajor"], "fused order",
          results.env["max_abs_diff_fused_order_vs_rowmajor"], flush=True)

    record("dense flash SDPA (full attention)", bench(lambda: F.scaled_dot_product_attention(q, k, v)))

    flex_masks = {}
    if not a.skip_flex:
        from bench_block_sparse import flex_block_mask_from_layout

        flex = torch.compile(flex_attention, dynamic=False)
        cy_r = (torch.arange(N, device=dev) // a.side)
        cx_r = (torch.arange(N, device=dev) % a.side)
        for name, cy, cx, lay in (("row-major", cy_r, cx_r, lay_r), ("hilbert", cy_r[perm], cx_r[perm], lay_h)):
            def mask_mod(b, h, qi, ki, cy=cy, cx=cx):
                return ((cy[qi] - cy[ki]).abs() <= R) & ((cx[qi] - cx[ki]).abs() <= R)

            flex_masks[name] = mask_mod
            # Flex's kernels on the block lists of our layout (the same partial/full split, Flex's mask_mod)
            bm = flex_block_mask_from_layout(lay, mask_mod)
            ins = (qs, ks, vs) if name == "row-major" else tuple(t.index_select(2, perm) for t in (qs, ks, vs))
            out = flex(*ins, block_mask=bm)
            ref = o_r if name == "row-major" else o_h.index_select(2, perm)
            err = float((out.float() - ref.float()).abs().max())
            record(f"flex {name}", bench(lambda bm=bm: flex(q, k, v, block_mask=bm)),
                   empty_blocks=round(1 - lay.density, 4), max_abs_diff_vs_ours=round(err, 5))

    # reorder once vs per site, in a 4-block model (forward)
    E, depth = H * D, 4
    model = nn.Sequential(*[Block(E, H) for _ in range(depth)]).to(dev, dtype).eval()
    x = torch.randn(1, N, E, device=dev, dtype=dtype)
    inner = dc.BlockSparse(pattern, block_size=BS)
    with torch.no_grad():
        for mode in ("once", "per_site", "fused"):
            res = dc.rewrite(model, (x,), dc.Hilbert(grid, inner, reorder=mode))
            n_gather = sum(1 for n in res.module.graph.nodes if n.target is torch.ops.aten.index_select.default)
            record(f"model {depth} blocks, reorder={mode}", bench(lambda m=res.module: m(x)), attention=False,
                   gathers=n_gather)
    # Flex's own block-mask build (compiled create_block_mask), last: its first call compiles
    for name in ("hilbert", "row-major") if flex_masks and a.flex_build else ():
        for attempt in ("first call", "steady"):
            harness.sync(dev)
            t0 = time.perf_counter()
            create_block_mask(flex_masks[name], None, None, N, N, device=dev, BLOCK_SIZE=BS, _compile=True)
            harness.sync(dev)
            record(f"flex create_block_mask {name} ({attempt})", (time.perf_counter() - t0) * 1e3, attention=False)
    summarise(results, rows, useful)
    results.write()
    plot(results, rows)
    return rows


def summarise(results, rows, useful):
    columns = ["method", "block", "empty blocks", "partial / full blocks", "ms", "useful TF/s", "gathers"]
    cells = []
    for r in rows:
        blocks = (f"{r['partial_blocks']} / {r['full_blocks']}" if "partial_blocks" in r else "-")
        cells.append([r["method"], r.get("block_size", "-"), r.get("empty_blocks", float("nan")), blocks, r["ms"],
                      r.get("useful_tflops", float("nan")), r.get("gathers", "-")])
    results.add_table(f"Neighbourhood attention on a {results.env['grid'][0]} × {results.env['grid'][1]} grid "
                      f"(radius {R}), forward", columns, cells,
                      notes=f"useful TF/s: 4·D·H FLOPs per allowed pair ({useful / 1e12:.3g} TFLOP in all); "
                            "model rows: 4 transformer blocks rewritten with dc.Hilbert.")


def plot(results, rows):
    def draw(plt):
        sel = [r for r in rows if "useful_tflops" in r]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(sel) + 1.2))
        ax.barh([r["method"] for r in sel], [r["ms"] for r in sel])
        ax.set(xscale="log", xlabel="forward ms", title="neighbourhood attention")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        return fig

    results.plot(draw)


if __name__ == "__main__":
    main()
