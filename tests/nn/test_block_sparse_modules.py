"""Adaptive selection against a loop-by-loop reference, the adaptive op against the masked-dense reference,
the block-sparse modules and their factory."""

import math

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from tests.lowering.block_sparse.test_op import dense_reference
from tests.tolerances import rel_err


def reference_selection(q, k, strategy, is_causal):
    """The documented rule, one (b, h, I) at a time."""
    B, H, N, D = q.shape
    bs, g = strategy.block_size, H // k.shape[1]
    nb = -(-N // bs)
    chosen = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            mq = [q[b, h, i * bs:(i + 1) * bs].double().mean(0) for i in range(nb)]
            mk = [k[b, h // g, j * bs:(j + 1) * bs].double().mean(0) for j in range(nb)]
            for i in range(nb):
                cand = [j for j in range(nb) if not is_causal or j <= i]
                s = torch.tensor([float(mq[i] @ mk[j]) / math.sqrt(D) for j in cand], dtype=torch.float64)
                mass = torch.softmax(s, 0)
                forced = [j for j in cand if j == i or j < strategy.sink_blocks]
                rest = sorted((j for j in cand if j not in forced), key=lambda j: -float(s[cand.index(j)]))
                picked, total = list(forced), sum(float(mass[cand.index(j)]) for j in forced)
                for j in rest:
                    if len(picked) >= strategy.top_k:
                        break
                    if strategy.threshold is not None and total >= strategy.threshold:
                        break
                    picked.append(j)
                    total += float(mass[cand.index(j)])
                chosen[b, h, i, picked] = True
    return chosen


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("strategy", [dc.Adaptive(top_k=3, block_size=16),
                                      dc.Adaptive(top_k=5, block_size=16, threshold=0.5, sink_blocks=1)],
                         ids=["topk", "threshold+sink"])
def test_selection_matches_reference(strategy, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 100, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 100, 16, generator=g, dtype=torch.float64)
    got = strategy.select(q, k, is_causal=causal)
    want = reference_selection(q, k, strategy, causal)
    assert torch.equal(got, want)
    diag = torch.arange(got.shape[-1])
    assert got[..., diag, diag].all()                                     # the diagonal block is always kept
    if causal:
        assert not torch.triu(got.int(), 1).any()


def test_adaptive_op_outputs_and_grads_on_the_selected_blocks():
    strategy = dc.Adaptive(top_k=2, block_size=16, sink_blocks=1)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 70, 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = dc.ops.adaptive_block_sparse_attention(q, k, v, strategy, is_causal=True)
    chosen = strategy.select(q.detach(), k.detach(), is_causal=True)
    mask = chosen.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :70, :70]
    mask = mask & torch.ones(70, 70, dtype=torch.bool).tril()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q2, k2, v2, mask)
    assert rel_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q2, k2, v2), dout)):
        assert rel_err(a, b) < 1e-12


def test_modules_and_factory():
    x = torch.randn(2, 50, 32)
    mha = dc.nn.create_block_sparse_attention("multihead", embed_dim=32, num_heads=4,
                                              pattern=P.sliding_window(8), block_size=16, num_kv_heads=2)
    out, weights = mha(x, is_causal=True)
    assert out.shape == x.shape and weights is None
    # the module equals its projections around the op
    q = mha.q_proj(x).view(2, 50, 4, 8).transpose(1, 2)
    k = mha.k_proj(x).view(2, 50, 2, 8).transpose(1, 2)
    v = mha.v_proj(x).view(2, 50, 2, 8).transpose(1, 2)
    att = dc.ops.block_sparse_attention(q, k, v, P.sliding_window(8), block_size=16, is_causal=True)
    torch.testing.assert_close(out, mha.out_proj(att.transpose(1, 2).reshape(2, 50, 32)))
    base = dc.nn.create_block_sparse_attention("base", pattern=P.local(1), block_size=16)
    heads = torch.randn(2, 50, 4, 8)
    assert base(heads, heads, heads).shape == heads.shape
    adaptive = dc.nn.create_block_sparse_attention("adaptive", top_k=2, block_size=16)
    assert adaptive(heads, heads, heads, is_causal=True).shape == heads.shape
    with pytest.raises(ValueError, match="no attn_mask"):
        mha(x, key_padding_mask=torch.zeros(2, 50, dtype=torch.bool))
    dist_mha = dc.nn.create_block_sparse_attention("distributed", embed_dim=32, num_heads=4, pattern=P.local(2),
                                                   block_size=16)
    assert isinstance(dist_mha, dc.nn.MultiheadSequenceParallelAttention)
    assert dist_mha.attention.config.mode == "auto" and dist_mha.attention.config.inner.block_size == 16
    with pytest.raises(ValueError, match="valid kinds"):
        dc.nn.create_block_sparse_attention("bigbird")
    with pytest.raises(ValueError, match="top_k"):
        dc.Adaptive(top_k=0)
