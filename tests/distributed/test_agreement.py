"""Ranks whose distributed attention calls disagree all raise the same ValueError, on 2 spawned gloo ranks.

A distributed call is collective: ranks passing different shard shapes, dtypes, strategies, modes, layouts,
causality or scales would otherwise hang, abort, or each return a mixture of two attentions. Every entry point
compares the calls first (one all_gather of a fingerprint) and every rank raises the same error, naming what
differs and each rank's value; a rank whose own arguments fail their checks takes part with its error, so the
others raise instead of waiting for it. The group stays usable afterwards: each worker runs its cases one after
another on the same group.
"""

import math

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.distributed.launch import run_ranks, values
from tests.test_backend import Block   # per-token ops around one causal SDPA: a sequence shard runs it unchanged

B, H, N, D = 1, 4, 16, 8
STRATEGIES = {   # each call builds its own strategy object, as each rank of a real job does
    "dense": lambda: None,
    "dilated": lambda: dc.Dilated((8, 16), (1, 2)),
    "dilated-other": lambda: dc.Dilated((8, 16), (1, 4)),
    "block-sparse": lambda: dc.BlockSparse(P.local(1), block_size=8),
}


def text_of(name: str) -> str:
    return repr(STRATEGIES[name]())


BASE = dict(api="ring", heads=(H, H), n=N, dtype=torch.float64, strategy="dilated", mode="sparse",
            layout="contiguous", is_causal=False, scale=None)

# name -> (rank 0's change to BASE, rank 1's change to BASE, the field named in the error, its two rank values)
CASES = {
    "ring mode, strategies": ({"mode": "ring"}, {"mode": "ring", "strategy": "dilated-other"}, "strategy",
                              (text_of("dilated"), text_of("dilated-other"))),
    "ring mode, dense and dilated": ({"mode": "ring", "strategy": "dense"}, {"mode": "ring"}, "strategy",
                                     ("None", text_of("dilated"))),
    "sparse mode, dtypes": ({}, {"dtype": torch.float32}, "dtype", ("torch.float64", "torch.float32")),
    "auto mode, causality": ({"mode": "auto"}, {"mode": "auto", "is_causal": True}, "is_causal", ("False", "True")),
    "modes": ({"mode": "ring"}, {}, "mode", ("'ring'", "'sparse'")),
    "layouts": ({}, {"layout": "zigzag"}, "layout", ("'contiguous'", "'zigzag'")),
    "scales": ({}, {"scale": 0.5}, "scale", (repr(1 / math.sqrt(D)), "0.5")),
    "shard lengths": ({}, {"n": N + 8}, "q shape", (str((B, H, N, D)), str((B, H, N + 8, D)))),
    "kv heads": ({}, {"heads": (H, 2)}, "k shape", (str((B, H, N, D)), str((B, 2, N, D)))),
    "head-parallel, causality": ({"api": "heads"}, {"api": "heads", "is_causal": True}, "is_causal",
                                 ("False", "True")),
    "head-parallel, strategies": ({"api": "heads"}, {"api": "heads", "strategy": "block-sparse"}, "strategy",
                                  (text_of("dilated"), text_of("block-sparse"))),
    "head-parallel, shard lengths": ({"api": "heads"}, {"api": "heads", "n": N + 8}, "q shape",
                                     (str((B, H, N, D)), str((B, H, N + 8, D)))),
    "ring and head-parallel": ({}, {"api": "heads"}, "mode", ("'sparse'", "'head_parallel'")),
    # one rank's own arguments fail their checks: it joins the check with its error instead of leaving the others
    # waiting for it
    "one rank's mode, invalid": ({"mode": "ring", "strategy": "dense"}, {"mode": "sparse", "strategy": "dense"},
                                 "argument checks", ("passed", "ValueError: mode='sparse' with dense attention")),
    "one rank's heads, invalid": ({}, {"heads": (H, 3)}, "argument checks",
                                  ("passed", f"ValueError: query heads ({H}) must be a multiple of kv heads (3)")),
    "head-parallel, one rank's layout, invalid": ({"api": "heads"}, {"api": "heads", "layout": "striped"},
                                                  "argument checks", ("passed", "ValueError: layout must be one of")),
}


