"""Block-sparse Triton kernels, launchers called directly (TRITON_INTERPRET=1 on CPU: small shapes, float16)."""

import pytest
import torch

from dilate_compiler import patterns as P
from dilate_compiler.hilbert import curve_order
from dilate_compiler.patterns.pattern import _pattern
from dilate_compiler.lowering.block_sparse.triton import block_sparse_attn_bwd, block_sparse_attn_fwd, tile_order
from tests.lowering.block_sparse.test_op import dense_reference
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {  # pattern, N, Hq, Hkv, block size, causal
    "window|global-ragged-causal": (P.sliding_window(20) | P.global_tokens(3), 45, 4, 2, 16, True),
    "window|global-ragged-full": (P.sliding_window(20) | P.global_tokens(3), 45, 4, 2, 16, False),
    "perhead-random&global": ((P.local(1) | P.random(1, per_head=True)) & P.global_tokens(30), 48, 4, 4, 16,
                              False),
    "dilated-bs32-causal": (P.dilated((2,)), 70, 2, 1, 32, True),
    # per-head lists under GQA (the dK/dV schedule sums a kv head's group), 2 sub-tiles per block, ragged
    "perhead-gqa-local|global-bs32": (P.local(1) | P.random(1, per_head=True) | P.global_tokens(32), 75, 4, 2, 32,
                                      True),
    # grid coordinates: a 5x9 neighbourhood with a CLS token, row-major and in Hilbert order
    "neighborhood|global-rowmajor": (P.neighborhood((5, 9), 1) | P.global_tokens(1), 46, 2, 1, 16, False),
    "neighborhood-hilbert": (P.neighborhood((5, 9), (1, 2)).reordered(P.Grid((5, 9), curve_order((5, 9)))), 45,
                             2, 2, 16, False),
    # one-ended token intervals (no public pattern makes them; the kernels compile them): queries up to 10 or keys
    # from 30 (an upper end first), and keys from 30 or the block diagonal (a lower end first)
    "p<=10|j>=30-causal": (_pattern("p<=10|j>=30", P.Term(p=(-P.INF, 10)), P.Term(j=(30, P.INF))), 61, 2, 1, 16,
                           True),
    "j>=30|local-full": (_pattern("j>=30", P.Term(j=(30, P.INF))) | P.local(1), 61, 2, 2, 16, False),
    # causal with p - j bounded below only (causality rides on that end) or on both ends
    "d>=-5|global-causal": (_pattern("d>=-5", P.Term(d=(-5, P.INF))) | P.global_tokens(3), 61, 2, 1, 16, True),
    "d<=-20|window-causal-bs32": (_pattern("d<=-20", P.Term(d=(-40, -20))) | P.sliding_window(10), 61, 2, 1, 32,
                             True),
    # the window alone: one term besides row 0, bounding only p - j (causal: row 0's bit on the diagonal blocks,
    # the window's on its edge blocks)
    "window-ragged-causal": (P.sliding_window(20), 45, 2, 1, 16, True),
    "window-ragged-full": (P.sliding_window(20), 45, 2, 2, 16, False),
    "window-causal-bs32": (P.sliding_window(40), 64, 2, 1, 32, True),
}


# The cases that take longest under the interpreter (larger N or more heads); make test-fast leaves them out.
SLOW_CASES = {"perhead-gqa-local|global-bs32", "window|global-ragged-full", "window|global-ragged-causal",
              "neighborhood|global-rowmajor", "window-causal-bs32", "perhead-random&global", "j>=30|local-full",
              "d>=-5|global-causal", "dilated-bs32-causal", "p<=10|j>=30-causal", "neighborhood-hilbert",
              "d<=-20|window-causal-bs32"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in sorted(CASES)])
def test_kernels_match_reference(name):
    pattern, N, Hq, Hkv, bs, causal = CASES[name]
    dtype = torch.float16
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(1, h, N, 32, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    lay = pattern.layout(N, bs, num_heads=Hq, is_causal=causal, device=DEVICE)
    out, lse = block_sparse_attn_fwd(q, k, v, *lay.tensors()[:4], bs, causal, 0.2, lay.coords, lay.checks)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    mask = pattern.token_mask(N, bs, num_heads=Hq, is_causal=causal, device=DEVICE)
    ref = dense_reference(q64, k64, v64, mask, scale=0.2)
    assert_close(out, ref, dtype)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = block_sparse_attn_bwd(dout, q, k, v, out, lse, *lay.args(), bs, causal, 0.2)
    for name_, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, name_)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernels_read_and_write_through_an_order_table(causal):
    # order[p] is the memory row of layout position p: the same as gathering q, k, v, running, scattering back
    grid = (5, 9)
    pattern = P.neighborhood(grid, (1, 2)).reordered(P.Grid(grid, curve_order(grid))) | P.global_tokens(2)
    N, Hq, Hkv, bs, dtype = 47, 2, 1, 16, torch.float16
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, N, 32, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    order = torch.randperm(N, generator=g).to(DEVICE)
    lay = pattern.layout(N, bs, num_heads=Hq, is_causal=causal, device=DEVICE)
    *tensors, _, checks = lay.args()
    out, lse = block_sparse_attn_fwd(q, k, v, *tensors[:4], bs, causal, 0.2, lay.coords, checks, order)
    mask = pattern.token_mask(N, bs, num_heads=Hq, is_causal=causal, device=DEVICE)
    inv = torch.argsort(order)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(*(t.index_select(2, order) for t in (q64, k64, v64)), mask, scale=0.2).index_select(2, inv)
    assert_close(out, ref, dtype)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = block_sparse_attn_bwd(dout, q, k, v, out, lse, *lay.args(order), bs, causal, 0.2)
    for name_, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert_close(a, b, dtype, name_)


