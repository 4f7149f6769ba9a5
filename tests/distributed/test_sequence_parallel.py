"""Sequence-parallel and head-parallel attention on real gloo process groups of 2 and 4 spawned ranks.

Every rank builds the same whole-sequence inputs, runs the single-process op on them (the reference), then the
distributed op on its shard; outputs and dq/dk/dv shards must equal the reference's shards (float64).
"""

import time

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.launch import run_ranks, values
from tests.test_backend import Block   # per-token ops around one causal SDPA: a sequence shard runs it unchanged
from tests.tolerances import REL_ERR, rel_err

N, D = 48, 8
STRATEGIES = {
    "dense": None,
    "dilated-lse": dc.Dilated((8, 16, 48), (1, 2, 4)),
    "dilated-head-groups": dc.Dilated((8, 24), (1, 3), mixing="head_groups"),
    "block-sparse": dc.BlockSparse(P.sliding_window(9) | P.global_tokens(2), block_size=8),
    "block-sparse-per-head": dc.BlockSparse(P.random(2, seed=3, per_head=True) | P.local(1), block_size=8),
}

# (api, strategy, causal, mode, layout, Hq, Hkv)
RING_CASES = [
    ("ring", "dense", False, "ring", "contiguous", 4, 2),
    ("ring", "dense", True, "ring", "contiguous", 4, 4),
    ("ring", "dense", True, "ring", "zigzag", 4, 2),
    ("ring", "dilated-lse", False, "auto", "contiguous", 4, 2),
    ("ring", "dilated-lse", True, "sparse", "zigzag", 4, 4),
    ("ring", "dilated-lse", True, "ring", "contiguous", 4, 2),
    ("ring", "dilated-head-groups", False, "sparse", "contiguous", 6, 3),
    ("ring", "dilated-head-groups", True, "ring", "contiguous", 6, 3),
    ("ring", "block-sparse", True, "sparse", "contiguous", 4, 2),
    ("ring", "block-sparse-per-head", False, "sparse", "zigzag", 4, 4),
    ("ring", "block-sparse", False, "ring", "contiguous", 4, 2),
]
HEAD_CASES = [
    ("heads", "dense", True, None, "contiguous", 4, 4),
    ("heads", "dense", False, None, "zigzag", 8, 4),
    ("heads", "dilated-lse", False, None, "contiguous", 8, 4),     # 4 ranks: first heads 2, 6 -> exact path
    ("heads", "dilated-head-groups", True, None, "zigzag", 6, 6),  # 4 ranks: uneven (2, 2, 1, 1 kv heads)
    ("heads", "block-sparse-per-head", True, None, "contiguous", 6, 6),
    ("heads", "block-sparse", False, None, "contiguous", 10, 5),   # 2 ranks: 3 + 2 kv heads (GQA, uneven)
]


def reference(strategy, q, k, v, causal):
    if strategy is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if isinstance(strategy, dc.Dilated):
        return dc.ops.dilated_attention(q, k, v, strategy.segment_lengths, strategy.dilation_rates, is_causal=causal,
                                        mixing=strategy.mixing)
    return dc.ops.block_sparse_attention(q, k, v, strategy.pattern, block_size=strategy.block_size,
                                         is_causal=causal)


