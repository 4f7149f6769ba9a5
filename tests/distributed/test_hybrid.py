"""The 2-D hybrid (head-parallel inside head groups, sequence-parallel across them) on 4 gloo ranks as 2 x 2.

Every rank builds the same whole-sequence inputs and runs the single-process op on them (the reference), then the
hybrid op on its shard; outputs and dq/dk/dv shards must equal the reference's (float64).
"""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.launch import run_ranks, values
from tests.distributed.test_sequence_parallel_masks import key_padding, single_process
from tests.tolerances import REL_ERR, rel_err

N, D = 48, 8
STRATEGIES = {
    "dense": None,
    "dilated-lse": dc.Dilated((8, 16, 48), (1, 2, 4)),
    "dilated-head-groups": dc.Dilated((8, 24), (1, 3), mixing="head_groups"),
    "block-sparse-per-head": dc.BlockSparse(P.random(2, seed=3, per_head=True) | P.local(1), block_size=8),
}

# (strategy, causal, sequence mode, Hq, Hkv, key padding)
CASES = [
    ("dense", True, "ring", 4, 2, False),
    ("dense", False, "ring", 8, 4, True),
    ("dilated-lse", False, "sparse", 4, 2, False),
    ("dilated-lse", True, "sparse", 8, 4, True),     # head group rank 1's first head is 4: a multiple of lcm(rates)
    ("dilated-lse", True, "ring", 6, 6, False),      # rank 1's first head is 3: the residues follow global heads
    ("dilated-head-groups", True, "sparse", 6, 2, True),
    ("block-sparse-per-head", False, "sparse", 4, 4, False),
]


def _cases_worker(rank, world, cases):
    from dilate_compiler.distributed import hybrid_attention, hybrid_groups, shard_sequence

    head_group, sequence_group = hybrid_groups(2)
    errors = {}
    for case in cases:
        name, causal, mode, hq, hkv, padded = case
        strategy = STRATEGIES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, N, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        dout = torch.randn(2, hq, N, D, generator=g, dtype=torch.float64)
        keep = key_padding(2) if padded else None
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = single_process(strategy, *full, causal, keep)
        ref_grads = torch.autograd.grad(ref, full, dout)
        local = [shard_sequence(t).requires_grad_() for t in (q, k, v)]
        out = hybrid_attention(*local, strategy, head_group=head_group, sequence_group=sequence_group,
                               is_causal=causal, sequence_mode=mode,
                               key_keep=None if keep is None else shard_sequence(keep, dim=1))
        grads = torch.autograd.grad(out, local, shard_sequence(dout))
        errors[case] = max([rel_err(out, shard_sequence(ref))] +
                           [rel_err(a, shard_sequence(b)) for a, b in zip(grads, ref_grads)])
    return errors


@pytest.mark.slow
def test_hybrid_2x2_equals_the_single_process_op():
    results = values(run_ranks(_cases_worker, 4, CASES))
    bad = [(r, case, err) for r, errs in enumerate(results) for case, err in errs.items()
           if not err <= REL_ERR[torch.float64]]
    assert not bad, bad


def _bytes_worker(rank, world):
    from dilate_compiler.distributed import (count_bytes, hybrid_attention, hybrid_groups, ring_attention,
                                             shard_sequence)

    head_group, sequence_group = hybrid_groups(2)
    B, H, n = 2, 4, 96
    got = {}
    g = torch.Generator().manual_seed(0)
    q, k, v = (shard_sequence(torch.randn(B, H, n, D, generator=g, dtype=torch.float64)).requires_grad_()
               for _ in range(3))
    for name, call in (
        ("hybrid-ring", lambda: hybrid_attention(q, k, v, head_group=head_group, sequence_group=sequence_group,
                                                 is_causal=True)),
        ("ring", lambda: ring_attention(q, k, v, is_causal=True)),
        ("hybrid-sparse", lambda: hybrid_attention(q, k, v, dc.Dilated((24, 48), (2, 4)), head_group=head_group,
                                                   sequence_group=sequence_group)),
    ):
        with count_bytes() as fwd:
            out = call()
        with count_bytes() as bwd:
            out.sum().backward()
        got[name] = {kind: (fwd.sent_bytes(kind), bwd.sent_bytes(kind)) for kind in ("heads", "kv", "grad")}
    return got


@pytest.mark.slow
def test_hybrid_bytes_per_rank():
    shard = 2 * 4 * 24 * D * 8          # one of q, k, v, o on a rank: B=2, H=4, S=24 rows, D=8, float64
    for got in values(run_ranks(_bytes_worker, 4)):
        # all-to-alls inside a head group of 2: half of q, k, v out and half of o back; backward the same
        assert got["hybrid-ring"]["heads"] == (4 * shard // 2, 4 * shard // 2), got
        # the ring over a sequence group of 2: one hop of 2 heads x 48 rows of k and v (= k + v of the shard),
        # backward the hop again and the fp64 dK/dV home in 2 hops; a ring over all 4 ranks moves 3 hops
        assert got["hybrid-ring"]["kv"] == (2 * shard, 2 * shard), got
        assert got["hybrid-ring"]["grad"] == (0, 2 * 2 * shard), got
        assert got["ring"]["kv"] == (3 * 2 * shard, 3 * 2 * shard), got
        # dilated segments of 24 and 48 that don't cross the sub-sequences of 48 rows: the sequence stage sends
        # nothing
        assert got["hybrid-sparse"]["kv"] == (0, 0) and got["hybrid-sparse"]["grad"] == (0, 0), got


def _bad_groups_worker(rank, world, case):
    import torch.distributed as dist

    from dilate_compiler.distributed import hybrid_attention, hybrid_groups

    if case == "swapped":    # head groups of ranks 2 apart, sequence groups of consecutive ranks
        groups = [dist.new_group(r) for r in ([0, 2], [1, 3], [0, 1], [2, 3])]
        head_group, sequence_group = groups[rank % 2], groups[2 + rank // 2]
        hkv = 2
    else:
        head_group, sequence_group = hybrid_groups(2)
        hkv = 3 if case == "heads" else 2
    q = torch.randn(1, 6, 8, 4, dtype=torch.float64)
    k = torch.randn(1, hkv, 8, 4, dtype=torch.float64)
    if case == "one rank's heads" and rank == 3:
        k = torch.randn(1, 3, 8, 4, dtype=torch.float64)
    try:
        if case == "ring and hybrid" and rank >= 2:
            dc.distributed.ring_attention(q, k, k)
        else:
            hybrid_attention(q, k, k, head_group=head_group, sequence_group=sequence_group)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
@pytest.mark.parametrize("case,expected", [
    ("swapped", "must tile the world's 4 ranks"),
    ("heads", "3 kv head(s) on a head group of 2 ranks"),
    ("one rank's heads", "differ in k shape"),
    ("ring and hybrid",
     "differ in mode (rank 0: 'hybrid/ring', rank 1: 'hybrid/ring', rank 2: 'ring', rank 3: 'ring')"),
])
def test_bad_groups_and_heads_get_the_same_error_on_every_rank(case, expected):
    messages = values(run_ranks(_bad_groups_worker, 4, case))
    assert len(set(messages)) == 1 or case == "heads", messages
    for message in messages:
        assert expected in message, message
