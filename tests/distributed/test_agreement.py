"""Distributed calls and the distributed module factories: clear errors for bad or disagreeing arguments."""

import pytest

import dilate_compiler as dc


@pytest.mark.parametrize("kind", ["ring", "head_parallel"])
@pytest.mark.parametrize("missing", ["segment_lengths", "dilation_rates"])
def test_factory_distributed_kinds_name_a_missing_strategy_argument(kind, missing):
    kw = dict(embed_dim=16, num_heads=2, segment_lengths=(8,), dilation_rates=(1,))
    del kw[missing]
    with pytest.raises(TypeError, match=rf"kind={kind!r}\) needs {missing}=.*not given"):
        dc.nn.create_multihead_dilated_attention(kind, **kw)
