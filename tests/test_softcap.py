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


# --- the Triton kernels, launchers called directly (TRITON_INTERPRET=1 on CPU: small shapes, float16/32) ------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

KERNEL_DILATED_CASES = [
    # B, Hq, Hkv, Nq, Nk, segments, rates, mixing, head offsets
    (2, 4, 2, 63, 63, (8, 16, 32), (1, 2, 4), "lse", "interleaved"),   # nested: the walks
    (1, 3, 3, 40, 40, (8, 16), (1, 2), "head_groups", "interleaved"),
    (1, 4, 2, 40, 40, (4, 6), (2, 3), "lse", "interleaved"),            # not nested: per-branch blocks
    (1, 4, 2, 40, 40, (8, 16, 32), (1, 2, 4), "lse", "grouped"),
    (2, 4, 2, 5, 50, (8, 16, 64), (1, 2, 4), "lse", "interleaved"),     # decoding: the last 5 of 50 positions
    (1, 2, 2, 200, 200, (64, 128), (1, 2), "lse", "interleaved"),       # whole tiles inside segments
]


def _kernel_inputs(B, Hq, Hkv, Nq, Nk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple((2 * torch.randn(B, h, n, D, generator=g)).to(DEVICE, dtype) for h, n in
                 ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))


def _check_kernel_grads(grads, ref, inputs64, dout, dtype):
    want = torch.autograd.grad(ref, inputs64, dout.double().cpu())
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a.cpu(), b, dtype, name)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c[3] >= 150 else c
                                  for c in KERNEL_DILATED_CASES],
                         ids=lambda c: f"N{c[3]}of{c[4]}-H{c[1]}/{c[2]}-{c[7]}-{c[8]}")
@pytest.mark.parametrize("is_causal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_dilated_kernels_match_capped_reference(case, is_causal):
    from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd

    B, Hq, Hkv, Nq, Nk, segs, rates, mixing, offsets = case
    dtype = torch.float32
    q, k, v = _kernel_inputs(B, Hq, Hkv, Nq, Nk, 32, dtype, seed=Nq + Hq)
    strategy = dc.Dilated(segs, rates, mixing, head_offsets=offsets)
    args = dict(is_causal=is_causal, scale=32 ** -0.5, mixing=mixing, q_offset=Nk - Nq, softcap=CAP,
                head_offsets=offsets)
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, **args)
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(strategy, q64, k64, v64, is_causal=is_causal, softcap=CAP)
    assert_close(out.cpu(), ref, dtype)
    assert (dilated_reference(strategy, q64, k64, v64, is_causal=is_causal, softcap=None) - ref).abs().max() > 0.05
    if mixing == "lse":
        ref_lse = dilated_reference_lse(strategy, q64, k64, is_causal=is_causal, softcap=CAP, scale=32 ** -0.5)
        linked = torch.isfinite(ref_lse)   # rows no branch links: -inf in both
        assert torch.equal(torch.isfinite(lse.cpu()), linked)
        assert_close(lse.cpu()[linked], ref_lse[linked], dtype, "lse")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, **args)
    _check_kernel_grads(grads, ref, (q64, k64, v64), dout, dtype)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dilated_kernels_with_key_padding_and_cap(is_causal):
    from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd

    B, Hq, Hkv, N, segs, rates = 2, 4, 2, 40, (8, 16), (1, 2)
    dtype = torch.float32
    q, k, v = _kernel_inputs(B, Hq, Hkv, N, N, 32, dtype, seed=11)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, 3::5] = False
    keep[1, N - 6:] = False
    args = dict(is_causal=is_causal, scale=32 ** -0.5, mixing="lse", key_keep=keep.to(DEVICE), softcap=CAP)
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, **args)
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    mask = torch.where(keep, 0.0, float("-inf")).double().view(B, 1, 1, N)
    ref = dilated_reference(dc.Dilated(segs, rates), q64, k64, v64, is_causal=is_causal, softcap=CAP, attn_mask=mask)
    assert_close(out.cpu(), ref, dtype)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    grads = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, **args)
    _check_kernel_grads(grads, ref, (q64, k64, v64), dout, dtype)


def test_dilated_kernels_with_cap_in_float16():
    from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd

    segs, rates = (8, 16, 32), (1, 2, 4)
    dtype = torch.float16
    q, k, v = _kernel_inputs(1, 4, 2, 63, 63, 32, dtype, seed=12)
    args = dict(is_causal=True, scale=32 ** -0.5, mixing="lse", softcap=CAP)
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, **args)
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(dc.Dilated(segs, rates), q64, k64, v64, is_causal=True, softcap=CAP)
    assert_close(out.cpu(), ref, dtype)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    grads = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, **args)
    _check_kernel_grads(grads, ref, (q64, k64, v64), dout, dtype)


