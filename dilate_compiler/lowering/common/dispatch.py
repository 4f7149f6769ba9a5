"""Whether a call runs the Triton kernels or the exact PyTorch path, and the dtype of what the exact paths
accumulate and every path's log-sum-exp."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .launch import INTERPRET

SUPPORTED_HEAD_DIMS = (32, 64, 128)

log = logging.getLogger("dilate_compiler")
_LOGGED: set = set()


def tensor_unsupported_reason(q) -> str:
    """Why no Triton attention kernel of this project can take q (device, head dim, dtype), or ''."""
    if q.device.type != "cuda":
        return f"device {q.device.type} (the kernels run on CUDA; launchers run on CPU only under TRITON_INTERPRET=1)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernels: {SUPPORTED_HEAD_DIMS})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (kernels: float16, bfloat16; float32 and float64 run the exact path)"
    return ""


def value_unsupported_reason(q, v) -> str:
    """Why the kernels can't take v beside q (they run one head dim for q, k and v), or ''."""
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} != query/key head dim {q.shape[-1]} (kernels: one head dim)"
    return ""


def interpreter_runs(q) -> bool:
    """Whether the kernels run ``q`` under ``TRITON_INTERPRET=1`` on the CPU (float16 / float32, a supported head
    dim): how the tests run them, also inside the distributed ops on gloo ranks."""
    return (INTERPRET and q.device.type == "cpu" and q.dtype in (torch.float16, torch.float32)
            and q.shape[-1] in SUPPORTED_HEAD_DIMS)


def kernels_apply(what: str, q: Tensor, reason: str) -> bool:
    """True when ``reason`` is empty (the Triton kernels run); a CUDA call that can't use them is logged once
    per (op, reason)."""
    if reason and q.device.type == "cuda" and (what, reason) not in _LOGGED:
        _LOGGED.add((what, reason))
        log.warning("%s on CUDA runs the exact PyTorch path: %s", what, reason)
    return not reason


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the exact paths' accumulation and of the ops' log-sum-exp there: float64 for float64, else
    float32 (the kernels' LSE is float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
