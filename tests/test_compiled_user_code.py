"""User code that calls the ops inside a ``torch.compile``d region (not through the rewrite): patterns made inside
or outside the region, one graph, the same result as eager."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from tests.tolerances import assert_close

OUTSIDE = P.sliding_window(16) | P.global_tokens(2)


def _block_sparse_inside(q, k, v):
    pattern = P.sliding_window(16) | P.dilated((2,)) | P.random(1, seed=3)
    return dc.ops.block_sparse_attention(q, k, v, pattern, block_size=16, is_causal=True)


def _block_sparse_outside(q, k, v):
    return dc.ops.block_sparse_attention(q, k, v, OUTSIDE, block_size=16, is_causal=True)


@pytest.mark.parametrize("fn", [_block_sparse_inside, _block_sparse_outside], ids=["inside", "outside"])
def test_block_sparse_pattern_compiles_in_one_graph(fn):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 80, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)
    compiled(q, k, v)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_grid_pattern_under_compile_asks_for_a_prebuilt_layout():
    pattern = P.neighborhood((4, 4), 1)

    def fn(q):
        return dc.ops.block_sparse_attention(q, q, q, pattern, block_size=4)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="is on a grid: under torch.compile pass its layout"):
        torch.compile(fn, fullgraph=True)(torch.randn(1, 2, 16, 8))
    layout = pattern.layout(16, 4)
    q = torch.randn(1, 2, 16, 8)
    prebuilt = torch.compile(lambda q: dc.ops.block_sparse_attention(q, q, q, layout, block_size=4), fullgraph=True)
    torch.testing.assert_close(prebuilt(q), dc.ops.block_sparse_attention(q, q, q, pattern, block_size=4))
    torch._dynamo.reset()


@pytest.mark.gpu
def test_block_sparse_pattern_compiles_on_cuda():
    """The layout used to be traced into the graph, and Inductor's CUDA codegen failed on it."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for fn in (_block_sparse_inside, _block_sparse_outside):
        reference = fn(*(t.cpu().double() for t in (q, k, v)))
        assert_close(torch.compile(fn, fullgraph=True)(q, k, v).cpu(), reference, torch.bfloat16)
    torch._dynamo.reset()
