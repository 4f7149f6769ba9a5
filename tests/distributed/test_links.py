"""The per-rank pieces of the distributed ops, in one process: which keys a set of queries needs (against brute
force over every query), and the exact position-aware attention with its LSE merge and backward."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.attend import attend_backward, attend_forward, merge
from dilate_compiler.distributed.links import links_for, positions, runs, shard_ranges
from tests.lowering.block_sparse.test_op import dense_reference
from tests.tolerances import REL_ERR, rel_err

N = 48
STRATEGIES = {
    "dense": None,
    "dilated-lse": dc.Dilated((8, 16, 48), (1, 2, 4)),
    "dilated-head-groups": dc.Dilated((8, 24), (1, 3), mixing="head_groups"),
    "dilated-long-segment": dc.Dilated((12, 64), (2, 4)),
    "block-sparse": dc.BlockSparse(P.sliding_window(9) | P.global_tokens(2), block_size=8),
    "block-sparse-per-head": dc.BlockSparse(P.random(2, seed=3, per_head=True) | P.local(1), block_size=8),
}


def brute_mask(strategy, H, causal):
    """bool ``[H, N, N]`` straight from each strategy's own definition."""
    if strategy is None:
        m = torch.ones(H, N, N, dtype=torch.bool)
        return m.tril() if causal else m
    if isinstance(strategy, dc.Dilated):
        return strategy.multiplicity(N, H, is_causal=causal) > 0
    return strategy.pattern.token_mask(N, strategy.block_size, num_heads=H, is_causal=causal).expand(H, N, N)


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_count_matches_the_strategy_definition(name, causal):
    strategy, H = STRATEGIES[name], 6
    links = links_for(strategy, N, H, causal)
    p, j, h = torch.arange(N).view(1, -1, 1), torch.arange(N).view(1, 1, -1), torch.arange(H).view(-1, 1, 1)
    count = links.count(h, p, j)
    if isinstance(strategy, dc.Dilated):
        assert torch.equal(count, strategy.multiplicity(N, H, is_causal=causal))
    else:
        assert torch.equal(count > 0, brute_mask(strategy, H, causal))
    assert not links.count(h, p, torch.full((1, 1, 3), -1)).any(), "padding (-1) must never link"


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("ranges", [[(0, 12)], [(13, 30)], [(5, 9), (40, 48)], [(0, 48)]])
def test_needed_covers_every_link_and_is_exact_for_token_patterns(name, causal, ranges):
    strategy, H = STRATEGIES[name], 6
    links = links_for(strategy, N, H, causal)
    brute = torch.zeros(H, N, dtype=torch.bool)
    mask = brute_mask(strategy, H, causal)
    for lo, hi in ranges:
        brute |= mask[:, lo:hi].any(1)
    need = links.needed(torch.arange(H), ranges, torch.arange(N))
    assert not (brute & ~need).any(), "a linked key was not marked needed"
    if not isinstance(strategy, dc.BlockSparse):
        assert torch.equal(need, brute)       # dense and dilated: exact; block-sparse: whole key blocks
    else:
        bs = strategy.block_size   # block granularity: keys of blocks some touched query block links to
        touched = torch.zeros(H, N, dtype=torch.bool)
        for lo, hi in ranges:
            touched |= mask[:, lo // bs * bs:-(-hi // bs) * bs].any(1)
        blocks = touched.view(H, -1, bs).any(-1).repeat_interleave(bs, 1)
        assert not (need & ~blocks).any(), "a key block no touched query block links to was marked needed"


def test_shard_ranges_and_runs():
    assert shard_ranges(1, 4, 6, "contiguous") == [(6, 12)]
    assert shard_ranges(1, 4, 6, "zigzag") == [(3, 6), (18, 21)]
    cover = torch.cat([positions(shard_ranges(r, 4, 6, "zigzag")) for r in range(4)]).sort().values
    assert torch.equal(cover, torch.arange(24))
    assert runs(torch.tensor([3, 4, 5, 18, 19, 20])) == [(3, 6), (18, 21)]
    with pytest.raises(ValueError, match="even shard length"):
        shard_ranges(0, 2, 5, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_ranges(0, 2, 4, "striped")


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attend_in_two_key_sets_merges_to_the_reference(name, causal):
    """Keys split into two disjoint position sets (as a ring sees them), merged by LSE, equal one softmax over all;
    the backward with the final LSE gives the reference gradients."""
    strategy, Hq, Hkv, D = STRATEGIES[name], 6, 3, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, N, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (Hq, Hkv, Hkv))
    links = links_for(strategy, N, Hq, causal)
    heads, pos = torch.arange(Hq), torch.arange(N)
    scale = D ** -0.5
    split = torch.randperm(N, generator=g)
    a, b = split[:20].sort().values, split[20:].sort().values
    o1, l1 = attend_forward(q, k[:, :, a], v[:, :, a], pos, a.view(1, -1), links, heads, scale)
    o2, l2 = attend_forward(q, k[:, :, b], v[:, :, b], pos, b.view(1, -1), links, heads, scale)
    out, lse = merge(o1, l1, o2, l2)
    out = out * links.output_scale
    if isinstance(strategy, dc.Dilated):
        ref = strategy.reference(q, k, v, is_causal=causal)
    else:
        ref = dense_reference(q, k, v, brute_mask(strategy, Hq, causal))
    assert rel_err(out, ref) <= REL_ERR[torch.float64]
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for idx in (a, b):
        gq, gk, gv = attend_backward(dout * links.output_scale, q, k[:, :, idx], v[:, :, idx], pos,
                                     idx.view(1, -1), links, heads, scale, lse, delta)
        dq += gq
        dk[:, :, idx] += gk
        dv[:, :, idx] += gv
    for got, want, what in zip((dq, dk, dv), ref_grads, ("dq", "dk", "dv")):
        assert rel_err(got, want) <= REL_ERR[torch.float64], what