def _cases_worker(rank, world, cases):
    from dilate_compiler.distributed import head_parallel_attention, ring_attention, shard_sequence

    errors = {}
    for case in cases:
        api, name, causal, mode, layout, hq, hkv = case
        strategy = STRATEGIES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, N, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        dout = torch.randn(2, hq, N, D, generator=g, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = reference(strategy, *full, causal)
        ref_grads = torch.autograd.grad(ref, full, dout)
        shard = lambda t: shard_sequence(t, layout=layout)  # noqa: E731
        local = [shard(t).requires_grad_() for t in (q, k, v)]
        if api == "ring":
            out = ring_attention(*local, strategy, is_causal=causal, mode=mode, layout=layout)
        else:
            out = head_parallel_attention(*local, strategy, is_causal=causal, layout=layout)
        grads = torch.autograd.grad(out, local, shard(dout))
        errors[case] = max([rel_err(out, shard(ref))] + [rel_err(a, shard(b)) for a, b in zip(grads, ref_grads)])
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_outputs_and_grads_equal_the_single_process_op(world):
    results = values(run_ranks(_cases_worker, world, RING_CASES + HEAD_CASES))
    bad = [(r, case, err) for r, errs in enumerate(results) for case, err in errs.items()
           if not err <= REL_ERR[torch.float64]]
    assert not bad, bad


# The Triton kernels on key windows (window.py), here in Triton's interpreter on float32 CPU tensors.
# (strategy, causal, mode, layout, Hq, Hkv, N)
WINDOW_CASES = [
    (dc.Dilated((8, 16, 32), (1, 2, 4)), True, "sparse", "contiguous", 4, 2, 48),     # windows cross shards
    (dc.Dilated((8, 16, 32), (1, 2, 4)), False, "sparse", "zigzag", 4, 4, 48),
    (dc.Dilated((8, 24), (1, 3), mixing="head_groups"), True, "sparse", "contiguous", 6, 3, 48),
    (dc.Dilated((8, 16, 32), (1, 2, 4)), True, "ring", "contiguous", 4, 2, 48),
    (dc.Dilated((8, 16), (1, 2)), False, "ring", "zigzag", 4, 2, 64),
    (dc.Dilated((8, 16), (2, 4)), True, "sparse", "contiguous", 4, 2, 64),            # whole segments per shard
]


def _kernel_cases_worker(rank, world, cases, counted):
    """Per case ``(strategy, causal, mode, layout, hq, hkv, n)``: how many forward / backward calls of the module
    ``counted`` (``window`` or ``dense_steps``) ran the kernels, and the largest relative error of out, dq, dk, dv
    against the float64 reference."""
    import importlib

    from dilate_compiler.distributed import ring_attention, shard_sequence

    calls_of = importlib.import_module(f"dilate_compiler.distributed.{counted}").CALLS
    errors = []
    for strategy, causal, mode, layout, hq, hkv, n in cases:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 32, generator=g) for h in (hq, hkv, hkv))
        dout = torch.randn(1, hq, n, 32, generator=g)
        full = [t.double().requires_grad_() for t in (q, k, v)]
        ref = reference(strategy, *full, causal) if strategy is None else strategy.reference(*full, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, full, dout.double())
        shard = lambda t: shard_sequence(t, layout=layout)  # noqa: E731
        local = [shard(t).requires_grad_() for t in (q, k, v)]
        calls = dict(calls_of)
        out = ring_attention(*local, strategy, is_causal=causal, mode=mode, layout=layout)
        grads = torch.autograd.grad(out, local, shard(dout))
        ran = (calls_of["forward"] - calls["forward"], calls_of["backward"] - calls["backward"])
        errors.append((ran, max([rel_err(out, shard(ref))] + [rel_err(a, shard(b)) for a, b in zip(grads, ref_grads)])))
    return errors


@pytest.mark.slow
def test_window_kernels_equal_the_single_process_op():
    for errors in values(run_ranks(_kernel_cases_worker, 2, WINDOW_CASES, "window")):
        for case, (ran, err) in zip(WINDOW_CASES, errors):
            assert ran == (1, 1), (case, ran)
            assert err <= REL_ERR[torch.float32], (case, err)


DENSE_STEP_CASES = [   # dense ring steps on the block-sparse kernels (strategy None)
    (None, True, "ring", "contiguous", 4, 2, 64),
    (None, False, "ring", "contiguous", 4, 4, 64),
    (None, True, "ring", "zigzag", 4, 2, 64),       # rank 0: two runs of 16; rank 1: one run of 32
    (None, True, "ring", "contiguous", 2, 2, 50),   # shards of 25 rows: ragged blocks
]


