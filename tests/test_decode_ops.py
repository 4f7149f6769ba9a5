"""The ops on queries that are the last Nq of Nk key positions (decoding with a KV cache): the exact paths and the
Triton kernels (launchers under TRITON_INTERPRET=1 on CPU) against float64 references built over all Nk positions
and cut to their last Nq rows; token-by-token decoding against one full forward; bad input."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.strategies.reference import weighted_softmax_attention
from tests.lowering.block_sparse.test_op import dense_reference
from tests.tolerances import assert_close, rel_err

DILATED = {  # segments, rates, mixing
    "lse": ((8, 16, 32), (1, 2, 4), "lse"),
    "lse-odd": ((6, 15), (2, 3), "lse"),                 # segments that divide no length here
    "head_groups": ((8, 16, 64), (1, 2, 4), "head_groups"),
    "dense-long": ((128,), (1,), "lse"),                 # a segment longer than the sequence
}
BLOCK_SPARSE = {  # pattern, block size
    "window": (P.sliding_window(20), 16),
    "local|global": (P.local(2) | P.global_tokens(3), 16),
    "dilated-blocks": (P.dilated((1, 2)), 16),
}


def _qkv(nq, nk, hq=4, hkv=2, d=16, dtype=torch.float64, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


def _left_padding(b, nk):
    """key_keep with batch row 1 left-padded by 5 keys (a KV cache of a shorter prompt)."""
    keep = torch.ones(b, nk, dtype=torch.bool)
    keep[1, :5] = False
    return keep


def _reference(q, k, v, weights, scale=None, attn_mask=None):
    """float64 output and LSE (natural log) of the weighted softmax: ``weights [H or 1, Nq, Nk]`` (bool or link
    counts), the last Nq rows of the pattern over Nk positions."""
    q64, k64 = q.double(), k.double()
    g = q.shape[1] // k.shape[1]
    s = q64 @ k64.repeat_interleave(g, 1).transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    w = weights.double()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            w = w * attn_mask.double()
        else:
            s = s + attn_mask.double()
    lse = torch.logsumexp(s + torch.log(w), -1)
    return weighted_softmax_attention(q, k, v, weights, scale=scale, attn_mask=attn_mask), lse


def _dilated_weights(name, nq, nk, hq, is_causal):
    segs, rates, mixing = DILATED[name]
    return dc.Dilated(segs, rates, mixing).multiplicity(nk, hq, is_causal=is_causal)[:, nk - nq:]


def _check(out, lse, grads, ref, ref_lse, inputs, dout, dtype, scale_out=1.0):
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert_close(out, ref * scale_out, dtype)
    assert_close(torch.where(torch.isinf(lse), 0.0, lse), torch.where(torch.isinf(ref_lse), 0.0, ref_lse), dtype,
                 "lse")
    ref_grads = torch.autograd.grad(ref * scale_out, inputs, dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.shape == b.shape, name
        assert_close(a, b, dtype, name)


# --- the exact paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DILATED))
@pytest.mark.parametrize("nk,nq", [(63, 1), (63, 5), (63, 63), (70, 1), (70, 17)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dilated_exact_path_on_trailing_queries(name, nk, nq, is_causal):
    segs, rates, mixing = DILATED[name]
    q, k, v = _qkv(nq, nk, seed=nk + nq)
    out, lse = torch.ops.dilate_compiler.dilated_attention_forward(q, k, v, None, list(segs), list(rates), is_causal,
                                                                   0.25, mixing, 0.0, None)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_lse = _reference(q, k, v, _dilated_weights(name, nq, nk, 4, is_causal), scale=0.25)
    scale_out = 1 / len(segs) if mixing == "head_groups" else 1.0
    _check(out, lse, grads, ref, ref_lse, (q, k, v), dout, torch.float64, scale_out)


@pytest.mark.parametrize("name", ["lse", "head_groups"])
@pytest.mark.parametrize("nq", [1, 6])
def test_dilated_exact_path_with_left_padding_and_a_mask(name, nq):
    """key_keep (a left-padded batch row) and a learned additive bias ``[B, Hq, Nq, Nk]``: outputs and every
    gradient, the bias's included."""
    segs, rates, mixing = DILATED[name]
    nk = 45
    q, k, v = _qkv(nq, nk, seed=nq)
    bias = (0.3 * torch.randn(2, 4, nq, nk, dtype=torch.float64)).requires_grad_()
    keep = _left_padding(2, nk)
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True, mixing=mixing, attn_mask=bias,
                                   key_keep=keep)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    weights = _dilated_weights(name, nq, nk, 4, True) * keep.view(2, 1, 1, nk)
    ref, _ = _reference(q, k, v, weights, attn_mask=bias)
    ref = ref / len(segs) if mixing == "head_groups" else ref
    assert_close(out, ref, torch.float64)
    for what, a, b in zip(("dq", "dk", "dv", "dmask"), grads, torch.autograd.grad(ref, (q, k, v, bias), dout)):
        assert_close(a, b, torch.float64, what)


