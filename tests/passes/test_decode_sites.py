"""Decode steps: a KV cache the step's keys extend is read from the graph, the queries are the last key positions,
and the site is rewritten with the strategy (never reported as cross-attention)."""

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from tests.tolerances import rel_err

STRATEGY = dc.Dilated((4, 8), (1, 2))
DENSE = dc.Dilated((64,), (1,))


class CachedAttention(torch.nn.Module):
    """One attention layer reading a KV cache: keys = cat([past, this step's], dim=-2). ``mask``: None, "causal"
    (built from aranges with the cache offset, as transformers does) or "padding" (causal AND a key-padding vector)."""

    def __init__(self, mask=None, is_causal=False, heads=2, dim=8):
        super().__init__()
        self.mask, self.is_causal, self.h, self.d = mask, is_causal, heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim, bias=False)

    def forward(self, x, past_k, past_v, keep=None):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        k = torch.cat([past_k, k], dim=-2)
        v = torch.cat([past_v, v], dim=-2)
        mask = None
        if self.mask is not None:
            past = past_k.shape[2]
            q_idx = torch.arange(n) + past
            kv_idx = torch.arange(past + n)
            mask = (kv_idx[None, :] <= q_idx[:, None])[None, None]
            if self.mask == "padding":
                mask = mask & keep[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal)


def _inputs(n=3, past=10, B=2, heads=2, dim=8):
    torch.manual_seed(0)
    x = torch.randn(B, n, heads * dim)
    pk, pv = torch.randn(B, heads, past, dim), torch.randn(B, heads, past, dim)
    keep = torch.ones(B, past + n, dtype=torch.bool)
    keep[1, :4] = False
    return x, pk, pv, keep


@pytest.mark.parametrize("mask", [None, "causal", "padding"])
def test_a_kv_cache_site_is_a_decode_step(mask):
    model = CachedAttention(mask)
    n = 1 if mask is None else 3
    x, pk, pv, keep = _inputs(n=n)
    report = dc.explain(model, (x, pk, pv, keep), STRATEGY)
    (site,) = report.sites
    assert site.decode and site.status == "rewritten", str(report)
    assert "cross" not in site.reason
    assert "decode" in str(report)
    if mask is not None:
        assert site.predicate == "causal", site.predicate_name
        assert bool(site.key_keep) == (mask == "padding")


def test_sdpa_is_causal_with_fewer_queries_is_not_a_decode_step():
    """SDPA's is_causal aligns queries with the first keys: the model's meaning is not a decode step."""
    model = CachedAttention(None, is_causal=True)
    x, pk, pv, keep = _inputs(n=3)
    (site,) = dc.explain(model, (x, pk, pv, keep), STRATEGY).sites
    assert site.status == "skipped" and "top-left" in site.reason


def test_keys_from_another_sequence_stay_cross_attention():
    class Cross(torch.nn.Module):
        def forward(self, q, memory_k, memory_v, k_new, v_new):
            return F.scaled_dot_product_attention(q, torch.cat([memory_k, k_new], 2), torch.cat([memory_v, v_new], 2))

    torch.manual_seed(0)
    q, mk, mv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    kn, vn = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    (site,) = dc.explain(Cross(), (q, mk, mv, kn, vn), STRATEGY).sites
    # q and the new keys are graph inputs of their own: nothing says they are one sequence
    assert not site.decode