def _call(rank, case, same=False):
    """Run one call of ``case`` as ``rank`` sees it (``same``: every rank runs rank 0's call);
    ``("returned", shape, "")`` or ``("raised", type, message)``."""
    from dilate_compiler.distributed import head_parallel_attention, ring_attention

    a = dict(BASE, **CASES[case][0 if same or rank == 0 else 1])
    strategy = STRATEGIES[a["strategy"]]()
    g = torch.Generator().manual_seed(rank)
    hq, hkv = a["heads"]
    q, k, v = (torch.randn(B, h, a["n"], D, generator=g, dtype=a["dtype"]) for h in (hq, hkv, hkv))
    kw = dict(is_causal=a["is_causal"], scale=a["scale"], layout=a["layout"])
    try:
        if a["api"] == "ring":
            out = ring_attention(q, k, v, strategy, mode=a["mode"], **kw)
        else:
            out = head_parallel_attention(q, k, v, strategy, **kw)
    except Exception as e:   # noqa: BLE001 - the type is what the test reads
        return ("raised", type(e).__name__, str(e))
    return ("returned", tuple(out.shape), "")


def _entry_points_worker(rank, world):
    disagreeing = {case: _call(rank, case) for case in CASES}
    agreeing = {case: _call(rank, case, same=True) for case in CASES}
    return disagreeing, agreeing


def _assert_same_error_everywhere(outcomes, field, texts):
    """Every rank raised a ValueError with the same message, naming ``field`` and each rank's value (``texts``)."""
    kinds = [o[:2] for o in outcomes]
    assert kinds == [("raised", "ValueError")] * len(outcomes), outcomes
    message = outcomes[0][2]
    assert all(o[2] == message for o in outcomes), outcomes
    assert field in message, message
    for r, value in enumerate(texts):
        assert f"rank {r}: {value}" in message, message


@pytest.mark.slow
def test_entry_points_raise_the_same_error_on_every_rank():
    results = values(run_ranks(_entry_points_worker, 2, timeout=240, pg_timeout_s=20))
    for case, (_, _, field, texts) in CASES.items():
        _assert_same_error_everywhere([r[0][case] for r in results], field, texts)
    for case in CASES:   # the same calls on every rank, each with its own strategy object: no error
        assert all(r[1][case][0] == "returned" for r in results), (case, [r[1][case] for r in results])


def _registry_worker(rank, world):
    """Registry entries and plan-cache hits of a second ring_attention call with a new but equal strategy."""
    from dilate_compiler.distributed import ring_attention
    from dilate_compiler.distributed import sequence_parallel as sp

    q = torch.randn(B, H, N, D, dtype=torch.float64)
    ring_attention(q, q, q, dc.Dilated((8, 16), (1, 2)), mode="ring")
    configs, hits = len(sp._CONFIGS), sp._plan.cache_info().hits
    ring_attention(q, q, q, dc.Dilated((8, 16), (1, 2)), mode="ring")
    return len(sp._CONFIGS) - configs, sp._plan.cache_info().hits - hits


@pytest.mark.slow
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