def test_dilated_exact_path_with_a_bool_mask_broadcast_over_queries():
    nq, nk = 3, 40
    q, k, v = _qkv(nq, nk, seed=3)
    mask = torch.rand(1, 1, 1, nk, generator=torch.Generator().manual_seed(1)) < 0.7
    out = dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), attn_mask=mask)
    ref, _ = _reference(q, k, v, dc.Dilated((8, 16), (1, 2)).multiplicity(nk, 4)[:, nk - nq:], attn_mask=mask)
    assert_close(out, ref, torch.float64)


@pytest.mark.parametrize("name", sorted(BLOCK_SPARSE))
@pytest.mark.parametrize("nk,nq", [(77, 1), (77, 5), (77, 77), (64, 17)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_block_sparse_exact_path_on_trailing_queries(name, nk, nq, is_causal):
    pattern, bs = BLOCK_SPARSE[name]
    q, k, v = _qkv(nq, nk, seed=nk + nq)
    keep = _left_padding(2, nk)
    lay = pattern.layout(nk, bs, num_heads=4, is_causal=is_causal)
    out, lse = torch.ops.dilate_compiler.block_sparse_attention_forward(q, k, v, *lay.args(), bs, is_causal, 0.25,
                                                                        keep)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    mask = pattern.token_mask(nk, bs, num_heads=4, is_causal=is_causal)[:, nk - nq:] & keep.view(2, 1, 1, nk)
    ref, ref_lse = _reference(q, k, v, mask, scale=0.25)
    _check(out, lse, grads, ref, ref_lse, (q, k, v), dout, torch.float64)


@pytest.mark.parametrize("op", ["dilated", "block_sparse"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_trailing_queries_equal_the_last_rows_of_the_full_op(op, is_causal):
    """float32: ``op(q[:, :, -Nq:], k, v) == op(q, k, v)[:, :, -Nq:]`` within 1e-5 relative."""
    nk = 70
    q, k, v = (t.detach() for t in _qkv(nk, nk, dtype=torch.float32, seed=5))

    def run(qq):
        if op == "dilated":
            return dc.ops.dilated_attention(qq, k, v, (8, 32), (1, 2), is_causal=is_causal)
        return dc.ops.block_sparse_attention(qq, k, v, P.sliding_window(9) | P.global_tokens(2), block_size=16,
                                             is_causal=is_causal)

    full = run(q)
    for nq in (1, 2, 15, 69):
        assert rel_err(run(q[:, :, nk - nq:]), full[:, :, nk - nq:]) <= 1e-5


@pytest.mark.parametrize("op", ["dilated", "sliding_window"])
def test_token_by_token_decoding_reproduces_the_full_forward(op):
    """Prefill 20 tokens, then decode one token at a time (the keys grow by one each step): every step's row equals
    the full causal forward's row at that position, float32, within 1e-5 relative."""
    n, prefill = 50, 20
    q, k, v = (t.detach() for t in _qkv(n, n, hq=4, hkv=2, dtype=torch.float32, seed=11))

    def run(qq, kk, vv):
        if op == "dilated":
            return dc.ops.dilated_attention(qq, kk, vv, (8, 16, 64), (1, 2, 4), is_causal=True)
        return dc.ops.block_sparse_attention(qq, kk, vv, P.sliding_window(12), block_size=16, is_causal=True)

    full = run(q, k, v)
    rows = [run(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])]
    for t in range(prefill, n):
        rows.append(run(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]))
    assert rel_err(torch.cat(rows, 2), full) <= 1e-5


def test_one_query_over_many_keys_attends_only_its_segments_and_rows():
    """A decode step of one query over 100K keys: the exact paths do the work of that query (a dense-over-Nk
    computation would need 10^10 scores); checked against the definition on that row alone."""
    nk = 100_000
    q, k, v = (t.detach() for t in _qkv(1, nk, hq=2, hkv=1, d=16, dtype=torch.float32, seed=2, b=1))
    p, j = torch.tensor([nk - 1]).view(1, 1), torch.arange(nk).view(1, -1)
    strategy = dc.Dilated((2048, 8192, 131072), (1, 2, 4))
    out = dc.ops.dilated_attention(q, k, v, strategy.segment_lengths, strategy.dilation_rates, is_causal=True)
    weights = strategy.link_count(torch.arange(2).view(-1, 1, 1), p, j, 2) * (j <= p)
    assert rel_err(out, weighted_softmax_attention(q, k, v, weights)) <= 1e-5
    out = dc.ops.block_sparse_attention(q, k, v, P.sliding_window(300), block_size=128, is_causal=True)
    assert rel_err(out, weighted_softmax_attention(q, k, v, (p - j < 300) & (j <= p))) <= 1e-5


# --- the Triton kernels (interpreter) ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lse", "head_groups"])
@pytest.mark.parametrize("nk,nq", [(63, 1), pytest.param(63, 4, marks=pytest.mark.slow),
                                   pytest.param(50, 50, marks=pytest.mark.slow)])
@pytest.mark.parametrize("key_padding", [False, True], ids=["", "left-padded"])
def test_dilated_kernels_on_trailing_queries(name, nk, nq, key_padding):
    from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd

    segs, rates, mixing = DILATED[name]
    dtype = torch.float16
    q, k, v = (t.detach() for t in _qkv(nq, nk, d=32, dtype=dtype, seed=nk + nq))
    keep = _left_padding(2, nk) if key_padding else None
    args = dict(is_causal=True, scale=0.2, mixing=mixing, q_offset=nk - nq, key_keep=keep)
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, **args)
    weights = _dilated_weights(name, nq, nk, 4, True)
    if keep is not None:
        weights = weights * keep.view(2, 1, 1, nk)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _reference(q64, k64, v64, weights, scale=0.2)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, **args)
    _check(out, lse, grads, ref, ref_lse, (q64, k64, v64), dout, dtype, 1 / len(segs) if mixing != "lse" else 1.0)


