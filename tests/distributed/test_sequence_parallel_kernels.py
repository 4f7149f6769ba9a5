"""Every inner strategy of sequence-parallel attention on the Triton kernels per rank (with and without key padding),
``dc.Hilbert`` as an inner strategy, and the ring backward's overlapped dK/dV hop, on gloo process groups of spawned
ranks.

The kernels run here in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, float32 and float16: how the
distributed ops pick them on CPU, ``dispatch.interpreter_runs``); float64 runs the exact path. Every case checks the
output and dq/dk/dv shards against the float64 single-process reference, and that the kernels ran (the per-rank
compute modules count their calls). With key padding the kernel path is also checked against the exact path of the
same sharded call (float64), and query rows that keep no key must be exactly 0, output and dq.
"""

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.launch import run_ranks, values
from tests.distributed.test_sequence_parallel import reference
from tests.distributed.test_sequence_parallel_masks import single_process
from tests.test_backend import Block   # per-token ops around one causal SDPA
from tests.tolerances import REL_ERR, rel_err

SLIDING = dc.BlockSparse(P.sliding_window(20), block_size=16)
LOCAL_GLOBAL = dc.BlockSparse(P.local(1) | P.global_tokens(3), block_size=16)
DILATED_BLOCKS = dc.BlockSparse(P.dilated((2, 3)), block_size=16)   # block distances 0, 2, 3, 4: not 1, 5
PER_HEAD = dc.BlockSparse(P.random(1, seed=5, per_head=True) | P.local(1), block_size=16)
HILBERT_BLOCKS = dc.Hilbert((8, 8), dc.BlockSparse(P.sliding_window(12), block_size=16))
HILBERT_DILATED = dc.Hilbert((8, 8), dc.Dilated((16, 32), (1, 2)))

# (strategy, causal, mode, layout, Hq, Hkv, N, dtype, counted): ``counted`` is the module whose kernel calls must run
BLOCK_CASES = [
    (SLIDING, False, "sparse", "contiguous", 4, 2, 64, torch.float32, "held_blocks"),
    (SLIDING, True, "sparse", "zigzag", 4, 4, 64, torch.float32, "held_blocks"),
    (SLIDING, True, "ring", "contiguous", 4, 2, 64, torch.float32, "held_blocks"),
    (SLIDING, False, "ring", "zigzag", 4, 2, 64, torch.float32, "held_blocks"),
    (LOCAL_GLOBAL, True, "sparse", "contiguous", 4, 2, 64, torch.float32, "held_blocks"),
    (LOCAL_GLOBAL, False, "ring", "contiguous", 4, 4, 64, torch.float32, "held_blocks"),
    (DILATED_BLOCKS, False, "sparse", "contiguous", 4, 2, 96, torch.float32, "held_blocks"),
    (DILATED_BLOCKS, True, "ring", "contiguous", 4, 2, 96, torch.float32, "held_blocks"),
    (PER_HEAD, False, "sparse", "contiguous", 4, 2, 96, torch.float32, "held_blocks"),   # kv heads receive unlike
    (SLIDING, True, "sparse", "contiguous", 2, 2, 50, torch.float32, "held_blocks"),    # shards of 25: ragged
    (SLIDING, False, "ring", "contiguous", 2, 1, 50, torch.float32, "held_blocks"),
    (SLIDING, True, "sparse", "contiguous", 4, 2, 64, torch.float16, "held_blocks"),
    (LOCAL_GLOBAL, False, "ring", "contiguous", 4, 2, 64, torch.float16, "held_blocks"),
]
HILBERT_CASES = [
    (HILBERT_BLOCKS, False, "sparse", "contiguous", 4, 2, 64, torch.float32, "held_blocks"),
    (HILBERT_BLOCKS, False, "ring", "zigzag", 4, 2, 64, torch.float32, "held_blocks"),
    (HILBERT_DILATED, False, "sparse", "contiguous", 4, 2, 64, torch.float32, "window"),
    (HILBERT_DILATED, False, "ring", "contiguous", 4, 4, 64, torch.float32, "window"),
    (HILBERT_DILATED, False, "sparse", "contiguous", 4, 2, 64, torch.float16, "window"),
    (HILBERT_BLOCKS, False, "ring", "contiguous", 4, 2, 64, torch.float16, "held_blocks"),
]
DENSE_CASES = [   # dense attention in ring mode (dense_steps), and in fp16
    (None, True, "ring", "contiguous", 4, 2, 64, torch.float16, "dense_steps"),
]


