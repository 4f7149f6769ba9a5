"""Soft-capped scores (Gemma2: ``s = s * scaling; s = tanh(s / c) * c; s = s + mask``) are read as ``site.softcap``
and rewritten exactly; what the ops can't express is skipped with its reason."""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import dilate_compiler as dc
from tests.passes.helpers import DENSE, OP, check_rewrite, targets
from tests.passes.test_find_attention import Fn, N, qkv

CAP = 5.0


def capped_div(q, k, v):
    return torch.softmax(torch.tanh(q @ k.mT * 0.3 / CAP) * CAP, -1) @ v


def capped_mul_causal(q, k, v):
    s = torch.tanh((q @ k.mT) * 0.3 * (1.0 / CAP)) * CAP
    return torch.softmax(s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf")), -1) @ v


@pytest.mark.parametrize("fn", [capped_div, capped_mul_causal])
@pytest.mark.parametrize("strategy", [DENSE, dc.BlockSparse(dc.patterns.local(4), block_size=8)],
                         ids=["dilated", "block_sparse"])
def test_soft_capped_site_is_rewritten_with_its_cap(fn, strategy):
    res = check_rewrite(Fn(fn), qkv(), 1, strategy=strategy)
    site = res.report.rewritten[0]
    assert site.softcap == pytest.approx(CAP) and site.scale == pytest.approx(0.3)
    assert f"softcap {CAP:g}" in str(res.report)


def test_the_cap_changes_the_result():
    """The test data's scores pass the cap: dropping it would be caught by the comparisons above."""
    q, k, v = qkv()
    plain = torch.softmax(q @ k.mT * 0.3, -1) @ v
    assert (capped_div(q, k, v) - plain).abs().max() > 1e-2


def test_a_tanh_with_different_constants_is_not_a_cap():
    res = dc.rewrite(Fn(lambda q, k, v: torch.softmax(torch.tanh(q @ k.mT / 3.0) * 5.0, -1) @ v), qkv(), DENSE)
    assert not res.report.rewritten
    assert "tanh" in res.report.skipped[0].reason and "not the soft-capping" in res.report.skipped[0].reason


def test_sdpa_sites_carry_no_cap():
    res = dc.rewrite(Fn(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)), qkv(), DENSE)
    assert res.report.rewritten[0].softcap is None
    assert "softcap" not in str(res.report)


@dataclass(frozen=True)
class _NoScoreModifier:
    """A strategy that applies no score modifier (no ``applies_softcap``)."""

    inner: object = DENSE

    def check_site(self, site) -> Optional[str]:
        return self.inner.check_site(site)

    def emit_call(self, emit, site, call):
        raise AssertionError("a soft-capped site must not reach this strategy")

    def reference(self, q, k, v, *, is_causal=False, scale=None, attn_mask=None):
        return self.inner.reference(q, k, v, is_causal=is_causal, scale=scale, attn_mask=attn_mask)


def test_strategy_without_a_score_modifier_skips_the_site_naming_the_cap():
    res = dc.rewrite(Fn(capped_div), qkv(), _NoScoreModifier())
    assert not res.report.rewritten
    assert "soft-capping of the scores (softcap 5" in res.report.skipped[0].reason
    with pytest.raises(dc.AttentionSkipped, match="soft-capping"):
        dc.rewrite(Fn(capped_div), qkv(), _NoScoreModifier(), strict=True)


def test_hilbert_passes_the_cap_to_its_inner_strategy():
    hilbert = dc.Hilbert((4, 6), dc.BlockSparse(dc.patterns.local(1), block_size=8), reorder="fused")
    res = dc.rewrite(Fn(capped_div), qkv(), hilbert)
    assert res.report.rewritten and res.report.rewritten[0].softcap == pytest.approx(CAP)
    q, k, v = qkv(dtype=torch.float64)
    ref = hilbert.reference(q, k, v, scale=0.3)   # uncapped reference: the cap must make a difference
    out = res.module(*(t.float() for t in (q, k, v)))
    order = hilbert.device_order(N, (4, 6), q.device)
    inner_ref = _capped_block_sparse_in_order(q, k, v, hilbert, order)
    torch.testing.assert_close(out.double(), inner_ref, atol=1e-5, rtol=1e-5)
    assert (out.double() - ref).abs().max() > 1e-2


def _capped_block_sparse_in_order(q, k, v, hilbert, order):
    from dilate_compiler.strategies.reference import weighted_softmax_attention
    keep = hilbert.token_mask(N, num_heads=q.shape[1], grid=(4, 6))
    return weighted_softmax_attention(q, k, v, keep, scale=0.3, softcap=CAP)


def test_capped_site_under_the_backend_fullgraph():
    from dilate_compiler.backend import dilated_backend

    q, k, v = qkv()
    compiled = torch.compile(capped_div, backend=dilated_backend, fullgraph=True, options={"strategy": DENSE})
    torch.testing.assert_close(compiled(q, k, v), capped_div(q, k, v), atol=1e-5, rtol=1e-5)


def _gemma2(sliding_window=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_cache=False,
                                    attn_implementation="eager", attn_logit_softcapping=50.0,
                                    sliding_window=sliding_window or 4096, query_pre_attn_scalar=16)
    model = transformers.Gemma2Model(cfg).eval()
    # larger query/key weights: scores of tens, where a cap of 50 matters
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids).last_hidden_state

    return Hidden()


@pytest.mark.parametrize("strategy", [DENSE, dc.BlockSparse("auto", block_size=8)], ids=["dilated", "block_sparse"])
@pytest.mark.parametrize("sliding_window", [None, 8], ids=["global", "sliding"])
def test_gemma2_is_rewritten_with_its_soft_capping(strategy, sliding_window):
    model = _gemma2(sliding_window)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    res = dc.rewrite(model, (ids,), strategy)
    assert len(res.report.rewritten) == 2 and not res.report.skipped, str(res.report)
    assert all(s.softcap == 50.0 for s in res.report.rewritten)
    assert "softcap 50" in str(res.report)
    ops = {dc.Dilated: OP, dc.BlockSparse: torch.ops.dilate_compiler.block_sparse_attention_forward.default}
    assert targets(res.module).count(ops[type(strategy)]) == 2
    with torch.no_grad():
        torch.testing.assert_close(res.module(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_gemma2_cap_matters_on_the_test_model():
    model = _gemma2()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        capped = model(ids)
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (model(ids) - capped).abs().max() > 1e-3