@pytest.mark.parametrize("name", sorted(BLOCK_SPARSE))
@pytest.mark.parametrize("nk,nq", [(45, 1), pytest.param(45, 7, marks=pytest.mark.slow),
                                   pytest.param(64, 20, marks=pytest.mark.slow)])
@pytest.mark.parametrize("is_causal", [pytest.param(False, marks=pytest.mark.slow), True], ids=["full", "causal"])
def test_block_sparse_kernels_on_trailing_queries(name, nk, nq, is_causal):
    """The launchers read the first query position from the shapes: only the query blocks holding queries run,
    the rows before the first query are masked, dK/dV walks only those rows."""
    from dilate_compiler.lowering.block_sparse.triton import block_sparse_attn_bwd, block_sparse_attn_fwd

    pattern, bs = BLOCK_SPARSE[name]
    dtype = torch.float16
    q, k, v = (t.detach() for t in _qkv(nq, nk, d=32, dtype=dtype, seed=nk + nq))
    keep = _left_padding(2, nk) if nq != 20 else None
    lay = pattern.layout(nk, bs, num_heads=4, is_causal=is_causal)
    out, lse = block_sparse_attn_fwd(q, k, v, *lay.tensors()[:4], bs, is_causal, 0.2, lay.coords, lay.checks,
                                     key_keep=keep)
    mask = pattern.token_mask(nk, bs, num_heads=4, is_causal=is_causal)[:, nk - nq:]
    if keep is not None:
        mask = mask & keep.view(2, 1, 1, nk)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = _reference(q64, k64, v64, mask, scale=0.2)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    grads = block_sparse_attn_bwd(dout, q, k, v, out, lse, *lay.args(), bs, is_causal, 0.2, key_keep=keep)
    _check(out, lse, grads, ref, ref_lse, (q64, k64, v64), dout, dtype)