def _reference(strategy, q, k, v, causal):
    if isinstance(strategy, dc.Hilbert):
        return strategy.attention(q, k, v)
    return reference(strategy, q, k, v, causal)


def _kernel_worker(rank, world, cases):
    """Per case: (forward, backward) kernel calls of the case's counted module, and the largest relative error of
    out, dq, dk, dv against the float64 reference (shards of the curve-ordered sequence for ``dc.Hilbert``)."""
    import importlib

    from dilate_compiler.distributed import ring_attention, shard_sequence

    results = []
    for strategy, causal, mode, layout, hq, hkv, n, dtype, counted in cases:
        calls_of = importlib.import_module(f"dilate_compiler.distributed.{counted}").CALLS
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 32, generator=g) for h in (hq, hkv, hkv))
        dout = torch.randn(1, hq, n, 32, generator=g)
        full = [t.double().requires_grad_() for t in (q, k, v)]
        ref = _reference(strategy, *full, causal)
        ref_grads = torch.autograd.grad(ref, full, dout.double())
        order = strategy if isinstance(strategy, dc.Hilbert) else None
        shard = lambda t: shard_sequence(t, layout=layout, order=order)  # noqa: E731
        local = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
        calls = dict(calls_of)
        out = ring_attention(*local, strategy, is_causal=causal, mode=mode, layout=layout)
        grads = torch.autograd.grad(out, local, shard(dout).to(dtype))
        ran = (calls_of["forward"] - calls["forward"], calls_of["backward"] - calls["backward"])
        err = max([rel_err(out, shard(ref))] + [rel_err(a, shard(b)) for a, b in zip(grads, ref_grads)])
        results.append((ran, err, out.dtype == dtype and all(x.dtype == dtype for x in grads)))
    return results


def _check(cases, results_per_rank):
    for results in results_per_rank:
        for case, (ran, err, dtypes_kept) in zip(cases, results):
            strategy, dtype = case[0], case[7]
            if case[-1] == "dense_steps":
                assert ran in ((2, 2), (1, 1)), (case, ran)   # causal: a rank may skip a shard it doesn't see
            else:
                assert ran == (1, 1), (case, ran)
            assert err <= REL_ERR[dtype], (case, err)
            assert dtypes_kept, case


@pytest.mark.slow
def test_block_sparse_ranks_run_the_kernels_and_equal_the_single_process_op():
    _check(BLOCK_CASES, values(run_ranks(_kernel_worker, 2, BLOCK_CASES)))


@pytest.mark.slow
def test_hilbert_ranks_run_the_kernels_and_equal_the_single_process_hilbert_op():
    _check(HILBERT_CASES + DENSE_CASES, values(run_ranks(_kernel_worker, 2, HILBERT_CASES + DENSE_CASES)))


ONE_RANK_CASES = [   # a ring of one (how the benchmark measures a rank's compute): the shard is the whole sequence
    (SLIDING, True, "sparse", "contiguous", 4, 2, 64, torch.float32, "held_blocks"),
    (LOCAL_GLOBAL, False, "ring", "contiguous", 4, 2, 64, torch.float32, "held_blocks"),
    (HILBERT_DILATED, False, "ring", "contiguous", 4, 2, 64, torch.float32, "window"),
    (HILBERT_BLOCKS, False, "sparse", "contiguous", 4, 4, 64, torch.float32, "held_blocks"),
]


@pytest.mark.slow
def test_one_rank_runs_the_kernels_on_its_whole_shard():
    _check(ONE_RANK_CASES, values(run_ranks(_kernel_worker, 1, ONE_RANK_CASES)))


# --- dc.Hilbert as an inner strategy, exact path (float64) ---------------------------------------------------------

HILBERT_EXACT = [   # (strategy, api, mode, layout, Hq, Hkv)
    (dc.Hilbert((6, 8), dc.BlockSparse(P.sliding_window(9), block_size=8)), "ring", "sparse", "contiguous", 4, 2),
    (dc.Hilbert((6, 8), dc.BlockSparse(P.neighborhood((6, 8), 1), block_size=8)), "ring", "ring", "zigzag", 4, 4),
    (dc.Hilbert((6, 8), dc.Dilated((8, 16), (1, 2)), extra_tokens="inner"), "ring", "sparse", "contiguous", 4, 2),
    (dc.Hilbert((5, 9), dc.BlockSparse(P.local(1), block_size=8)), "ring", "ring", "contiguous", 2, 2),  # 3 extra
    (dc.Hilbert((6, 8), dc.BlockSparse(P.sliding_window(9), block_size=8)), "heads", None, "contiguous", 4, 4),
]


