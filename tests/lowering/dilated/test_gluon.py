"""The warp-specialised Hopper dilated forward (``lowering/dilated/gluon.py``): when the op takes it, and (GPU,
marker ``gpu``) that it matches float64 and the Triton forward, feeds the Triton backward, runs in compiled graphs as
in eager mode and replays in a CUDA graph. Gluon has no CPU interpreter, so its exactness is checked on the GPU
only."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler.lowering.dilated import gluon as dg
from dilate_compiler.lowering.common import hopper_gluon as hg
from dilate_compiler.lowering.dilated import op as dilated_op
from tests.lowering.block_sparse.test_gluon import (assert_compiled_runs_ws_and_cuda_graph_replays_ws,
                                                   assert_like_triton_forward_with_exact_gradients, counted)
from tests.tolerances import assert_close, eager_dilated, rel_err

SEGS, RATES = (1024, 2048, 4096), (1, 2, 4)


def test_the_op_says_why_it_runs_the_triton_forward_off_hopper():
    q = torch.zeros(1, 2, 2048, 64, dtype=torch.bfloat16)
    reason = dilated_op.warp_specialised_reason(q, q, q, None, SEGS, RATES, False, "lse", 0.0)
    assert reason.startswith("device cpu")
    with hg.turned_off():
        reason = dg.unsupported_reason(q, q, q, None, SEGS, RATES, is_causal=False, mixing="lse", dropout_p=0.0)
    assert "DILATE_COMPILER_WARP_SPECIALISED=0" in reason


def _call_reason(q, segs=SEGS, rates=RATES, is_causal=False, mixing="lse", dropout_p=0.0, attn_mask=None):
    return dg.call_reason(q, q, q, attn_mask, segs, rates, is_causal=is_causal, mixing=mixing, dropout_p=dropout_p)


@pytest.mark.parametrize("n,change,expected", [
    (2048, dict(is_causal=True), "causal, a mask or dropout"),
    (2048, dict(dropout_p=0.1), "causal, a mask or dropout"),
    (2048, dict(attn_mask=torch.zeros(2048, 2048)), "causal, a mask or dropout"),
    (2048, dict(mixing="head_groups"), "a nested pattern under mixing='lse'"),
    (2048, dict(segs=(1024, 1536), rates=(1, 2)), "a nested pattern under mixing='lse'"),
    (2048, dict(segs=(384, 768), rates=(1, 2)), "L * 128 = 256 dividing N and the shortest segment"),
    (2304, {}, "N 2304"),
])
def test_the_reasons_name_what_the_forward_does_not_take(n, change, expected):
    assert _call_reason(torch.zeros(1, 2, 2048, 64, dtype=torch.bfloat16)) == ""
    assert expected in _call_reason(torch.zeros(1, 2, n, 64, dtype=torch.bfloat16), **change)


def test_the_reasons_name_dtypes_head_dims_and_layouts_it_does_not_take():
    q = torch.zeros(1, 2, 2048, 64, dtype=torch.bfloat16)
    assert "head dim 32" in _call_reason(torch.zeros(1, 2, 2048, 32, dtype=torch.bfloat16))
    assert "dtype torch.float32" in _call_reason(q.float())
    assert "not contiguous" in _call_reason(torch.zeros(1, 2048, 2, 64, dtype=torch.bfloat16).transpose(1, 2))
    k = torch.zeros(1, 2, 4096, 64, dtype=torch.bfloat16)
    reason = dg.call_reason(q, k, k, None, SEGS, RATES, is_causal=False, mixing="lse", dropout_p=0.0)
    assert "queries that are the last 2048 of 4096 key positions" in reason


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


CASES = {  # segments, rates, dtype, B, Hq, Hkv, N
    "L4-B2": ((1024, 2048, 4096), (1, 2, 4), torch.bfloat16, 2, 4, 4, 4096),
    "L8-truncated": ((1024, 2048, 4096, 8192), (1, 2, 4, 8), torch.bfloat16, 1, 2, 2, 7168),
    "unsorted-gqa-fp16": ((2048, 1024), (2, 1), torch.float16, 1, 8, 2, 3072),
    "unlinked-rows": ((512, 1024), (2, 4), torch.bfloat16, 1, 4, 4, 2048),       # odd classes link nothing
    "many-tiles": ((512, 1024, 2048), (1, 2, 4), torch.bfloat16, 1, 8, 8, 8192),  # 512 tiles: rings wrap
}


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs compute capability 9.0")
@pytest.mark.parametrize("name", list(CASES))
def test_warp_specialised_forward_matches_float64_and_the_triton_forward(name):
    segs, rates, dtype, B, Hq, Hkv, N = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(N + Hq)
    q, k, v = (torch.randn(B, h, N, 64, device="cuda", generator=g, dtype=dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    with counted(dg, "dilated_attn_fwd_ws") as calls:
        out = dc.ops.dilated_attention(q, k, v, segs, rates)
    assert calls, dilated_op.warp_specialised_reason(q, k, v, None, segs, rates, False, "lse", 0.0)
    strategy = dc.Dilated(segs, rates)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = strategy.reference(q64, k64, v64, is_causal=False)
    eager = eager_dilated(*(t.detach() for t in (q, k, v)), strategy, False)
    assert_close(out, ref, dtype, eager_err=rel_err(eager, ref))
    # the LSE it hands the backward: the Triton forward's, and the Triton backward's gradients are exact
    args = (None, list(segs), list(rates), False, 64 ** -0.5, "lse", 0.0, None)
    ws_out, ws_lse = torch.ops.dilate_compiler.dilated_attention_forward(q, k, v, *args)
    with hg.turned_off():
        tr_out, tr_lse = torch.ops.dilate_compiler.dilated_attention_forward(q, k, v, *args)
    assert_like_triton_forward_with_exact_gradients((ws_out, ws_lse), (tr_out, tr_lse), out, ref, (q, k, v),
                                                    (q64, k64, v64), g)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs compute capability 9.0")
def test_compiled_graphs_and_cuda_graphs_run_the_warp_specialised_forward():
    q, k, v = (torch.randn(1, 4, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def op(q, k, v):
        return dc.ops.dilated_attention(q, k, v, SEGS, RATES)

    assert_compiled_runs_ws_and_cuda_graph_replays_ws(op, (q, k, v), dg, "dilated_attn_fwd_ws",
                                                      "dilated_attention_forward_hopper", "_dilated_attn_fwd_kernel")
