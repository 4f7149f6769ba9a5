"""Bad input gets an error that names the argument, its value and what is accepted (each case here gave an
unclear error, or a wrong result, before)."""

import re

import pytest
import torch

import dilate_compiler as dc

Q = torch.randn(2, 2, 16, 8)


@pytest.mark.parametrize("shape,what", [((0, 2, 16, 8), "batch size B >= 1"), ((2, 2, 16, 0), "head dim D >= 1")])
def test_empty_batch_or_head_dim_is_refused_by_name(shape, what):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=re.escape(f"q must have {what}, got q of shape {tuple(shape)}")):
        dc.ops.dilated_attention(x, x, x, (8,), (1,))


def test_empty_sequence_still_runs():
    x = torch.randn(2, 2, 0, 8)
    assert dc.ops.dilated_attention(x, x, x, (8,), (1,)).shape == x.shape


@pytest.mark.parametrize("segment", [2**63, 2**64])
def test_segment_lengths_beyond_int64_are_refused_by_name(segment):
    with pytest.raises(ValueError, match=r"segment_lengths must hold ints of at most 2\*\*63 - 1"):
        dc.Dilated((segment,), (1,))
    with pytest.raises(ValueError, match=r"segment_lengths must hold ints of at most 2\*\*63 - 1"):
        dc.ops.dilated_attention(Q, Q, Q, (segment,), (1,))


def test_mask_batch_that_does_not_broadcast_names_the_dim():
    mask = torch.ones(3, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"its batch B dim is 3; accepted: 1 or 2"):
        dc.ops.dilated_attention(Q, Q, Q, (8,), (1,), attn_mask=mask)


def test_mask_on_another_device_is_refused():
    """A meta mask beside CPU q was read as garbage before."""
    mask = torch.ones(16, 16, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="attn_mask is on meta but q is on cpu"):
        dc.ops.dilated_attention(Q, Q, Q, (8,), (1,), attn_mask=mask)


def test_block_sparse_refuses_meta_tensors_and_meta_layouts():
    with pytest.raises(ValueError, match="q, k, v are meta tensors"):
        m = Q.to("meta")
        dc.ops.block_sparse_attention(m, m, m, dc.patterns.local(1), block_size=8)
    with pytest.raises(ValueError, match="layout is a meta tensor"):
        dc.ops.block_sparse_attention(Q, Q, Q, torch.ones(1, 2, 2, dtype=torch.bool, device="meta"), block_size=8)


def test_adaptive_refuses_an_empty_sequence_by_name():
    x = torch.randn(1, 2, 0, 8)
    with pytest.raises(ValueError, match=r"sequence length N=0"):
        dc.ops.adaptive_block_sparse_attention(x, x, x, dc.Adaptive(top_k=2, block_size=8))


@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_module_masks_are_checked_under_their_own_name(name):
    m = dc.nn.MultiheadDilatedAttention(16, 2, (8,), (1,))
    x = torch.randn(2, 16, 16)
    bad_dtype = torch.ones(2, 16, dtype=torch.long) if name == "key_padding_mask" else torch.ones(16, 16).long()
    with pytest.raises(TypeError, match=f"{name} must be bool .* got dtype torch.int64"):
        m(x, x, x, **{name: bad_dtype})
    meta = torch.zeros(bad_dtype.shape, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but the query is on cpu"):
        m(x, x, x, **{name: meta})


def test_distributed_block_sparse_factory_without_pattern_names_it():
    with pytest.raises(ValueError, match="needs pattern="):
        dc.nn.create_block_sparse_attention("distributed", embed_dim=32, num_heads=4)
