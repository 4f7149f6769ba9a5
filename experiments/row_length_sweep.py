"""Block-sparse forward time against list length, beside dense flash SDPA, one run: what a block row costs
beyond its key blocks.

    python experiments/row_length_sweep.py [--n 65536] [--ks 1,2,4,8,16,32,64,128,256,512]
        [--tiles 128x128/8w/3s@128] [--out DIR]

Layouts: ``local(k)``, not causal (interior query blocks visit 2k - 1 key blocks; ``k`` = N / 128 is full
attention through the block lists), B=1, H=16, D=64, bf16, block size 128; the forward kernel pinned to each tile
of ``--tiles`` in turn. Per k: the forward's median time (``triton.testing.do_bench``), the visited key blocks, the
computed-block TFLOP/s (4 * D per token pair of a visited block) and its ratio to dense flash SDPA's TFLOP/s in
the same run. Per tile: a least-squares fit ``time = alpha * rows + beta * blocks`` over the sweep (rows fixed, so
the intercept of time against blocks), printed as the cost of one row in block iterations (``alpha / beta``) and
the computed-block TFLOP/s the fit gives a row of infinite length, against dense.
"""

import argparse
import json
import os
import sys

os.environ["TRITON_CACHE_AUTOTUNING"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests.lowering.pinning

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import dilate_compiler as dc  # noqa: E402
from dilate_compiler import patterns as P  # noqa: E402
from dilate_compiler.lowering.block_sparse import triton as bt  # noqa: E402

from autotune_timings import tile_name  # noqa: E402  (experiments/, beside this script)
from pinned_tiles import parse_tile  # noqa: E402
from tests.lowering.pinning import pinned  # noqa: E402

H, D, BS = 16, 64, 128


def fit(blocks: list, ms: list) -> tuple[float, float]:
    """Least squares ``ms = c + beta * blocks``: ``(c, beta)``."""
    n = len(blocks)
    mx, my = sum(blocks) / n, sum(ms) / n
    beta = sum((x - mx) * (y - my) for x, y in zip(blocks, ms)) / sum((x - mx) ** 2 for x in blocks)
    return my - beta * mx, beta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--ks", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--tiles", default="128x128/8w/3s@128")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    n, ks = a.n, [int(k) for k in a.ks.split(",")]
    if n % BS or max(ks) > n // BS:
        raise SystemExit(f"--n {n} must be a multiple of {BS} and --ks at most N / {BS} = {n // BS}, got {a.ks}")
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__} N={n}",
          flush=True)
    with torch.no_grad():
        dense_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
    dense_tf = 4 * D * H * n * n / dense_ms / 1e9
    print(f"dense flash SDPA {dense_ms:.3f} ms, {dense_tf:.0f} TFLOP/s", flush=True)
    layouts = {kk: P.local(kk).layout(n, BS, device="cuda") for kk in ks}
    rows, nrows = [], n // BS
    for spec in a.tiles.split(","):
        cfg = parse_tile(spec)
        blocks, times = [], []
        with pinned([bt._autotuned("fwd", BS)], cfg), torch.no_grad():
            for kk, lay in layouts.items():
                op = lambda lay=lay: dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS)  # noqa: E731
                op()
                ms = triton.testing.do_bench(op)
                visited = int(lay.kv_count[0, :, 1].sum())
                tf = 4 * D * H * visited * BS * BS / ms / 1e9
                blocks.append(visited)
                times.append(ms)
                row = {"tile": tile_name(cfg), "k": kk, "N": n, "visited_blocks": visited, "ms": ms,
                       "computed_tflops": tf, "dense_ms": dense_ms, "dense_tflops": dense_tf}
                rows.append(row)
                print(f"{tile_name(cfg):<20} local({kk:<4}) {visited / nrows:7.1f} blocks/row  {ms:8.3f} ms  "
                      f"{tf:5.0f} TF/s  {tf / dense_tf:5.2f}x dense", flush=True)
        c, beta = fit(blocks, times)
        per_row = c / nrows / beta
        tf_inf = 4 * D * H * BS * BS / beta / 1e9
        print(f"{tile_name(cfg)}: fit {c:.4f} ms + {beta * 1e3:.4f} us/block: one row costs {per_row:.2f} block "
              f"iterations beyond its blocks; no-overhead rate {tf_inf:.0f} TF/s = {tf_inf / dense_tf:.2f}x dense",
              flush=True)
        rows.append({"tile": tile_name(cfg), "fit_ms": c, "fit_ms_per_block": beta, "row_cost_blocks": per_row,
                     "no_overhead_tflops": tf_inf})
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "row_length_sweep.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
