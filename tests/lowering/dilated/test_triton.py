"""Triton kernels, launchers called directly. On CPU this runs under TRITON_INTERPRET=1 (set in conftest):
small shapes, float16 and float32 (the interpreter's bfloat16 dot is wrong; bfloat16 is checked on the GPU)."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler.lowering.dilated.plan import nested_order
from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd
from tests.tolerances import assert_close, eager_dilated, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # B, Hq, Hkv, N, D, segments, rates, causal, mixing
    (1, 4, 2, 63, 32, (8, 16, 32), (1, 2, 4), True, "lse"),
    (1, 4, 2, 63, 32, (8, 16, 32), (1, 2, 4), False, "lse"),
    (2, 3, 3, 15, 32, (4, 6), (2, 3), True, "lse"),
    (1, 5, 5, 50, 32, (8, 16, 64), (1, 2, 4), True, "head_groups"),
    (1, 2, 1, 1, 32, (8,), (2,), False, "lse"),
    (1, 2, 2, 40, 32, (64,), (1,), True, "lse"),  # one dense branch, w > N
    # tiles (16 rows x L) inside segments: exercises the unmasked key/query blocks
    (1, 2, 1, 200, 32, (64, 128), (1, 2), True, "lse"),
    (1, 2, 2, 200, 32, (64, 128), (1, 2), False, "lse"),
    # nested patterns (each segment and rate divides the next) with rows and keys inside one segment of the
    # shortest branch: each linked pair visited once, weighted by its multiplicity; unsorted branches
    (1, 4, 2, 300, 32, (256, 64, 128), (4, 1, 2), True, "lse"),
    (1, 4, 4, 300, 32, (64, 128, 256), (1, 2, 4), False, "lse"),
    (1, 3, 3, 260, 32, (64, 64, 128), (1, 2, 2), False, "lse"),   # equal segments: an empty walk
    (1, 2, 2, 150, 32, (48, 96), (1, 2), True, "lse"),      # 48 not a multiple of a tile's span: walk per program
    (1, 2, 2, 200, 32, (64, 128, 512), (1, 2, 4), False, "lse"),  # a segment longer than the sequence
    (1, 2, 2, 150, 32, (64, 128), (1, 1), True, "lse"),     # equal rates: keys of the short segment count twice
]


def _slow_from(cases, n_index, n_min):
    """The cases whose sequence length is at least ``n_min`` marked slow (the interpreter's time grows with N)."""
    return [pytest.param(c, marks=pytest.mark.slow) if c[n_index] >= n_min else c for c in cases]


@pytest.mark.parametrize("case", _slow_from(CASES, 3, 60),
                         ids=lambda c: f"N{c[3]}-H{c[1]}/{c[2]}-{c[7] and 'causal' or 'full'}-{c[8]}")
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_kernels_match_reference(case, dtype):
    B, Hq, Hkv, N, D, segs, rates, is_causal, mixing = case
    if dtype == torch.float32 and N == 1:
        pytest.skip("dq is exactly 0 at N == 1; float32 rounding of delta dominates the relative measure")
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    strategy = dc.Dilated(segs, rates, mixing)
    scale = D ** -0.5
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, is_causal=is_causal, scale=scale, mixing=mixing)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = strategy.reference(q64, k64, v64, is_causal=is_causal)
    eager_err = rel_err(eager_dilated(q, k, v, strategy, is_causal), ref) if dtype != torch.float32 else None
    assert_close(out, ref, dtype, eager_err=eager_err)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    dq, dk, dv = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, is_causal=is_causal, scale=scale,
                                  mixing=mixing)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, name)


def test_kernel_lse_matches_exact_path():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 32, generator=g).to(DEVICE, torch.float16) for _ in range(3))
    _, lse = dilated_attn_fwd(q, k, v, (8, 16), (1, 2), is_causal=True, scale=0.2, mixing="lse")
    _, lse_exact = torch.ops.dilate_compiler.dilated_attention_forward_exact(
        q.float(), k.float(), v.float(), None, [8, 16], [1, 2], True, 0.2, "lse", 0.0, None)
    torch.testing.assert_close(lse.float().cpu(), lse_exact.cpu(), atol=2e-3, rtol=1e-3)


