"""Real models: Hugging Face (built from configs, no downloads) and torch.nn attention modules."""

import warnings

import pytest
import torch

from tests.passes.helpers import check_rewrite
from tests.tolerances import rel_err

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
PADDED = torch.ones(2, 12, dtype=torch.long)
PADDED[0, :3] = 0  # left padding: fully masked query rows in causal models


class LastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, attention_mask=None):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.model(x, **kw).last_hidden_state


def _hf(name, impl):
    t = transformers
    common = {"attn_implementation": impl}
    if name == "llama":
        cfg = t.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, use_cache=False, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0, **common)
        return t.LlamaModel(cfg)
    if name == "gpt2":
        cfg = t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                           bos_token_id=1, eos_token_id=2, **common)
        return t.GPT2Model(cfg)
    if name == "bert":
        return t.BertModel(t.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, **common))
    return t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, **common))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit"])
def test_hugging_face_models(name, impl):
    torch.manual_seed(0)
    model = LastHidden(_hf(name, impl).eval())
    if name == "vit":
        args, kwargs = (torch.randn(2, 3, 32, 32),), {}
    else:
        args, kwargs = (IDS,), {"attention_mask": PADDED}
    res = check_rewrite(model, args, 2, grads=False, kwargs=kwargs)
    sites = res.report.rewritten
    assert all(s.location for s in sites), str(res.report)
    if name == "llama":
        assert {s.gqa_ratio for s in sites} == {2}


def test_hugging_face_training_gradients():
    torch.manual_seed(0)
    model = LastHidden(_hf("llama", "eager").train())
    res = check_rewrite(model, (IDS,), 2, grads=False, kwargs={"attention_mask": PADDED})
    out = res.module(IDS, attention_mask=PADDED)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in res.module.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(IDS, attention_mask=PADDED).sum().backward()
    ref = dict(model.named_parameters())
    assert grads
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n].grad, atol=1e-5, rtol=1e-4)


class MHA(torch.nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["mha", "encoder", "decoder"])
def test_torch_nn_attention_modules(kind, mode):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 32)
    if kind == "mha":
        model, args, n = MHA(need_weights=False), (x,), 1
    elif kind == "encoder":
        model, args, n = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), (x,), 1
    else:   # self-attention, then cross-attention to memory of the same length: only the first is rewritten
        memory = torch.randn(2, 12, 32)
        model, args, n = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True), (x, memory), 1
    getattr(model, mode)()
    res = check_rewrite(model, args, n, grads=(mode == "train"), allow_skipped=True)
    if kind == "decoder":
        (cross,) = res.report.skipped
        assert cross.location == "multihead_attn" and cross.reason.startswith("cross-attention: k/v are computed from "
                                                                               "other inputs than q"), cross.reason


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mha_default_need_weights_with_weights_discarded(mode):
    """nn.MultiheadAttention's default (need_weights=True) takes the bmm path; discarded weights are dead code."""
    torch.manual_seed(0)
    model = MHA(need_weights=True)
    getattr(model, mode)()
    res = check_rewrite(model, (torch.randn(2, 12, 32),), 1, grads=(mode == "train"))
    assert res.report.rewritten[0].q_shape == (2, 4, 12, 8)


def test_mha_weights_returned_are_skipped_with_reason():
    import dilate_compiler as dc
    from tests.passes.helpers import DENSE

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)

    res = dc.rewrite(Weights().eval(), (torch.randn(2, 12, 32),), DENSE)
    assert not res.report.rewritten and "escape" in res.report.skipped[0].reason


def _family(name):
    t = transformers
    kw = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    return {
        "llama": lambda: t.LlamaModel(t.LlamaConfig(**kw)),
        "mistral-sliding": lambda: t.MistralModel(t.MistralConfig(**kw, sliding_window=5)),
        "qwen2": lambda: t.Qwen2Model(t.Qwen2Config(**kw)),
        "qwen3": lambda: t.Qwen3Model(t.Qwen3Config(**kw, head_dim=8)),
        "phi3": lambda: t.Phi3Model(t.Phi3Config(**kw, pad_token_id=0)),
        "gemma3": lambda: t.Gemma3TextModel(t.Gemma3TextConfig(
            **kw, head_dim=8, sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
        "starcoder2": lambda: t.Starcoder2Model(t.Starcoder2Config(**kw, sliding_window=5)),
        "gpt-neox": lambda: t.GPTNeoXModel(t.GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4)),
        "opt": lambda: t.OPTModel(t.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=32,
                                              max_position_embeddings=64)),
        "modernbert": lambda: t.ModernBertModel(t.ModernBertConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            local_attention=4, global_attn_every_n_layers=2, pad_token_id=0)),
    }[name]()


