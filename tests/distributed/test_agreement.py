"""Distributed calls and the distributed module factories: clear errors for bad or disagreeing arguments; a new
but equal strategy reuses its registered config and plan."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.launch import run_ranks, values

B, H, N, D = 1, 4, 16, 8


def _registry_worker(rank, world):
    """Registry entries and plan-cache hits of a second ring_attention call with a new but equal strategy."""
    from dilate_compiler.distributed import ring_attention
    from dilate_compiler.distributed import sequence_parallel as sp

    q = torch.randn(B, H, N, D, dtype=torch.float64)
    ring_attention(q, q, q, dc.Dilated((8, 16), (1, 2)), mode="ring")
    configs, hits = len(sp._CONFIGS), sp._plan.cache_info().hits
    ring_attention(q, q, q, dc.Dilated((8, 16), (1, 2)), mode="ring")
    return len(sp._CONFIGS) - configs, sp._plan.cache_info().hits - hits


def test_ring_attention_with_a_new_equal_strategy_reuses_its_config_and_plan():
    for new_configs, new_hits in values(run_ranks(_registry_worker, 2, timeout=120, pg_timeout_s=20)):
        assert (new_configs, new_hits) == (0, 1)


def test_the_config_registry_keys_strategies_by_value():
    from dilate_compiler.distributed.sequence_parallel import Config, register

    def key(strategy, **changes):
        args = dict(strategy=strategy, group=None, mode="local", layout="contiguous", is_causal=False, scale=None,
                    head_range=(0, 4))
        return register(Config(**dict(args, **changes)))

    layout = torch.eye(4, dtype=torch.bool).unsqueeze(0)
    assert key(dc.Dilated((8, 16), (1, 2))) == key(dc.Dilated([8, 16], [1, 2]))
    assert key(dc.Dilated((8, 16), (1, 2))) != key(dc.Dilated((8, 16), (1, 2), mixing="head_groups"))
    pattern = lambda: P.local(2) | P.global_tokens(1)  # noqa: E731 - a new pattern object each time
    assert key(dc.BlockSparse(pattern(), 8)) == key(dc.BlockSparse(pattern(), 8))
    assert key(dc.BlockSparse(P.local(2), 8)) != key(dc.BlockSparse(P.local(2), 16))
    assert key(dc.BlockSparse(P.local(2), 8)) != key(dc.BlockSparse(P.local(3), 8))
    assert key(dc.BlockSparse(P.from_layout(layout), 8)) == key(dc.BlockSparse(P.from_layout(layout.clone()), 8))
    assert key(dc.BlockSparse(P.from_layout(layout), 8)) != key(dc.BlockSparse(P.from_layout(~layout), 8))
    assert key(None) != key(None, is_causal=True)


@pytest.mark.parametrize("kind", ["ring", "head_parallel"])
@pytest.mark.parametrize("missing", ["segment_lengths", "dilation_rates"])
def test_factory_distributed_kinds_name_a_missing_strategy_argument(kind, missing):
    kw = dict(embed_dim=16, num_heads=2, segment_lengths=(8,), dilation_rates=(1,))
    del kw[missing]
    with pytest.raises(TypeError, match=rf"kind={kind!r}\) needs {missing}=.*not given"):
        dc.nn.create_multihead_dilated_attention(kind, **kw)
