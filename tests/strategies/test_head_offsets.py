"""``dc.Dilated(..., head_offsets="grouped")``: torchscale's LongNet, where head h of H reads the rows
``p % r == h // ceil(H / r)`` of a branch of rate r, against an independent float64 transcription of torchscale's
dilated attention (pad heads to a multiple of r, take the diagonal of (row class, head group), one softmax per
branch, branches mixed by their softmax denominators). The exact path, the Triton kernels in the interpreter and the
compiled graph are checked against it; the default (``"interleaved"``, ``h % r``) is unchanged."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dilate_compiler as dc
from dilate_compiler.lowering.dilated.plan import nested_order
from dilate_compiler.lowering.dilated.triton import _launch_pattern, dilated_attn_bwd, dilated_attn_fwd
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- torchscale's LongNet dilated attention, written out in float64 ------------------------------------------


def _dense_to_sparse(x: torch.Tensor, r: int) -> torch.Tensor:
    """torchscale's ``dense_to_sparse`` on one segment batch ``x [S, w, H, D]``: heads padded to a multiple of r,
    ``(l r1) (r2 h) -> l h r1 r2``, the diagonal r1 == r2, heads back in order: ``[S, w / r, H, D]`` where head
    ``r2 * (H_pad / r) + hh`` holds the rows ``l * r + r2``."""
    S, w, H, D = x.shape
    head_pad = (-H) % r
    x = F.pad(x, (0, 0, 0, head_pad))
    x = x.view(S, w // r, r, r, (H + head_pad) // r, D)              # S, l, r1, r2, h, D
    x = torch.diagonal(x, dim1=2, dim2=3)                            # S, l, h, D, r
    x = x.permute(0, 1, 4, 2, 3).reshape(S, w // r, H + head_pad, D)  # S, l, (r h), D
    return x[:, :, :H]


def _sparse_to_dense(x: torch.Tensor, r: int, fill: float) -> torch.Tensor:
    """The inverse of ``_dense_to_sparse`` into ``[S, w, H, ...]``, unselected rows set to ``fill``."""
    S, l, H = x.shape[:3]
    head_pad = (-H) % r
    hg = (H + head_pad) // r
    out = torch.full((S, l * r, H) + x.shape[3:], fill, dtype=x.dtype)
    for h in range(H):
        r2 = h // hg
        out[:, r2::r, h] = x[:, :, h]
    return out


def torchscale_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, is_causal: bool, scale: float):
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, N, D]`` (query head h reads kv head ``h // (Hq // Hkv)``), float64."""
    B, H, N, D = q.shape
    g = H // k.shape[1]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)))
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        w = min(w, -(-N // r) * r)                                   # a segment longer than the sequence holds it
        n_pad = -(-N // w) * w
        valid = torch.arange(n_pad) < N
        seg = lambda x: F.pad(x, (0, 0, 0, 0, 0, n_pad - N)).reshape(B * (n_pad // w), w, H, D)  # noqa: E731
        pos = torch.arange(n_pad).view(1, n_pad // w, w).expand(B, -1, -1).reshape(-1, w, 1, 1).expand(-1, -1, H, 1)
        qs, ks, vs, ps = (_dense_to_sparse(t, r) for t in (seg(q), seg(k), seg(v), pos.double()))
        ks_valid = _dense_to_sparse(valid.view(1, -1, 1, 1).expand(B, -1, H, 1).reshape(-1, w, H, 1).double(), r)
        s = torch.einsum("slhd,smhd->shlm", qs, ks) * scale          # S, H, l, m
        allowed = ks_valid[..., 0].transpose(1, 2).unsqueeze(2) > 0
        if is_causal:
            allowed = allowed & (ps[..., 0].transpose(1, 2).unsqueeze(-1) >= ps[..., 0].transpose(1, 2).unsqueeze(-2))
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)                                 # S, H, l
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        o = torch.einsum("shlm,smhd->slhd", p, vs)
        outs.append(_sparse_to_dense(o, r, 0.0).reshape(B, n_pad, H, D)[:, :N])
        lses.append(_sparse_to_dense(lse.transpose(1, 2), r, float("-inf")).reshape(B, n_pad, H)[:, :N])
    lse = torch.stack(lses)                                          # branches, B, N, H
    top = lse.amax(0).clamp_min(-1e300)
    weights = torch.exp(lse - top)
    weights = weights / weights.sum(0).clamp_min(1e-300)
    out = (weights.unsqueeze(-1) * torch.stack(outs)).sum(0)
    return out.transpose(1, 2)


# --- the strategy --------------------------------------------------------------------------------------------


def test_default_is_interleaved_and_unchanged():
    s = dc.Dilated((8, 16), (2, 4))
    assert s.head_offsets == "interleaved"
    h, p = torch.arange(6).view(-1, 1, 1), torch.arange(32).view(1, -1, 1)
    j = p.transpose(1, 2)
    want = sum(((p // w == j // w) & (p % r == h % r) & (j % r == h % r)).long() for w, r in ((8, 2), (16, 4)))
    assert torch.equal(s.multiplicity(32, 6), want)


def test_grouped_gives_contiguous_head_groups():
    """H = 5, r = 2: ceil(5 / 2) = 3 heads share offset 0, two offset 1; r = 8 > H: head h has offset h."""
    s = dc.Dilated((8, 16), (2, 8), head_offsets="grouped")
    offsets = {br.dilation_rate: [(g.start, g.stop, g.step, g.offset) for g in br.head_groups]
               for br in s.plan(40, 5).branches}
    assert offsets[2] == [(0, 3, 1, 0), (3, 5, 1, 1)]
    assert offsets[8] == [(h, h + 1, 1, h) for h in range(5)]


def test_grouped_differs_from_interleaved_where_the_finding_says():
    """H = 4, rates (1, 2, 4): heads 1 and 2 differ on every row, heads 0 and 3 agree."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 32, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pattern = ((8, 16, 32), (1, 2, 4))
    a = dc.Dilated(*pattern).reference(q, k, v)
    b = dc.Dilated(*pattern, head_offsets="grouped").reference(q, k, v)
    differs = (a - b).abs().amax(-1) > 1e-9
    assert differs[0, 1].all() and differs[0, 2].all()
    assert not differs[0, 0].any() and not differs[0, 3].any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_offsets="contiguous"), r"head_offsets must be one of \('interleaved', 'grouped'\), got 'contiguous'"),
    (dict(mixing="head_groups", head_offsets="grouped"), r"needs mixing='lse', got mixing='head_groups'"),
])
def test_bad_head_offsets_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dc.Dilated((8,), (2,), **kwargs)


REFERENCE_CASES = [  # Hq, Hkv, N, segments, rates, causal
    (4, 4, 32, (8, 16, 32), (1, 2, 4), False),
    (4, 4, 32, (8, 16, 32), (1, 2, 4), True),
    (5, 5, 37, (6, 12), (2, 3), True),       # H not a multiple of r, N not a multiple of the segments
    (3, 3, 40, (8, 16), (1, 8), False),      # r > H
    (6, 2, 45, (12, 24, 48), (1, 2, 4), True),  # GQA
    (2, 1, 20, (64,), (4,), False),          # a segment longer than the sequence, rows no head reads
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_reference_matches_torchscale(case):
    Hq, Hkv, N, segs, rates, causal = case
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(2, h, N, 16, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    want = torchscale_dilated_attention(q, k, v, segs, rates, is_causal=causal, scale=0.25)
    got = dc.Dilated(segs, rates, head_offsets="grouped").reference(q, k, v, is_causal=causal, scale=0.25)
    assert_close(got, want, torch.float64)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), heads=st.integers(1, 7),
       branches=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3))
def test_plan_covers_exactly_the_grouped_multiplicity(n, heads, branches):
    s = dc.Dilated(tuple(a * r for a, r in branches), tuple(r for _, r in branches), head_offsets="grouped")
    m = torch.zeros(heads, n, n, dtype=torch.int64)
    for br in s.plan(n, heads).branches:
        w, r = br.segment_length, br.dilation_rate
        for grp in br.head_groups:
            rows = torch.tensor([p for p in range(n) if p % r == grp.offset], dtype=torch.int64)
            same = (rows.view(-1, 1) // w == rows.view(1, -1) // w).long()
            for h in grp.heads():
                m[h][rows.view(-1, 1), rows.view(1, -1)] += same
        assert sorted(h for grp in br.head_groups for h in grp.heads()) == list(range(heads))
    assert torch.equal(m, s.multiplicity(n, heads))


# --- the op: exact path, kernels, compiled graph ---------------------------------------------------------------


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_op_exact_path_matches_torchscale_with_gradients(case):
    Hq, Hkv, N, segs, rates, causal = case
    g = torch.Generator().manual_seed(N + 1)
    q, k, v = (torch.randn(1, h, N, 16, generator=g, dtype=torch.float64).requires_grad_() for h in (Hq, Hkv, Hkv))
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=causal, scale=0.25, head_offsets="grouped")
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = torchscale_dilated_attention(q64, k64, v64, segs, rates, is_causal=causal, scale=0.25)
    assert_close(out, want, torch.float64)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(want, (q64, k64, v64), dout)):
        assert_close(a, b, torch.float64, name)


def test_op_decoding_rows_use_grouped_offsets():
    """q holds the last 5 of 40 positions: the last 5 rows of the full op."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    args = ((8, 16), (2, 4))
    full = dc.ops.dilated_attention(q, k, v, *args, is_causal=True, head_offsets="grouped")
    last = dc.ops.dilated_attention(q[:, :, -5:], k, v, *args, is_causal=True, head_offsets="grouped")
    assert_close(last, full[:, :, -5:], torch.float64)


def test_op_refuses_grouped_with_head_groups_mixing():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head_offsets='grouped'.*needs mixing='lse'"):
        dc.ops.dilated_attention(q, q, q, (4,), (2,), mixing="head_groups", head_offsets="grouped")


def test_grouped_offsets_leave_the_nested_walks():
    """Rates (1, 2, 4) over 4 heads: the offsets differ from h % r, so the kernels walk per branch with GROUPED;
    rates (1, 4) over 4 heads: they coincide (r = 1 or r >= H), and the interleaved, nested launch runs."""
    assert nested_order((8, 16, 32), (1, 2, 4), "lse", 0.0, "grouped") is None
    meta, _, nested = _launch_pattern((8, 16, 32), (1, 2, 4), "lse", 4, 0.0, "grouped")
    assert meta["GROUPED"] and not nested
    assert _launch_pattern((8, 32), (1, 4), "lse", 4, 0.0, "grouped") == _launch_pattern((8, 32), (1, 4), "lse", 4,
                                                                                          0.0)


KERNEL_CASES = [  # Hq, Hkv, N, segments, rates, causal
    (4, 2, 40, (8, 16, 32), (1, 2, 4), True),
    (4, 4, 40, (8, 16, 32), (1, 2, 4), False),
    (5, 5, 30, (6, 12), (2, 3), True),
    (3, 3, 24, (8, 16), (1, 8), False),       # r > H: offsets coincide, the nested walks run
]


@pytest.mark.parametrize("case", [c if i % 2 == 0 else pytest.param(c, marks=pytest.mark.slow)
                                  for i, c in enumerate(KERNEL_CASES)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_kernels_match_torchscale(case, dtype):
    Hq, Hkv, N, segs, rates, causal = case
    g = torch.Generator().manual_seed(N + Hq)
    q, k, v = (torch.randn(1, h, N, 32, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    scale = 32 ** -0.5
    args = dict(is_causal=causal, scale=scale, mixing="lse", head_offsets="grouped")
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, **args)
    q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (q, k, v))
    want = torchscale_dilated_attention(q64, k64, v64, segs, rates, is_causal=causal, scale=scale)
    assert_close(out.cpu(), want, dtype)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, **args)
    for name, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(want, (q64, k64, v64), dout.double().cpu())):
        assert_close(a.cpu(), b, dtype, name)


def test_compiled_model_keeps_grouped_offsets():
    """dc.rewrite of an SDPA model with a grouped strategy runs the op with grouped offsets (CPU: exact path)."""

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 32, 16, generator=g) for _ in range(3))
    strategy = dc.Dilated((8, 16, 32), (1, 2, 4), head_offsets="grouped")
    res = dc.rewrite(Attn(), (q, k, v), strategy=strategy)
    assert len(res.report.rewritten) == 1
    want = torchscale_dilated_attention(q.double(), k.double(), v.double(), strategy.segment_lengths,
                                        strategy.dilation_rates, is_causal=True, scale=1 / math.sqrt(16))
    assert_close(res.module(q, k, v), want, torch.float32)


def test_distributed_refuses_grouped_offsets():
    from dilate_compiler.distributed.links import links_for

    with pytest.raises(NotImplementedError, match="head_offsets='grouped'"):
        links_for(dc.Dilated((8,), (2,), head_offsets="grouped"), 16, 4, False)


def test_warp_specialised_forward_refuses_grouped_offsets():
    """The Hopper forward walks nested branches (offsets h % r): grouped offsets that differ are refused with a
    reason, ones that coincide are not refused for their offsets."""
    from dilate_compiler.lowering.dilated import op as dilated_op

    if dilated_op.gluon is None:
        pytest.skip("this Triton has no Gluon")
    q = torch.zeros(1, 4, 64, 64)
    reason = dilated_op.warp_specialised_reason(q, q, q, None, (8, 16, 32), (1, 2, 4), False, "lse", 0.0,
                                                head_offsets="grouped")
    assert "head_offsets='grouped' with rates (1, 2, 4) over 4 heads" in reason
    reason = dilated_op.warp_specialised_reason(q, q, q, None, (8, 32), (1, 4), False, "lse", 0.0,
                                                head_offsets="grouped")
    assert "head_offsets" not in reason
