"""Sequence-parallel attention with key padding and model masks, on gloo process groups of 2 and 4 spawned ranks.

The key padding vector ``key_keep [B, N]`` is sharded as the keys are and travels with them (ring: around the
ring; sparse: the flags of the rows sent); rows that keep no key are 0, as in the single-process ops. Compared
with the single-process op on whole sequences (float64): outputs and dq/dk/dv.
"""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.launch import run_ranks, values
from tests.tolerances import REL_ERR, rel_err

N, D = 48, 8
STRATEGIES = {
    "dense": None,
    "dilated-lse": dc.Dilated((8, 16, 48), (1, 2, 4)),
    "dilated-head-groups": dc.Dilated((8, 24), (1, 3), mixing="head_groups"),
    "block-sparse": dc.BlockSparse(P.sliding_window(9) | P.global_tokens(2), block_size=8),
}

# (strategy, causal, mode, layout, Hq, Hkv, batch rows of key_keep)
CASES = [
    ("dense", True, "ring", "contiguous", 4, 2, 2),
    ("dense", False, "ring", "zigzag", 4, 4, 1),
    ("dilated-lse", True, "sparse", "contiguous", 4, 2, 2),
    ("dilated-lse", True, "ring", "zigzag", 4, 2, 2),
    ("dilated-lse", False, "sparse", "zigzag", 4, 4, 1),
    ("dilated-head-groups", True, "sparse", "contiguous", 6, 3, 2),
    ("block-sparse", True, "sparse", "contiguous", 4, 2, 2),
    ("block-sparse", False, "ring", "contiguous", 4, 2, 2),
]


def key_padding(batch: int) -> torch.Tensor:
    """Row 0: left padding (its first queries keep no key when causal); row 1: holes and right padding."""
    keep = torch.ones(batch, N, dtype=torch.bool)
    keep[0, :13] = False
    if batch > 1:
        keep[1, 20:23] = False
        keep[1, 40:] = False
    return keep


def single_process(strategy, q, k, v, causal, keep):
    """The single-process op with key padding ``keep`` on whole sequences (dense attention: one branch of rate 1
    as long as the sequence)."""
    if strategy is None:
        return dc.ops.dilated_attention(q, k, v, (q.shape[2],), (1,), is_causal=causal, key_keep=keep)
    if isinstance(strategy, dc.Dilated):
        return dc.ops.dilated_attention(q, k, v, strategy.segment_lengths, strategy.dilation_rates, is_causal=causal,
                                        mixing=strategy.mixing, key_keep=keep)
    return dc.ops.block_sparse_attention(q, k, v, strategy.pattern, block_size=strategy.block_size,
                                         is_causal=causal, key_keep=keep)


def _op_worker(rank, world, cases):
    from dilate_compiler.distributed import ring_attention, shard_sequence

    errors = {}
    for case in cases:
        name, causal, mode, layout, hq, hkv, rows = case
        strategy = STRATEGIES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, N, D, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
        dout = torch.randn(2, hq, N, D, generator=g, dtype=torch.float64)
        keep = key_padding(rows)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = single_process(strategy, *full, causal, keep)
        ref_grads = torch.autograd.grad(ref, full, dout)
        shard = lambda t, dim=2: shard_sequence(t, dim=dim, layout=layout)  # noqa: E731
        local = [shard(t).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, strategy, is_causal=causal, mode=mode, layout=layout, key_keep=shard(keep, 1))
        grads = torch.autograd.grad(out, local, shard(dout))
        errors[case] = max([rel_err(out, shard(ref))] + [rel_err(a, shard(b)) for a, b in zip(grads, ref_grads)])
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_key_padding_travels_with_the_keys(world):
    results = values(run_ranks(_op_worker, world, CASES))
    bad = [(r, case, err) for r, errs in enumerate(results) for case, err in errs.items()
           if not err <= REL_ERR[torch.float64]]
    assert not bad, bad


# --- transformers decoders rewritten to sequence-parallel attention -------------------------------------------------

HF_N = 24
HF_STRATEGY = dc.Dilated((8, 24), (1, 2))


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask, position_ids):
        return self.model(ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def hf_decoder(name: str, impl: str):
    import transformers as t

    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, use_cache=False, attn_implementation=impl)
    torch.manual_seed(0)
    model = t.LlamaModel(t.LlamaConfig(**kw)) if name == "llama" else t.Qwen2Model(t.Qwen2Config(**kw))
    return LastHidden(model.double().train())


