"""dc.ops.dilated_attention against the float64 dense reference of the definition."""


import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from tests.tolerances import assert_close, eager_dilated, rel_err

CASES = [
    # N, segments, rates
    (1, (8,), (2,)),
    (15, (4, 8), (1, 2)),
    (63, (8, 16, 32), (1, 2, 4)),
    (300, (32, 64, 512), (1, 2, 4)),
    (1025, (128, 256), (2, 4)),
]


def _inputs(B, Hq, Hkv, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("N, segs, rates", CASES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_matches_reference_float64(N, segs, rates, is_causal, mixing):
    Hq, Hkv = (4, 2) if N < 1025 else (2, 1)
    q, k, v = _inputs(1 if N == 1025 else 2, Hq, Hkv, N, 16, torch.float64)
    strategy = dc.Dilated(segs, rates, mixing)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, mixing=mixing)
    ref = strategy.reference(q, k, v, is_causal=is_causal)
    assert_close(out, ref, torch.float64)
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_within_ceiling_and_eager_error(dtype, is_causal):
    N, segs, rates = 300, (32, 64, 512), (1, 2, 4)
    q, k, v = _inputs(2, 4, 2, N, 32, dtype, seed=1)
    strategy = dc.Dilated(segs, rates)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal)
    assert out.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = strategy.reference(q64, k64, v64, is_causal=is_causal)
    eager = eager_dilated(q.detach(), k.detach(), v.detach(), strategy, is_causal)
    assert_close(out, ref, dtype, eager_err=rel_err(eager, ref))
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", _grads(out, (q, k, v), dout), _grads(ref, (q64, k64, v64), dout.double())):
        assert a.dtype == dtype
        assert_close(a, b, dtype, f"d{name}")


def test_single_dense_branch_equals_sdpa():
    q, k, v = _inputs(2, 4, 4, 63, 16, torch.float64)
    for is_causal in (False, True):
        out = dc.ops.dilated_attention(q, k, v, (64,), (1,), is_causal=is_causal)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        assert_close(out, ref, torch.float64)
        dout = torch.randn_like(out)
        for a, b in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
            assert_close(a, b, torch.float64, "grad")


def test_gqa_single_branch_equals_sdpa_enable_gqa():
    q, k, v = _inputs(1, 6, 2, 40, 16, torch.float64)
    out = dc.ops.dilated_attention(q, k, v, (4096,), (1,), is_causal=True, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert_close(out, ref, torch.float64)


def test_causal_future_tokens_never_change_earlier_outputs():
    q, k, v = (t.detach() for t in _inputs(1, 4, 4, 100, 16, torch.float64))
    segs, rates = (16, 32, 64), (1, 2, 4)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True)
    t = 57
    k2, v2, q2 = k.clone(), v.clone(), q.clone()
    k2[:, :, t:] += 5 * torch.randn_like(k2[:, :, t:])
    v2[:, :, t:] += 5 * torch.randn_like(v2[:, :, t:])
    q2[:, :, t:] += 5 * torch.randn_like(q2[:, :, t:])
    out2 = dc.ops.dilated_attention(q2, k2, v2, segs, rates, is_causal=True)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


def test_head_groups_leaves_exactly_the_documented_rows_zero():
    N, H = 48, 5
    segs, rates = (8, 16, 48), (1, 2, 4)
    q, k, v = (t.detach() for t in _inputs(1, H, H, N, 8, torch.float64))
    out = dc.ops.dilated_attention(q, k, v, segs, rates, mixing="head_groups")
    bounds = dc.Dilated(segs, rates, "head_groups").head_group_bounds(H)
    for i, (start, stop) in enumerate(bounds):
        for h in range(start, stop):
            selected = torch.arange(N) % rates[i] == i % rates[i]
            row_zero = (out[0, h] == 0).all(-1)
            assert torch.equal(row_zero, ~selected), (i, h)


def test_unlinked_rows_are_zero_with_lse_mixing():
    # rates all 2: head 0 links only even positions, head 1 only odd ones.
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 10, 8, torch.float64))
    out = dc.ops.dilated_attention(q, k, v, (4, 8), (2, 2))
    assert (out[0, 0, 1::2] == 0).all() and (out[0, 1, 0::2] == 0).all()
    assert (out[0, 0, 0::2] != 0).any(-1).all()


