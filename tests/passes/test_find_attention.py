"""Every attention formulation the compiler must find: positive, negative, strict, where, property test."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dilate_compiler as dc
from tests.passes.helpers import DENSE, check_rewrite

B, H, N, D = 2, 4, 24, 8


def qkv(hkv=H, n=N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, D, generator=g, dtype=dtype), torch.randn(B, hkv, n, D, generator=g, dtype=dtype),
            torch.randn(B, hkv, n, D, generator=g, dtype=dtype))


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


SDPA_SPELLINGS = {
    "plain": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v),
    "causal_kw": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "positional": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, None, 0.0, True),
    "mask_kw_bool": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
    "mask_positional_float": lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, torch.zeros(N, N).masked_fill(~m, -math.inf)),
    "scale_kw": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, scale=0.3),
    "gqa": lambda q, k, v, m: F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
}


@pytest.mark.parametrize("name", sorted(SDPA_SPELLINGS))
def test_sdpa_every_spelling(name):
    q, k, v = qkv()
    m = torch.rand(N, N, generator=torch.Generator().manual_seed(1)) > 0.3
    m |= torch.eye(N, dtype=torch.bool)
    res = check_rewrite(Fn(SDPA_SPELLINGS[name]), (q, k, v, m), 1)
    site = res.report.rewritten[0]
    assert site.kind == "sdpa"
    assert site.gqa_ratio == (2 if name == "gqa" else 1)
    assert site.is_causal == (name in ("causal_kw", "positional"))


def test_sdpa_dropout_kept_in_training():
    q, k, v = qkv()
    model = Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.25))
    res = dc.rewrite(model, (q, k, v), DENSE)
    assert res.report.rewritten[0].dropout_p == 0.25
    torch.manual_seed(0)
    a = res.module(q, k, v)
    assert not torch.allclose(a, F.scaled_dot_product_attention(q, k, v))  # dropout happened


ADDITIVE = torch.randn(N, N, generator=torch.Generator().manual_seed(2))


def _mask_bool():
    return torch.ones(N, N, dtype=torch.bool).tril()


HAND_WRITTEN = {
    "matmul_div": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v,
    "matmul_mul_transpose_dims": lambda q, k, v: torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.2, dim=-1) @ v,
    "permute_kT": lambda q, k, v: torch.softmax(q @ k.permute(0, 1, 3, 2) * 0.2, -1) @ v,
    "sqrt_scale_split": lambda q, k, v: torch.softmax((q * D ** -0.25) @ (k * D ** -0.25).transpose(-1, -2), -1) @ v,
    "no_scale_t5": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v,
    "einsum": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd",
                                           torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.3).softmax(-1), v),
    "additive_mask": lambda q, k, v: torch.softmax(q @ k.mT * 0.3 + ADDITIVE, -1) @ v,
    "masked_fill_finfo_min": lambda q, k, v: torch.softmax((q @ k.mT * 0.3).masked_fill(
        ~_mask_bool(), torch.finfo(torch.float32).min), -1) @ v,
    "masked_fill_inf": lambda q, k, v: torch.softmax((q @ k.mT * 0.3).masked_fill(~_mask_bool(), -math.inf),
                                                     -1) @ v,
    "where_tril": lambda q, k, v: torch.softmax(torch.where(_mask_bool(), q @ k.mT * 0.3, -math.inf), -1) @ v,
    "causal_from_arange": lambda q, k, v: torch.softmax((q @ k.mT * 0.3).masked_fill(
        torch.arange(N)[None, :] > torch.arange(N)[:, None], float("-inf")), -1) @ v,
    "triu_additive": lambda q, k, v: torch.softmax(q @ k.mT * 0.3 + torch.full((N, N), -1e9).triu(1), -1) @ v,
    "softmax_float_cast": lambda q, k, v: F.softmax((q @ k.mT * 0.3).float(), dim=-1).to(q.dtype) @ v,
    "softmax_dtype_kw": lambda q, k, v: F.softmax(q @ k.mT * 0.3, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
    "scale_after_mask": lambda q, k, v: torch.softmax((q @ k.mT + torch.full((N, N), -1e9).triu(1)) * 0.3, -1) @ v,
    "repeat_kv": lambda q, k, v: torch.softmax(q @ k[:, :2, None].expand(B, 2, 2, N, D).reshape(B, H, N, D).mT
                                               * 0.3, -1) @ v[:, :2, None].expand(B, 2, 2, N, D).reshape(B, H, N, D),
    "repeat_interleave": lambda q, k, v: torch.softmax(q @ k[:, :2].repeat_interleave(2, dim=1).mT * 0.3, -1)
    @ v[:, :2].repeat_interleave(2, dim=1),
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_attention(name):
    res = check_rewrite(Fn(HAND_WRITTEN[name]), qkv(), 1)
    site = res.report.rewritten[0]
    assert site.kind == "matmul-softmax"
    if name.startswith("repeat"):
        assert site.gqa_ratio == 2
    expected_scale = {"matmul_div": 1 / math.sqrt(D), "matmul_mul_transpose_dims": 0.2, "permute_kT": 0.2,
                      "sqrt_scale_split": 1.0, "no_scale_t5": 1.0}.get(name, 0.3)
    assert site.scale == pytest.approx(expected_scale)


def test_dropout_after_softmax_is_kept():
    model = Fn(lambda q, k, v: F.dropout(torch.softmax(q @ k.mT * 0.3, -1), 0.2, training=True) @ v)
    res = dc.rewrite(model, qkv(), DENSE)
    assert res.report.rewritten[0].dropout_p == pytest.approx(0.2)
    model_eval = Fn(lambda q, k, v: F.dropout(torch.softmax(q @ k.mT * 0.3, -1), 0.2, training=False) @ v)
    assert dc.rewrite(model_eval, qkv(), DENSE).report.rewritten[0].dropout_p == 0.0


# --- negative: no rewrite, and a reason --------------------------------------------------------------------


def test_returned_weights_are_not_rewritten():
    def fn(q, k, v):
        p = torch.softmax(q @ k.mT * 0.3, -1)
        return p @ v, p

    res = dc.rewrite(Fn(fn), qkv(), DENSE)
    assert not res.report.rewritten and len(res.report.skipped) == 1
    assert "escape" in res.report.skipped[0].reason
    q, k, v = qkv()
    torch.testing.assert_close(res.module(q, k, v), fn(q, k, v))


def test_cross_attention_skipped_with_reason():
    q, _, _ = qkv()
    _, k, v = qkv(n=N + 8)
    res = dc.rewrite(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), (q, k, v), DENSE)
    assert res.report.skipped[0].reason.startswith("cross-attention: query length 24 != key length 32")


def test_merged_heads_3d_without_visible_split_skipped_with_reason():
    q, k, v = (t.reshape(B * H, N, D) for t in qkv())
    res = dc.rewrite(Fn(lambda q, k, v: torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1).bmm(v)), (q, k, v), DENSE)
    assert "head split is not visible" in res.report.skipped[0].reason


def test_merged_heads_3d_bmm_with_visible_split():
    """[B, N, E] -> [B*H, N, D] written out, then bmm/baddbmm attention: H is recovered, heads keep their index."""
    strategy = dc.Dilated((8, 16), (1, 2))  # rate 2: head index matters

    def split(x):  # [B, N, E] -> [B*H, N, D]
        return x.view(B, N, H, D).transpose(1, 2).reshape(B * H, N, D)

    def fn(x, y, z, bias):
        q, k, v = split(x), split(y), split(z)
        return torch.bmm(torch.softmax(torch.baddbmm(bias, q * 0.3, k.transpose(1, 2)), -1), v)

    g = torch.Generator().manual_seed(5)
    x, y, z = (torch.randn(B, N, H * D, generator=g) for _ in range(3))
    bias = torch.randn(B * H, N, N, generator=g)
    res = dc.rewrite(Fn(fn), (x, y, z, bias), strategy)
    site = res.report.rewritten[0]
    assert site.q_shape == (B, H, N, D)
    q4, k4, v4 = (t.view(B, N, H, D).transpose(1, 2) for t in (x, y, z))
    expected = dc.ops.dilated_attention(q4, k4, v4, (8, 16), (1, 2), scale=0.3, attn_mask=bias.view(B, H, N, N))
    torch.testing.assert_close(res.module(x, y, z, bias), expected.reshape(B * H, N, D), atol=1e-5, rtol=1e-5)


def test_unsupported_dtype_skipped():
    q, k, v = (t.to(torch.complex64) for t in qkv())
    res = dc.rewrite(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), (q, k, v), DENSE)
    assert "dtype" in res.report.skipped[0].reason


def test_softmax_that_is_not_attention_is_not_a_site():
    res = dc.rewrite(Fn(lambda x: torch.softmax(x * 2, -1)), (torch.randn(3, 5),), DENSE)
    assert res.report.found == []


class LearnedTemperature(torch.nn.Module):
    def __init__(self, divide=False, mask=False):
        super().__init__()
        self.temp = torch.nn.Parameter(torch.tensor(0.3 if not divide else 3.0))
        self.divide, self.mask = divide, mask

    def forward(self, q, k, v):
        s = (q @ k.mT) / self.temp if self.divide else self.temp * (q @ k.mT)
        if self.mask:
            s = s + torch.full((N, N), -1e9).triu(1)
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("divide", [False, True])
@pytest.mark.parametrize("mask", [False, True])
def test_run_time_scale_is_folded_into_q_with_its_gradient(divide, mask):
    """A learned temperature (a one-element tensor) scales q before the op: s * t == (q * t) . k."""
    model = LearnedTemperature(divide, mask)
    q, k, v = qkv()
    res = dc.rewrite(model, (q, k, v), DENSE)
    assert len(res.report.rewritten) == 1, str(res.report)
    out, ref = res.module(q, k, v), model(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), [p for n, p in res.module.named_parameters() if "temp" in n])
    (ref_g,) = torch.autograd.grad(ref.square().sum(), [model.temp])
    torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)


def test_run_time_scale_after_a_mask_is_skipped_with_reason():
    temp = torch.nn.Parameter(torch.tensor(0.3))
    fn = Fn(lambda q, k, v: torch.softmax((q @ k.mT + torch.full((N, N), -1e9).triu(1)) * temp, -1) @ v)
    fn.temp = temp
    res = dc.rewrite(fn, qkv(), DENSE)
    assert "multiplies the scores after a mask term" in res.report.skipped[0].reason


def test_unreadable_scores_between_product_and_softmax_are_reported():
    """softmax(f(q @ kT)) @ v with f unreadable (an unsupported op, a scale that is not a scalar): a skipped site
    whose reason names the node, not silence; the model is unchanged."""
    per_head = torch.rand(1, H, 1, 1)
    res = dc.rewrite(Fn(lambda q, k, v: torch.softmax((q @ k.mT) * per_head, -1) @ v), qkv(), DENSE)
    assert not res.report.rewritten and len(res.report.skipped) == 1
    assert "neither a constant nor a run-time scalar" in res.report.skipped[0].reason
    res = dc.rewrite(Fn(lambda q, k, v: torch.softmax(torch.tanh(q @ k.mT), -1) @ v), qkv(), DENSE)
    assert "unsupported op" in res.report.skipped[0].reason and "tanh" in res.report.skipped[0].reason
    q, k, v = qkv()
    torch.testing.assert_close(res.module(q, k, v), torch.softmax(torch.tanh(q @ k.mT), -1) @ v)


def test_strict_raises_on_first_skip():
    q, _, _ = qkv()
    _, k, v = qkv(n=N + 8)
    with pytest.raises(dc.AttentionSkipped, match="cross-attention"):
        dc.rewrite(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), (q, k, v), DENSE, strict=True)


def test_where_selects_sites():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q[:, :, :8], k[:, :, :8],
                                                                                         v[:, :, :8]).sum()

    res = dc.rewrite(Fn(fn), qkv(), DENSE, where=16)
    assert [s.seq_len for s in res.report.rewritten] == [24]
    assert res.report.skipped[0].reason == "not selected by where="
    res = dc.rewrite(Fn(fn), qkv(), DENSE, where=lambda s: s.seq_len < 16)
    assert [s.seq_len for s in res.report.rewritten] == [8]
    with pytest.raises(TypeError, match="where must be"):
        dc.rewrite(Fn(fn), qkv(), DENSE, where="long")


def test_explain_and_report_table():
    report = dc.explain(Fn(HAND_WRITTEN["matmul_div"]), qkv(), DENSE)
    text = str(report)
    assert "matmul-softmax" in text and "1 attention site(s): 1 rewritten, 0 skipped" in text
    with pytest.raises(TypeError, match="strategy must be"):
        dc.rewrite(Fn(HAND_WRITTEN["matmul_div"]), qkv(), strategy="dilated")


def test_strategy_pattern_is_used_not_only_dense():
    strategy = dc.Dilated((8, 16), (1, 2))
    q, k, v = qkv()
    res = dc.rewrite(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), (q, k, v), strategy)
    expected = strategy.reference(q, k, v, is_causal=True).float()
    torch.testing.assert_close(res.module(q, k, v), expected, atol=1e-5, rtol=1e-5)


# --- property: random formulations of the same attention are found exactly once -----------------------------

@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    product=st.sampled_from(["matmul", "einsum"]),
    scale=st.sampled_from(["div", "mul", "split", "mul_first"]),
    mask=st.sampled_from(["none", "additive", "fill_min", "fill_inf", "where"]),
    cast=st.booleans(),
    gqa=st.sampled_from(["none", "repeat_kv", "repeat_interleave"]),
)
def test_random_formulations_found_exactly_once(product, scale, mask, cast, gqa):
    causal = torch.ones(N, N, dtype=torch.bool).tril()

    def fn(q, k, v):
        if gqa == "repeat_kv":
            k, v = (t[:, :2, None].expand(B, 2, 2, N, D).reshape(B, H, N, D) for t in (k, v))
        elif gqa == "repeat_interleave":
            k, v = (t[:, :2].repeat_interleave(2, dim=1) for t in (k, v))
        if scale == "split":
            q, k = q * D ** -0.25, k * D ** -0.25
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) if product == "einsum" else q @ k.transpose(-1, -2)
        if scale == "div":
            s = s / math.sqrt(D)
        elif scale in ("mul", "mul_first"):
            s = s * D ** -0.5
        if mask == "additive":
            s = s + torch.zeros(N, N).masked_fill(~causal, -1e9)
        elif mask == "fill_min":
            s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
        elif mask == "fill_inf":
            s = s.masked_fill(~causal, float("-inf"))
        elif mask == "where":
            s = torch.where(causal, s, float("-inf"))
        p = torch.softmax(s.float() if cast else s, dim=-1).to(q.dtype)
        return torch.einsum("bhqk,bhkd->bhqd", p, v) if product == "einsum" else p @ v

    res = check_rewrite(Fn(fn), qkv(), 1, grads=False)
    # A sqrt-scale applied after the repeat hides the repeat from the peel: still exact, k/v stay repeated.
    assert res.report.rewritten[0].gqa_ratio == (1 if gqa == "none" or scale == "split" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HAND_WRITTEN) + ["sdpa_" + n for n in sorted(SDPA_SPELLINGS)])
def test_every_pattern_compiles_fullgraph_with_backend(name):
    from dilate_compiler import backend

    torch._dynamo.reset()
    q, k, v = qkv()
    if name.startswith("sdpa_"):
        m = torch.ones(N, N, dtype=torch.bool).tril()
        fn, args = SDPA_SPELLINGS[name[5:]], (q, k, v, m)
    else:
        fn, args = HAND_WRITTEN[name], (q, k, v)
    compiled = torch.compile(Fn(fn), backend="dilated", options={"strategy": DENSE}, fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args), atol=1e-5, rtol=1e-5)
    assert len(backend.last_report().rewritten) == 1, str(backend.last_report())
    torch._dynamo.reset()
