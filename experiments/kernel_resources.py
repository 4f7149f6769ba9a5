"""Registers, spills and shared memory of the dilated kernels' autotuned configs (what the compiler reports).

    python experiments/kernel_resources.py [--n 262144] [--heads 16] [--dim 64] [--causal]
"""

import argparse

import torch

import dilate_compiler as dc
from dilate_compiler.lowering.dilated import triton as kt

SEGS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    a = ap.parse_args()
    q, k, v = (torch.randn(1, a.heads, a.n, a.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=a.causal)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    for name in ("_dilated_attn_fwd_kernel", "_dilated_attn_fwd_walk0_kernel", "_dilated_attn_bwd_dq_kernel",
                 "_dilated_attn_bwd_dkdv_kernel"):
        tuner = getattr(kt, name)
        best = getattr(tuner, "best_config", None)
        print(f"{name}: best config {best}")
        for cache in tuner.fn.device_caches.values() if hasattr(tuner.fn, "device_caches") else []:
            for compiled in cache[0].values():
                md = compiled.metadata
                print(f"   num_warps={md.num_warps} num_stages={md.num_stages} regs={compiled.n_regs} "
                      f"spills={compiled.n_spills} shared={md.shared} bytes")


if __name__ == "__main__":
    main()
