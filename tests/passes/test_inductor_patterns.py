"""Every attention formulation Inductor's own ``fuse_attention`` patterns show people write (the functions
``_sfdp_pattern_N`` there, taken from real models: BERT, DistilBERT, GPT-2, T5, MBart, ...) is rewritten and
keeps the model's output; the one that can't be read exactly is skipped with its reason."""

import inspect
import math

import pytest
import torch

import dilate_compiler as dc
from tests.passes.helpers import DENSE, OP, targets
from tests.passes.test_find_attention import Fn

fuse_attention = pytest.importorskip("torch._inductor.fx_passes.fuse_attention")
PATTERNS = sorted((name for name in dir(fuse_attention) if name.startswith("_sfdp_pattern_")),
                  key=lambda name: int(name.rsplit("_", 1)[1]))
B, H, N, D = 2, 4, 16, 8
# q/k/v given as [B, N, H, D] (the pattern permutes them) rather than [B, H, N, D]
TOKEN_MAJOR = {7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 21, 22, 23, 25, 26, 27, 29, 30}
# [B*H, N, D] inputs with no visible head split: a dilated pattern depends on the head, which the graph hides
SKIPPED = {13: "3-D attention [B*H, N, D] whose head split is not visible in the graph"}
# the model rounds the probabilities and v to float16; the op reads v before that cast
ROUNDED_TO_FP16 = {7, 8, 9, 10}


def _arguments(number: int, params: list) -> list:
    g = torch.Generator().manual_seed(number)
    shape = (B * H, N, D) if number == 13 else (B, N, H, D) if number in TOKEN_MAJOR else (B, H, N, D)
    args = []
    for p in params:
        if p in ("query", "key", "value"):
            args.append(torch.randn(shape, generator=g))
        elif p in ("inv_scale", "inv_scale_factor"):
            args.append(math.sqrt(D))
        elif p == "scale_factor":
            args.append(1 / math.sqrt(D))
        elif p == "dropout_p":
            args.append(0.0)
        elif p in ("attn_mask", "attention_mask") and number in (15, 17, 20):   # a key padding mask of 0 / 1
            mask = torch.ones(B, N)
            mask[0, -3:] = 0
            args.append(mask)
        elif p in ("attn_mask", "attention_mask"):
            args.append(torch.randn(B, 1, N, N, generator=g))
        elif p == "causal_mask":
            args.append(torch.ones(N, N, dtype=torch.bool).tril())
        else:
            raise AssertionError(f"{p}: an argument this test does not know how to make")
    return args


@pytest.mark.parametrize("name", PATTERNS)
def test_inductor_attention_patterns(name):
    number = int(name.rsplit("_", 1)[1])
    pattern = getattr(fuse_attention, name)
    params = list(inspect.signature(pattern).parameters)
    args = _arguments(number, params)
    tensor_names = [p for p, a in zip(params, args) if isinstance(a, torch.Tensor)]
    fixed = {p: a for p, a in zip(params, args) if not isinstance(a, torch.Tensor)}
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))

    def fn(*ts):
        return pattern(**dict(zip(tensor_names, ts)), **fixed)

    res = dc.rewrite(Fn(fn), tensors, DENSE)
    out, ref = res.module(*tensors), fn(*tensors)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    if number in SKIPPED:
        assert not res.report.rewritten and res.report.skipped[0].reason.startswith(SKIPPED[number]), str(res.report)
        for a, b in zip(outs, refs):
            torch.testing.assert_close(a, b)
        return
    assert len(res.report.rewritten) == 1 and not res.report.skipped, str(res.report)
    assert targets(res.module).count(OP) == 1
    if number not in ROUNDED_TO_FP16:
        for a, b in zip(outs, refs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        return
    # The model computes p @ v in float16: the rewrite is at least as close to the float64 attention.
    q, k, v = (t.permute(0, 2, 1, 3).double() for t in tensors[:3])
    exact = torch.softmax(q @ k.mT / math.sqrt(D), -1) @ v
    assert out.dtype == ref.dtype == torch.float16
    assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max()
