"""Soft-capped scores (``softcap=c``: ``s = c * tanh(scale * q.k / c)``, Gemma2's ``attn_logit_softcapping``) in
``dc.ops.dilated_attention`` and ``dc.ops.block_sparse_attention``: the exact path against float64 references
(outputs, log-sum-exps, every gradient), and the argument's checks."""

import math
import re

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.strategies.reference import weighted_softmax_attention
from tests.tolerances import assert_close

CAP = 2.0   # scores of the test data reach several units: a cap of 2 changes them a lot


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    def mk(h, n):
        return (2 * torch.randn(B, h, n, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    return mk(Hq, Nq), mk(Hkv, Nk), mk(Hkv, Nk)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def capped_scores(q, k, scale, softcap):
    """float64 ``[B, Hq, Nq, Nk]`` scores, capped (GQA: head h reads kv head h // (Hq // Hkv))."""
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    return s if softcap is None else softcap * torch.tanh(s / softcap)


def dilated_reference(strategy, q, k, v, *, is_causal, softcap, attn_mask=None):
    """float64 output of the op's definition with capped scores; queries are the last Nq of the Nk keys."""
    nq, nk = q.shape[2], k.shape[2]
    m = strategy.multiplicity(nk, q.shape[1], is_causal=is_causal, device=q.device)[:, nk - nq:]
    out = weighted_softmax_attention(q, k, v, m, attn_mask=attn_mask, softcap=softcap)
    return out / strategy.num_branches if strategy.mixing == "head_groups" else out


def dilated_reference_lse(strategy, q, k, *, is_causal, softcap, scale):
    nq, nk = q.shape[2], k.shape[2]
    m = strategy.multiplicity(nk, q.shape[1], is_causal=is_causal, device=q.device)[:, nk - nq:].double()
    s = capped_scores(q, k, scale, softcap) + torch.log(m)
    return torch.logsumexp(s, -1)


DILATED_CASES = [
    # B, Hq, Hkv, Nq, Nk, segments, rates, mixing
    (2, 4, 2, 15, 15, (4, 8), (1, 2), "lse"),
    (1, 4, 4, 63, 63, (8, 16, 32), (1, 2, 4), "lse"),
    (1, 3, 3, 40, 40, (8, 16), (1, 2), "head_groups"),
    (2, 4, 2, 5, 50, (8, 16, 64), (1, 2, 4), "lse"),   # decoding: the last 5 of 50 positions
]


@pytest.mark.parametrize("case", DILATED_CASES, ids=lambda c: f"N{c[3]}of{c[4]}-H{c[1]}/{c[2]}-{c[7]}")
@pytest.mark.parametrize("is_causal", [False, True])
def test_dilated_exact_path_matches_capped_reference(case, is_causal):
    B, Hq, Hkv, Nq, Nk, segs, rates, mixing = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, 16, torch.float64)
    strategy = dc.Dilated(segs, rates, mixing)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, mixing=mixing, softcap=CAP)
    ref = dilated_reference(strategy, q, k, v, is_causal=is_causal, softcap=CAP)
    assert_close(out, ref, torch.float64)
    uncapped = dilated_reference(strategy, q, k, v, is_causal=is_causal, softcap=None)
    assert (uncapped - ref).abs().max() > 0.05   # the cap matters on this data
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64, f"d{name}")


def test_dilated_lse_is_the_capped_scores_log_sum_exp():
    q, k, v = _inputs(1, 4, 2, 63, 63, 16, torch.float64, seed=3)
    segs, rates = (8, 16, 32), (1, 2, 4)
    _, lse = torch.ops.dilate_compiler.dilated_attention_forward(
        q, k, v, None, list(segs), list(rates), True, 0.25, "lse", 0.0, None, None, CAP)
    ref = dilated_reference_lse(dc.Dilated(segs, rates), q, k, is_causal=True, softcap=CAP, scale=0.25)
    assert_close(lse, ref, torch.float64, "lse")


@pytest.mark.parametrize("is_causal", [False, True])
def test_dilated_key_keep_and_learned_bias_with_cap(is_causal):
    B, Hq, Hkv, N = 2, 4, 2, 40
    q, k, v = _inputs(B, Hq, Hkv, N, N, 16, torch.float64, seed=1)
    segs, rates = (8, 16), (1, 2)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, :7] = False
    bias = torch.randn(1, Hq, N, N, dtype=torch.float64, requires_grad=True)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, attn_mask=bias, key_keep=keep,
                                   softcap=CAP)
    mask = bias + torch.where(keep, 0.0, float("-inf")).double().view(B, 1, 1, N)
    ref = dilated_reference(dc.Dilated(segs, rates), q, k, v, is_causal=is_causal, softcap=CAP, attn_mask=mask)
    assert_close(out, ref, torch.float64)
    dout = torch.randn_like(out)
    inputs = (q, k, v, bias)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), _grads(out, inputs, dout), _grads(ref, inputs, dout)):
        assert_close(a, b, torch.float64, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dilated_low_precision_exact_path(dtype):
    q, k, v = _inputs(1, 4, 2, 63, 63, 32, dtype, seed=2)
    segs, rates = (8, 16, 32), (1, 2, 4)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True, softcap=CAP)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(dc.Dilated(segs, rates), q64, k64, v64, is_causal=True, softcap=CAP)
    assert_close(out, ref, dtype)
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q64, k64, v64), dout.double())):
        assert_close(a, b, dtype, f"d{name}")


