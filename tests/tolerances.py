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


def eager_dilated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, strategy, is_causal: bool) -> torch.Tensor:
    """Eager PyTorch at q's dtype, for the "at most ~2x eager's error" check: the definition with dtype
    matmuls and a float32 softmax over log-multiplicity-weighted scores. Differentiable."""
    import math

    g = q.shape[1] // k.shape[1]
    m = strategy.multiplicity(q.shape[2], q.shape[1], is_causal=is_causal, device=q.device)
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.float().masked_fill(m == 0, float("-inf")) + torch.log(m.clamp_min(1).float())
    out = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype) @ v.repeat_interleave(g, 1)
    return out / strategy.num_branches if strategy.mixing == "head_groups" else out