def test_unlinked_rows_are_zero_and_written():
    """Rates all 2: head 0 links only even rows. Every output element is written (poisoned first)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 32, generator=g).to(DEVICE, torch.float16) for _ in range(3))
    out, lse = dilated_attn_fwd(q, k, v, (4, 8), (2, 2), is_causal=False, scale=0.2, mixing="lse")
    assert torch.isfinite(out).all()
    assert (out[0, 0, 1::2] == 0).all() and (out[0, 1, 0::2] == 0).all()
    assert torch.isinf(lse[0, 0, 1::2]).all() and torch.isfinite(lse[0, 0, 0::2]).all()


# --- queries at an offset (the per-rank compute of sequence-parallel attention) ----------------------------

OFFSET_CASES = [
    # Hq, Hkv, N, segments, rates, causal, mixing, query rows [lo, hi)
    (4, 2, 63, (8, 16, 32), (1, 2, 4), True, "lse", (13, 50)),      # lo, hi not multiples of L = 4
    (4, 2, 63, (8, 16, 32), (1, 2, 4), False, "lse", (32, 63)),
    (4, 4, 200, (64, 128), (1, 2), True, "lse", (64, 192)),          # whole tiles inside segments
    (5, 5, 50, (8, 16, 64), (1, 2, 4), False, "head_groups", (1, 2)),
    (2, 1, 40, (64,), (1,), True, "lse", (0, 40)),
    (4, 2, 300, (64, 128, 256), (1, 2, 4), False, "lse", (40, 260)),  # nested, rows cut off both ends
    (4, 2, 600, (128, 256, 512), (1, 2, 4), True, "lse", (32, 560)),   # every other query tile walks
]


@pytest.mark.parametrize("case", _slow_from(OFFSET_CASES, 2, 60),
                         ids=lambda c: f"N{c[2]}-q{c[7][0]}:{c[7][1]}-{c[6]}")
def test_kernels_with_query_offset_match_reference_rows(case):
    """q holds rows [lo, hi) of the sequence: out, lse and dq are those rows of the whole op, dk and dv the
    gradients of all keys from those queries alone (the reference's dout is zero elsewhere)."""
    Hq, Hkv, N, segs, rates, is_causal, mixing, (lo, hi) = case
    dtype = torch.float32
    g = torch.Generator().manual_seed(N + lo)
    q, k, v = (torch.randn(1, h, N, 32, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    strategy = dc.Dilated(segs, rates, mixing)
    scale = 32 ** -0.5
    args = dict(is_causal=is_causal, scale=scale, mixing=mixing)
    q_rows = q[:, :, lo:hi]
    out, lse = dilated_attn_fwd(q_rows, k, v, segs, rates, q_offset=lo, **args)
    _, lse_all = dilated_attn_fwd(q, k, v, segs, rates, **args)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = strategy.reference(q64, k64, v64, is_causal=is_causal)
    assert out.shape == q_rows.shape and lse.shape == q_rows.shape[:3]
    assert_close(out, ref[:, :, lo:hi], dtype)
    torch.testing.assert_close(lse, lse_all[:, :, lo:hi])
    dout = torch.zeros(ref.shape, dtype=torch.float64)
    dout[:, :, lo:hi] = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    dq, dk, dv = dilated_attn_bwd(dout[:, :, lo:hi].to(DEVICE, dtype), q_rows, k, v, out, lse, segs, rates,
                                  q_offset=lo, **args)
    assert dq.shape == q_rows.shape and dk.shape == k.shape
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), (grads[0][:, :, lo:hi], grads[1], grads[2])):
        assert_close(a, b, dtype, name)


def test_nested_order_takes_chains_only():
    """The kernels visit each linked pair once (multiplicity-weighted) only for chains under LSE mixing."""
    assert nested_order((2048, 4096, 8192, 16384), (1, 2, 4, 8), "lse") == ((2048, 4096, 8192, 16384), (1, 2, 4, 8))
    assert nested_order((16, 4, 8), (4, 1, 2), "lse") == ((4, 8, 16), (1, 2, 4))
    assert nested_order((4, 6), (2, 3), "lse") is None                        # 4 does not divide 6
    assert nested_order((8, 16), (2, 3), "lse") is None                       # rates 2, 3
    assert nested_order((8, 16), (1, 2), "head_groups") is None
    assert nested_order((8, 16), (1, 2), "lse", dropout_p=0.1) is None        # one keep flag per branch and pair


def test_walks_compile_one_path_when_the_tiles_decide_it():
    """Which code a kernel compiles: walks only when every program's rows sit in one shortest segment, the
    per-branch blocks only when none can, both otherwise."""
    from dilate_compiler.lowering.dilated.triton import walks

    assert walks(True, 2048, 8, 128, 64, 0) == 2              # config A's forward: every 1K-row tile inside 2K
    assert walks(True, 2048, 8, 128, 64, 4096) == 2           # an aligned query offset
    assert walks(True, 2048, 8, 128, 64, 1000) == 1           # an unaligned one: some tiles span segments
    assert walks(True, 48, 2, 16, 16, 0) == 1                 # 48 not a multiple of a tile's span (32)
    assert walks(True, 128, 4, 64, 64, 0) == 0                # a tile spans 253 positions > 128: none walks
    assert walks(True, 2048, 8, 128, 4, 0) == 0               # walked tile not a multiple of L
    assert walks(False, 2048, 8, 128, 64, 0) == 0             # not nested (head_groups, dropout, no chain)


def test_causal_walk0_kernel_applies_to_causal_rate_one_chains_only():
    """The first walk runs over contiguous rows (``_dilated_attn_fwd_walk0_kernel``) for causal chains whose
    shortest branch has rate 1 and whose every forward program walks."""
    from dilate_compiler.lowering.dilated.triton import _launch_pattern, walk0_applies

    def applies(segs, rates, is_causal, walks=2):
        meta, _, nested = _launch_pattern(segs, rates, "lse", 4, 0.0)
        return walk0_applies(meta, nested, is_causal, walks)

    assert applies((2048, 4096, 8192, 16384), (1, 2, 4, 8), True)
    assert applies((64, 128), (1, 1), True)
    assert not applies((2048, 4096, 8192, 16384), (1, 2, 4, 8), False)        # nothing masked to save
    assert not applies((2048, 4096, 8192, 16384), (1, 2, 4, 8), True, walks=1)  # some programs don't walk
    assert not applies((64, 128), (2, 4), True)                                # walk 0 skips rows
    assert not applies((4, 6), (2, 3), True)                                   # not a chain
    assert not applies((24, 48), (1, 2), True)                                 # a row tile (16) straddles 24


@pytest.mark.slow
@pytest.mark.parametrize("segs,lo,hi", [((64, 128, 256), 0, 300), ((64, 128, 256), 64, 260),
                                         ((128, 256, 512), 0, 300)])
def test_causal_walk0_kernel_seeds_the_forward(monkeypatch, segs, lo, hi):
    """With walk 0 run over contiguous rows and its softmax state seeding the strided forward, out and lse
    match the forward that walks everything itself and the float64 reference, also at a query offset, and
    with shortest segments of 8 row tiles (128 positions, 16-row tiles)."""
    from dilate_compiler.lowering.dilated import triton as dt

    rates = (1, 2, 4)
    g = torch.Generator().manual_seed(lo)
    q, k, v = (torch.randn(1, h, 300, 32, generator=g).to(DEVICE) for h in (4, 2, 2))
    args = dict(is_causal=True, scale=32 ** -0.5, mixing="lse", q_offset=lo)
    seen = []
    applies = dt.walk0_applies
    monkeypatch.setattr(dt, "walk0_applies", lambda *a: seen.append(applies(*a)) or seen[-1])
    out, lse = dt.dilated_attn_fwd(q[:, :, lo:hi], k, v, segs, rates, **args)
    monkeypatch.setattr(dt, "walk0_applies", lambda *a: False)
    out_plain, lse_plain = dt.dilated_attn_fwd(q[:, :, lo:hi], k, v, segs, rates, **args)
    assert seen == [True]
    ref = dc.Dilated(segs, rates).reference(q.double(), k.double(), v.double(), is_causal=True, scale=32 ** -0.5)
    assert_close(out, ref[:, :, lo:hi], torch.float32)
    torch.testing.assert_close(out, out_plain)
    torch.testing.assert_close(lse, lse_plain)


def test_query_offset_outside_the_keys_is_refused():
    q, k = torch.zeros(1, 1, 8, 32), torch.zeros(1, 1, 10, 32)
    with pytest.raises(ValueError, match="q_offset"):
        dilated_attn_fwd(q, k, k, (4,), (1,), is_causal=False, scale=1.0, mixing="lse", q_offset=3)


# --- dropout -------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def philox_words(seed: int, c0, c1, c2, c3):
    """Philox-4x32-10's four output words (numpy, uint64 arithmetic), written from the algorithm's definition
    (Salmon et al., SC'11) with Triton's key split (low, high 32 bits of the seed)."""
    import numpy as np

    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    ka, kb = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    m, s32 = np.uint64(_M32), np.uint64(32)
    k0, k1 = np.uint64(seed & _M32), np.uint64((seed >> 32) & _M32)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & m for c in (c0, c1, c2, c3))
    for _ in range(10):
        prod_b, prod_a = b * c2, a * c0
        c0, c2, c1, c3 = ((prod_b >> s32) ^ c1 ^ k0), ((prod_a >> s32) ^ c3 ^ k1), prod_b & m, prod_a & m
        k0, k1 = (k0 + ka) & m, (k1 + kb) & m
    return c0, c1, c2, c3


