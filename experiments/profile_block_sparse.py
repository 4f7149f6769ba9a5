"""One launch each of our block-sparse forward and FlexAttention's on the same sliding-window blocks, for a profiler.

    DILATE_COMPILER_AUTOTUNE=0 python experiments/profile_block_sparse.py          # compiles (run once first)
    DILATE_COMPILER_AUTOTUNE=0 ncu -k regex:"block_sparse_fwd|triton_tem" -s 2 -c 2 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section InstructionStats \
        --section SchedulerStats python experiments/profile_block_sparse.py

B=1, H=16, D=64, bf16, N=65536 (``--n``), causal sliding window of 4096 tokens, block size 128; Flex gets our
layout's block lists (as ``bench_block_sparse.py --flex-mask from-layout``). Three rounds of (ours, Flex): the
``-s 2 -c 2`` above profiles the second round.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import torch  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

import dilate_compiler as dc  # noqa: E402
from bench_block_sparse import WINDOW, flex_block_mask_from_layout  # noqa: E402  (benchmarks/)
from dilate_compiler import patterns as P  # noqa: E402

H, D, BS = 16, 64, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    n = ap.parse_args().n
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = P.sliding_window(WINDOW).layout(n, BS, is_causal=True, device="cuda")
    bm = flex_block_mask_from_layout(lay, lambda b, h, qi, kv: (qi - kv < WINDOW) & (kv <= qi))
    flex = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS, is_causal=True)
            flex(q, k, v, block_mask=bm)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