@pytest.mark.parametrize("mask_kind", ["bool_padding", "bool_full", "additive"])
def test_attn_mask_matches_reference(mask_kind):
    B, H, N = 2, 4, 50
    q, k, v = _inputs(B, H, 2, N, 16, torch.float64)
    g = torch.Generator().manual_seed(3)
    if mask_kind == "bool_padding":
        mask = torch.ones(B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., 41:] = False
    elif mask_kind == "bool_full":
        mask = torch.rand(B, H, N, N, generator=g) > 0.3
    else:
        mask = torch.randn(1, H, N, N, generator=g, dtype=torch.float64)
    segs, rates = (8, 16, 64), (1, 2, 4)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True, attn_mask=mask)
    ref = dc.Dilated(segs, rates).reference(q, k, v, is_causal=True, attn_mask=mask)
    assert_close(out, ref, torch.float64)
    dout = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64, "grad")


@pytest.mark.slow
def test_dropout_is_reproducible_and_has_exact_gradients():
    q, k, v = _inputs(1, 2, 2, 24, 8, torch.float64)
    args = ([8, 16], [1, 2], False, 0.5, "lse", 0.3, torch.tensor(1234))
    fwd = lambda q, k, v: torch.ops.dilate_compiler.dilated_attention_forward(q, k, v, None, *args)[0]  # noqa
    assert torch.equal(fwd(q, k, v), fwd(q, k, v))
    no_drop = dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), scale=0.5)
    assert not torch.allclose(fwd(q, k, v), no_drop)
    assert torch.autograd.gradcheck(fwd, (q, k, v))
    torch.manual_seed(7)
    a = dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), dropout_p=0.3)
    torch.manual_seed(7)
    b = dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), dropout_p=0.3)
    assert torch.equal(a, b)


def test_dropout_keeps_expectation():
    q, k, v = (t.detach() for t in _inputs(1, 1, 1, 16, 4, torch.float64))
    outs = torch.stack([dc.ops.dilated_attention(q, k, v, (16,), (1,), dropout_p=0.5) for _ in range(2000)])
    ref = dc.ops.dilated_attention(q, k, v, (16,), (1,))
    assert (outs.mean(0) - ref).abs().max() < 0.15 * ref.abs().max()


def test_opcheck_custom_op():
    q, k, v = _inputs(1, 4, 2, 20, 8, torch.float32)
    args = (q, k, v, None, [8, 16], [1, 2], True, 0.25, "lse", 0.0, None)
    torch.library.opcheck(torch.ops.dilate_compiler.dilated_attention_forward, args)


