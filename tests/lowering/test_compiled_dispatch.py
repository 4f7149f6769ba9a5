"""Compiled calls reach the launchers eager calls reach: where eager mode runs a warp-specialised Hopper forward, a
graph compiled by Inductor (``torch.compile``, ``backend="dilated"``) runs it too, through the opaque
``*_forward_hopper`` ops. On the CPU: the device check is made to pass and the Gluon launchers are spies that
record the call and compute the forward on the exact path (the GPU tests in ``test_gluon.py`` run the real ones)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.lowering.block_sparse import gluon as bs_gluon
from dilate_compiler.lowering.block_sparse import op as bs_op
from dilate_compiler.lowering.common import hopper_gluon
from dilate_compiler.lowering.dilated import gluon as dl_gluon
from dilate_compiler.lowering.dilated import op as dl_op

SEGS, RATES = (1024, 2048), (1, 2)
B, H, N, D = 1, 2, 2048, 64
LAYOUT = P.local(2).layout(N, 128)          # full blocks only: what the warp-specialised block-sparse forward takes


def _dense_forward(q, k, v, mask, scale):
    """``(out, lse)`` of attention restricted to ``mask`` ``[N, N]``, in float32."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype), lse


@pytest.fixture
def hopper(monkeypatch):
    """The CPU taken for a Hopper card by the ops' dispatch: the Triton and warp-specialised checks pass, and the
    warp-specialised launchers record each call (with whether its tensors were real) and return the exact path's
    result. Yields the list of calls."""
    calls = []

    def dilated_ws(q, k, v, segment_lengths, dilation_rates, *, scale):
        calls.append(("dilated", type(q) is torch.Tensor))
        return torch.ops.dilate_compiler.dilated_attention_forward_exact(
            q, k, v, None, list(segment_lengths), list(dilation_rates), False, scale, "lse", 0.0, None)

    def block_sparse_ws(q, k, v, kv_count, kv_idx, tile_order, scale):
        calls.append(("block-sparse", type(q) is torch.Tensor))
        return _dense_forward(q, k, v, LAYOUT.token_mask()[0], scale)

    monkeypatch.setattr(hopper_gluon, "device_reason", lambda q, tensors: "")
    monkeypatch.setattr(dl_op, "use_kernels", lambda *args, **kwargs: True)
    monkeypatch.setattr(bs_op, "use_kernels", lambda *args, **kwargs: True)
    monkeypatch.setattr(dl_gluon, "dilated_attn_fwd_ws", dilated_ws)
    monkeypatch.setattr(bs_gluon, "block_sparse_attn_fwd_ws", block_sparse_ws)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=torch.bfloat16) for _ in range(3))


def test_the_compiled_dilated_op_runs_the_warp_specialised_launcher_as_eager_does(hopper):
    q, k, v = _qkv()

    def fn(q, k, v):
        return dc.ops.dilated_attention(q, k, v, SEGS, RATES)

    with torch.no_grad():
        eager = fn(q, k, v)
        assert hopper == [("dilated", True)]
        compiled, codes = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False),
                                           q, k, v)
    assert hopper == [("dilated", True), ("dilated", True)]       # launched when the graph ran, on real tensors
    assert any("dilated_attention_forward_hopper" in c for c in codes)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


class _SdpaBlock(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_backend_dilated_runs_the_warp_specialised_launcher_as_eager_does(hopper):
    q, k, v = _qkv()
    strategy = dc.Dilated(SEGS, RATES)
    with torch.no_grad():
        eager = dc.ops.dilated_attention(q, k, v, SEGS, RATES)
        compiled = torch.compile(_SdpaBlock(), backend="dilated", options={"strategy": strategy}, fullgraph=True,
                                 dynamic=False)(q, k, v)
    assert hopper == [("dilated", True), ("dilated", True)]
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


def test_the_compiled_block_sparse_op_chooses_as_eager_does_when_the_graph_runs(hopper):
    q, k, v = _qkv()
    assert bs_gluon.all_blocks_full(LAYOUT.kv_count)

    def fn(q, k, v):
        return dc.ops.block_sparse_attention(q, k, v, LAYOUT, block_size=128)

    with torch.no_grad():
        eager = fn(q, k, v)
        compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)(q, k, v)
    assert hopper == [("block-sparse", True), ("block-sparse", True)]
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
