"""Curve orders (bijection, unit steps, inverse), dc.Hilbert against masked dense references, and the pass that
reorders once (hand-written ViT, Hugging Face ViT, position-dependent ops, torch.compile)."""

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dilate_compiler as dc
from dilate_compiler.strategies.contract import Emitted
from dilate_compiler.strategies.reference import weighted_softmax_attention
from dilate_compiler import hilbert as hb
from dilate_compiler import patterns as P
from tests.lowering.block_sparse.test_op import dense_reference

AWKWARD = [(7, 13), (14, 14), (16, 9), (1, 5), (2, 3), (256, 256), (4, 6, 5), (3, 3, 3), (2, 8, 8), (5, 1, 7)]


def steps(grid, order):
    c = hb.coordinates(grid)[order]
    return (c[1:] - c[:-1]).abs().sum(1)


def check_curve(grid):
    order = hb.curve_order(grid)
    n = math.prod(grid)
    assert order.dtype == torch.int64 and torch.equal(order.sort().values, torch.arange(n))
    assert bool((steps(grid, order) == 1).all()), f"non-unit steps on {grid}"
    inv = hb.inverse(order)
    assert torch.equal(order[inv], torch.arange(n)) and torch.equal(inv[order], torch.arange(n))


@pytest.mark.parametrize("grid", AWKWARD, ids=str)
def test_curve_is_a_unit_step_bijection(grid):
    check_curve(grid)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 90), st.integers(1, 90))
def test_curve_2d_any_size(h, w):
    check_curve((h, w))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12))
def test_curve_3d_any_size(t, h, w):
    check_curve((t, h, w))


def test_hilbert_on_a_power_of_two_square_visits_aligned_quadrants():
    order = hb.curve_order((16, 16))
    c = hb.coordinates((16, 16))[order]
    for start in range(0, 256, 16):   # every 16 consecutive cells form an aligned 4x4 square
        quad = c[start:start + 16]
        assert (quad.amax(0) - quad.amin(0)).tolist() == [3, 3]
        assert (quad.amin(0) % 4 == 0).all()


@pytest.mark.parametrize("grid", [(7, 13), (4, 6, 5), (8, 8)], ids=str)
def test_z_order_is_a_bijection_in_morton_order(grid):
    order = hb.z_order(grid)
    n = math.prod(grid)
    assert torch.equal(order.sort().values, torch.arange(n))
    c = hb.coordinates(grid)[order]
    code = torch.zeros(n, dtype=torch.int64)
    for b in range(4):
        for a in range(len(grid)):
            code |= ((c[:, a] >> b) & 1) << (b * len(grid) + len(grid) - 1 - a)
    assert bool((code[1:] > code[:-1]).all())


def test_curve_arguments_are_checked_and_results_cached_but_not_shared():
    for bad in [(0, 3), (3,), (1, 2, 3, 4), (2.0, 3), "8x8"]:
        with pytest.raises(ValueError, match="grid"):
            hb.curve_order(bad)
    with pytest.raises(ValueError, match="curve"):
        hb.curve_order((4, 4), "peano")
    a = hb.curve_order((5, 5))
    a[0] = 99
    assert hb.curve_order((5, 5))[0] != 99


# --- the strategy on tensors ------------------------------------------------------------------------------------


def qkv(n, h=2, hkv=None, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, c, n, d, generator=g, dtype=torch.float64) for c in (h, hkv or h, hkv or h))