def test_compiles_fullgraph_and_exports():
    q, k, v = (t.detach() for t in _inputs(1, 4, 2, 20, 8, torch.float32))

    def f(q, k, v):
        return dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=True) * 2

    expected = f(q, k, v)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), expected)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    ep = torch.export.export(M(), (q, k, v))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.dilate_compiler.dilated_attention_forward.default in targets
    assert torch.equal(ep.module()(q, k, v), expected)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dims"),
        (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), ValueError, r"q has 12 positions and k has 5; accepted:"),
        (lambda q, k, v: (q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), ValueError, r"query heads \(4\) must be a multiple.*\(3\)"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q has dtype torch.int64"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, r"k and v must have the same \[B, Hkv, N\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    q, k, v = (t.detach() for t in _inputs(1, 4, 2, 12, 8, torch.float32))
    with pytest.raises(exc, match=match):
        dc.ops.dilated_attention(*mutate(q, k, v), (4,), (1,))


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": float("nan")}, "scale must be a finite"),
    ({"scale": float("inf")}, "scale must be a finite"),
    ({"dropout_p": 1.0}, r"dropout_p must be a float in \[0, 1\)"),
    ({"mixing": "mean"}, "mixing must be one of"),
    ({"attn_mask": torch.ones(3, 3, dtype=torch.bool)}, "does not broadcast"),
    ({"attn_mask": torch.ones(12, 12, dtype=torch.int32)}, "attn_mask must be bool"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    q, k, v = (t.detach() for t in _inputs(1, 4, 2, 12, 8, torch.float32))
    with pytest.raises((ValueError, TypeError), match=match):
        dc.ops.dilated_attention(q, k, v, (4,), (1,), **kwargs)


def test_chunked_route_equals_fused_route():
    """An all-True mask sends the CPU op down the chunked route; without it, the fused one runs."""
    from dilate_compiler.lowering.dilated.eager import fused_route_applies

    q, k, v = _inputs(2, 4, 2, 300, 16, torch.float64)
    everything = torch.ones(300, 300, dtype=torch.bool)
    assert fused_route_applies(q, v, None, 0.0, 0.3) and not fused_route_applies(q, v, everything, 0.0, 0.3)
    for is_causal in (False, True):
        a = dc.ops.dilated_attention(q, k, v, (32, 64, 512), (1, 2, 4), is_causal=is_causal)
        b = dc.ops.dilated_attention(q, k, v, (32, 64, 512), (1, 2, 4), is_causal=is_causal, attn_mask=everything)
        assert_close(a, b, torch.float64)
        dout = torch.randn_like(a)
        for x, y in zip(_grads(a, (q, k, v), dout), _grads(b, (q, k, v), dout)):
            assert_close(x, y, torch.float64, "grad")


# --- shapes and masks models bring (each failed before) ---------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_value_head_dim_may_differ_from_query_head_dim(is_causal, mixing):
    """Multi-head latent attention (DeepSeek-V3): q/k head dim 24, v head dim 16."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 40, 24, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 40, 24, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    segs, rates = (8, 16), (1, 2)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, mixing=mixing)
    ref = dc.Dilated(segs, rates, mixing).reference(q, k, v, is_causal=is_causal)
    assert out.shape == (2, 4, 40, 16)
    assert_close(out, ref, torch.float64)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b, what in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout), "qkv"):
        assert_close(a, b, torch.float64, f"d{what}")


@pytest.mark.parametrize("shape", [(4, 40, 40), (1, 1, 40, 40), (2, 1, 40, 40)], ids=str)
def test_a_learned_bias_gets_its_gradient(shape):
    g = torch.Generator().manual_seed(4)
    q, k, v = _inputs(2, 4, 2, 40, 16, torch.float64)
    bias = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    segs, rates = (8, 16), (1, 2)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True, attn_mask=bias)
    ref = dc.Dilated(segs, rates).reference(q, k, v, is_causal=True, attn_mask=bias)
    assert_close(out, ref, torch.float64)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b, what in zip(_grads(out, (q, k, v, bias), dout), _grads(ref, (q, k, v, bias), dout),
                          ("dq", "dk", "dv", "dbias")):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64, what)


def test_negative_scale_with_causal_on_the_cpu():
    """The CPU's fused flash kernel gave NaN rows for a negative scale with is_causal."""
    q, k, v = _inputs(2, 2, 2, 33, 16, torch.float32)
    out = dc.ops.dilated_attention(q, k, v, (16,), (1,), is_causal=True, scale=-0.3)
    ref = dc.Dilated((16,), (1,)).reference(q, k, v, is_causal=True, scale=-0.3)
    assert not out.isnan().any()
    assert_close(out, ref, torch.float32)


def test_float16_mask_is_added_in_float16_as_the_model_adds_it():
    """A row masked everywhere with finfo(float16).min: the model's ``scores + mask`` in float16 does not saturate
    (s - 65504 rounds to a grid of 32 or to -inf), and its softmax follows that rounding."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).half() for _ in range(3))
    mask = torch.zeros(1, 1, 24, 24, dtype=torch.float16)
    mask[..., :3, :] = torch.finfo(torch.float16).min          # rows 0-2 see no key
    mask[..., 3:, :] = torch.where(torch.ones(21, 24).tril(3).bool(), 0.0, torch.finfo(torch.float16).min)
    out = dc.ops.dilated_attention(q, k, v, (4096,), (1,), attn_mask=mask, scale=4.0)
    model = torch.softmax((q @ k.mT) * 4.0 + mask, -1, dtype=torch.float32).half() @ v
    assert_close(out, model.double(), torch.float16)


@pytest.mark.parametrize("is_causal", [False, True])
def test_key_padding_on_the_exact_path(is_causal):
    q, k, v = _inputs(3, 4, 2, 40, 16, torch.float64)
    keep = torch.ones(3, 40, dtype=torch.bool)
    keep[0, :13] = False
    keep[1, 4::6] = False
    keep[2] = False
    segs, rates = (8, 16), (1, 2)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, key_keep=keep)
    ref = dc.Dilated(segs, rates).reference(q, k, v, is_causal=is_causal, attn_mask=keep.view(3, 1, 1, 40))
    assert_close(out, ref, torch.float64)
    assert (out[2] == 0).all()
    dout = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(_grads(out, (q, k, v), dout), _grads(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64)


def test_key_keep_is_checked_by_name():
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 12, 8, torch.float32))
    with pytest.raises(ValueError, match=r"key_keep must have shape \[B or 1, N\]"):
        dc.ops.dilated_attention(q, k, v, (4,), (1,), key_keep=torch.ones(3, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_keep must be bool"):
        dc.ops.dilated_attention(q, k, v, (4,), (1,), key_keep=torch.ones(2, 12))