@pytest.mark.slow
def test_dense_ring_steps_run_the_kernels_and_equal_dense_attention():
    for errors in values(run_ranks(_kernel_cases_worker, 2, DENSE_STEP_CASES, "dense_steps")):
        for case, (ran, err) in zip(DENSE_STEP_CASES, errors):
            assert ran == (2, 2) or (case[1] and ran == (1, 1)), (case, ran)   # causal: a rank may skip a shard
            assert err <= REL_ERR[torch.float32], (case, err)


def _bytes_worker(rank, world):
    from dilate_compiler.distributed import count_bytes, head_parallel_attention, ring_attention, shard_sequence

    B, Hkv, Dh = 2, 2, 8
    got = {}

    def run(name, strategy, n, mode="auto", causal=False, backward=False):
        g = torch.Generator().manual_seed(0)
        q, k, v = (shard_sequence(torch.randn(B, Hkv, n, Dh, generator=g, dtype=torch.float64)).requires_grad_()
                   for _ in range(3))
        with count_bytes() as fwd:
            out = ring_attention(q, k, v, strategy, is_causal=causal, mode=mode)
        with count_bytes() as bwd:
            if backward:
                out.sum().backward()
        got[name] = (fwd.sent_bytes("kv"), fwd.received_bytes("kv"), bwd.sent_bytes("kv"), bwd.sent_bytes("grad"))

    run("dense", None, 96, causal=True, backward=True)
    run("dilated-144", dc.Dilated((48,), (4,)), 144, backward=True)
    run("dilated-240", dc.Dilated((48,), (4,)), 240)
    run("dilated-aligned", dc.Dilated((24, 48), (2, 4)), 96)
    run("dilated-ring", dc.Dilated((48,), (4,)), 144, mode="ring")
    run("local-1", dc.BlockSparse(P.local(1), block_size=8), 96)
    run("local-2", dc.BlockSparse(P.local(2), block_size=8), 96)
    # head-parallel: q/k/v shards out to their heads' ranks and the output back; backward the reverse
    q, k, v = (shard_sequence(torch.randn(B, 4, 96, Dh, dtype=torch.float64)).requires_grad_() for _ in range(3))
    with count_bytes() as fwd:
        out = head_parallel_attention(q, k, v, dc.Dilated((24, 48), (2, 4)))
    with count_bytes() as bwd:
        out.sum().backward()
    got["head_parallel"] = (fwd.sent_bytes("heads"), fwd.received_bytes("heads"), bwd.sent_bytes("heads"),
                            bwd.received_bytes("heads"), fwd.messages, bwd.messages)
    return got


@pytest.mark.slow
def test_bytes_moved_follow_the_pattern():
    got = values(run_ranks(_bytes_worker, 2))
    row_bytes = 2 * 2 * 2 * 8 * 8          # k and v, B=2, Hkv=2, D=8, float64: bytes per sequence row
    for r in range(2):
        g = got[r]
        # dense ring: one hop of the whole K/V shard forward, again backward, and the fp64 dK/dV home in 2 hops
        assert g["dense"] == (48 * row_bytes, 48 * row_bytes, 48 * row_bytes, 2 * 48 * row_bytes)
        # dilated w=48, r=4: only the segment straddling the shard boundary travels, one row in 4 per head
        # (24 rows of it on the other rank -> 6 per kv head), whatever N is
        assert g["dilated-144"][:2] == (6 * row_bytes, 6 * row_bytes)
        assert g["dilated-240"][:2] == g["dilated-144"][:2]
        # backward: the same rows again, and their gradients back to their owners (fp64 accumulators here)
        assert g["dilated-144"][2] == g["dilated-144"][3] == g["dilated-144"][0]
        assert g["dilated-ring"][0] == 72 * row_bytes           # the ring sends the whole shard instead
        # segments that don't cross a shard boundary need no communication at all
        assert g["dilated-aligned"] == (0, 0, 0, 0)
        # block-diagonal blocks need nothing from the other rank; local(2) only the one key block across the boundary
        assert g["local-1"] == (0, 0, 0, 0)
        assert g["local-2"][:2] == (8 * row_bytes, 8 * row_bytes)
        # head-parallel, 4 heads on 2 ranks: q and k/v stacked (2 heads x 48 rows each) out and the output back,
        # forward; the output's gradient out and dq, dk/dv back, backward: the same bytes, one message per
        # all-to-all (three each way), and forward one more: the agreement check's all_gather
        moved = 4 * 2 * 48 * 8 * 2 * 8          # 4 tensors, 2 heads, 48 rows, D=8, B=2, float64
        assert g["head_parallel"] == (moved, moved, moved, moved, 3 + 1, 3)