def hf_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, HF_N), generator=g)
    mask = torch.ones(2, HF_N, dtype=torch.long)
    mask[0, :5] = 0                      # left padding: row 0's first queries keep no key
    ids[0, :5] = 0
    positions = torch.arange(HF_N).view(1, -1).expand(2, -1)
    dout = torch.randn(2, HF_N, 32, generator=g, dtype=torch.float64)
    return ids, mask, positions, dout


def _hf_worker(rank, world, models, mode):
    """Per (model, attention implementation): the sequence-parallel rewrite of the model on this rank's shard against
    the single-process rewrite on the whole batch: the largest relative error of the output and of every parameter
    gradient, and the sharded model's report."""
    import torch.distributed as dist

    from dilate_compiler.distributed import hybrid_groups, shard_sequence

    if mode == "hybrid":
        head_group, sequence_group = hybrid_groups(2)
        strategy = dc.SequenceParallel(HF_STRATEGY, mode="hybrid", head_group=head_group,
                                       sequence_group=sequence_group)
    else:
        strategy = dc.SequenceParallel(HF_STRATEGY, mode=mode)
    got = {}
    for name, impl in models:
        ids, mask, positions, dout = hf_inputs()
        model = hf_decoder(name, impl)
        whole = dc.rewrite(model, (ids,), HF_STRATEGY, example_kwargs={"attention_mask": mask,
                                                                       "position_ids": positions})
        ref = whole.module(ids, attention_mask=mask, position_ids=positions)
        names = [n for n, _ in whole.module.named_parameters()]
        ref_grads = torch.autograd.grad(ref, [p for _, p in whole.module.named_parameters()], dout)

        shard = lambda t: shard_sequence(t, dim=1)  # noqa: E731
        local = dict(attention_mask=shard(mask), position_ids=shard(positions))
        sharded = dc.rewrite(model, (shard(ids),), strategy, example_kwargs=local)
        out = sharded.module(shard(ids), **local)
        params = dict(sharded.module.named_parameters())
        grads = torch.autograd.grad(out, [params[n] for n in names], shard(dout), allow_unused=True)
        grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
        for g in grads:              # each rank holds its shard's share of the parameter gradients
            dist.all_reduce(g)
        errors = [rel_err(out, shard(ref))] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
        got[(name, impl)] = (max(errors), str(sharded.report),
                             sorted({s.empty_rows for s in sharded.report.rewritten}))
    return got


@pytest.mark.slow
@pytest.mark.parametrize("world,mode", [(2, "sparse"), (4, "sparse"), (2, "ring"), (4, "hybrid"),
                                        (2, "head_parallel")])
def test_transformers_decoders_with_left_padding_equal_the_single_process_rewrite(world, mode):
    """Llama and Qwen2 (eager attention: padding rows are the mean of v over every key; SDPA: 0) on 2 and 4 ranks:
    the sequence-parallel rewrite of each rank's shard equals the single-process rewrite, forward and gradients
    (sparse exchange, ring, the 2 x 2 hybrid, head-parallel)."""
    pytest.importorskip("transformers")
    models = [("llama", "eager"), ("qwen2", "sdpa")]
    for got in values(run_ranks(_hf_worker, world, models, mode)):
        for (name, impl), (err, report, empty_rows) in got.items():
            assert "2 attention site(s): 2 rewritten" in report, report
            assert "causal + key padding" in report, report
            assert empty_rows == (["mean"] if impl == "eager" else ["zero"]), (name, impl, empty_rows)
            assert err <= REL_ERR[torch.float64], (name, impl, err)


# --- a model's own mask: a sliding window joins a block-sparse pattern; what can't be read is skipped -----------------

E, HEADS = 16, 2