def _hilbert_exact_worker(rank, world, cases):
    from dilate_compiler.distributed import gather_sequence, head_parallel_attention, ring_attention, shard_sequence

    errors = []
    for strategy, api, mode, layout, hq, hkv in cases:
        g = torch.Generator().manual_seed(2)
        n = 48
        q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        dout = torch.randn(2, hq, n, 8, generator=g, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = strategy.attention(*full)
        ref_grads = torch.autograd.grad(ref, full, dout)
        shard = lambda t: shard_sequence(t, layout=layout, order=strategy)  # noqa: E731
        local = [shard(t).requires_grad_() for t in (q, k, v)]
        if api == "ring":
            out = ring_attention(*local, strategy, mode=mode, layout=layout)
        else:
            out = head_parallel_attention(*local, strategy, layout=layout)
        grads = torch.autograd.grad(out, local, shard(dout))
        whole = gather_sequence(out, layout=layout, order=strategy)       # back in row-major order
        errors.append(max([rel_err(out, shard(ref)), rel_err(whole, ref)] +
                          [rel_err(a, shard(b)) for a, b in zip(grads, ref_grads)]))
    return errors


@pytest.mark.slow
def test_hilbert_inner_strategy_equals_the_single_process_hilbert_op():
    for errors in values(run_ranks(_hilbert_exact_worker, 2, HILBERT_EXACT)):
        assert max(errors) <= REL_ERR[torch.float64], errors


class BidirectionalBlock(torch.nn.Module):
    """Per-token layers around one non-causal SDPA (a ViT block's shape): a curve-ordered shard runs it unchanged."""

    def __init__(self, E=16, H=2):
        super().__init__()
        self.qkv, self.o, self.H = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E), H

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, E))


def _hilbert_model_worker(rank, world, mode):
    import torch.distributed as dist

    from dilate_compiler.distributed import shard_sequence

    inner = dc.Hilbert((6, 8), dc.BlockSparse(P.sliding_window(9), block_size=8))
    torch.manual_seed(0)
    model = torch.nn.Sequential(BidirectionalBlock(), BidirectionalBlock()).double()
    x = torch.randn(2, 48, 16, dtype=torch.float64)
    dout = torch.randn(2, 48, 16, dtype=torch.float64)
    ref = dc.rewrite(model, (x,), strategy=inner).module(x)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), dout)
    shard = lambda t: shard_sequence(t, dim=1, order=inner)  # noqa: E731
    res = dc.rewrite(model, (shard(x),), strategy=dc.SequenceParallel(inner, mode=mode))
    out = res.module(shard(x))
    grads = torch.autograd.grad(out, list(model.parameters()), shard(dout))
    for g in grads:
        dist.all_reduce(g)
    return max([rel_err(out, shard(ref))] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]), str(res.report)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sparse", "head_parallel"])
def test_a_model_rewritten_with_a_hilbert_inner_strategy_equals_the_single_process_rewrite(mode):
    for err, report in values(run_ranks(_hilbert_model_worker, 2, mode)):
        assert err <= REL_ERR[torch.float64], err
        assert "2 attention site(s): 2 rewritten" in report, report


def _hilbert_errors_worker(rank, world):
    from dilate_compiler.distributed import head_parallel_attention, ring_attention, shard_sequence

    strategy = dc.Hilbert((6, 8), dc.BlockSparse(P.local(1), block_size=8))
    q = torch.randn(1, 2, 24, 8, dtype=torch.float64)
    errors = []
    for call in (lambda: ring_attention(q, q, q, strategy, is_causal=True),
                 lambda: head_parallel_attention(q, q, q, strategy, is_causal=True),
                 lambda: ring_attention(q[:, :, :20], q[:, :, :20], q[:, :, :20], strategy),
                 lambda: ring_attention(q, q, q, dc.Hilbert(None, dc.BlockSparse(P.local(1), block_size=8))),
                 lambda: shard_sequence(torch.randn(1, 2, 48, 8), order=torch.arange(47))):
        try:
            call()
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    causal_model = Block(16)    # a causal SDPA site: skipped, with the reason
    report = dc.explain(causal_model, (torch.randn(1, 24, 16),), dc.SequenceParallel(strategy))
    errors.append(" ".join(s.reason for s in report.skipped) if report.skipped and not report.rewritten else
                  str(report))
    return errors


