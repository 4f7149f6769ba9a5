"""Rewrites that would change a model's meaning are skipped with the true reason (issue: no silent change of
meaning). Each test here failed before its fix."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from tests.passes.helpers import DENSE, check_rewrite
from tests.passes.test_find_attention import Fn, N, qkv

warnings.filterwarnings("ignore", category=UserWarning)
STRATEGY = dc.Dilated((4, 8), (1, 2))   # not dense: a wrong rewrite changes the output


def _skipped_reasons(res) -> list:
    return [s.reason for s in res.report.skipped]


# --- cross-attention is read from the graph, not from the lengths ---------------------------------------------


def test_cross_attention_of_equal_length_is_skipped():
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    tgt, memory = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    res = dc.rewrite(layer, (tgt, memory), STRATEGY)
    assert [s.location for s in res.report.rewritten] == ["self_attn"]
    (cross,) = res.report.skipped
    assert cross.location == "multihead_attn"
    assert cross.reason == ("cross-attention: k/v are computed from other inputs than q (q from {tgt}, k from "
                            "{memory}, v from {memory})")


def test_cross_attention_is_skipped_under_the_backend_too():
    from dilate_compiler import backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    tgt, memory = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    compiled = torch.compile(layer, backend=backend.dilated_backend, options={"strategy": DENSE}, fullgraph=True)
    torch.testing.assert_close(compiled(tgt, memory), layer(tgt, memory), atol=1e-5, rtol=1e-5)
    report = backend.last_report()
    assert len(report.rewritten) == 1 and report.skipped[0].reason.startswith("cross-attention: k/v are computed")
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_models_keep_cross_attention(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    use_cache=False, decoder_start_token_id=0)
        model = transformers.T5Model(cfg).eval()
    else:
        cfg = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, use_cache=False, max_position_embeddings=64)
        model = transformers.BartModel(cfg).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, dec_ids):
            return self.model(input_ids=ids, decoder_input_ids=dec_ids).last_hidden_state

    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    res = check_rewrite(Hidden(), (ids, dec), 4, grads=False, allow_skipped=True)   # 2 encoder + 2 decoder self
    assert len(res.report.skipped) == 2, str(res.report)
    assert all(r.startswith("cross-attention: k/v are computed from other inputs than q")
               for r in _skipped_reasons(res)), str(res.report)


def test_attention_over_inputs_q_k_v_is_taken_as_self_attention():
    """``f(q, k, v)`` over graph inputs can't be told from cross-attention; equal lengths are self-attention."""
    check_rewrite(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), qkv(), 1)


def test_projected_from_two_inputs_is_cross_attention():
    w = torch.randn(8, 8)
    res = dc.rewrite(Fn(lambda x, y: F.scaled_dot_product_attention(x @ w, y @ w, y @ w)), qkv()[:2], DENSE)
    assert res.report.skipped[0].reason.startswith("cross-attention: k/v are computed from other inputs than q")


def test_keys_that_extend_the_queries_are_a_decode_step():
    """A KV cache: keys = cat(cached, new); the queries are the new positions, the last of the keys."""
    w = torch.randn(8, 8)

    def fn(x, cached):
        return F.scaled_dot_product_attention(x @ w, torch.cat([cached, x @ w], 2), torch.cat([cached, x @ w], 2))

    x, cached = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 7, 8)
    res = dc.rewrite(Fn(fn), (x, cached), DENSE)
    (site,) = res.report.rewritten
    assert site.decode and "decode" in str(res.report)
    torch.testing.assert_close(res.module(x, cached), fn(x, cached), atol=1e-5, rtol=1e-5)


# --- the softmax must normalise over keys ----------------------------------------------------------------------


@pytest.mark.parametrize("three_d", [False, True])
def test_softmax_over_another_axis_is_skipped(three_d):
    q, k, v = qkv()
    if three_d:
        q, k, v = q[0], k[0], v[0]
        fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), dim=1) @ v  # noqa: E731
    else:
        fn = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v  # noqa: E731
    res = dc.rewrite(Fn(fn), (q, k, v), DENSE)
    assert not res.report.rewritten
    assert "not the key axis (the last)" in res.report.skipped[0].reason
    torch.testing.assert_close(res.module(q, k, v), fn(q, k, v))


# --- in-place changes after the scores ----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["q", "k", "mask"])
def test_in_place_change_after_the_scores_is_skipped(what):
    mask = torch.zeros(24, 24)

    def fn(q, k, v):
        q, k, m = q.clone(), k.clone(), mask.clone()
        s = q @ k.mT * 0.3 + m
        {"q": q, "k": k, "mask": m}[what].mul_(2)
        return torch.softmax(s, -1) @ v

    q, k, v = qkv()
    res = dc.rewrite(Fn(fn), (q, k, v), DENSE)
    assert not res.report.rewritten
    assert "in-place op aten.mul_.Tensor" in res.report.skipped[0].reason
    torch.testing.assert_close(res.module(q, k, v), fn(q, k, v))


def test_in_place_change_of_something_else_keeps_the_rewrite():
    def fn(q, k, v):
        other = v.clone()
        s = q @ k.mT * 0.3
        other.mul_(2)
        return torch.softmax(s, -1) @ v + other

    check_rewrite(Fn(fn), qkv(), 1)


