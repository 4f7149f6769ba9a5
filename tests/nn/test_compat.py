"""The modules take dilated-attention-pytorch's argument order and keyword names where they tell the two apart, and
refuse a positional call the two orders would read differently, naming both."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler.nn import MultiheadDilatedAttention


def _pattern(m: MultiheadDilatedAttention):
    s = m.attention.strategy
    return s.segment_lengths, s.dilation_rates


def test_our_positional_order():
    m = MultiheadDilatedAttention(32, 4, (8, 16), (1, 2), 0.1, False, False)
    assert _pattern(m) == ((8, 16), (1, 2))
    assert m.attention.attention_dropout == 0.1 and m.q_proj.bias is None and not m.batch_first
    assert m.norm is not None


def test_dilated_attention_pytorch_positional_order():
    """(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm, layer_norm_eps,
    gamma_init): rates (1, 2) can't be segments of rates (8, 16), so the call reads in that library's order."""
    m = MultiheadDilatedAttention(32, 4, [1, 2], [8, 16], 0.1, False, False, 1e-6, 0.5)
    assert _pattern(m) == ((8, 16), (1, 2))
    assert m.attention.attention_dropout == 0.1 and m.q_proj.bias is None
    assert m.norm is None and m.batch_first and m.gamma_init == 0.5


def test_their_order_with_layer_norm_eps_and_norm():
    m = MultiheadDilatedAttention(32, 4, [1, 2], [8, 16], 0.0, True, True, 1e-3)
    assert m.norm is not None and m.norm.eps == 1e-3


def test_equal_sequences_read_the_same_in_both_orders():
    m = MultiheadDilatedAttention(32, 4, (2, 4), (2, 4), 0.0, True)
    assert _pattern(m) == ((2, 4), (2, 4))


def test_ambiguous_positional_call_names_both_orders():
    with pytest.raises(TypeError, match=r"batch_first here, layer_norm there.*segment_lengths, dilation_rates, "
                                        r"dropout, bias, batch_first.*dilation_rates, segment_lengths"):
        MultiheadDilatedAttention(32, 4, (2, 4), (2, 4), 0.0, True, False)


def test_unreadable_positional_call_names_both_orders_and_why():
    with pytest.raises(ValueError, match=r"read in neither order.*segment_lengths, dilation_rates.*dilation_rates, "
                                        r"segment_lengths.*multiple of its dilation rate"):
        MultiheadDilatedAttention(32, 4, (6, 8), (4, 3))


def test_one_sequence_by_position_the_other_by_keyword():
    a = MultiheadDilatedAttention(32, 4, (8, 16), dilation_rates=(1, 2))
    b = MultiheadDilatedAttention(32, 4, (1, 2), segment_lengths=(8, 16))
    assert _pattern(a) == _pattern(b) == ((8, 16), (1, 2))


def test_missing_sequence_is_named():
    with pytest.raises(TypeError, match="dilation_rates missing"):
        MultiheadDilatedAttention(32, 4, (8, 16))


def test_their_keywords_and_op():
    m = MultiheadDilatedAttention(embed_dim=32, num_heads=4, dilation_rates=[1, 2], segment_lengths=[8, 16],
                                  dropout=0.0, bias=True, layer_norm=False, layer_norm_eps=1e-5, gamma_init=1.0,
                                  device=None, dtype=None, op=None)
    assert _pattern(m) == ((8, 16), (1, 2)) and m.norm is None
    with pytest.raises(ValueError, match="op selects an xformers attention operator.*pass op=None"):
        MultiheadDilatedAttention(32, 4, (8, 16), (1, 2), op=object())


def test_dilated_attention_takes_their_positional_order():
    """DilatedAttention(segment_lengths, dilation_rates, softmax_scale, attention_dropout, op)."""
    a = dc.nn.DilatedAttention([8, 16], [1, 2], 0.5, 0.1, None)
    assert a.softmax_scale == 0.5 and a.attention_dropout == 0.1
    with pytest.raises(ValueError, match="pass op=None"):
        dc.nn.DilatedAttention([8, 16], [1, 2], None, 0.0, "cutlass")


def test_modules_carry_head_offsets():
    g = torch.Generator().manual_seed(0)
    m = dc.nn.create_multihead_dilated_attention("improved", embed_dim=32, num_heads=4, segment_lengths=(8, 16),
                                                 dilation_rates=(1, 2), head_offsets="grouped").double()
    assert m.attention.strategy.head_offsets == "grouped"
    assert "head_offsets='grouped'" in repr(m)
    x = torch.randn(1, 16, 32, generator=g, dtype=torch.float64)
    y, _ = m(x)
    q, k, v = (proj(x).view(1, 16, 4, 8).transpose(1, 2) for proj in (m.q_proj, m.k_proj, m.v_proj))
    ref = m.attention.strategy.reference(q, k, v).transpose(1, 2).reshape(1, 16, 32)
    torch.testing.assert_close(y, m.out_proj(m.norm(ref)))
    with pytest.raises(ValueError, match="needs mixing='lse'"):
        dc.nn.create_multihead_dilated_attention("standard", embed_dim=32, num_heads=4, segment_lengths=(8,),
                                                 dilation_rates=(1,), head_offsets="grouped")


def test_distributed_factory_refuses_grouped_offsets():
    with pytest.raises(NotImplementedError, match="head_offsets='grouped'"):
        dc.nn.create_multihead_dilated_attention("ring", embed_dim=32, num_heads=4, segment_lengths=(8,),
                                                 dilation_rates=(2,), head_offsets="grouped")
