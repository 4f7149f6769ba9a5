"""The dilated forward kernels launched eagerly and by Inductor (torch.compile), with one tile config pinned for
both, side by side: time per kernel under the profiler, and each launch as the profiler records it (grid, block,
registers per thread, shared memory); then the whole op under ``do_bench``, the two paths alternating.

    python experiments/launch_compare.py [--config A|B] [--n 262144] [--causal] [--tile 64x64/4w/3s] [--reps 5]

Why: under torch.compile the causal walk-0 kernel once ran faster than the eager launch of what should be the
same kernel (docs/design-notes.md, "Two autotuners disagree"). Pinning one config takes the autotuners out; what
remains to differ is the launch.
"""

import argparse
import json
import os
import tempfile

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from dilate_compiler.lowering.dilated import triton as dt

from autotune_timings import KERNELS, tile_name   # noqa: E402  (experiments/, beside this script)
from profile_dilated import add_problem_args, problem   # noqa: E402

LAUNCH_ARGS = ("grid", "block", "registers per thread", "shared memory", "est. achieved occupancy %")


def _tile(spec: str, kind: str):
    """The config of the ``kind`` space named ``spec`` (``tile_name``)."""
    space = dt.tile_space(kind)
    for c in space:
        if tile_name(c) == spec:
            return c
    raise ValueError(f"--tile must name a config of the {kind!r} space ({', '.join(map(tile_name, space))}), "
                     f"got {spec!r}")


def _launches(fn, reps: int) -> dict:
    """Kernel name -> (mean ms per call, the launch arguments of its first launch), from a profiler trace."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    out = {}
    for e in events:
        if e.get("cat") != "kernel":
            continue
        name = e["name"]
        total, launch = out.get(name, (0.0, None))
        out[name] = (total + e["dur"] / 1e3 / reps, launch or {k: e["args"].get(k) for k in LAUNCH_ARGS})
    return out


def main():
    ap = argparse.ArgumentParser()
    add_problem_args(ap)
    ap.add_argument("--tile", default="64x64/4w/3s")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    q, k, v, op = problem(a)
    for kind, kernel in KERNELS.items():
        kernel.configs, kernel.cache = [_tile(a.tile, kind)], {}
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    compiled = torch.compile(op, fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager_out = op(q, k, v)
        diff = (compiled(q, k, v) - eager_out).abs().max().item()
        del eager_out
    print(f"config {a.config}, N={a.n}, causal={a.causal}, tile {a.tile} pinned for both paths; "
          f"compiled vs eager max abs {diff:.3g} (eager output kept alive)")
    for name, fn in (("eager", lambda: op(q, k, v)), ("compiled", lambda: compiled(q, k, v))):
        for kernel_name, (ms, launch) in sorted(_launches(fn, a.reps).items(), key=lambda kv: -kv[1][0]):
            if ms > 0.01:
                print(f"  {name:<8} {ms:8.3f} ms  {kernel_name[:44]:<44} {launch}")
    for rep in range(3):
        print(f"do_bench round {rep}: eager {triton.testing.do_bench(lambda: op(q, k, v)):.3f} ms, "
              f"compiled {triton.testing.do_bench(lambda: compiled(q, k, v)):.3f} ms")


if __name__ == "__main__":
    main()
