"""Forward op time with one kernel pinned to each of a list of tiles, registers per thread capped or not: what a
tile (e.g. a register cap, ``tile_configs``) buys before it joins an autotuning space.

    python benchmarks/pinned_tiles.py --problem window|A|A-causal-walk0|A-causal-fwd|B [--n 262144]
        --tiles 128x128/4w/3s,128x128/8w/3s@128

Problems (bf16, B=1):
- window: block-sparse causal sliding window of 4096 tokens (H=16, D=64, block size 128), the forward kernel;
- A / B: dilated config A (H=16, D=64) or B (H=8, D=128), non-causal, the forward kernel;
- A-causal-walk0 / A-causal-fwd: config A causal, the walk-0 kernel or the forward kernel (the other autotuned).
A tile is ``{BLOCK_M}x{BLOCK_N}/{warps}w/{stages}s[@{registers}]`` (``autotune_timings.tile_name``); it need not
be in the space. Times: medians of ``triton.testing.do_bench`` (warmup 25, rep 100) of the whole op, after one
call that compiles the tile. Prints one line per tile; ``--out`` also writes them as JSON.
"""

import argparse
import json
import os
import re

os.environ["TRITON_CACHE_AUTOTUNING"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

import dilate_compiler as dc  # noqa: E402
from dilate_compiler import patterns as P  # noqa: E402
from dilate_compiler.lowering import block_sparse_triton as bt  # noqa: E402
from dilate_compiler.lowering import dilated_triton as dt  # noqa: E402

from autotune_timings import tile_name  # noqa: E402  (benchmarks/, beside this script)
from profile_dilated import RATES, SEGS  # noqa: E402

PROBLEMS = ("window", "A", "A-causal-walk0", "A-causal-fwd", "B")
TILE = re.compile(r"(\d+)x(\d+)/(\d+)w/(\d+)s(?:@(\d+))?")


def parse_tile(spec: str) -> triton.Config:
    """``tile_name``'s inverse."""
    m = TILE.fullmatch(spec)
    if m is None:
        raise ValueError(f"tile must look like 128x64/8w/3s or 128x64/8w/3s@128, got {spec!r}")
    bm, bn, w, s, r = m.groups()
    return triton.Config({"BLOCK_M": int(bm), "BLOCK_N": int(bn)}, num_warps=int(w), num_stages=int(s),
                         maxnreg=int(r) if r else None)


def problem(name: str, n: int):
    """(the autotuned kernel to pin, the op call) of problem ``name`` at N = ``n``."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {name!r}")
    H, D = (8, 128) if name == "B" else (16, 64)
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if name == "window":
        lay = P.sliding_window(4096).layout(n, 128, is_causal=True, device="cuda")
        return bt._autotuned("fwd", 128), lambda: dc.ops.block_sparse_attention(q, k, v, lay, block_size=128,
                                                                                is_causal=True)
    causal = name.startswith("A-causal")
    kernel = dt._dilated_attn_fwd_walk0_kernel if name == "A-causal-walk0" else dt._dilated_attn_fwd_kernel
    return kernel, lambda: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=causal)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="window", choices=PROBLEMS)
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--tiles", required=True)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    configs = [parse_tile(t) for t in a.tiles.split(",")]
    kernel, call = problem(a.problem, a.n)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; {a.problem} "
          f"N={a.n}", flush=True)
    saved = kernel.configs, kernel.cache
    times = {}
    try:
        for cfg in configs:
            kernel.configs, kernel.cache = [cfg], {}
            call()
            torch.cuda.synchronize()
            times[tile_name(cfg)] = triton.testing.do_bench(call, warmup=25, rep=100)
            print(f"{tile_name(cfg):<22} {times[tile_name(cfg)]:8.3f} ms", flush=True)
    finally:
        kernel.configs, kernel.cache = saved
    if a.out:
        with open(os.path.join(a.out, f"pinned_tiles_{a.problem}_{a.n}.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "problem": a.problem, "N": a.n, "ms": times}, f, indent=1)


if __name__ == "__main__":
    main()