STRATEGIES = {
    "local": (dc.Hilbert((6, 7), dc.BlockSparse(P.local(2), block_size=8)), 42),
    "window+cls": (dc.Hilbert((5, 6), dc.BlockSparse(P.sliding_window(9), block_size=8)), 31),
    "neighbourhood+cls-zorder": (dc.Hilbert((6, 6), dc.BlockSparse(P.neighborhood((6, 6), 1), block_size=8),
                                            curve="zorder"), 38),
    "video-local": (dc.Hilbert((3, 4, 5), dc.BlockSparse(P.local(1), block_size=16)), 60),
    "cls-inner": (dc.Hilbert((5, 5), dc.BlockSparse(P.local(1), block_size=8), extra_tokens="inner"), 26),
    "dilated": (dc.Hilbert((8, 8), dc.Dilated((16, 32), (1, 2))), 64),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_reordered_then_restored_equals_direct_computation_on_the_same_mask(name):
    strategy, n = STRATEGIES[name]
    q, k, v = qkv(n, hkv=1 if name == "local" else None)
    out = strategy.attention(q, k, v)
    m = strategy.token_mask(n, q.shape[1])
    if m.dtype == torch.bool:
        ref = dense_reference(q, k, v, m)
    else:   # a Dilated inner strategy: the multiplicity-weighted softmax, in the caller's order
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        w = m.double() * torch.exp(s - s.amax(-1, keepdim=True))
        ref = (w / w.sum(-1, keepdim=True).clamp_min(1e-300)) @ v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    extra = n - math.prod(strategy.grid)
    if extra and strategy.extra_tokens == "global":
        assert m[..., :extra, :].all() and m[..., :, :extra].all()


@pytest.mark.parametrize("name", ["neighbourhood+cls-zorder", "window+cls", "video-local"])
def test_fused_order_equals_gathering(name):
    # reorder="fused": the op reads q, k, v and writes out through the permutation, no gathers; same result
    # and gradients as gathering into curve order and back
    strategy, n = STRATEGIES[name]
    fused = dc.Hilbert(strategy.grid, strategy.inner, curve=strategy.curve, reorder="fused")
    q, k, v = (t.requires_grad_() for t in qkv(n))
    out, want = fused.attention(q, k, v), strategy.attention(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_order_argument_is_checked():
    q, k, v = qkv(16)
    pat = P.local(1)
    for bad, msg in ((torch.arange(15), "shape"), (torch.arange(16.0), "int32/int64"),
                     (torch.zeros(16, dtype=torch.long), "permutation"), ([0] * 16, "int32/int64")):
        with pytest.raises(ValueError, match=msg):
            dc.ops.block_sparse_attention(q, k, v, pat, block_size=8, order=bad)
    order = torch.arange(16)
    dc.ops.block_sparse_attention(q, k, v, pat, block_size=8, order=order)
    order[0] = 1                                  # changed in place after a check: checked again
    with pytest.raises(ValueError, match="permutation"):
        dc.ops.block_sparse_attention(q, k, v, pat, block_size=8, order=order)
    with pytest.raises(NotImplementedError, match="index table"):
        dc.Hilbert((4, 4), dc.Dilated((16,), (1,)), reorder="fused")


def test_grid_neighbourhood_is_the_same_mask_in_any_order():
    grid = (6, 9)
    row = dc.BlockSparse(P.neighborhood(grid, 2), block_size=8)
    want = P.neighborhood(grid, 2).token_mask(54, 8)
    for curve in ("hilbert", "zorder"):
        assert torch.equal(dc.Hilbert(grid, row, curve=curve).token_mask(54), want)
    q, k, v = qkv(54)
    torch.testing.assert_close(dc.Hilbert(grid, row).attention(q, k, v),
                               dc.ops.block_sparse_attention(q, k, v, row.pattern, block_size=8))


def test_strategy_arguments_are_checked():
    inner = dc.BlockSparse(P.local(1))
    with pytest.raises(ValueError, match="grid"):
        dc.Hilbert((0, 4), inner)
    with pytest.raises(TypeError, match="inner"):
        dc.Hilbert((4, 4), dc.Adaptive())
    with pytest.raises(ValueError, match="auto"):
        dc.Hilbert((4, 4), dc.BlockSparse("auto"))
    for kw in ({"curve": "peano"}, {"extra_tokens": "local"}, {"reorder": "twice"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            dc.Hilbert((4, 4), inner, **kw)
    with pytest.raises(ValueError, match="seq_len=15"):
        dc.Hilbert((4, 4), inner).plan(15)
    with pytest.raises(NotImplementedError, match="extra_tokens='inner'"):
        dc.Hilbert((4, 4), dc.Dilated((8,), (1,))).plan(17)


# --- the pass: reorder once ----------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, E, H, rope=False):
        super().__init__()
        self.H, self.rope = H, rope
        self.n1, self.n2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.m1, self.m2 = nn.Linear(E, 2 * E), nn.Linear(2 * E, E)

    def forward(self, x, cos=None):
        B, N, E = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, N, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4).unbind(0)
        if cos is not None:   # RoPE-style: a position-dependent factor per token
            q, k = q * cos, k * cos
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, E)
        x = x + self.o(a)
        return x + self.m2(F.gelu(self.m1(self.n2(x))))


class ViT(nn.Module):
    """Conv patch embedding -> flatten -> transpose, optional CLS token, learned positions, blocks, norm."""

    def __init__(self, E=32, H=2, depth=3, cls=True, rope=False, img=28, patch=4):
        super().__init__()
        g = img // patch
        n = g * g + (1 if cls else 0)
        self.pe = nn.Conv2d(3, E, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, E)) if cls else None
        self.pos = nn.Parameter(torch.randn(1, n, E) * 0.1)
        self.register_buffer("cos", torch.cos(torch.arange(n).view(n, 1) * torch.linspace(0.1, 1, E // H)))
        self.rope = rope
        self.blocks = nn.ModuleList(Block(E, H) for _ in range(depth))
        self.norm = nn.LayerNorm(E)

    def forward(self, img):
        x = self.pe(img).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.pos
        for b in self.blocks:
            x = b(x, self.cos if self.rope else None)
        return self.norm(x)


class MaskedDense:
    """Test strategy (``strategies.contract``): dense SDPA with a fixed bool mask (the Hilbert strategy's mask in
    the model's order)."""

    def __init__(self, mask):
        self.mask = mask

    def check_site(self, site):
        return None

    def emit_call(self, emit, site, call):
        m = emit.constant(self.mask)
        return Emitted(emit(torch.ops.aten.scaled_dot_product_attention.default, (call.q, call.k, call.v, m),
                            {"scale": call.scale}))

    def reference(self, q, k, v, *, is_causal=False, scale=None, attn_mask=None):
        return weighted_softmax_attention(q, k, v, self.mask, scale=scale, attn_mask=attn_mask)


def gathers(gm):
    return sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.index_select.default)


LOCAL = dc.BlockSparse(P.local(2), block_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "no-cls"])
@pytest.mark.parametrize("depth", [1, 3])
def test_vit_reorders_once_and_equals_the_mask_in_row_major_order(cls, depth):
    torch.manual_seed(depth)
    model = ViT(depth=depth, cls=cls).double().eval()
    img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    strategy = dc.Hilbert(None, LOCAL)                          # grid inferred from the conv: 7 x 7
    once = dc.rewrite(model, (img,), strategy, strict=True)
    assert all("grid 7x7" in s.detail for s in once.report.rewritten)
    assert gathers(once.module) == 2                             # once in, once out, whatever the depth
    per_site = dc.rewrite(model, (img,), dc.Hilbert((7, 7), LOCAL, reorder="per_site"), strict=True).module
    assert gathers(per_site) == 4 * depth
    n = 49 + cls
    ref = dc.rewrite(model, (img,), MaskedDense(strategy.token_mask(n, grid=(7, 7))[0]), strict=True).module
    want = ref(img)
    torch.testing.assert_close(once.module(img), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(per_site(img), want, rtol=1e-10, atol=1e-10)
    fused = dc.rewrite(model, (img,), dc.Hilbert((7, 7), LOCAL, reorder="fused"), strict=True).module
    assert gathers(fused) == 0                                   # the kernels read through the index table
    torch.testing.assert_close(fused(img), want, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_vit_gradients_equal_the_row_major_mask():
    torch.manual_seed(0)
    model = ViT(depth=2).double()
    img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    once = dc.rewrite(model, (img,), dc.Hilbert(None, LOCAL)).module
    ref = dc.rewrite(model, (img,), MaskedDense(dc.Hilbert((7, 7), LOCAL).token_mask(50)[0])).module
    for m in (once, ref):
        m(img).square().sum().backward()
    got = {n: p.grad for n, p in once.named_parameters() if p.grad is not None}
    want = dict(ref.named_parameters())
    assert len(got) > 10
    for name, g in got.items():
        torch.testing.assert_close(g, want[name].grad, rtol=1e-9, atol=1e-10)


def test_position_dependent_ops_stop_the_propagation():
    torch.manual_seed(1)
    model = ViT(depth=2, rope=True).double().eval()
    img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    once = dc.rewrite(model, (img,), dc.Hilbert((7, 7), LOCAL)).module
    cos_gathers = [n for n in once.graph.nodes if n.target is torch.ops.aten.index_select.default
                   and n.args[0].op == "get_attr" and n.args[0].target == "cos"]
    assert cos_gathers                          # the per-token factor is permuted with the tokens
    ref = dc.rewrite(model, (img,), MaskedDense(dc.Hilbert((7, 7), LOCAL).token_mask(50)[0])).module
    torch.testing.assert_close(once(img), ref(img), rtol=1e-10, atol=1e-10)


def test_token_reductions_and_cls_selection_need_no_restore():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = ViT(depth=2)

        def forward(self, img):
            x = self.vit(img)
            return x[:, 0] + x.mean(1)

    torch.manual_seed(2)
    model = Pooled().double().eval()
    img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    once = dc.rewrite(model, (img,), dc.Hilbert(None, LOCAL)).module
    assert gathers(once) == 1
    ref = dc.rewrite(model, (img,), MaskedDense(dc.Hilbert((7, 7), LOCAL).token_mask(50)[0])).module
    torch.testing.assert_close(once(img), ref(img), rtol=1e-10, atol=1e-10)


def test_sites_the_strategy_cannot_take_are_skipped_with_reasons():
    class Causal(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    q = torch.randn(1, 2, 16, 8)
    rep = dc.explain(Causal(), (q,), dc.Hilbert((4, 4), LOCAL))
    assert "causal in the model's token order" in rep.skipped[0].reason

    class Plain(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    rep = dc.explain(Plain(), (q,), dc.Hilbert(None, LOCAL))
    assert "could not be inferred" in rep.skipped[0].reason and "grid=" in rep.skipped[0].reason
    rep = dc.explain(Plain(), (torch.randn(1, 2, 17, 8),), dc.Hilbert((4, 4), dc.Dilated((8,), (1,))))
    assert "extra_tokens='inner'" in rep.skipped[0].reason


transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_hugging_face_vit_with_a_hilbert_local_strategy():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, attn_implementation="sdpa")

    class LastHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = transformers.ViTModel(cfg, add_pooling_layer=True)

        def forward(self, x):
            out = self.vit(x)
            return out.last_hidden_state, out.pooler_output

    model = LastHidden().double().eval()
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    strategy = dc.Hilbert(None, dc.BlockSparse(P.local(2), block_size=16))
    once = dc.rewrite(model, (img,), strategy, strict=True)
    assert len(once.report.rewritten) == 2 and all("grid 8x8 + 1 global" in s.detail for s in once.report.rewritten)
    assert gathers(once.module) == 2
    ref = dc.rewrite(model, (img,), MaskedDense(strategy.token_mask(65, grid=(8, 8))[0]), strict=True).module
    for got, want in zip(once.module(img), ref(img)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_backend_compiles_the_hilbert_strategy():
    torch.manual_seed(3)
    model = ViT(depth=2).eval()
    img = torch.randn(2, 3, 28, 28)
    strategy = dc.Hilbert(None, LOCAL)
    compiled = torch.compile(model, backend="dilated", options={"strategy": strategy})
    want = dc.rewrite(model, (img,), strategy).module(img)
    torch.testing.assert_close(compiled(img), want, rtol=1e-5, atol=1e-5)
    assert "hilbert order" in str(dc.backend.REPORTS[-1])


def test_plan_hands_out_a_permutation_of_the_callers_own():
    """Mutating the returned permutation must not change what later sites and calls use."""
    h = dc.Hilbert((4, 4), dc.BlockSparse(P.local(1), block_size=4))
    perm, _ = h.plan(16)
    expected = perm.clone()
    perm.zero_()
    assert torch.equal(h.plan(16)[0], expected)
    q = torch.randn(1, 2, 16, 8)
    fresh = dc.Hilbert((4, 4), dc.BlockSparse(P.local(1), block_size=4))
    torch.testing.assert_close(h.attention(q, q, q), fresh.attention(q, q, q))