def _failing_worker(rank, world):
    from dilate_compiler.distributed import ring_attention

    if rank == 1:
        raise RuntimeError("rank 1 fails before attention, on purpose")
    q = torch.randn(1, 2, 8, 4)
    start = time.monotonic()
    try:
        ring_attention(q, q, q)
    except Exception as e:   # noqa: BLE001
        return ("raised", type(e).__name__, time.monotonic() - start)
    return ("returned", "", time.monotonic() - start)


@pytest.mark.slow
def test_a_failing_rank_makes_the_others_raise_not_hang():
    results = run_ranks(_failing_worker, 2, timeout=120, pg_timeout_s=15)
    assert results[1][0] == "error" and "on purpose" in results[1][1]
    assert results[0][0] == "ok", results[0]
    outcome, _, seconds = results[0][1]
    assert outcome == "raised" and seconds < 60, results[0][1]


def _mismatch_worker(rank, world):
    from dilate_compiler.distributed import ring_attention

    q = torch.randn(1, 2, 8 + 2 * rank, 4)
    try:
        ring_attention(q, q, q)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_ranks_with_different_shard_shapes_all_get_a_clear_error():
    for message in values(run_ranks(_mismatch_worker, 2)):
        assert "ranks of the process group differ in q shape" in message, message
        assert "rank 0: (1, 2, 8, 4), rank 1: (1, 2, 10, 4)" in message, message


def test_errors_without_a_process_group_and_for_bad_arguments():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dc.distributed.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="mode must be one of"):
        dc.SequenceParallel(None, mode="allgather")
    with pytest.raises(ValueError, match="mode='sparse' with dense"):
        dc.SequenceParallel(None, mode="sparse")
    with pytest.raises(ValueError, match="fixed pattern"):
        dc.SequenceParallel(dc.BlockSparse("auto"))
    with pytest.raises(TypeError, match="inner must be"):
        dc.SequenceParallel("dilated")
    with pytest.raises(ValueError, match="layout must be one of"):
        dc.SequenceParallel(None, layout="striped")
    report = dc.explain(Block(16), (torch.randn(1, 8, 16),), dc.SequenceParallel(None))
    assert len(report.skipped) == 1 and "init_process_group" in report.skipped[0].reason


def _model_worker(rank, world, inner_name, mode, layout, compile_it):
    import torch.distributed as dist

    from dilate_compiler.backend import dilated_backend
    from dilate_compiler.distributed import shard_sequence

    inner = STRATEGIES[inner_name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(16), Block(16)).double()
    x = torch.randn(2, N, 16, dtype=torch.float64)
    dout = torch.randn(2, N, 16, dtype=torch.float64)
    # single process, whole sequence, the inner strategy (dense: the model itself)
    ref_model = model if inner is None else dc.rewrite(model, (x,), strategy=inner).module
    ref = ref_model(x)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), dout)
    # every rank: its shard, the model rewritten to sequence-parallel attention
    strategy = dc.SequenceParallel(inner, mode=mode, layout=layout)
    x_local = shard_sequence(x, dim=1, layout=layout)
    if compile_it:
        run = torch.compile(model, backend=lambda gm, ex: dilated_backend(gm, ex, {"strategy": strategy}))
        report = "compiled"
    else:
        res = dc.rewrite(model, (x_local,), strategy=strategy)
        run, report = res.module, str(res.report)
    out = run(x_local)
    grads = torch.autograd.grad(out, list(model.parameters()), shard_sequence(dout, dim=1, layout=layout))
    for g in grads:               # each rank holds its shard's share of the parameter gradients
        dist.all_reduce(g)
    err = max([rel_err(out, shard_sequence(ref, dim=1, layout=layout))] +
              [rel_err(a, b) for a, b in zip(grads, ref_grads)])
    return err, report


