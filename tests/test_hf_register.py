"""``dc.hf``: a strategy as a transformers ``attn_implementation`` (training, padding, generation) and the cache
that evicts the keys no future query links."""

import pytest
import torch

import dilate_compiler as dc

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402

from tests.tolerances import REL_ERR, rel_err  # noqa: E402

DILATED = dc.Dilated((8, 16), (1, 2))
WINDOW = dc.BlockSparse(dc.patterns.sliding_window(6), block_size=4)


def _config(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    base.update(kw)
    return LlamaConfig(**base)


def _reference_attention(strategy):
    """The float64 definition of ``strategy`` with the model's key padding, as a transformers attention function."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        n_q, n_k = query.shape[2], key.shape[2]
        pad = torch.zeros(query.shape[:2] + (n_k - n_q, query.shape[3]), dtype=query.dtype)
        full_q = torch.cat([pad, query], 2)          # the queries are the last n_q key positions
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
        out = strategy.reference(full_q, key, value, is_causal=True, scale=scaling, attn_mask=mask)
        out = out.nan_to_num(0.0)[:, :, n_k - n_q:]   # a row that keeps no key is 0, as the op gives
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


@pytest.fixture(scope="module")
def names():
    from transformers import masking_utils, modeling_utils

    dc.hf.register("dc_test_dilated", strategy=DILATED)
    dc.hf.register("dc_test_window", strategy=WINDOW)
    for name, strategy in (("dc_test_dilated_ref", DILATED), ("dc_test_window_ref", WINDOW)):
        modeling_utils.AttentionInterface.register(name, _reference_attention(strategy))
        masking_utils.AttentionMaskInterface.register(name, masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["dc_test_dilated"])
    return {"dilated": "dc_test_dilated", "window": "dc_test_window"}


def _models(name, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(**cfg), attn_implementation=name).to(dtype).eval()
    ref = AutoModelForCausalLM.from_config(_config(**cfg), attn_implementation=name + "_ref").to(dtype).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _padded_batch(n=30, pad=7):
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("which", ["dilated", "window"])
def test_forward_and_backward_match_the_definition_with_left_padding(names, which):
    model, ref = _models(names[which])
    ids, mask = _padded_batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(out[keep], want[keep]) <= REL_ERR[torch.float64] * 1e3   # float64 through a 2-layer model
    out[keep].square().sum().backward()
    want[keep].square().sum().backward()
    for (n, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, p_ref.grad) <= 1e-9, n


def test_set_attn_implementation_switches_a_loaded_model(names):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa").double().eval()
    ids, mask = _padded_batch()
    dense = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(names["dilated"])
    sparse = model(input_ids=ids, attention_mask=mask).logits
    _, ref = _models(names["dilated"])
    ref.load_state_dict(model.state_dict())
    want = ref(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_err(sparse[keep], want[keep]) <= 1e-9
    assert rel_err(sparse[keep], dense[keep]) > 1e-3     # the strategy's semantics, not dense attention


def test_dense_equivalent_strategy_equals_sdpa():
    dc.hf.register("dc_test_dense", strategy=dc.Dilated((64,), (1,)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="dc_test_dense").double().eval()
    sdpa = AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa").double().eval()
    sdpa.load_state_dict(model.state_dict())
    ids, mask = _padded_batch()
    keep = mask.bool()
    assert rel_err(model(input_ids=ids, attention_mask=mask).logits[keep],
                   sdpa(input_ids=ids, attention_mask=mask).logits[keep]) <= 1e-9


def test_compiled_training_step_matches_eager(names):
    model, _ = _models(names["dilated"], dtype=torch.float32)
    model.train()
    ids, _ = _padded_batch()
    eager = model(input_ids=ids).logits
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)(input_ids=ids).logits
    assert rel_err(compiled, eager) <= REL_ERR[torch.float32]
    compiled.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _generate(model, ids, mask, steps, cache=None):
    kw = {} if cache is None else {"past_key_values": cache}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("which", ["dilated", "window"])
def test_generation_gives_the_logits_of_one_full_forward(names, which):
    """Prefill, then one token at a time with a cache: the logits of each step equal those of one forward of the
    final sequence (float32, within 1e-5 relative), with left padding."""
    model, _ = _models(names[which], dtype=torch.float32)
    ids, mask = _padded_batch(n=13, pad=4)
    steps = 22                                     # past both segment lengths and the window
    gen = _generate(model, ids, mask, steps)
    seq = gen.sequences
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)
    full = model(input_ids=seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1]
    stepped = torch.stack(gen.logits, 1)
    assert rel_err(stepped, full) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("which", ["dilated", "window"])
def test_evicting_cache_generates_the_same_tokens_with_bounded_keys(names, which):
    strategy = DILATED if which == "dilated" else WINDOW
    model, _ = _models(names[which], dtype=torch.float32)
    ids, mask = _padded_batch(n=11, pad=3)
    steps = 45
    full = _generate(model, ids, mask, steps)
    cache = dc.hf.EvictingCache(strategy)
    evicting = _generate(model, ids, mask, steps, cache=cache)
    assert torch.equal(evicting.sequences, full.sequences)
    assert rel_err(torch.stack(evicting.logits, 1), torch.stack(full.logits, 1)) <= 1e-5
    held = max(cache.held())
    bound = 16 if which == "dilated" else 6 - 1 + 4    # lcm(8, 16) keys; the window's reach, rounded to a block
    assert held <= bound + 1 < ids.shape[1] + steps
    assert cache.get_seq_length() == ids.shape[1] + steps - 1


def test_first_needed_key():
    start = dc.hf.first_needed_key(dc.Dilated((4, 6), (1, 2)))
    assert [start(n) for n in (0, 11, 12, 13, 25)] == [0, 0, 12, 12, 24]
    start = dc.hf.first_needed_key(dc.BlockSparse(dc.patterns.local(2), block_size=4))
    assert [start(n) for n in (0, 7, 8, 9, 13)] == [0, 0, 4, 4, 8]   # block 2 (keys 8..) needs block 1 (4..)
    for pattern in (dc.patterns.global_tokens(2) | dc.patterns.sliding_window(4), dc.patterns.dilated((2,))):
        with pytest.raises(NotImplementedError, match="nothing can be evicted"):
            dc.hf.first_needed_key(dc.BlockSparse(pattern, block_size=4))


def test_bad_strategies_and_layers_are_named(names):
    with pytest.raises(ValueError, match="'auto'"):
        dc.hf.register("dc_test_auto", strategy=dc.BlockSparse("auto"))
    with pytest.raises(TypeError, match="strategy must be"):
        dc.hf.register("dc_test_bad", strategy="dilated")
    with pytest.raises(ValueError, match="name must be"):
        dc.hf.register("sdpa", strategy=DILATED)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=names["dilated"])
    with pytest.raises(NotImplementedError, match="sliding_window"):
        model(input_ids=torch.randint(0, 64, (1, 12)))