def _model_worker(rank, world):
    """The rewritten and compiled paths and the dc.nn modules with a strategy (or causality) that differs on rank
    1: what each rank saw."""
    from dilate_compiler.backend import dilated_backend
    from dilate_compiler.distributed import shard_sequence

    inner = STRATEGIES[["dilated", "dilated-other"][rank]]()
    torch.manual_seed(0)
    model = Block(16).double()
    x = shard_sequence(torch.randn(2, 2 * N, 16, dtype=torch.float64), dim=1)
    seen = {}

    def attempt(name, fn):
        try:
            out = fn()
        except Exception as e:   # noqa: BLE001 - the type is what the test reads
            seen[name] = ("raised", type(e).__name__, str(e))
        else:
            seen[name] = ("returned", tuple(out.shape), "")

    for mode in ("sparse", "ring", "head_parallel"):
        strategy = dc.SequenceParallel(inner, mode=mode)
        attempt(f"rewrite, {mode}", lambda: dc.rewrite(model, (x,), strategy=strategy).module(x))
    for mode in ("sparse", "head_parallel"):
        strategy = dc.SequenceParallel(inner, mode=mode)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=lambda gm, ex: dilated_backend(gm, ex, {"strategy": strategy}))
        attempt(f"compile, {mode}", lambda: compiled(x))
    xs = torch.randn(2, N, 32, dtype=torch.float64)
    heads = xs.view(2, N, 4, 8)
    module = dc.nn.SequenceParallelAttention(STRATEGIES["dilated"]())
    attempt("SequenceParallelAttention, causality", lambda: module(heads, heads, heads, is_causal=bool(rank)))
    mask = torch.ones(N, N, dtype=torch.bool) if rank else None
    attempt("SequenceParallelAttention, one rank's mask", lambda: module(heads, heads, heads, attn_mask=mask))
    kw = dict(embed_dim=32, num_heads=4, dtype=torch.float64, segment_lengths=(8, 16 * (rank + 1)),
              dilation_rates=(1, 2))
    for kind in ("ring", "head_parallel"):
        module = dc.nn.create_multihead_dilated_attention(kind, **kw)
        attempt(f"create_multihead_dilated_attention({kind!r}), strategies", lambda: module(xs)[0])
    return seen


@pytest.mark.slow
def test_rewritten_compiled_and_module_paths_raise_the_same_error_on_every_rank():
    results = values(run_ranks(_model_worker, 2, timeout=400, pg_timeout_s=20))
    for name in results[0]:
        field, texts = "strategy", (text_of("dilated"), text_of("dilated-other"))
        if "causality" in name:
            field, texts = "is_causal", ("False", "True")
        elif "mask" in name:
            field, texts = "argument checks", ("passed", "ValueError: sequence-parallel attention takes no attn_mask")
        elif "create_multihead" in name:
            texts = (repr(dc.Dilated((8, 16), (1, 2))), repr(dc.Dilated((8, 32), (1, 2))))
        _assert_same_error_everywhere([r[name] for r in results], field, texts)


def _outside_group_worker(rank, world):
    import torch.distributed as dist

    from dilate_compiler.distributed import ring_attention

    first = dist.new_group([0])   # every rank creates every group; only rank 0 is in this one
    q = torch.randn(B, H, N, D, dtype=torch.float64)
    try:
        return ("returned", tuple(ring_attention(q, q, q, group=first).shape), "")
    except Exception as e:   # noqa: BLE001 - the type is what the test reads
        return ("raised", type(e).__name__, str(e))


@pytest.mark.slow
def test_a_rank_outside_the_group_it_passes_gets_a_clear_error():
    inside, outside = values(run_ranks(_outside_group_worker, 2, timeout=120, pg_timeout_s=20))
    assert inside == ("returned", (B, H, N, D), "")      # a group of one: rank 0 attends over its whole sequence
    assert outside[:2] == ("raised", "ValueError"), outside
    assert "global rank 1) is not a member of the process group it passed (global ranks [0])" in outside[2], outside


@pytest.mark.parametrize("kind", ["ring", "head_parallel"])
@pytest.mark.parametrize("missing", ["segment_lengths", "dilation_rates"])
def test_factory_distributed_kinds_name_a_missing_strategy_argument(kind, missing):
    kw = dict(embed_dim=16, num_heads=2, segment_lengths=(8,), dilation_rates=(1,))
    del kw[missing]
    with pytest.raises(TypeError, match=rf"kind={kind!r}\) needs {missing}=.*not given"):
        dc.nn.create_multihead_dilated_attention(kind, **kw)
