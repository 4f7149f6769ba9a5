"""Per-rank compute of the distributed ops on one GPU (an NCCL group of one), beside the single-process op:
what the exact per-rank path (ring / sparse modes) costs against the fused kernels that head-parallel uses.

    python benchmarks/bench_distributed.py [--ns 16384,65536]

bf16, B=1, H=16, D=64, causal; dilated: segments (2048, 4096, 8192), rates (1, 2, 4). Forward only. With one
rank there is no communication: the figures are the compute a rank does for its shard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dilate_compiler as dc  # noqa: E402
from benchmarks.bench_dilated import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="16384,65536")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} triton={triton.__version__}", flush=True)
    strategy = dc.Dilated((2048, 4096, 8192), (1, 2, 4))
    rows = []
    for n in (int(x) for x in a.ns.split(",")):
        q, k, v = (torch.randn(1, 16, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cases = {
            "dense SDPA (flash)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "dense ring_attention (exact per-rank path)": lambda: dc.distributed.ring_attention(
                q, k, v, None, is_causal=True),
            "dilated single-process op (Triton kernels)": lambda: dc.ops.dilated_attention(
                q, k, v, strategy.segment_lengths, strategy.dilation_rates, is_causal=True),
            "dilated ring_attention sparse (exact per-rank path)": lambda: dc.distributed.ring_attention(
                q, k, v, strategy, is_causal=True),
            "dilated head_parallel_attention (Triton kernels)": lambda: dc.distributed.head_parallel_attention(
                q, k, v, strategy, is_causal=True),
        }
        if n > 16384:   # the exact path reads every earlier key in 16-row chunks: minutes per call beyond this
            del cases["dense ring_attention (exact per-rank path)"]
        for name, fn in cases.items():
            ms = bench(fn)
            rows.append({"n": n, "method": name, "ms": ms})
            print(f"N={n:>7}  {name:<55} {ms:9.3f} ms", flush=True)
    with open(os.path.join(a.out, "bench_distributed.json"), "w") as f:
        json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