def block_sparse_reference(q, k, v, mask, *, scale, softcap, key_keep=None):
    """float64 softmax over the allowed keys (``mask [Hl, Nq, Nk]``, True attends) of the capped scores."""
    keep = mask.unsqueeze(0)
    if key_keep is not None:
        keep = keep & key_keep.view(key_keep.shape[0], 1, 1, -1)
    return weighted_softmax_attention(q, k, v, keep, scale=scale, softcap=softcap)


BS = 16


@pytest.mark.parametrize("nq, nk", [(77, 77), (6, 77)], ids=["self", "decode"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_block_sparse_exact_path_matches_capped_reference(nq, nk, is_causal):
    q, k, v = _inputs(2, 4, 2, nq, nk, 32, torch.float64, seed=4)
    pattern = P.sliding_window(20) | P.global_tokens(3)
    keep = torch.ones(2, nk, dtype=torch.bool)
    keep[1, 30:40] = False
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=BS, is_causal=is_causal, key_keep=keep,
                                        softcap=CAP)
    mask = pattern.token_mask(nk, BS, num_heads=4, is_causal=is_causal)[:, nk - nq:]
    ref = block_sparse_reference(q, k, v, mask, scale=32 ** -0.5, softcap=CAP, key_keep=keep)
    assert_close(out, ref, torch.float64)
    uncapped = block_sparse_reference(q, k, v, mask, scale=32 ** -0.5, softcap=None, key_keep=keep)
    assert (uncapped - ref).abs().max() > 0.05
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64, f"d{name}")


def test_block_sparse_lse_and_order_with_cap():
    N = 64
    q, k, v = _inputs(1, 2, 2, N, N, 32, torch.float64, seed=5)
    pattern = P.sliding_window(16)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=BS, order=order, softcap=CAP)
    mask = pattern.token_mask(N, BS, num_heads=2, is_causal=False)
    gathered = [t.index_select(2, order) for t in (q, k, v)]
    ref = torch.empty_like(out).index_copy(2, order, block_sparse_reference(*gathered, mask, scale=32 ** -0.5,
                                                                            softcap=CAP))
    assert_close(out, ref, torch.float64)
    lay = pattern.layout(N, BS, num_heads=2, is_causal=False)
    _, lse = torch.ops.dilate_compiler.block_sparse_attention_forward(q, k, v, *lay.args(), BS, False, 0.5, None,
                                                                      CAP)
    s = capped_scores(q, k, 0.5, CAP).masked_fill(~mask, float("-inf"))
    assert_close(lse, torch.logsumexp(s, -1), torch.float64, "lse")


@pytest.mark.parametrize("op", ["dilated", "block_sparse"])
@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError), ("50", TypeError), (True, TypeError)])
def test_bad_softcap_is_refused_by_name(op, bad, error):
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, torch.float32)
    with pytest.raises(error, match=r"softcap must be .*" + re.escape(repr(bad))):
        if op == "dilated":
            dc.ops.dilated_attention(q, k, v, (4,), (1,), softcap=bad)
        else:
            dc.ops.block_sparse_attention(q, k, v, P.local(1), block_size=4, softcap=bad)


def test_softcap_none_is_the_uncapped_op_and_an_int_is_accepted():
    q, k, v = _inputs(1, 2, 2, 16, 16, 16, torch.float64)
    plain = dc.ops.dilated_attention(q, k, v, (8,), (2,))
    assert torch.equal(dc.ops.dilated_attention(q, k, v, (8,), (2,), softcap=None), plain)
    assert torch.equal(dc.ops.dilated_attention(q, k, v, (8,), (2,), softcap=3),
                       dc.ops.dilated_attention(q, k, v, (8,), (2,), softcap=3.0))


def test_ops_with_cap_under_torch_compile_fullgraph():
    q, k, v = (t.detach().float() for t in _inputs(1, 2, 1, 32, 32, 16, torch.float32))

    def fn(q, k, v):
        a = dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=True, softcap=CAP)
        b = dc.ops.block_sparse_attention(q, k, v, P.sliding_window(8), block_size=8, softcap=CAP)
        return a + b

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(q, k, v), fn(q, k, v), torch.float32)


def test_registered_attention_function_takes_gemma2_softcap():
    """``dc.hf``'s attention function gets Gemma2's ``softcap`` and runs it; with a dense-equivalent strategy it is
    Gemma2's own eager attention (scaled, capped, causal mask added)."""
    pytest.importorskip("transformers")
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    class Layer(torch.nn.Module):
        is_causal, num_key_value_groups, head_dim = True, 2, 16

    q, k, v = (t.detach() for t in _inputs(2, 4, 2, 20, 20, 16, torch.float64, seed=6))
    layer = Layer().eval()
    fn = dc.hf.attention_function(dc.Dilated((64,), (1,)))
    got, _ = fn(layer, q, k, v, None, scaling=0.3, softcap=CAP)
    causal = torch.zeros(20, 20, dtype=torch.float64).masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1),
                                                                  float("-inf"))
    want, _ = eager_attention_forward(layer, q, k, v, causal, scaling=0.3, softcap=CAP)
    assert_close(got, want, torch.float32)   # Gemma2's eager softmax runs in float32
    plain, _ = eager_attention_forward(layer, q, k, v, causal, scaling=0.3)
    assert (got - plain).abs().max() > 0.05
