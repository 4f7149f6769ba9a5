"""Every tile configuration's time as the autotuner measured it, for the dilated forward kernels of one call,
eager (Triton's autotuner) and under torch.compile (Inductor's autotuner of user-defined kernels), and the whole
op's time with each config of one kernel pinned, under ``do_bench`` and back to back: whether the config picked is
the fastest by a margin larger than the run-to-run noise, whether the two paths agree, and whether the way of
timing changes the ranking.

    python experiments/autotune_timings.py [--config A|B] [--n 262144] [--causal] [--repeats 2] [--compiled]

Each repeat clears the autotuner's choice and tunes again (Triton's disk cache of autotuning results is off).
"""

import argparse
import logging
import os

os.environ["TRITON_CACHE_AUTOTUNING"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

from dilate_compiler.lowering.dilated import triton as dt  # noqa: E402

from profile_dilated import add_problem_args, problem  # noqa: E402  (experiments/, beside this script)

KERNELS = {"walk0": dt._dilated_attn_fwd_walk0_kernel, "fwd": dt._dilated_attn_fwd_kernel}


def tile_name(c) -> str:
    """A tile config as ``{BLOCK_M}x{BLOCK_N}/{warps}w/{stages}s[@{registers}]``, e.g. ``128x64/4w/3s`` or
    ``128x64/8w/3s@128`` (registers per thread capped, ``tile_configs``)."""
    cap = f"@{c.maxnreg}" if c.maxnreg else ""
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}/{c.num_warps}w/{c.num_stages}s{cap}"


def back_to_back(fn, calls: int = 20) -> float:
    """Mean ms per call over ``calls`` calls launched back to back (no cache flush or pause between them, as in a
    model), after three warm-up calls. ``do_bench`` zeroes a 256 MB buffer before each call instead."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


class _InductorTimings(logging.Handler):
    """Collects the debug lines of Inductor's ``benchmark_all_configs``."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main():
    ap = argparse.ArgumentParser()
    add_problem_args(ap)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compiled", action="store_true")
    a = ap.parse_args()
    q, k, v, op = problem(a)
    print(f"config {a.config}, N={a.n}, causal={a.causal}; times in ms (median of the autotuner's runs)")
    for r in range(a.repeats):
        for kernel in KERNELS.values():
            kernel.cache.clear()
            kernel.configs_timings = None
        op(q, k, v)
        torch.cuda.synchronize()
        for name, kernel in KERNELS.items():
            if not kernel.configs_timings:
                continue
            ranked = sorted(kernel.configs_timings.items(), key=lambda kv: kv[1][0])
            print(f"eager repeat {r} {name}: " + ", ".join(f"{tile_name(c)} {t[0]:.3f}" for c, t in ranked))
        print(f"eager repeat {r}: op {triton.testing.do_bench(lambda: op(q, k, v)):.3f} ms under do_bench, "
              f"{back_to_back(lambda: op(q, k, v)):.3f} back to back")
    for name, kernel in KERNELS.items():     # the whole op with each config of one kernel, the other's choice kept
        chosen = dict(kernel.cache)
        if not chosen:
            continue
        times = []
        for cfg in kernel.configs:
            kernel.cache.update({key: cfg for key in chosen})
            times.append((triton.testing.do_bench(lambda: op(q, k, v)), back_to_back(lambda: op(q, k, v)), cfg))
        kernel.cache.update(chosen)
        print(f"op with each {name} config, ms under do_bench / back to back: "
              + ", ".join(f"{tile_name(c)} {t:.3f} / {b:.3f}" for t, b, c in sorted(times, key=lambda x: x[0])))
    if not a.compiled:
        return
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    handler = _InductorTimings()
    heuristics_log = logging.getLogger("torch._inductor.runtime.triton_heuristics")
    heuristics_log.addHandler(handler)
    heuristics_log.setLevel(logging.DEBUG)
    for r in range(a.repeats):
        torch._dynamo.reset()
        handler.lines.clear()
        compiled = torch.compile(op, fullgraph=True, dynamic=False)
        compiled(q, k, v)
        torch.cuda.synchronize()
        print(f"compiled repeat {r}: " + " | ".join(handler.lines))
        print(f"compiled repeat {r}: op {triton.testing.do_bench(lambda: compiled(q, k, v)):.3f} ms under do_bench, "
              f"{back_to_back(lambda: compiled(q, k, v)):.3f} back to back")


if __name__ == "__main__":
    main()