def reference_keep(seed: int, B: int, H: int, N: int, rates, dropout_p: float) -> torch.Tensor:
    """``keep[branch, b, h, p, j]`` as documented in ``_dropout_keep``: with ``u = j // rate``, word ``u % 4`` of
    Philox on (p, u // 4, stream, 0), stream ``(b * H + h) * num_branches + branch``; kept when its top 31 bits
    >= round(p * 2**31)."""
    import numpy as np

    nb = len(rates)
    br, bb, hh, p, j = np.meshgrid(np.arange(nb), np.arange(B), np.arange(H), np.arange(N), np.arange(N),
                                   indexing="ij")
    u = j // np.asarray(rates).reshape(-1, 1, 1, 1, 1)
    words = np.stack(philox_words(seed, p, u // 4, (bb * H + hh) * nb + br, np.zeros_like(p)))
    r = np.take_along_axis(words, (u % 4)[None].astype(np.int64), 0)[0]
    return torch.from_numpy((r >> np.uint64(1)) >= round(dropout_p * 2**31))


def dropout_reference(q, k, v, strategy, is_causal: bool, scale: float, keep: torch.Tensor, dropout_p: float):
    """float64: one softmax over the union of branches (undropped normaliser), then each branch's share of the
    probabilities dropped with its own keep mask and scaled by ``1 / (1 - dropout_p)``. Differentiable."""
    B, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    h = torch.arange(Hq, device=q.device).view(-1, 1, 1)
    p = torch.arange(N, device=q.device).view(1, -1, 1)
    j = torch.arange(N, device=q.device).view(1, 1, -1)
    links = []
    bounds = strategy.head_group_bounds(Hq)
    for i, (w, r) in enumerate(zip(strategy.segment_lengths, strategy.dilation_rates)):
        if strategy.mixing == "lse":
            link = (p // w == j // w) & (p % r == h % r) & (j % r == h % r)
        else:
            link = (h >= bounds[i][0]) & (h < bounds[i][1]) & (p // w == j // w) & (p % r == i % r) & (j % r == i % r)
        if is_causal:
            link = link & (j <= p)
        links.append(link.to(torch.float64))
    m = sum(links)
    e = torch.exp(s - s.amax(-1, keepdim=True).detach())
    denom = (m * e).sum(-1, keepdim=True)
    denom = torch.where(denom > 0, denom, 1.0)
    probs = sum(link * keep[i].to(torch.float64) * e for i, link in enumerate(links)) / denom / (1.0 - dropout_p)
    out = probs @ v
    return out / strategy.num_branches if strategy.mixing == "head_groups" else out


DROPOUT_CASES = [
    # B, Hq, Hkv, N, D, segments, rates, causal, mixing, dropout_p
    (1, 4, 2, 40, 32, (8, 16), (1, 2), True, "lse", 0.3),
    (2, 3, 3, 33, 32, (8, 16, 32), (1, 2, 4), False, "head_groups", 0.5),
    (1, 2, 2, 30, 32, (6, 12), (1, 2), True, "lse", 0.4),  # w / r = 6: one Philox call per pair
]


@pytest.mark.slow
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"N{c[3]}-{c[8]}-p{c[9]}")
def test_kernels_with_dropout_match_reference(case):
    """Outputs and dq/dk/dv with in-kernel dropout against float64 with the documented keep masks."""
    B, Hq, Hkv, N, D, segs, rates, is_causal, mixing, dropout_p = case
    dtype = torch.float32
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    seed_value = (1 << 40) + 12345  # both Philox key words in use
    seed = torch.tensor(seed_value, dtype=torch.int64)
    strategy = dc.Dilated(segs, rates, mixing)
    scale = D ** -0.5
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, is_causal=is_causal, scale=scale, mixing=mixing,
                                dropout_p=dropout_p, seed=seed)
    keep = reference_keep(seed_value, B, Hq, N, rates, dropout_p)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = dropout_reference(q64, k64, v64, strategy, is_causal, scale, keep, dropout_p)
    assert_close(out, ref, dtype)
    # The LSE is the undropped one.
    _, lse_plain = dilated_attn_fwd(q, k, v, segs, rates, is_causal=is_causal, scale=scale, mixing=mixing)
    torch.testing.assert_close(lse, lse_plain)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    dq, dk, dv = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, is_causal=is_causal, scale=scale,
                                  mixing=mixing, dropout_p=dropout_p, seed=seed)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert_close(a, b, dtype, name)


def test_dropout_is_a_function_of_the_seed():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 32, generator=g).to(DEVICE, torch.float16) for _ in range(3))
    args = dict(is_causal=False, scale=0.2, mixing="lse", dropout_p=0.25)
    a, _ = dilated_attn_fwd(q, k, v, (8,), (1,), seed=torch.tensor(5), **args)
    b, _ = dilated_attn_fwd(q, k, v, (8,), (1,), seed=torch.tensor(5), **args)
    c, _ = dilated_attn_fwd(q, k, v, (8,), (1,), seed=torch.tensor(6), **args)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="seed"):
        dilated_attn_fwd(q, k, v, (8,), (1,), seed=None, **args)