def test_tile_order_puts_heavy_rows_first():
    """Local + global: the global block row visits every key block, so it starts first, in every program head;
    equal work keeps (head, block) order. Per-head lists seen from kv heads sum each GQA group's counts."""
    lay = (P.local(2) | P.global_tokens(16)).layout(16 * 6, 16, num_heads=1)
    assert lay.kv_count[0, :, 1].tolist() == [6, 3, 4, 4, 4, 3]
    order = tile_order(lay.kv_count, 1, 1)
    assert order.dtype == torch.int32 and order.tolist() == [0, 2, 3, 4, 1, 5]
    assert tile_order(lay.kv_count, 1, 2).tolist() == [0, 6, 2, 3, 4, 8, 9, 10, 1, 5, 7, 11]
    count = torch.tensor([[[0, 1], [0, 5]], [[0, 1], [0, 1]], [[0, 9], [0, 1]], [[0, 1], [0, 1]]])
    assert tile_order(count, 2, 2).tolist() == [2, 1, 0, 3]
    assert tile_order(count, 2, 4).tolist() == [2, 6, 1, 5, 0, 3, 4, 7]


def test_tile_order_is_sorted_once_per_layout_and_again_after_a_change():
    """A layout reused across launches keeps its launch order (the same tensor back); another program count sorts
    anew; an in-place change of the counts (a new version) sorts again."""
    count = torch.tensor([[[0, 1], [0, 5], [0, 3]]])
    first = tile_order(count, 1, 2)
    assert tile_order(count, 1, 2) is first and first.tolist() == [1, 4, 2, 5, 0, 3]
    assert tile_order(count, 1, 1).tolist() == [1, 2, 0]
    count[0, 0, 1] = 9
    assert tile_order(count, 1, 2).tolist() == [0, 3, 1, 4, 2, 5]
    assert tile_order(count, 1, 1).tolist() == [0, 1, 2]
    with torch.inference_mode():           # a layout built under inference mode: no version counter, no cache
        count = torch.tensor([[[0, 1], [0, 5], [0, 3]]])
        assert tile_order(count, 1, 1).tolist() == [1, 2, 0]
        count[0, 2, 1] = 7
        assert tile_order(count, 1, 1).tolist() == [2, 1, 0]


# --- key padding (``key_keep``) ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param("window|global-ragged-causal", marks=pytest.mark.slow),
                                  pytest.param("window-ragged-full", marks=pytest.mark.slow),
                                  pytest.param("dilated-bs32-causal", marks=pytest.mark.slow)])
def test_kernels_with_key_padding_match_reference(name):
    """Four batch rows: left padding, right padding, holes, and no key kept (its output is 0, its lse -inf)."""
    pattern, N, Hq, Hkv, bs, causal = CASES[name]
    dtype = torch.float16
    g = torch.Generator().manual_seed(N + 1)
    q, k, v = (torch.randn(4, h, N, 32, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    keep = torch.ones(4, N, dtype=torch.bool)
    keep[0, : N // 3] = False
    keep[1, N - N // 4:] = False
    keep[2, 3::5] = False
    keep[3] = False
    keep = keep.to(DEVICE)
    lay = pattern.layout(N, bs, num_heads=Hq, is_causal=causal, device=DEVICE)
    out, lse = block_sparse_attn_fwd(q, k, v, *lay.tensors()[:4], bs, causal, 0.2, lay.coords, lay.checks,
                                     key_keep=keep)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    mask = pattern.token_mask(N, bs, num_heads=Hq, is_causal=causal, device=DEVICE) & keep.view(4, 1, 1, N)
    ref = dense_reference(q64, k64, v64, mask, scale=0.2)
    assert_close(out, ref, dtype)
    assert (out[3] == 0).all() and (lse[3] == float("-inf")).all()
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = block_sparse_attn_bwd(dout, q, k, v, out, lse, *lay.args(), bs, causal, 0.2, key_keep=keep)
    for name_, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert torch.isfinite(a).all(), name_
        assert_close(a, b, dtype, name_)