def test_in_place_change_before_the_scores_keeps_the_rewrite():
    def fn(q, k, v):
        q = q.clone()
        q.mul_(2)
        return torch.softmax(q @ k.mT * 0.3, -1) @ v

    check_rewrite(Fn(fn), qkv(), 1)


# --- what stops a rewrite is named -----------------------------------------------------------------------------


def test_soft_capping_the_ops_cannot_express_is_named():
    """A mask added before the cap, or a scale after it: the ops cap the scaled scores, then add the mask."""
    bias = torch.randn(N, N)
    res = dc.rewrite(Fn(lambda q, k, v: torch.softmax(torch.tanh((q @ k.mT * 0.3 + bias) / 5.0) * 5.0, -1) @ v),
                     qkv(), DENSE)
    assert not res.report.rewritten
    assert "a mask term is added to the scores before the soft-capping" in res.report.skipped[0].reason
    res = dc.rewrite(Fn(lambda q, k, v: torch.softmax(torch.tanh(q @ k.mT / 5.0) * 5.0 * 0.3, -1) @ v), qkv(), DENSE)
    assert "soft-capped scores are scaled or capped again" in res.report.skipped[0].reason


# --- rows that see no key: what the model's own softmax gives ---------------------------------------------------


def test_rows_with_no_key_are_nan_as_torch_softmax_makes_them():
    """``softmax`` of a row of -inf is NaN; the op alone gives 0, the rewrite gives the model's NaN back."""
    keep = torch.ones(24, 24, dtype=torch.bool).tril()
    keep[:2] = False

    def fn(q, k, v):
        return torch.softmax((q @ k.mT * 0.3).masked_fill(~keep, float("-inf")), -1) @ v

    q, k, v = qkv()
    res = dc.rewrite(Fn(fn), (q, k, v), DENSE)
    out, ref = res.module(q, k, v), fn(q, k, v)
    assert res.report.rewritten and ref[:, :, :2].isnan().all()
    torch.testing.assert_close(out, ref, equal_nan=True, atol=1e-5, rtol=1e-5)


def test_rows_with_no_key_stay_zero_under_safe_softmax():
    keep = torch.ones(24, 24, dtype=torch.bool).tril()
    keep[:2] = False

    def fn(q, k, v):
        return torch.ops.aten._safe_softmax((q @ k.mT * 0.3).masked_fill(~keep, float("-inf")), -1) @ v

    q, k, v = qkv()
    res = dc.rewrite(Fn(fn), (q, k, v), DENSE)
    assert res.report.rewritten
    torch.testing.assert_close(res.module(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)


# --- what used to be rewritten and then fail, or change the output ---------------------------------------------


class _LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask=None):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.model(ids, **kw).last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_multi_head_latent_attention_with_a_smaller_value_head_runs(impl):
    """DeepSeek-V3: q/k head dim 24 (16 + 8 rotary), v head dim 16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        attn_implementation=impl, use_cache=False)
    model = _LastHidden(transformers.DeepseekV3Model(cfg).eval())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    check_rewrite(model, (ids,), 1, grads=False)


def test_a_learned_bias_trains_through_the_rewrite():
    """A mask that requires grad (a learned relative-position bias): its gradient flows, it doesn't fail at
    backward."""
    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(4, 24, 24) * 0.1)

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)

    model = Biased()
    q, k, v = qkv()
    res = dc.rewrite(model, (q, k, v), DENSE)
    assert len(res.report.rewritten) == 1
    out, ref = res.module(q, k, v), model(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), [p for n, p in res.module.named_parameters() if "bias" in n])
    (ref_g,) = torch.autograd.grad(ref.square().sum(), [model.bias])
    torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)


def test_float16_eager_model_with_left_padding_keeps_its_padded_rows():
    """Qwen3, attn_implementation="eager", float16: rows that see no key follow the model's float16 rounding of
    scores + finfo(float16).min; they used to attend every key."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_cache=False,
                                   attn_implementation="eager")
    model = _LastHidden(transformers.Qwen3Model(cfg).eval().half())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[0, :4] = 0
    res = dc.rewrite(model, (ids,), DENSE, example_kwargs={"attention_mask": pad})
    assert len(res.report.rewritten) == 2
    with torch.no_grad():
        out, ref = res.module(ids, attention_mask=pad), model(ids, attention_mask=pad)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_a_constant_index_table_that_is_not_positions_is_not_read_as_causal():
    """A mask built from a constant table (no graph input) is read from its value only when the table steps by one
    along an axis: a reversed arange compared as transformers compares positions is anti-causal, not causal."""

    def fn(q, k, v):
        idx = torch.arange(q.shape[2]).flip(0)
        keep = idx[None, :] <= idx[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = qkv()
    res = dc.rewrite(Fn(fn), (q, k, v), DENSE)
    assert all(s.predicate != "causal" for s in res.report.sites), str(res.report)
    for site in res.report.rewritten:
        assert site.mask_reason, str(res.report)   # carried to the exact path as the model wrote it
    torch.testing.assert_close(res.module(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)