class MaskedAttention(torch.nn.Module):
    """One attention whose mask is built over the positions the module sees (a shard, when sharded): ``kind``
    ``"window"`` (causal sliding window of 5), ``"global"`` (causal, plus the first 2 keys) or ``"causal"``; AND the
    key padding ``keep [B, S]``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.qkv = torch.nn.Linear(E, 3 * E)
        self.proj = torch.nn.Linear(E, E)

    def forward(self, x, keep):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
        i = torch.arange(S, device=x.device)
        d = i.view(-1, 1) - i.view(1, -1)
        mask = d >= 0
        if self.kind == "window":
            mask = mask & (d < 5)
        elif self.kind == "global":
            mask = mask | (i.view(1, -1) < 2)
        mask = mask & keep[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, S, E))


def test_masks_sequence_parallel_attention_cannot_take_are_skipped_with_the_reason():
    x, keep = torch.randn(2, 24, E), torch.ones(2, 24, dtype=torch.bool)
    window = dc.explain(MaskedAttention("window"), (x, keep), dc.SequenceParallel(dc.Dilated((8,), (2,))))
    assert "causal sliding_window(5)" in window.skipped[0].reason, str(window)
    assert "dc.BlockSparse inner strategy takes the predicate" in window.skipped[0].reason, str(window)
    absolute = dc.explain(MaskedAttention("global"), (x, keep),
                          dc.SequenceParallel(dc.BlockSparse(P.local(8), block_size=8)))
    assert "bounds absolute positions" in absolute.skipped[0].reason, str(absolute)
    heads = dc.explain(MaskedAttention("causal"), (x, keep),
                       dc.SequenceParallel(None, mode="head_parallel", layout="zigzag"))
    assert "mode='head_parallel' takes one with contiguous shards only" in heads.skipped[0].reason, str(heads)


def _window_worker(rank, world, mode):
    import torch.distributed as dist

    from dilate_compiler.distributed import shard_sequence

    torch.manual_seed(0)
    model = MaskedAttention("window").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, E, generator=g, dtype=torch.float64)
    dout = torch.randn(2, N, E, generator=g, dtype=torch.float64)
    keep = key_padding(2)
    keep[0, :16] = False             # a whole block of left padding: its queries' windows keep no key
    ref = model(x, keep)
    params = list(model.parameters())
    ref_grads = torch.autograd.grad(ref, params, dout)
    every_block = dc.BlockSparse(P.local(N // 8), block_size=8)      # allows every pair: the mask decides
    shard = lambda t: shard_sequence(t, dim=1)  # noqa: E731
    res = dc.rewrite(model, (shard(x), shard(keep)), dc.SequenceParallel(every_block, mode=mode))
    out = res.module(shard(x), shard(keep))
    grads = torch.autograd.grad(out, params, shard(dout))
    for g in grads:
        dist.all_reduce(g)
    err = max([rel_err(out, shard(ref))] + [rel_err(a, b) for a, b in zip(grads, ref_grads)])
    return err, str(res.report)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sparse", "ring"])
def test_a_sliding_window_mask_joins_a_block_sparse_inner_pattern(mode):
    for err, report in values(run_ranks(_window_worker, 2, mode)):
        assert "1 rewritten" in report and "(model mask)" in report, report
        assert err <= REL_ERR[torch.float64], err


def _keep_mismatch_worker(rank, world):
    from dilate_compiler.distributed import ring_attention

    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    keep = torch.ones(1, 8, dtype=torch.bool) if rank == 0 else None
    messages = []
    for mode in ("ring", "sparse"):
        try:
            ring_attention(q, q, q, dc.Dilated((8,), (2,)), mode=mode, key_keep=keep)
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


@pytest.mark.slow
def test_ranks_that_differ_in_key_padding_all_get_a_clear_error():
    for messages in values(run_ranks(_keep_mismatch_worker, 2)):
        for message in messages:
            assert "differ in key padding (rank 0: (1, 8), rank 1: none)" in message, message


def _compile_worker(rank, world, mode):
    """torch.compile with the backend: a causal + key padding mask, rewritten to sequence-parallel attention with a
    dense-equivalent inner strategy, equals the model on the whole sequence (output and parameter gradients)."""
    import torch.distributed as dist

    from dilate_compiler.backend import dilated_backend
    from dilate_compiler.distributed import hybrid_groups, shard_sequence

    torch.manual_seed(0)
    model = MaskedAttention("causal").double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, E, generator=g, dtype=torch.float64)
    dout = torch.randn(2, N, E, generator=g, dtype=torch.float64)
    keep = key_padding(2)
    ref = model(x, keep)
    params = list(model.parameters())
    ref_grads = torch.autograd.grad(ref, params, dout)
    dense = dc.Dilated((N,), (1,))
    if mode == "hybrid":
        head_group, sequence_group = hybrid_groups(2)
        strategy = dc.SequenceParallel(dense, mode="hybrid", head_group=head_group, sequence_group=sequence_group)
    else:
        strategy = dc.SequenceParallel(dense, mode=mode)
    shard = lambda t: shard_sequence(t, dim=1)  # noqa: E731
    run = torch.compile(model, backend=lambda gm, ex: dilated_backend(gm, ex, {"strategy": strategy, "strict": True}),
                        fullgraph=True)
    out = run(shard(x), shard(keep))
    grads = torch.autograd.grad(out, params, shard(dout))
    for g in grads:
        dist.all_reduce(g)
    return max([rel_err(out, shard(ref))] + [rel_err(a, b) for a, b in zip(grads, ref_grads)])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sparse", "hybrid", "head_parallel"])
def test_compiled_model_with_key_padding_equals_the_whole_model(mode):
    for err in values(run_ranks(_compile_worker, 2, mode)):
        assert err <= REL_ERR[torch.float64], err