FAMILY = ["llama", "mistral-sliding", "qwen2", "qwen3", "phi3", "gemma3", "starcoder2", "gpt-neox", "opt",
          "modernbert"]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", FAMILY)
def test_block_sparse_auto_reads_every_mask_of_transformers_models(name, impl):
    """BlockSparse('auto') rewrites every attention of these transformers 5.x models, in both attention
    implementations, with left padding: their masks (causal, sliding windows, local attention) are read as a
    pattern AND key padding, and the output is unchanged."""
    import dilate_compiler as dc

    torch.manual_seed(0)
    hf = _family(name)
    hf.set_attn_implementation(impl)
    model = LastHidden(hf.eval())
    res = check_rewrite(model, (IDS,), 2, strategy=dc.BlockSparse("auto", block_size=16), grads=False,
                        kwargs={"attention_mask": PADDED})
    descs = {s.mask_desc for s in res.report.rewritten}
    assert all(d.endswith("+ key padding") for d in descs), descs
    if name in ("mistral-sliding", "starcoder2"):
        assert descs == {"causal sliding_window(5) + key padding"}, descs


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dilated_runs_a_transformers_causal_padding_mask_on_the_kernels_route(impl):
    """A Llama's materialised causal + padding mask is read as causality and key padding, which the kernels take
    (on CPU the exact path runs it, for the device alone); a dense-equivalent pattern keeps the output."""
    import dilate_compiler as dc

    torch.manual_seed(0)
    hf = _family("llama")
    hf.set_attn_implementation(impl)
    model = LastHidden(hf.eval())
    res = check_rewrite(model, (IDS,), 2, strategy=dc.Dilated((16,), (1,)), grads=False,
                        kwargs={"attention_mask": PADDED})
    for site in res.report.rewritten:
        assert site.mask_desc == "causal + key padding" and site.nodes["route"] == "split", str(res.report)
        assert site.runs.startswith("exact path: device cpu"), site.runs


def test_rewrite_a_causal_lm_called_as_users_call_it():
    """Default use_cache (the model would return a KV cache object): the traced module returns the logits, no
    cache; and with use_cache=False, transformers' packed-sequence mask of an unpacked batch (position ids from
    arange) is read as causal."""
    import dilate_compiler as dc

    t = transformers
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2)).eval()
    for kwargs in ({}, {"use_cache": False}):
        res = dc.rewrite(model, (IDS,), dc.Dilated((16,), (1,)), example_kwargs=kwargs)
        assert [s.mask_desc for s in res.report.rewritten] == ["causal", "causal"], str(res.report)
        with torch.no_grad():
            out, ref = res.module(IDS, **kwargs), model(IDS, **kwargs)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert model.config.use_cache   # restored after tracing


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dilated_reads_transformers_masks_at_symbolic_lengths(impl):
    """Under torch.compile with dynamic shapes one graph serves every length: a Llama's causal + padding mask is
    read for every length (causality and key padding, the kernels' route), the eager implementation's scale (a
    float attribute Dynamo passes as a symbolic number) is read, and a dense-equivalent pattern keeps the output at
    each length."""
    import dilate_compiler as dc
    from dilate_compiler.backend import capture_reports

    torch.manual_seed(0)
    hf = _family("llama")
    hf.set_attn_implementation(impl)
    model = LastHidden(hf.eval())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dilated", dynamic=True, options={"strategy": dc.Dilated((16,), (1,))})
    with capture_reports() as report, torch.no_grad():
        for n in (12, 16):
            ids = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(n))
            mask = torch.ones(2, n, dtype=torch.long)
            mask[0, :3] = 0
            got, want = compiled(ids, attention_mask=mask), model(ids, attention_mask=mask)
            assert rel_err(got, want) <= 1e-5
    torch._dynamo.reset()
    assert any(not isinstance(s.k_shape[-2], int) for s in report.sites), str(report)
    for site in report.sites:
        assert site.status == "rewritten" and site.mask_desc == "causal + key padding", str(report)
        assert site.nodes["route"] == "split", str(report)
