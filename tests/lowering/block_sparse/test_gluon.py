"""The warp-specialised Hopper forward (``lowering/block_sparse/gluon.py``): when the op takes it, and (GPU, marker
``gpu``) that it matches float64 and the Triton forward, feeds the Triton backward, runs in compiled graphs as in
eager mode and replays in a CUDA graph. Gluon has no CPU interpreter, so its exactness is checked on the GPU
only."""

import contextlib
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.lowering.block_sparse import gluon as bg
from dilate_compiler.lowering.common import hopper_gluon as hg
from dilate_compiler.lowering.block_sparse import op as block_sparse_op
from tests.lowering.block_sparse.test_op import dense_reference
from tests.tolerances import assert_close, rel_err


def test_all_blocks_full_reads_once_per_layout_version():
    lay = (P.local(2) | P.global_tokens(128)).layout(1024, 128)
    assert bg.all_blocks_full(lay.kv_count) is True
    assert bg.all_blocks_full(P.sliding_window(300).layout(1024, 128).kv_count) is False
    with mock.patch.object(torch.Tensor, "any", side_effect=AssertionError("read again")):
        assert bg.all_blocks_full(lay.kv_count) is True          # kept on the tensor
    lay.kv_count[0, 3, 0] = 1                                    # an in-place change: read again
    assert bg.all_blocks_full(lay.kv_count) is False


def test_the_op_says_why_it_runs_the_triton_forward_off_hopper():
    q = torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16)
    lay = P.local(1).layout(256, 128)
    reason = block_sparse_op.warp_specialised_reason(q, q, q, lay.kv_count, 128, False, None)
    assert reason.startswith("device cpu")
    with hg.turned_off():
        assert "DILATE_COMPILER_WARP_SPECIALISED=0" in bg.unsupported_reason(q, q, q, lay.kv_count, 128, False, None)


@pytest.mark.slow
def test_an_unknown_setting_is_refused_by_name():
    env = dict(os.environ, DILATE_COMPILER_WARP_SPECIALISED="yes")
    r = subprocess.run([sys.executable, "-c", "import dilate_compiler.lowering.block_sparse.gluon"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "DILATE_COMPILER_WARP_SPECIALISED must be '0' (off) or '1' (on, the default), got 'yes'" in r.stderr


def assert_like_triton_forward_with_exact_gradients(ws, triton, out, ref, inputs, inputs64, g):
    """A warp-specialised forward's ``(out, lse)`` against the Triton forward's (the LSE is what the Triton
    backward reads), and the gradients of the op's ``out`` against float64 ``ref``'s."""
    torch.testing.assert_close(ws[0], triton[0], atol=2e-2, rtol=0)
    finite = torch.isfinite(triton[1])
    assert torch.equal(finite, torch.isfinite(ws[1]))
    torch.testing.assert_close(ws[1][finite], triton[1][finite], atol=1e-4, rtol=1e-5)
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref, inputs64, dout.double())
    for what, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, out.dtype, what)


@contextlib.contextmanager
def counted(module, name):
    """Within the block, calls of ``module.name`` (a launcher) are counted in the list yielded."""
    calls = []
    run = getattr(module, name)
    with mock.patch.object(module, name, lambda *a, **kw: calls.append(1) or run(*a, **kw)):
        yield calls


def assert_compiled_runs_ws_and_cuda_graph_replays_ws(op, inputs, module, launcher, hopper_op, triton_kernel):
    """``torch.compile(op)`` runs the warp-specialised forward as eager mode does (``module.launcher`` called when
    the graph runs, through the opaque ``hopper_op`` in Inductor's code, ``triton_kernel`` absent from it) and
    matches eager; a CUDA graph captured in eager mode runs the warp-specialised launcher and replays it bit for
    bit on new inputs."""
    from torch._inductor.utils import run_and_get_code

    eager = op(*inputs)
    with counted(module, launcher) as calls:
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(op), *inputs)
        assert calls and any(hopper_op in c for c in codes) and not any(triton_kernel in c for c in codes)
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        calls.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(*inputs)
        assert calls                                  # whatever the launcher checks was read before the capture
    inputs[0].copy_(torch.randn_like(inputs[0]))
    graph.replay()
    torch.testing.assert_close(captured, op(*inputs), atol=0, rtol=0)


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _empty_row_layout(nb):
    lay = torch.ones(nb, nb, dtype=torch.bool).tril()
    lay[1] = False                                               # block row 1 attends to nothing
    return P.from_layout(lay)


CASES = {  # pattern, dtype, B, Hq, Hkv, N
    "local+global": (lambda: P.local(8) | P.global_tokens(128), torch.bfloat16, 2, 4, 4, 2048),
    "local-gqa-fp16": (lambda: P.local(2), torch.float16, 1, 8, 2, 1024),
    "perhead-random": (lambda: P.random(3, seed=2, per_head=True) | P.local(1), torch.bfloat16, 2, 4, 2, 1536),
    "empty-row": (lambda: _empty_row_layout(8), torch.bfloat16, 1, 2, 2, 1024),
    "many-tiles": (lambda: P.local(4) | P.global_tokens(128), torch.bfloat16, 2, 8, 8, 4096),   # 512 tiles
}


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs compute capability 9.0")
@pytest.mark.parametrize("name", list(CASES))
def test_warp_specialised_forward_matches_float64_and_the_triton_forward(name):
    make, dtype, B, Hq, Hkv, N = CASES[name]
    pattern = make()
    g = torch.Generator(device="cuda").manual_seed(N + Hq)
    q, k, v = (torch.randn(B, h, N, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    lay = pattern.layout(N, 128, num_heads=Hq, device="cuda")
    with counted(bg, "block_sparse_attn_fwd_ws") as calls:
        out = dc.ops.block_sparse_attention(q, k, v, lay, block_size=128)
    assert calls, block_sparse_op.warp_specialised_reason(q, k, v, lay.kv_count, 128, False, None)
    mask = pattern.token_mask(N, 128, num_heads=Hq, device="cuda")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, mask)
    eager = F.scaled_dot_product_attention(*(t.detach() for t in (q, k.repeat_interleave(Hq // Hkv, 1),
                                                                   v.repeat_interleave(Hq // Hkv, 1))),
                                           attn_mask=mask.unsqueeze(0)).nan_to_num(0.0)
    assert_close(out, ref, dtype, eager_err=rel_err(eager, ref))
    # the LSE it hands the backward: the Triton forward's, and the Triton backward's gradients are exact
    args = lay.args(None)
    ws_out, ws_lse = torch.ops.dilate_compiler.block_sparse_attention_forward(q, k, v, *args, 128, False, 64 ** -0.5)
    with hg.turned_off():
        tr_out, tr_lse = torch.ops.dilate_compiler.block_sparse_attention_forward(q, k, v, *args, 128, False,
                                                                                  64 ** -0.5)
    assert_like_triton_forward_with_exact_gradients((ws_out, ws_lse), (tr_out, tr_lse), out, ref, (q, k, v),
                                                    (q64, k64, v64), g)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs compute capability 9.0")
def test_compiled_graphs_and_cuda_graphs_run_the_warp_specialised_forward():
    q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = (P.local(2) | P.global_tokens(128)).layout(2048, 128, device="cuda")

    def op(q, k, v):
        return dc.ops.block_sparse_attention(q, k, v, lay, block_size=128)

    assert_compiled_runs_ws_and_cuda_graph_replays_ws(op, (q, k, v), bg, "block_sparse_attn_fwd_ws",
                                                      "block_sparse_attention_forward_hopper",
                                                      "_block_sparse_fwd_kernel")
