"""A small kernel autotuned over three tiles, for the autotuner's tests (``test_autotune.py``): it copies ``x``
scaled by ``SCALE`` into ``y``; run as a script it copies once and prints ``autotune.counters`` as JSON (a fresh
process reading the cache another wrote)."""

import json
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dilate_compiler.lowering.common import autotune  # noqa: E402

CONFIGS = [triton.Config({"BLOCK_M": b, "BLOCK_N": 16}, num_warps=4, num_stages=s) for b, s in ((16, 1), (32, 2),
                                                                                              (64, 3))]


@autotune.autotune(CONFIGS, key=["N"], name="test copy", streamed=("BLOCK_M", 1))
@triton.jit
def scaled_copy_kernel(X, Y, N, HEAD_DIM: tl.constexpr, SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = tl.load(X + i, mask=i < N)
    tl.store(Y + i, x * SCALE, mask=i < N)


def scaled_copy(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    scaled_copy_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](x, y, n, HEAD_DIM=16, SCALE=scale)
    return y


if __name__ == "__main__":
    x = torch.arange(int(sys.argv[1]), dtype=torch.float32)
    assert torch.equal(scaled_copy(x), 2 * x)
    print(json.dumps(dict(autotune.counters)))