@pytest.mark.slow
@pytest.mark.parametrize("inner,mode,layout,compile_it", [
    ("dense", "auto", "zigzag", False),
    ("dilated-lse", "auto", "contiguous", False),
    ("block-sparse", "head_parallel", "contiguous", False),
    ("dilated-lse", "sparse", "contiguous", True),
    ("dense", "head_parallel", "contiguous", True),
])
def test_rewrite_and_compile_make_a_sharded_model_equal_the_whole_one(inner, mode, layout, compile_it):
    for err, report in values(run_ranks(_model_worker, 2, inner, mode, layout, compile_it)):
        assert err <= REL_ERR[torch.float64], err
        if not compile_it:
            assert "2 attention site(s): 2 rewritten" in report, report


def _modules_worker(rank, world):
    from dilate_compiler.distributed import shard_sequence

    torch.manual_seed(0)
    x = torch.randn(2, N, 32, dtype=torch.float64)
    kw = dict(embed_dim=32, num_heads=4, num_kv_heads=2, dtype=torch.float64)
    dil = dict(segment_lengths=(8, 16, 48), dilation_rates=(1, 2, 4))
    pairs = [
        (dc.nn.create_multihead_dilated_attention("improved", **kw, **dil),
         dc.nn.create_multihead_dilated_attention("ring", **kw, **dil)),
        (dc.nn.create_multihead_dilated_attention("improved", **kw, **dil),
         dc.nn.create_multihead_dilated_attention("head_parallel", layout="zigzag", **kw, **dil)),
        (dc.nn.create_block_sparse_attention("multihead", pattern=P.local(2), block_size=8, **kw),
         dc.nn.create_block_sparse_attention("distributed", pattern=P.local(2), block_size=8, **kw)),
    ]
    errors = []
    for whole, sharded in pairs:
        sharded.load_state_dict(whole.state_dict())
        layout = sharded.attention.config.layout
        ref = whole(x, is_causal=True)[0]
        out = sharded(shard_sequence(x, dim=1, layout=layout), is_causal=True)[0]
        errors.append(rel_err(out, shard_sequence(ref, dim=1, layout=layout)))
    return errors


@pytest.mark.slow
def test_factory_kinds_equal_their_single_process_modules():
    for errors in values(run_ranks(_modules_worker, 2)):
        assert max(errors) <= REL_ERR[torch.float64], errors


def test_dense_step_pairs_are_whole_empty_or_diagonal():
    """A ring step's (query piece, key piece) pairs: whole (every key before every query), empty, or the
    diagonal; runs are cut to their common length (zigzag: rank 1's two chunks are adjacent, one run of 16);
    pieces that overlap without being equal leave the step to the exact path."""
    from dilate_compiler.distributed.dense_steps import pairs
    from dilate_compiler.distributed.links import positions

    zig0 = positions([(0, 8), (24, 32)])            # zigzag, 2 ranks of 16 rows: rank 0 and rank 1
    zig1 = positions([(8, 16), (16, 24)])
    assert pairs(zig0, zig0, True) == [(0, 8, 0, 8, True), (8, 16, 0, 8, False), (8, 16, 8, 16, True)]
    assert pairs(zig0, zig1, True) == [(8, 16, 0, 8, False), (8, 16, 8, 16, False)]
    assert pairs(zig1, zig0, True) == [(0, 8, 0, 8, False), (8, 16, 0, 8, False)]
    assert pairs(zig1, zig1, True) == [(0, 16, 0, 16, True)]                  # one run: one diagonal pair
    assert len(pairs(zig0, zig1, False)) == 4
    assert pairs(positions([(16, 32)]), positions([(0, 8)]), True) == [(0, 8, 0, 8, False), (8, 16, 0, 8, False)]
    assert pairs(positions([(0, 16)]), positions([(8, 24)]), True) is None     # overlapping, not the diagonal
