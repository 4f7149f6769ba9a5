"""BlockSparse through the compiler: fixed patterns, exact mask detection (``pattern="auto"``) on masks built
from arange / tril / triu / where, the report's layout detail, export round trip and torch.compile."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.backend import dilated_backend, last_report

N, BS = 100, 16


class Attn(nn.Module):
    """One attention whose mask is built in the graph in one of several spellings."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(64, 192)

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
        i = torch.arange(n, device=x.device)
        if self.kind == "none":
            return F.scaled_dot_product_attention(q, k, v)
        if self.kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.kind == "mistral":          # sliding window 24, causal, as a bool mask
            mask = (i[:, None] - i[None, :] < 24) & (i[None, :] <= i[:, None])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.kind == "tril":
            s = (q @ k.transpose(-1, -2)) / 4.0
            s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device)), float("-inf"))
            return s.softmax(-1) @ v
        if self.kind == "additive_triu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.full((n, n), float("-inf")).triu(1))
        if self.kind == "band_global_finfo":
            keep = ((i[:, None] - i[None, :]).abs() < 10) | (i[:, None] < 4) | (i[None, :] < 4)
            s = (q @ k.transpose(-1, -2)) * 0.25
            s = s.masked_fill(keep.logical_not(), torch.finfo(s.dtype).min)
            return s.softmax(-1) @ v
        if self.kind == "where_additive":
            add = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=add)
        if self.kind == "padding":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(x[..., 0] > -1)[:, None, None, :])
        if self.kind == "data":             # depends on the data over queries and keys: no predicate
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(x[..., :1] @ x[..., :1].mT > 0)[:, None])
        raise ValueError(self.kind)


def brute(kind):
    p, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    return {"causal": j <= p, "mistral": (p - j < 24) & (j <= p), "tril": j <= p, "additive_triu": j <= p,
            "band_global_finfo": ((p - j).abs() < 10) | (p < 4) | (j < 4), "where_additive": j <= p}[kind]


AUTO = ["causal", "mistral", "tril", "additive_triu", "band_global_finfo", "where_additive"]


@pytest.mark.parametrize("kind", AUTO)
def test_auto_reads_the_models_mask_exactly(kind):
    model = Attn(kind).eval()
    x = torch.randn(2, N, 64)
    strategy = dc.BlockSparse("auto", block_size=BS)
    res = dc.rewrite(model, (x,), strategy, strict=True)
    (site,) = res.report.rewritten
    assert site.detail.startswith("auto") and "density=" in site.detail
    torch.testing.assert_close(res.module(x), model(x), atol=1e-6, rtol=1e-5)
    # the derived pattern's token mask equals the model's mask
    pattern = site.nodes["pattern"]
    got = pattern.token_mask(N, BS, is_causal=site.is_causal)[0]
    assert torch.equal(got, brute(kind))
    ops = [n.target for n in res.module.graph.nodes]
    assert torch.ops.dilate_compiler.block_sparse_attention_forward.default in ops


def test_auto_reads_key_padding_beside_the_predicate():
    """A padding mask [B, 1, 1, N] is key padding: the kernels take it; the output is the model's."""
    model = Attn("padding").eval()
    x = torch.randn(2, N, 64)
    res = dc.rewrite(model, (x,), dc.BlockSparse("auto", block_size=BS), strict=True)
    (site,) = res.report.rewritten
    assert site.mask_desc == "all + key padding" and site.detail.startswith("auto: all")
    torch.testing.assert_close(res.module(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,reason", [("data", "not a static predicate and key padding"),
                                         ("none", "no mask")])
def test_auto_skips_unstructured_masks_with_a_reason(kind, reason):
    model = Attn(kind).eval()
    x = torch.randn(2, N, 64)
    report = dc.explain(model, (x,), dc.BlockSparse("auto", block_size=BS))
    (site,) = report.skipped
    assert reason in site.reason


def test_fixed_pattern_on_an_unmasked_model_keeps_a_structured_mask_and_refuses_a_data_mask():
    x = torch.randn(2, N, 64)
    pattern = P.sliding_window(20) | P.global_tokens(2)
    model = Attn("none").eval()
    res = dc.rewrite(model, (x,), dc.BlockSparse(pattern, block_size=BS), strict=True)
    q, k, v = model.qkv(x).view(2, N, 3, 4, 16).permute(2, 0, 3, 1, 4)
    want = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=BS)
    torch.testing.assert_close(res.module(x), want)
    # a structured mask in the graph is kept: the pattern and the model's mask must both allow a key
    model = Attn("mistral").eval()
    res = dc.rewrite(model, (x,), dc.BlockSparse(pattern, block_size=BS), strict=True)
    assert "& (model mask)" in res.report.rewritten[0].detail
    q, k, v = model.qkv(x).view(2, N, 3, 4, 16).permute(2, 0, 3, 1, 4)
    both = pattern.token_mask(N, BS) & brute("mistral")
    torch.testing.assert_close(res.module(x), dense_masked(q, k, v, both), atol=1e-6, rtol=1e-5)
    # key padding rides beside the pattern; a mask that depends on the data over queries and keys is refused
    model = Attn("padding").eval()
    res = dc.rewrite(model, (x,), dc.BlockSparse(pattern, block_size=BS), strict=True)
    q, k, v = model.qkv(x).view(2, N, 3, 4, 16).permute(2, 0, 3, 1, 4)
    padded = pattern.token_mask(N, BS) & (x[..., 0] > -1)[:, None, None, :]
    torch.testing.assert_close(res.module(x), dense_masked(q, k, v, padded), atol=1e-6, rtol=1e-5)
    report = dc.explain(Attn("data").eval(), (x,), dc.BlockSparse(pattern, block_size=BS))
    assert "use BlockSparse('auto')" in report.skipped[0].reason


def dense_masked(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.slow
def test_export_round_trip_and_compile():
    model = Attn("mistral").eval()
    x = torch.randn(2, N, 64)
    strategy = dc.BlockSparse("auto", block_size=BS)
    ep = dc.export(model, (x,), strategy)
    assert len(ep.dilate_report.rewritten) == 1
    assert ep.constants and all(n.op != "get_attr" for n in ep.graph.nodes)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    torch.testing.assert_close(loaded.module()(x), model(x), atol=1e-6, rtol=1e-5)
    compiled = torch.compile(model, backend=dilated_backend, options={"strategy": strategy})
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
    assert last_report().rewritten[0].detail.startswith("auto: causal sliding_window(24)")


def test_training_through_the_rewritten_model():
    model = Attn("mistral")
    x = torch.randn(2, N, 64)
    res = dc.rewrite(model, (x,), dc.BlockSparse("auto", block_size=BS), strict=True)
    res.module(x).sum().backward()
    ref = Attn("mistral")
    ref.load_state_dict(model.state_dict())
    ref(x).sum().backward()
    got = dict(res.module.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, atol=1e-5, rtol=1e-4)
