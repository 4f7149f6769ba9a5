"""Main job: dilated attention against dense attention on a long sequence — time and peak memory.

Runs on CUDA when present, else on the CPU. Each measurement runs in a fresh process so peak memory
(CUDA: max allocated; CPU: growth of the process's peak resident set) belongs to that method alone.

    python examples/demo.py [--seq-len N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SEGMENTS = (1024, 2048, 4096)
RATES = (1, 2, 4)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(method: str, seq_len: int, device: str) -> dict:
    """Time and peak memory of one method; a tiny first call takes one-time initialisation out of the figures."""
    _measure(method, 64, device)
    return _measure(method, seq_len, device)


def _measure(method: str, seq_len: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    import dilate_compiler as dc

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, H, D = 1, 8, 64
    E = H * D
    if method in ("dense SDPA", "dc.ops.dilated_attention"):
        q, k, v = (torch.randn(B, H, seq_len, D, device=device, dtype=dtype) for _ in range(3))
        if method == "dense SDPA":
            fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        else:
            fn = lambda: dc.ops.dilated_attention(q, k, v, SEGMENTS, RATES)  # noqa: E731
    else:
        x = torch.randn(B, seq_len, E, device=device, dtype=dtype)
        if method == "nn.MultiheadAttention":
            mod = torch.nn.MultiheadAttention(E, H, batch_first=True, device=device, dtype=dtype).eval()
            fn = lambda: mod(x, x, x, need_weights=False)  # noqa: E731
        else:
            mod = dc.nn.MultiheadDilatedAttention(E, H, SEGMENTS, RATES, device=device, dtype=dtype).eval()
            fn = lambda: mod(x)  # noqa: E731
    with torch.no_grad():
        # Peak memory over the first call (the high-water mark cannot be reset on the CPU), time afterwards.
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _peak_rss_bytes()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()) - base
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"method": method, "ms": sorted(times)[1] * 1e3, "peak_mib": max(peak, 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.seq_len, args.device)))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_len = args.seq_len or (65536 if device == "cuda" else 8192)
    print(f"device={device}  B=1 H=8 D=64 N={seq_len}  segments={SEGMENTS} rates={RATES}")
    rows = []
    for method in ("dense SDPA", "dc.ops.dilated_attention", "nn.MultiheadAttention", "MultiheadDilatedAttention"):
        res = subprocess.run(
            [sys.executable, __file__, "--worker", method, "--seq-len", str(seq_len), "--device", device],
            capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'method':<28}{'time (ms)':>12}{'peak extra memory (MiB)':>26}")
    for r in rows:
        print(f"{r['method']:<28}{r['ms']:>12.1f}{r['peak_mib']:>26.1f}")
    dense, dil = rows[0]["ms"], rows[1]["ms"]
    print(f"dilated attention op: {dense / dil:.1f}x faster than dense attention at N={seq_len} "
          f"(different attention pattern: LongNet's sparse one, not dense)")


if __name__ == "__main__":
    main()