@pytest.mark.slow
def test_hilbert_inner_strategy_errors_name_what_does_not_fit():
    for errors in values(run_ranks(_hilbert_errors_worker, 2)):
        assert "is_causal=True with dc.Hilbert" in errors[0] and errors[0] == errors[1], errors[:2]
        assert "seq_len=40" in errors[2], errors[2]
        assert "grid=None" in errors[3], errors[3]
        assert "permutation of the 48" in errors[4], errors[4]
        assert "is_causal=True with dc.Hilbert" in errors[5], errors[5]


# --- the ring backward's dK/dV hop overlaps the next step's compute -------------------------------------------------


def _ring_backward_events_worker(rank, world):
    """The order of the ring backward's hop starts, hop waits and step computes on this rank (dense, exact path)."""
    from dilate_compiler.distributed import comm, ring_attention, shard_sequence
    from dilate_compiler.distributed import sequence_parallel as sp

    events = []
    start, wait, attend = comm.RingShift.start, comm.RingShift.wait, sp.attend_backward

    def logged_start(self, t):
        events.append(("start", self.kind, id(self)))
        return start(self, t)

    def logged_wait(self):
        events.append(("wait", self.kind, id(self)))
        return wait(self)

    def logged_attend(*args, **kwargs):
        events.append(("compute", None, None))
        return attend(*args, **kwargs)

    comm.RingShift.start, comm.RingShift.wait, sp.attend_backward = logged_start, logged_wait, logged_attend
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 2, 48, 8, generator=g, dtype=torch.float64) for _ in range(4))
    local = [shard_sequence(t).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, None, mode="ring")
    events.clear()
    torch.autograd.grad(out, local, shard_sequence(dout))
    return events


@pytest.mark.slow
def test_each_dkdv_hop_but_the_last_is_in_flight_during_a_step_compute():
    world = 3
    for events in values(run_ranks(_ring_backward_events_worker, world)):
        grad_starts = [i for i, (what, kind, _) in enumerate(events) if what == "start" and kind == "grad"]
        assert len(grad_starts) == world, events                 # P hops take every accumulator home
        assert sum(what == "compute" for what, _, _ in events) == world, events
        for i in grad_starts:
            done = next(j for j in range(i + 1, len(events)) if events[j][0] == "wait" and events[j][2] == events[i][2])
            between = [e[0] for e in events[i + 1:done]]
            assert ("compute" in between) == (i != grad_starts[-1]), (i, events)


# --- key padding on the kernels --------------------------------------------------------------------------------------

PAD_N = 64
DILATED_CROSSING = dc.Dilated((16, 64), (1, 4))   # the 64-branch crosses the shards: windows hold received rows
DILATED_OWN = dc.Dilated((16, 32), (1, 2))        # shards of whole segments: each rank's window is its own shard

# (strategy, causal, mode, layout, Hq, Hkv, batch rows of key_keep, dtype, counted)
PAD_WINDOW_CASES = [
    (DILATED_CROSSING, True, "sparse", "contiguous", 4, 2, 2, torch.float32, "window"),
    (DILATED_CROSSING, False, "ring", "zigzag", 4, 2, 2, torch.float32, "window"),
    (DILATED_CROSSING, True, "ring", "contiguous", 2, 2, 1, torch.float32, "window"),
    (DILATED_OWN, True, "sparse", "contiguous", 4, 2, 2, torch.float32, "window"),
    (DILATED_CROSSING, False, "sparse", "zigzag", 4, 2, 2, torch.float16, "window"),
]
PAD_BLOCK_CASES = [
    (SLIDING, True, "sparse", "contiguous", 4, 2, 2, torch.float32, "held_blocks"),
    (SLIDING, False, "ring", "zigzag", 4, 2, 2, torch.float32, "held_blocks"),
    (LOCAL_GLOBAL, False, "sparse", "contiguous", 4, 2, 1, torch.float32, "held_blocks"),
    (LOCAL_GLOBAL, True, "ring", "contiguous", 4, 2, 2, torch.float32, "held_blocks"),
    (DILATED_BLOCKS, False, "sparse", "contiguous", 4, 2, 2, torch.float32, "held_blocks"),
    (DILATED_BLOCKS, True, "ring", "contiguous", 4, 2, 2, torch.float16, "held_blocks"),
]
PAD_DENSE_CASES = [
    (None, True, "ring", "contiguous", 4, 2, 2, torch.float32, "dense_steps"),
    (None, False, "ring", "zigzag", 4, 2, 1, torch.float32, "dense_steps"),
    (None, True, "ring", "zigzag", 2, 1, 2, torch.float16, "dense_steps"),
]


