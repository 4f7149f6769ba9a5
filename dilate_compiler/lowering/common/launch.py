"""Launching the project's Triton kernels: the interpreter switch, autotuning spaces, the launch context, the
``wrap_triton`` runner, and what the kernels can read in place.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (how the tests run them): one small tile, no autotuning.
``DILATE_COMPILER_AUTOTUNE=0`` pins the first tile of each space (bounded compile time, e.g. in tests).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
from torch.library import wrap_triton

from . import inductor_caps

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("DILATE_COMPILER_AUTOTUNE", "1") != "0"


def tile_configs(space) -> list:
    """``triton.Config`` of each ``(BLOCK_M, BLOCK_N, warps, stages[, registers])`` tile. A fifth entry caps the
    registers per thread (ptxas ``maxnreg``): an 8-warp tile held to 128 runs two CTAs, 16 warps, per SM instead
    of one. The in-order loop is latency-bound (ncu, block-sparse window: 41% of issue slots busy, 8 warps per
    SM), and the second CTA hides its waits (H200: window forward 2.75 -> 2.49 ms at 64K, config A non-causal
    9.11 -> 8.40 ms at 256K). Inductor (torch 2.11 to 2.13) doesn't pass ``Config.maxnreg`` on to user-defined
    kernels by itself: ``inductor_caps`` forwards it (on unless ``DILATE_COMPILER_INDUCTOR_CAPS=0``)."""
    return [triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3],
                          maxnreg=t[4] if len(t) > 4 else None) for t in space]


def autotune_configs(configs: list) -> list:
    """What a kernel autotunes over, given its GPU space ``configs``: one 16 x 16 tile under the interpreter; the
    space, or its first tile when ``DILATE_COMPILER_AUTOTUNE=0``."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return configs if AUTOTUNE else configs[:1]


def launch_device(t: torch.Tensor):
    """The context of a kernel launch on ``t``'s tensors: Triton launches on the current CUDA device, so make it
    ``t``'s (a no-op off CUDA)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def runner(kernel):
    """``kernel`` as the ops launch it: through ``wrap_triton`` (Inductor inlines the launch into its output code),
    or as is under the interpreter (which ``wrap_triton`` rejects)."""
    if INTERPRET:
        return kernel
    if inductor_caps.ENABLED:
        inductor_caps.install()   # once: Inductor compiles the capped tiles with their cap (inductor_caps.py)
    return wrap_triton(kernel)


def rows_fit(t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` ``[B, H, N, D]`` in place: unit stride along D, and ``position * row
    stride`` (int32 arithmetic in the kernels' loops) below 2**31. A batch-first view (row stride H * D) at
    H=16, D=64 passes 2**31 from N = 2M on; a contiguous copy's row stride is D."""
    return t.stride(-1) == 1 and t.shape[-2] * t.stride(-2) < 2**31


def rows_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when the kernels can't read it in place (``rows_fit``)."""
    return t if rows_fit(t) else t.contiguous()


def head_shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
    """``(Hq, Hkv, D)`` as ints: the kernels compile them in (``GQA``, ``HEAD_DIM``, the head-group starts). Under
    ``torch.compile(dynamic=True)`` they arrive symbolic; ``int`` specialises them, so Dynamo guards on them and
    another head count or head dim recompiles (the lengths stay symbolic)."""
    return int(q.shape[1]), int(k.shape[1]), int(q.shape[-1])


def softcap_args(softcap) -> dict:
    """The kernels' soft-capping arguments (``primitives.soft_cap``): the runtime ``softcap`` and the constexpr
    ``SOFTCAP``. Without capping ``softcap`` is None, which Triton specialises away, so the kernels compile as if
    they had no such argument."""
    if softcap is None:
        return dict(softcap=None, SOFTCAP=False)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0 \
            or softcap == float("inf"):
        raise ValueError(f"softcap must be a finite float > 0 or None (no soft-capping), got {softcap!r}")
    return dict(softcap=float(softcap), SOFTCAP=True)
