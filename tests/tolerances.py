"""Relative error ceilings per dtype, against float64 references. These never loosen.

Error is measured as ``max|x - ref| / max(max|ref|, 1e-2)`` (see ``rel_err``; test data are unit-scale,
so the floor only matters for references that are zero, such as dq when N == 1). A low-precision result must also be
within ``EAGER_FACTOR`` of the error that eager PyTorch makes at that dtype on the same problem.
"""

import torch

REL_ERR = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
EAGER_FACTOR = 2.0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.to(torch.float64), ref.to(torch.float64)
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()


def assert_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", eager_err=None):
    err = rel_err(x, ref)
    ceiling = REL_ERR[dtype]
    assert err <= ceiling, f"{what}: relative error {err:.3g} > ceiling {ceiling:.3g} for {dtype}"
    if eager_err is not None:
        bound = max(EAGER_FACTOR * eager_err, REL_ERR[torch.float32])
        assert err <= bound, f"{what}: relative error {err:.3g} > {EAGER_FACTOR}x eager's {eager_err:.3g} ({dtype})"