def pad_keep(rows: int) -> torch.Tensor:
    """Row 0: left padding (its first queries keep no key when causal, or when their segment or window is all
    padding); row 1: a hole across a block boundary and right padding."""
    keep = torch.ones(rows, PAD_N, dtype=torch.bool)
    keep[0, :24] = False
    if rows > 1:
        keep[1, 28:37] = False
        keep[1, 52:] = False
    return keep


def _padded_worker(rank, world, cases):
    """Per case: (forward, backward) kernel calls of the case's counted module; the largest relative error of the
    kernel path's out, dq, dk, dv against the float64 exact path of the same sharded call and against the float64
    single-process op; how many query rows keep no key (reference 0) and whether the kernel path's output and dq are
    exactly 0 there; whether dtypes were kept."""
    import importlib

    from dilate_compiler.distributed import ring_attention, shard_sequence

    results = []
    for strategy, causal, mode, layout, hq, hkv, rows, dtype, counted in cases:
        calls_of = importlib.import_module(f"dilate_compiler.distributed.{counted}").CALLS
        g = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(2, h, PAD_N, 32, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        dout = torch.randn(2, hq, PAD_N, 32, generator=g, dtype=torch.float64)
        keep = pad_keep(rows)
        shard = lambda t, dim=2: shard_sequence(t, dim=dim, layout=layout)  # noqa: E731
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = single_process(strategy, *full, causal, keep)
        ref_grads = torch.autograd.grad(ref, full, dout)

        def sharded(dt):
            local = [shard(t).to(dt).requires_grad_() for t in (q, k, v)]
            out = ring_attention(*local, strategy, is_causal=causal, mode=mode, layout=layout,
                                 key_keep=shard(keep, 1))
            return (out,) + torch.autograd.grad(out, local, shard(dout).to(dt))

        exact = sharded(torch.float64)
        calls = dict(calls_of)
        got = sharded(dtype)
        ran = (calls_of["forward"] - calls["forward"], calls_of["backward"] - calls["backward"])
        err_exact = max(rel_err(a, b) for a, b in zip(got, exact))
        err_ref = max(rel_err(a, shard(b)) for a, b in zip(got, (ref,) + ref_grads))
        empty = (shard(ref) == 0).all(-1)                                   # [B, Hq, S]: rows that keep no key
        zero_there = bool((got[0][empty] == 0).all() and (got[1][empty] == 0).all())
        dtypes_kept = all(t.dtype == dtype for t in got)
        results.append((ran, err_exact, err_ref, int(empty.sum()), zero_there, dtypes_kept))
    return results


def _check_padded(cases, results_per_rank):
    for rank, results in enumerate(results_per_rank):
        for case, (ran, err_exact, err_ref, empty, zero_there, dtypes_kept) in zip(cases, results):
            causal, layout, dtype = case[1], case[3], case[7]
            if case[-1] == "dense_steps":
                assert ran in ((2, 2), (1, 1)), (case, ran)   # causal: a rank may skip a shard it doesn't see
            else:
                assert ran == (1, 1), (case, ran)
            assert err_exact <= REL_ERR[dtype], (case, "against the exact path", err_exact)
            assert err_ref <= REL_ERR[dtype], (case, "against the single-process op", err_ref)
            if causal and (rank == 0 or layout == "zigzag"):   # left padding: the sequence's first queries keep none
                assert empty > 0, case
            assert zero_there, case
            assert dtypes_kept, case


@pytest.mark.slow
def test_key_padding_runs_the_window_kernels_and_equals_the_exact_path():
    _check_padded(PAD_WINDOW_CASES, values(run_ranks(_padded_worker, 2, PAD_WINDOW_CASES, timeout=900)))


@pytest.mark.slow
def test_key_padding_runs_the_held_block_kernels_and_equals_the_exact_path():
    _check_padded(PAD_BLOCK_CASES, values(run_ranks(_padded_worker, 2, PAD_BLOCK_CASES, timeout=900)))


@pytest.mark.slow
def test_key_padding_runs_the_dense_ring_step_kernels_and_equals_the_exact_path():
    _check_padded(PAD_DENSE_CASES, values(run_ranks(_padded_worker, 2, PAD_DENSE_CASES, timeout=900)))


PAD_ONE_RANK_CASES = [   # a ring of one: the kernels on the whole sequence in order, with key padding
    (DILATED_CROSSING, True, "sparse", "contiguous", 4, 2, 2, torch.float32, "window"),
    (SLIDING, False, "ring", "contiguous", 4, 2, 2, torch.float32, "held_blocks"),
    (LOCAL_GLOBAL, True, "sparse", "contiguous", 4, 2, 1, torch.float32, "held_blocks"),
    (None, True, "ring", "contiguous", 4, 2, 2, torch.float32, "dense_steps"),
]


@pytest.mark.slow
def test_key_padding_on_one_rank_runs_the_kernels_on_its_whole_shard():
    _check_padded(PAD_ONE_RANK_CASES, values(run_ranks(_padded_worker, 1, PAD_ONE_RANK_CASES, timeout=900)))


# (strategy, causal, Hq, Hkv, batch rows of key_keep, dtype, counted, ranks whose heads run the kernels)
PAD_HEAD_PARALLEL_CASES = [
    (None, True, 4, 2, 2, torch.float32, "dense_steps", (0, 1)),
    (dc.Dilated((16, 64), (1, 2)), True, 4, 2, 2, torch.float32, "window", (0, 1)),   # rank 1's heads from 2
    (dc.Dilated((16, 64), (1, 4)), False, 4, 2, 1, torch.float32, "window", (0,)),    # from 2: not a multiple of 4
    (SLIDING, False, 4, 2, 2, torch.float32, "held_blocks", ()),                     # a block-sparse head subset
]


def _padded_head_parallel_worker(rank, world, cases):
    """Head-parallel attention with key padding (the hybrid without a sequence stage: each rank's heads over the
    whole sequence as a ring of one): per case, (forward, backward) kernel calls of the counted module and the
    largest relative error of out, dq, dk, dv against the float64 single-process op."""
    import importlib

    from dilate_compiler.distributed import hybrid_attention, shard_sequence

    results = []
    for strategy, causal, hq, hkv, rows, dtype, counted, _ in cases:
        calls_of = importlib.import_module(f"dilate_compiler.distributed.{counted}").CALLS
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(2, h, PAD_N, 32, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        dout = torch.randn(2, hq, PAD_N, 32, generator=g, dtype=torch.float64)
        keep = pad_keep(rows)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = single_process(strategy, *full, causal, keep)
        ref_grads = torch.autograd.grad(ref, full, dout)
        local = [shard_sequence(t).to(dtype).requires_grad_() for t in (q, k, v)]
        calls = dict(calls_of)
        out = hybrid_attention(*local, strategy, head_group=None, sequence_group=None, is_causal=causal,
                               key_keep=shard_sequence(keep, dim=1))
        grads = torch.autograd.grad(out, local, shard_sequence(dout).to(dtype))
        ran = (calls_of["forward"] - calls["forward"], calls_of["backward"] - calls["backward"])
        results.append((ran, max(rel_err(a, shard_sequence(b)) for a, b in zip((out,) + grads, (ref,) + ref_grads))))
    return results


@pytest.mark.slow
def test_key_padding_on_head_parallel_ranks_runs_the_kernels_where_they_take_the_heads():
    results = values(run_ranks(_padded_head_parallel_worker, 2, PAD_HEAD_PARALLEL_CASES, timeout=900))
    for rank, per_case in enumerate(results):
        for case, (ran, err) in zip(PAD_HEAD_PARALLEL_CASES, per_case):
            assert ran == ((1, 1) if rank in case[-1] else (0, 0)), (rank, case, ran)
            assert err <= REL_ERR[case[5]], (rank, case, err)
