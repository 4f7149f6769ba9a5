"""An op's time with one of its kernels pinned to each of a list of tiles, registers per thread capped or not:
what a tile (e.g. a register cap, ``tile_configs``) buys before it joins an autotuning space.

    python experiments/pinned_tiles.py --problem window|A|A-causal|B --kernel fwd|walk0|dq|dkdv [--n 262144]
        --tiles 128x128/4w/3s,128x128/8w/3s@128

Problems (bf16, B=1):
- window: block-sparse causal sliding window of 4096 tokens (H=16, D=64, block size 128);
- A, A-causal, B: dilated config A (H=16, D=64) non-causal or causal, config B (H=8, D=128) non-causal.
Kernels: fwd (the forward), walk0 (causal dilated only), dq, dkdv; the others autotune as usual. fwd and walk0 time
the forward; dq and dkdv forward + backward (``out.backward``). A tile is
``{BLOCK_M}x{BLOCK_N}/{warps}w/{stages}s[@{registers}]`` (``autotune_timings.tile_name``); it need not be in the
space. Times: medians of ``triton.testing.do_bench`` (warmup 25, rep 100) of the whole op, after one call that
compiles the tile. Prints one line per tile; ``--out`` also writes them as JSON.
"""

import argparse
import json
import os
import re
import sys

os.environ["TRITON_CACHE_AUTOTUNING"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests.lowering.pinning

import torch  # noqa: E402
import triton  # noqa: E402

import dilate_compiler as dc  # noqa: E402
from dilate_compiler import patterns as P  # noqa: E402
from dilate_compiler.lowering.block_sparse import triton as bt  # noqa: E402
from dilate_compiler.lowering.dilated import triton as dt  # noqa: E402

from autotune_timings import tile_name  # noqa: E402  (experiments/, beside this script)
from profile_dilated import problem as dilated_problem  # noqa: E402
from tests.lowering.pinning import pinned  # noqa: E402  (the pinning the GPU tests use)

PROBLEMS = ("window", "A", "A-causal", "B")
KERNELS = ("fwd", "walk0", "dq", "dkdv")
TILE = re.compile(r"(\d+)x(\d+)/(\d+)w/(\d+)s(?:@(\d+))?")


def parse_tile(spec: str) -> triton.Config:
    """``tile_name``'s inverse."""
    m = TILE.fullmatch(spec)
    if m is None:
        raise ValueError(f"tile must look like 128x64/8w/3s or 128x64/8w/3s@128, got {spec!r}")
    bm, bn, w, s, r = m.groups()
    return triton.Config({"BLOCK_M": int(bm), "BLOCK_N": int(bn)}, num_warps=int(w), num_stages=int(s),
                         maxnreg=int(r) if r else None)


def kernel_of(problem: str, kernel: str):
    """The autotuned kernel ``kernel`` of ``problem``'s op."""
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
    if kernel not in KERNELS or (kernel == "walk0" and problem != "A-causal"):
        accepted = KERNELS if problem == "A-causal" else tuple(k for k in KERNELS if k != "walk0")
        raise ValueError(f"kernel of problem {problem!r} must be one of {accepted}, got {kernel!r}")
    if problem == "window":
        return bt._autotuned(kernel, 128)
    return {"fwd": dt._dilated_attn_fwd_kernel, "walk0": dt._dilated_attn_fwd_walk0_kernel,
            "dq": dt._dilated_attn_bwd_dq_kernel, "dkdv": dt._dilated_attn_bwd_dkdv_kernel}[kernel]


def problem_call(problem: str, n: int, backward: bool):
    """``problem``'s op at N = ``n`` as a call: its forward, or forward + backward (the dilated problems are
    ``profile_dilated.problem``'s)."""
    if problem == "window":
        q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
                   for _ in range(3))
        lay = P.sliding_window(4096).layout(n, 128, is_causal=True, device="cuda")
        op = lambda q, k, v: dc.ops.block_sparse_attention(q, k, v, lay, block_size=128,  # noqa: E731
                                                           is_causal=True)
    else:
        spec = argparse.Namespace(config=problem[0], n=n, causal=problem == "A-causal")
        q, k, v, op = dilated_problem(spec, requires_grad=backward)
    if not backward:
        return lambda: op(q, k, v)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    return lambda: op(q, k, v).backward(dout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="window", choices=PROBLEMS)
    ap.add_argument("--kernel", default="fwd", choices=KERNELS)
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--tiles", required=True)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    configs = [parse_tile(t) for t in a.tiles.split(",")]
    kernel = kernel_of(a.problem, a.kernel)
    call = problem_call(a.problem, a.n, a.kernel in ("dq", "dkdv"))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; {a.problem} "
          f"N={a.n}, {a.kernel} pinned", flush=True)
    times = {}
    for cfg in configs:
        with pinned([kernel], cfg):
            call()
            torch.cuda.synchronize()
            times[tile_name(cfg)] = triton.testing.do_bench(call, warmup=25, rep=100)
        print(f"{tile_name(cfg):<22} {times[tile_name(cfg)]:8.3f} ms", flush=True)
    if a.out:
        with open(os.path.join(a.out, f"pinned_tiles_{a.problem}_{a.kernel}_{a.n}.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "problem": a.problem, "kernel": a.kernel, "N": a.n,
                       "ms": times}, f, indent=1)


if __name__ == "__main__":
    main()
