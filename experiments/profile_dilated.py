"""CUDA time per kernel of one dilated attention call (forward, or forward + backward), after autotuning: which
kernel the time goes to.

    python experiments/profile_dilated.py [--config A|B] [--n 262144] [--causal] [--backward] [--reps 5]

Config A: H=16, D=64; B: H=8, D=128; segments (2048, 4096, 8192, 16384), rates (1, 2, 4, 8), bf16.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import dilate_compiler as dc

SEGS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)


def add_problem_args(ap: argparse.ArgumentParser) -> None:
    """``--config``, ``--n``, ``--causal``: the dilated attention call these tools look at."""
    ap.add_argument("--config", default="A", choices=("A", "B"))
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--causal", action="store_true")


def problem(a, requires_grad: bool = False):
    """q, k, v (bf16 on CUDA) of ``a.config`` at ``a.n`` and the op ``(q, k, v) -> out`` with ``a.causal``."""
    H, D = (16, 64) if a.config == "A" else (8, 128)
    q, k, v = (torch.randn(1, H, a.n, D, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
               for _ in range(3))
    return q, k, v, lambda q, k, v: dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=a.causal)


def main():
    ap = argparse.ArgumentParser()
    add_problem_args(ap)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    q, k, v, op = problem(a, requires_grad=a.backward)

    def call():
        out = op(q, k, v)
        if a.backward:
            out.backward(torch.ones_like(out))

    call()                                              # autotuning
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.reps):
            call()
        torch.cuda.synchronize()
    print(f"config {a.config}, N={a.n}, causal={a.causal}, backward={a.backward}, per call ({a.reps} calls):")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"  {e.device_time_total / a.reps / 1e3:9.3f} ms  {e.count // a.reps:>3}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