def test_row_offsets_past_int32_read_a_contiguous_copy():
    """The kernels compute position * row stride in int32: a batch-first view of 2M tokens (row stride H * D =
    1024) passes 2**31 and is read from a contiguous copy (row stride D); 1M tokens are read in place."""
    from dilate_compiler.lowering.common.launch import rows_addressable, rows_fit

    def batch_first(n):
        return torch.empty_strided((1, 16, n, 64), (n * 1024, 64, 1024, 1), device="meta")

    assert rows_fit(batch_first(2**20))
    view = batch_first(2**21)
    assert not rows_fit(view)
    copy = rows_addressable(view)
    assert copy.is_contiguous() and copy.stride(-2) == 64 and rows_fit(copy)
    assert rows_addressable(batch_first(2**20)).stride(-2) == 1024        # read in place


# --- key padding (``key_keep``): left, right, holes, rows that keep no key ----------------------------------

KEY_PADDING_CASES = [
    # Hq, Hkv, N, segments, rates, causal, mixing; walks, per-branch blocks and walk 0 are each reached
    (4, 2, 63, (8, 16, 32), (1, 2, 4), True, "lse"),
    (4, 2, 63, (8, 16, 32), (1, 2, 4), False, "lse"),
    (3, 3, 50, (4, 6), (2, 3), True, "lse"),                     # not a chain: per-branch blocks only
    (4, 4, 50, (8, 16, 64), (1, 2, 4), False, "head_groups"),
    (4, 2, 200, (64, 128), (1, 2), True, "lse"),                 # whole tiles inside segments, walk 0
    (4, 2, 200, (64, 128), (1, 2), False, "lse"),
]