@pytest.mark.parametrize("nq, nk", [pytest.param(45, 45, marks=pytest.mark.slow), (6, 45)], ids=["self", "decode"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["all-keys", "key-padding"])
def test_block_sparse_kernels_match_capped_reference(nq, nk, is_causal, padded):
    from dilate_compiler.lowering.block_sparse.triton import block_sparse_attn_bwd, block_sparse_attn_fwd

    dtype = torch.float32
    pattern = P.sliding_window(20) | P.global_tokens(3)
    q, k, v = _kernel_inputs(2, 4, 2, nq, nk, 32, dtype, seed=nq + 7 * is_causal)
    keep = None
    if padded:
        keep = torch.ones(2, nk, dtype=torch.bool)
        keep[0, :5] = False
        keep[1, 20:30] = False
    key_keep = None if keep is None else keep.to(DEVICE)
    lay = pattern.layout(nk, BS, num_heads=4, is_causal=is_causal, device=DEVICE)
    out, lse = block_sparse_attn_fwd(q, k, v, *lay.tensors()[:4], BS, is_causal, 0.2, lay.coords, lay.checks,
                                     key_keep=key_keep, softcap=CAP)
    mask = pattern.token_mask(nk, BS, num_heads=4, is_causal=is_causal)[:, nk - nq:]
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    ref = block_sparse_reference(q64, k64, v64, mask, scale=0.2, softcap=CAP, key_keep=keep)
    if padded and is_causal:   # rows that keep no key: output 0 (the reference's NaN), lse -inf
        empty = ref.isnan().all(-1)
        assert (out.cpu()[empty] == 0).all() and (lse.cpu()[empty] == float("-inf")).all()
        ref = ref.nan_to_num(0.0)
    assert_close(out.cpu(), ref, dtype)
    assert (block_sparse_reference(q64, k64, v64, mask, scale=0.2, softcap=None, key_keep=keep).nan_to_num(0.0)
            - ref).abs().max() > 0.05
    allowed = mask.unsqueeze(0) if keep is None else mask.unsqueeze(0) & keep.view(2, 1, 1, nk)
    s = capped_scores(q64.detach(), k64.detach(), 0.2, CAP).masked_fill(~allowed, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    linked = torch.isfinite(ref_lse)
    assert_close(lse.cpu()[linked], ref_lse[linked], dtype, "lse")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    grads = block_sparse_attn_bwd(dout, q, k, v, out, lse, *lay.args(), BS, is_causal, 0.2, key_keep=key_keep,
                                  softcap=CAP)
    _check_kernel_grads(grads, ref, (q64, k64, v64), dout, dtype)


@pytest.mark.parametrize("op", ["dilated", "block_sparse"])
def test_kernel_dispatch_takes_softcap(op, monkeypatch):
    """The ops' kernel dispatch no longer refuses soft-capping (tensors the kernels take: any, here)."""
    from dilate_compiler.lowering.block_sparse import op as bop
    from dilate_compiler.lowering.block_sparse import triton as bt
    from dilate_compiler.lowering.dilated import op as dop
    from dilate_compiler.lowering.dilated import triton as dt

    monkeypatch.setattr(dt, "tensor_unsupported_reason", lambda q: "")
    monkeypatch.setattr(bt, "tensor_unsupported_reason", lambda q: "")
    q = torch.empty(1, 2, 8, 32, dtype=torch.float16)
    if op == "dilated":
        assert dt.kernel_unsupported_reason(q, None, 0.0, 2, CAP) == ""
        assert dop.use_kernels(q, q, None, 0.0, 2, CAP)
    else:
        assert bt.kernel_unsupported_reason(q, 64, CAP) == ""
        assert bop.use_kernels(q, q, 64, CAP)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ops_run_the_kernels_with_cap_on_gpu(dtype):
    """On CUDA the capped ops run the Triton kernels and match the float64 reference, gradients included."""
    from dilate_compiler.lowering.block_sparse import op as bop
    from dilate_compiler.lowering.dilated import op as dop

    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in _inputs(2, 4, 2, 256, 256, 64, torch.float64))
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    segs, rates = (64, 128), (1, 2)
    assert dop.use_kernels(q, v, None, 0.0, len(segs), CAP)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True, softcap=CAP)
    ref = dilated_reference(dc.Dilated(segs, rates), q64, k64, v64, is_causal=True, softcap=CAP)
    assert_close(out.cpu(), ref, dtype)
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q64, k64, v64), dout.double().cpu())):
        assert_close(a.cpu(), b, dtype, f"d{name}")
    pattern = P.sliding_window(128) | P.global_tokens(3)
    assert bop.use_kernels(q, v, 64, CAP)
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=64, is_causal=True, softcap=CAP)
    mask = pattern.token_mask(256, 64, num_heads=4, is_causal=True)
    ref = block_sparse_reference(q64, k64, v64, mask, scale=64 ** -0.5, softcap=CAP)
    assert_close(out.cpu(), ref, dtype)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q64, k64, v64), dout.double().cpu())):
        assert_close(a.cpu(), b, dtype, f"d{name}")
