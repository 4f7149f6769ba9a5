"""``dc.ops.block_sparse_attention`` (the exact path on CPU) against the float64 masked-dense reference."""

import math

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from tests.tolerances import assert_close, rel_err

N, BS = 77, 16


def dense_reference(q, k, v, mask, scale=None):
    """float64 softmax over the allowed keys (mask ``[Hl, N, N]``, True attends); empty rows are 0."""
    g = q.shape[1] // k.shape[1]
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def brute_window_global(n, window, n_global, causal):
    p, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    m = ((p - j).abs() < window) | (p < n_global) | (j < n_global)
    return m & (j <= p) if causal else m


def qkv(dtype, hq=4, hkv=2, n=N, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, d, generator=g).to(dtype).requires_grad_() for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_op_matches_dense_reference_outputs_and_grads(dtype, causal):
    q, k, v = qkv(dtype)
    pattern = P.sliding_window(20) | P.global_tokens(3)
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=BS, is_causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = brute_window_global(N, 20, 3, causal)
    ref = dense_reference(q64, k64, v64, mask)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype)
    dout = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert_close(a, b, dtype, f"d{name}")


def test_bool_layout_per_head_and_gqa_and_scale():
    q, k, v = qkv(torch.float64, hq=6, hkv=3, n=50, seed=1)
    g = torch.Generator().manual_seed(2)
    blocks = torch.rand(6, 4, 4, generator=g) < 0.5
    out = dc.ops.block_sparse_attention(q, k, v, blocks, block_size=BS, scale=0.3)
    mask = blocks.repeat_interleave(BS, 1).repeat_interleave(BS, 2)[:, :50, :50]
    ref = dense_reference(q, k, v, mask, scale=0.3)
    assert rel_err(out, ref) < 1e-12
    empty_rows = ~mask.any(-1)
    assert (out[:, empty_rows] == 0).all()


def test_one_softmax_over_the_union_not_per_block():
    """Two allowed key blocks: the result is one softmax over both, not an average of per-block softmaxes."""
    q, k, v = qkv(torch.float64, hq=1, hkv=1, n=32)
    blocks = torch.ones(1, 2, 2, dtype=torch.bool)
    out = dc.ops.block_sparse_attention(q, k, v, blocks, block_size=16)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_err(out, dense) < 1e-12


def test_causal_does_not_leak_future_tokens():
    q, k, v = qkv(torch.float64, hq=2, hkv=2, n=64)
    pattern = P.local(2) | P.random(2, seed=0)       # random blocks above the diagonal must not leak
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=BS, is_causal=True)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 40:] += 5.0
    v2[:, :, 40:] -= 3.0
    out2 = dc.ops.block_sparse_attention(q, k2, v2, pattern, block_size=BS, is_causal=True)
    assert torch.equal(out[:, :, :40], out2[:, :, :40])
    dk, dv = torch.autograd.grad(out[:, :, :40].sum(), (k, v))
    assert (dk[:, :, 40:] == 0).all() and (dv[:, :, 40:] == 0).all()


def test_prebuilt_layout_is_checked_against_the_call():
    q, k, v = qkv(torch.float32)
    lay = P.local(1).layout(N, BS, is_causal=False)
    dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS)
    with pytest.raises(ValueError, match="is_causal"):
        dc.ops.block_sparse_attention(q, k, v, lay, block_size=BS, is_causal=True)
    with pytest.raises(ValueError, match="block_size"):
        dc.ops.block_sparse_attention(q, k, v, lay, block_size=32)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        dc.ops.block_sparse_attention(q, k, v, lay, block_size=0)
    with pytest.raises(TypeError, match="layout must be"):
        dc.ops.block_sparse_attention(q, k, v, [[True]], block_size=BS)


@pytest.mark.slow
def test_op_under_torch_compile_fullgraph():
    q, k, v = qkv(torch.float32)
    lay = (P.sliding_window(20) | P.global_tokens(3)).layout(N, BS, is_causal=True)
    f = lambda q, k, v: torch.ops.dilate_compiler.block_sparse_attention_forward(  # noqa: E731
        q, k, v, *lay.args(), BS, True, 0.25)[0]
    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("causal", [False, True])
def test_value_head_dim_may_differ_from_query_head_dim(causal):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 50, 24, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 50, 24, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    pattern = P.sliding_window(12) | P.global_tokens(2)
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=16, is_causal=causal)
    keep = pattern.token_mask(50, 16, is_causal=causal)
    s = (q @ k.repeat_interleave(2, 1).mT) / math.sqrt(24)
    ref = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    assert out.shape == (2, 4, 50, 16)
    assert_close(out, ref, torch.float64)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_on_the_exact_path(causal):
    q, k, v = (t.detach().double().requires_grad_() for t in qkv(torch.float64))
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[0, :10] = False
    keep[1, 5::7] = False
    pattern = P.sliding_window(12) | P.global_tokens(2)
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=16, is_causal=causal, key_keep=keep)
    mask = pattern.token_mask(N, 16, is_causal=causal) & keep.view(2, 1, 1, N)
    ref = dense_reference(q, k, v, mask)
    assert_close(out, ref, torch.float64)
    dout = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert_close(a, b, torch.float64)