def _key_keep(N: int) -> torch.Tensor:
    """Four batch rows: left padding, right padding, holes, and no key kept at all."""
    keep = torch.ones(4, N, dtype=torch.bool)
    keep[0, : N // 3] = False
    keep[1, N - N // 4:] = False
    keep[2, 3::5] = False
    keep[2, :2] = False
    keep[3] = False
    return keep


@pytest.mark.parametrize("case", [c if c is KEY_PADDING_CASES[2] else pytest.param(c, marks=pytest.mark.slow)
                                  for c in KEY_PADDING_CASES],
                         ids=lambda c: f"N{c[2]}-H{c[0]}/{c[1]}-{c[5] and 'causal' or 'full'}-{c[6]}")
def test_kernels_with_key_padding_match_reference(case):
    Hq, Hkv, N, segs, rates, is_causal, mixing = case
    dtype = torch.float32
    g = torch.Generator().manual_seed(N + 7)
    q, k, v = (torch.randn(4, h, N, 32, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    keep = _key_keep(N).to(DEVICE)
    strategy = dc.Dilated(segs, rates, mixing)
    args = dict(is_causal=is_causal, scale=32 ** -0.5, mixing=mixing)
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, key_keep=keep, **args)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = strategy.reference(q64, k64, v64, is_causal=is_causal, attn_mask=keep.view(4, 1, 1, N))
    assert_close(out, ref, dtype)
    assert (out[3] == 0).all() and torch.isinf(lse[3]).all() and (lse[3] < 0).all()
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    dq, dk, dv = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, key_keep=keep, **args)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, dtype, name)


def test_key_padding_broadcasts_one_row_to_the_batch():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 40, 32, generator=g).to(DEVICE) for _ in range(3))
    keep = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    keep[0, :9] = False
    out, _ = dilated_attn_fwd(q, k, v, (8, 16), (1, 2), is_causal=True, scale=0.2, mixing="lse", key_keep=keep)
    ref = dc.Dilated((8, 16), (1, 2)).reference(q.double(), k.double(), v.double(), is_causal=True, scale=0.2,
                                                  attn_mask=keep.view(1, 1, 1, 40))
    assert_close(out, ref, torch.float32)