@pytest.mark.parametrize("mask", [None, "causal", "padding"])
def test_rewritten_decode_step_keeps_the_meaning_and_gives_the_full_sequence_rows(mask):
    model = CachedAttention(mask)
    n = 1 if mask is None else 3
    x, pk, pv, keep = _inputs(n=n)
    args = (x, pk, pv, keep)
    dense = dc.rewrite(model, args, DENSE)
    assert dense.report.sites[0].status == "rewritten"
    want = model(*args)
    rows = keep[:, -n:].any(-1) if mask == "padding" else slice(None)
    assert rel_err(dense.module(*args)[rows], want[rows]) <= 1e-5
    # with the strategy: the rows of one causal pass over the whole sequence
    sparse = dc.rewrite(model, args, STRATEGY).module(*args)
    B, heads, dim = 2, 2, 8
    q, k_new, v_new = model.qkv(x).view(B, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
    k, v = torch.cat([pk, k_new], 2), torch.cat([pv, v_new], 2)
    q_full = torch.cat([torch.zeros(B, heads, pk.shape[2], dim), q], 2)
    attn_mask = keep[:, None, None, :] if mask == "padding" else None
    ref = STRATEGY.reference(q_full, k, v, is_causal=mask is not None or n == 1, attn_mask=attn_mask)[:, :, -n:]
    assert rel_err(sparse, ref.float()) <= 1e-5


@pytest.mark.slow
def test_compiled_generation_runs_every_decode_step_with_the_strategy():
    """model.generate() under backend="dilated": the prefill and every decode step (static, then symbolic key
    lengths) are rewritten, none reported as cross-attention, and the tokens and logits are those of the same
    strategy registered with transformers (dc.hf)."""
    import copy

    transformers = pytest.importorskip("transformers")
    from dilate_compiler.backend import capture_reports

    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    dc.hf.register("dc_test_decode_sites", strategy=STRATEGY)
    ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                        attn_implementation="dc_test_decode_sites").eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    want = ref.generate(ids, **kw)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="dilated", options={"strategy": STRATEGY})
    with capture_reports() as report:
        got = model.generate(ids, **kw)
    torch._dynamo.reset()
    assert report.sites and not report.skipped, str(report)
    assert sum(s.decode for s in report.sites) >= 2
    # the steps at symbolic key lengths too: their masks are read, not carried to the exact path
    assert any(not isinstance(s.k_shape[2], int) for s in report.sites), str(report)
    assert {s.mask_desc for s in report.sites} == {"causal + key padding"}, str(report)
    assert torch.equal(got.sequences, want.sequences)
    assert rel_err(torch.stack(got.logits, 1), torch.stack(want.logits, 1)) <= 1e-5


class CacheLongWindow(CachedAttention):
    """A decode step whose causal window is as long as the cache: ``p - j < past`` compares the distance between
    query and key with a symbolic size."""

    def forward(self, x, past_k, past_v, keep=None):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        past = past_k.shape[2]
        q_idx, kv_idx = torch.arange(n) + past, torch.arange(past + n)
        d = q_idx[:, None] - kv_idx[None, :]
        mask = ((d >= 0) & (d < past))[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _compiled_steps(model, pasts, n=3, strategy=STRATEGY):
    """``model`` under backend="dilated" with dynamic shapes, one call per cache length: (reports, outputs, inputs)."""
    from dilate_compiler.backend import capture_reports

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dilated", dynamic=True, options={"strategy": strategy})
    outs, inputs = [], []
    with capture_reports() as report:
        for past in pasts:
            args = _inputs(n=n, past=past)
            outs.append(compiled(*args))
            inputs.append(args)
    torch._dynamo.reset()
    return report, outs, inputs


def test_decode_masks_are_read_at_symbolic_lengths():
    """Under dynamic shapes the cache length is a symbol: the causal + padding mask of a decode step is read for
    every length (the query positions arange(n) + past against past + n keys), and the output is the strategy's."""
    model = CachedAttention("padding")
    report, outs, inputs = _compiled_steps(model, (10, 13))
    (site,) = report.sites
    assert not isinstance(site.k_shape[2], int), str(report)
    assert site.decode and site.status == "rewritten" and site.mask_desc == "causal + key padding", str(report)
    assert "exact path:" not in site.runs or "device cpu" in site.runs, site.runs
    for (x, pk, pv, keep), got in zip(inputs, outs):
        n = x.shape[1]
        q, k_new, v_new = model.qkv(x).view(2, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([pk, k_new], 2), torch.cat([pv, v_new], 2)
        q_full = torch.cat([torch.zeros(2, 2, pk.shape[2], 8), q], 2)
        want = STRATEGY.reference(q_full, k, v, is_causal=True, attn_mask=keep[:, None, None, :])[:, :, -n:]
        assert rel_err(got, want.float()) <= 1e-5


def test_a_mask_that_compares_with_a_symbolic_length_is_carried_with_the_reason():
    """``p - j < past`` links other pairs at each cache length: it is not read as a predicate, the site keeps the
    model's mask (exact path) and, under a dense-equivalent strategy, the output is the model's. (A comparison of key positions alone with the cache
    length, ``j >= past``, is a per-key term and is read as key padding.)"""
    model = CacheLongWindow("causal")
    report, outs, inputs = _compiled_steps(model, (10, 13), strategy=DENSE)
    (site,) = report.sites
    assert site.status == "rewritten" and "symbolic size" in site.mask_reason, str(report)
    for args, got in zip(inputs, outs):
        assert rel_err(got, model(*args)) <= 1e-5
