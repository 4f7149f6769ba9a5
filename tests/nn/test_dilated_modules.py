import pytest
import torch
from torch import nn

import dilate_compiler as dc
from tests.tolerances import assert_close

E, H, N, B = 32, 4, 37, 2


def _pair(batch_first=True):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=torch.float64)
    mod = dc.nn.MultiheadDilatedAttention(E, H, (64,), (1,), layer_norm=False, batch_first=batch_first,
                                          dtype=torch.float64)
    with torch.no_grad():
        w, b = ref.in_proj_weight, ref.in_proj_bias
        for i, lin in enumerate((mod.q_proj, mod.k_proj, mod.v_proj)):
            lin.weight.copy_(w[i * E:(i + 1) * E])
            lin.bias.copy_(b[i * E:(i + 1) * E])
        mod.out_proj.load_state_dict(ref.out_proj.state_dict())
    return ref, mod


@pytest.mark.parametrize("batch_first", [True, False])
def test_dense_equivalent_matches_nn_multihead_attention(batch_first):
    ref, mod = _pair(batch_first)
    x = torch.randn(B, N, E, dtype=torch.float64, requires_grad=True)
    xin = x if batch_first else x.transpose(0, 1)
    a, _ = ref(xin, xin, xin, need_weights=False)
    b, w = mod(xin)
    assert w is None
    assert_close(b, a, torch.float64)
    ga = torch.autograd.grad(a.sum(), x)[0]
    gb = torch.autograd.grad(b.sum(), x)[0]
    assert_close(gb, ga, torch.float64, "dx")


@pytest.mark.parametrize("masks", ["padding", "causal_bool", "additive_and_padding", "per_head_bool"])
def test_masks_are_honoured_like_nn_multihead_attention(masks):
    ref, mod = _pair()
    x = torch.randn(B, N, E, dtype=torch.float64)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[0, 30:] = True
    kwargs = {}
    if masks == "padding":
        kwargs = {"key_padding_mask": kpm}
    elif masks == "causal_bool":
        kwargs = {"attn_mask": torch.triu(torch.ones(N, N, dtype=torch.bool), 1)}
    elif masks == "additive_and_padding":
        kwargs = {"attn_mask": torch.randn(N, N, dtype=torch.float64), "key_padding_mask": kpm}
    else:
        kwargs = {"attn_mask": torch.rand(B * H, N, N) > 0.8}
    a, _ = ref(x, x, x, need_weights=False, **kwargs)
    b, _ = mod(x, **kwargs)
    assert_close(b, a, torch.float64)


def test_is_causal_matches_causal_mask():
    ref, mod = _pair()
    x = torch.randn(B, N, E, dtype=torch.float64)
    a, _ = ref(x, x, x, need_weights=False, attn_mask=nn.Transformer.generate_square_subsequent_mask(N,
               dtype=torch.float64), is_causal=True)
    b, _ = mod(x, is_causal=True)
    assert_close(b, a, torch.float64)


def test_need_weights_refused_not_ignored():
    _, mod = _pair()
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        mod(torch.randn(B, N, E, dtype=torch.float64), need_weights=True)


def test_bad_mask_shapes_raise():
    _, mod = _pair()
    x = torch.randn(B, N, E, dtype=torch.float64)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        mod(x, key_padding_mask=torch.zeros(B, N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        mod(x, attn_mask=torch.zeros(N, N + 1, dtype=torch.bool))


def test_dilated_module_layout_and_gqa():
    torch.manual_seed(0)
    att = dc.nn.DilatedAttention((8, 16), (1, 2))
    q = torch.randn(2, 40, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 40, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 40, 2, 8, dtype=torch.float64)
    out = att(q, k, v, is_causal=True)
    assert out.shape == q.shape
    ref = dc.Dilated((8, 16), (1, 2)).reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                is_causal=True)
    assert_close(out.transpose(1, 2), ref, torch.float64)
    with pytest.raises(ValueError, match="query must have 4 dims"):
        att(q[0], k, v)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mod = dc.nn.MultiheadDilatedAttention(16, 2, (8,), (1,), dropout=0.5)
    x = torch.randn(1, 16, 16)
    mod.eval()
    assert torch.equal(mod(x)[0], mod(x)[0])
    mod.train()
    assert not torch.equal(mod(x)[0], mod(x)[0])


def test_multihead_gqa_and_layer_norm_shapes_and_backward():
    mod = dc.nn.MultiheadDilatedAttention(64, 8, (16, 32), (1, 2), num_kv_heads=2)
    assert mod.k_proj.out_features == 16
    x = torch.randn(2, 50, 64, requires_grad=True)
    out, _ = mod(x, is_causal=True)
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None and torch.isfinite(x.grad).all()


def test_factory_kinds():
    std = dc.nn.create_multihead_dilated_attention("standard", embed_dim=16, num_heads=2,
                                                   segment_lengths=(8,), dilation_rates=(1,))
    imp = dc.nn.create_multihead_dilated_attention("improved", embed_dim=16, num_heads=2,
                                                   segment_lengths=(8,), dilation_rates=(1,))
    assert std.attention.strategy.mixing == "head_groups"
    assert imp.attention.strategy.mixing == "lse"
    with pytest.raises(ValueError, match=r"unknown kind 'fast'; valid kinds: \['improved', 'standard', 'head_parallel', 'ring'\]"):
        dc.nn.create_multihead_dilated_attention("fast", embed_dim=16, num_heads=2,
                                                 segment_lengths=(8,), dilation_rates=(1,))
    for kind, mode in (("ring", "auto"), ("head_parallel", "head_parallel")):
        m = dc.nn.create_multihead_dilated_attention(kind, embed_dim=16, num_heads=2, segment_lengths=(8,),
                                                     dilation_rates=(1,), mixing="head_groups")
        assert isinstance(m, dc.nn.MultiheadSequenceParallelAttention)
        assert m.attention.config.mode == mode and m.attention.config.inner.mixing == "head_groups"
    with pytest.raises(ValueError, match="no attention dropout"):
        dc.nn.create_multihead_dilated_attention("ring", embed_dim=16, num_heads=2, segment_lengths=(8,),
                                                 dilation_rates=(1,), dropout=0.1)


def test_constructor_errors():
    with pytest.raises(ValueError, match="embed_dim"):
        dc.nn.MultiheadDilatedAttention(30, 4, (8,), (1,))
    with pytest.raises(ValueError, match="num_kv_heads"):
        dc.nn.MultiheadDilatedAttention(32, 4, (8,), (1,), num_kv_heads=3)
    with pytest.raises(ValueError, match="multiple of its dilation rate"):
        dc.nn.MultiheadDilatedAttention(32, 4, (9,), (2,))