def test_block_sparse_tile_order_of_the_last_query_blocks():
    """The launch order of a decoding call covers the query blocks from the first query's on, packed as the full
    order packs them (``head * NB + block``), heaviest first."""
    from dilate_compiler.lowering.block_sparse.triton import tile_order

    count = torch.tensor([[[0, 1], [0, 3], [0, 2], [0, 2]]], dtype=torch.int32)   # NB = 4, work 1, 3, 2, 2
    assert tile_order(count, 1, 2).tolist() == [1, 5, 2, 3, 6, 7, 0, 4]
    assert tile_order(count, 1, 2, 2).tolist() == [2, 3, 6, 7]
    assert tile_order(count, 1, 1, 3).tolist() == [3]


# --- torch.compile with dynamic shapes ----------------------------------------------------------------------------


def test_compiled_dilated_op_with_dynamic_shapes_takes_other_query_and_key_lengths():
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(q, k, v):
        return dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for nq, nk in ((3, 40), (5, 57)):   # lengths unlike the batch size 2 (no duck-sized equality to guard on)
        q, k, v = (t.detach() for t in _qkv(nq, nk, dtype=torch.float32, seed=nk))
        assert rel_err(compiled(q, k, v), step(q, k, v)) <= 1e-6
        frames.append(counter.frame_count)
    assert frames[0] == frames[1], "the second (Nq, Nk) recompiled"


# --- bad input ----------------------------------------------------------------------------------------------------


def test_more_queries_than_keys_is_an_error_naming_both_lengths():
    q, k, v = (t.detach() for t in _qkv(9, 5))
    for call in (lambda: dc.ops.dilated_attention(q, k, v, (4,), (1,)),
                 lambda: dc.ops.block_sparse_attention(q, k, v, P.local(1), block_size=16)):
        with pytest.raises(ValueError, match=r"q has 9 positions and k has 5; accepted: .*1 <= Nq < Nk"):
            call()


def test_shapes_of_masks_and_key_padding_follow_the_key_length():
    q, k, v = (t.detach() for t in _qkv(3, 20))
    with pytest.raises(ValueError, match=r"does not broadcast to \[B, Hq, Nq, Nk\] = \[2, 4, 3, 20\].*keys Nk"):
        dc.ops.dilated_attention(q, k, v, (4,), (1,), attn_mask=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"key_keep must have shape \[B or 1, N\] = \[2 or 1, 20\]"):
        dc.ops.block_sparse_attention(q, k, v, P.local(1), block_size=16, key_keep=torch.ones(2, 3, dtype=torch.bool))


def test_a_layout_built_for_the_query_length_is_refused():
    q, k, v = (t.detach() for t in _qkv(3, 20))
    with pytest.raises(ValueError, match="layout was built with seq_len=3 but the call has seq_len=20"):
        dc.ops.block_sparse_attention(q, k, v, P.local(1).layout(3, 16), block_size=16)


def test_order_and_adaptive_refuse_trailing_queries():
    q, k, v = (t.detach() for t in _qkv(3, 20))
    with pytest.raises(NotImplementedError, match=r"order .* last 3 of 20 key positions"):
        dc.ops.block_sparse_attention(q, k, v, P.local(1), block_size=16, order=torch.arange(20))
    with pytest.raises(NotImplementedError, match=r"adaptive block selection .* last 3 of 20"):
        dc.ops.adaptive_block_sparse_attention(q, k, v, dc.Adaptive(top_k=2, block_size=16))


def test_dropout_on_the_exact_path_refuses_trailing_queries():
    q, k, v = (t.detach() for t in _qkv(3, 20))
    with pytest.raises(NotImplementedError, match=r"dropout \(dropout_p=0.1\) on the exact path .* last 3 of 20"):
        dc.ops.dilated_attention(q, k, v, (4,), (1,), dropout_p=0.1)
