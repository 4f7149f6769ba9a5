"""GPU subset (marker ``gpu``): the op on CUDA runs the Triton kernels; checked against float64 and against
eager PyTorch's own error at the same dtype; the kernels appear in Inductor's output code."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from dilate_compiler.backend import dilated_backend
from dilate_compiler.lowering.dilated.op import use_kernels
from tests.lowering.pinning import pinned as _pinned
from tests.tolerances import assert_close, eager_dilated, rel_err

pytestmark = pytest.mark.gpu

SEGS, RATES = (128, 256, 512), (1, 2, 4)

CASES = [  # dtype, D, causal, mixing, Hq, Hkv, N
    (torch.bfloat16, 64, False, "lse", 8, 8, 1000),
    (torch.bfloat16, 64, True, "lse", 8, 8, 1000),
    (torch.bfloat16, 64, True, "lse", 8, 2, 1000),
    (torch.bfloat16, 64, False, "head_groups", 6, 3, 1000),
    (torch.bfloat16, 64, True, "head_groups", 6, 6, 1000),
    (torch.bfloat16, 32, True, "lse", 8, 4, 777),
    (torch.bfloat16, 128, True, "lse", 4, 4, 1025),
    (torch.bfloat16, 128, False, "lse", 4, 2, 1025),
    (torch.float16, 64, True, "lse", 8, 8, 1000),
    (torch.float16, 32, False, "lse", 8, 8, 300),
    (torch.float16, 128, True, "head_groups", 6, 2, 1000),
    (torch.bfloat16, 64, True, "lse", 4, 4, 1),
    (torch.bfloat16, 64, True, "lse", 4, 4, 63),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-D{c[1]}-{'causal' if c[2] else 'full'}-"
                                                     f"{c[3]}-H{c[4]}/{c[5]}-N{c[6]}")
def test_op_on_cuda_runs_kernels_and_matches_reference(case):
    dtype, D, is_causal, mixing, Hq, Hkv, N = case
    g = torch.Generator(device="cuda").manual_seed(N + D)
    q, k, v = (torch.randn(2, h, N, D, device="cuda", generator=g, dtype=dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    assert use_kernels(q, v, None, 0.0, len(SEGS))
    strategy = dc.Dilated(SEGS, RATES, mixing)
    out = dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=is_causal, mixing=mixing)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = strategy.reference(q64, k64, v64, is_causal=is_causal)
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = eager_dilated(qe, ke, ve, strategy, is_causal)
    assert_close(out, ref, dtype, eager_err=rel_err(eager, ref))
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    eager_grads = torch.autograd.grad(eager, (qe, ke, ve), dout)
    for name, a, b, e in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, dtype, name, eager_err=rel_err(e, b))


@pytest.mark.parametrize("lo,hi", [(300, 900), (0, 1000), (513, 514)])
def test_kernels_with_query_offset_on_cuda(lo, hi):
    """q holds rows [lo, hi) (the per-rank compute of sequence-parallel attention): those rows of the op, and dk,
    dv from those queries alone."""
    from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd

    g = torch.Generator(device="cuda").manual_seed(lo)
    q, k, v = (torch.randn(1, 8, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    args = dict(is_causal=True, scale=0.125, mixing="lse")
    out, lse = dilated_attn_fwd(q[:, :, lo:hi], k, v, SEGS, RATES, q_offset=lo, **args)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = dc.Dilated(SEGS, RATES).reference(q64, k64, v64, is_causal=True, scale=0.125)
    assert_close(out, ref[:, :, lo:hi], torch.bfloat16)
    dout = torch.zeros(ref.shape, device="cuda", dtype=torch.float64)
    dout[:, :, lo:hi] = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    dq, dk, dv = dilated_attn_bwd(dout[:, :, lo:hi].to(torch.bfloat16), q[:, :, lo:hi], k, v, out, lse, SEGS, RATES,
                                  q_offset=lo, **args)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref_grads[0][:, :, lo:hi], ref_grads[1], ref_grads[2])):
        assert_close(a, b, torch.bfloat16, name)


NESTED_SEGS, NESTED_RATES = (1024, 2048, 4096), (1, 2, 4)   # tiles of up to 128 rows x L=4 fit a 1024-segment


@pytest.mark.parametrize("D,is_causal,lo", [(64, False, 0), (64, True, 0), (128, True, 0), (64, True, 1000),
                                             (64, True, 1024)])
def test_nested_walks_on_cuda(D, is_causal, lo):
    """A chain of segments and rates with segments longer than a tile: the kernels visit each linked pair once,
    weighted by its multiplicity (the walks of ``nested_order``), forward and backward, also at a query offset."""
    from dilate_compiler.lowering.dilated.plan import nested_order
    from dilate_compiler.lowering.dilated.triton import dilated_attn_bwd, dilated_attn_fwd

    assert nested_order(NESTED_SEGS, NESTED_RATES, "lse") is not None
    N, hi = 4500, 4500 if lo == 0 else 3500
    g = torch.Generator(device="cuda").manual_seed(D + lo)
    q = torch.randn(1, 4, N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, N, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    args = dict(is_causal=is_causal, scale=D ** -0.5, mixing="lse")
    out, lse = dilated_attn_fwd(q[:, :, lo:hi], k, v, NESTED_SEGS, NESTED_RATES, q_offset=lo, **args)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    strategy = dc.Dilated(NESTED_SEGS, NESTED_RATES)
    ref = strategy.reference(q64, k64, v64, is_causal=is_causal, scale=D ** -0.5)
    eager = eager_dilated(q, k, v, strategy, is_causal)[:, :, lo:hi]
    assert_close(out, ref[:, :, lo:hi], torch.bfloat16, eager_err=rel_err(eager, ref[:, :, lo:hi]))
    dout = torch.zeros(ref.shape, device="cuda", dtype=torch.float64)
    dout[:, :, lo:hi] = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    dq, dk, dv = dilated_attn_bwd(dout[:, :, lo:hi].to(torch.bfloat16), q[:, :, lo:hi], k, v, out, lse, NESTED_SEGS,
                                  NESTED_RATES, q_offset=lo, **args)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref_grads[0][:, :, lo:hi], ref_grads[1], ref_grads[2])):
        assert_close(a, b, torch.bfloat16, name)


def _tile_cases():
    from dilate_compiler.lowering.dilated.triton import tile_space

    return [(kind, i) for kind in ("fwd", "walk0", "bwd") for i in range(len(tile_space(kind)))]


@pytest.mark.parametrize("kind,index", _tile_cases(), ids=lambda x: str(x))
def test_every_tile_of_the_autotuning_space_matches_reference(kind, index):
    """Whichever tile configuration the autotuner picks is exact: each one of the space, pinned in turn (the
    forward kernel, the causal walk-0 kernel, or both backward kernels), on the nested pattern (walks; the causal
    diagonal), against float64 and eager's error."""
    from dilate_compiler.lowering.dilated import triton as dt

    config = dt.tile_space(kind)[index]
    kernels = {"fwd": [dt._dilated_attn_fwd_kernel], "walk0": [dt._dilated_attn_fwd_walk0_kernel],
               "bwd": [dt._dilated_attn_bwd_dq_kernel, dt._dilated_attn_bwd_dkdv_kernel]}[kind]
    N, D = 4500, 64
    g = torch.Generator(device="cuda").manual_seed(index)
    q = torch.randn(1, 4, N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, N, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    args = dict(is_causal=True, scale=D ** -0.5, mixing="lse")
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = dc.Dilated(NESTED_SEGS, NESTED_RATES).reference(q64, k64, v64, is_causal=True, scale=D ** -0.5)
    with _pinned(kernels if kind != "bwd" else [], config):
        out, lse = dt.dilated_attn_fwd(q, k, v, NESTED_SEGS, NESTED_RATES, **args)
    assert_close(out, ref, torch.bfloat16, eager_err=rel_err(eager_dilated(q, k, v, dc.Dilated(
        NESTED_SEGS, NESTED_RATES), True), ref))
    if kind != "bwd":
        return
    dout = torch.randn(ref.shape, device="cuda", generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    with _pinned(kernels, config):
        grads = dt.dilated_attn_bwd(dout.to(torch.bfloat16), q, k, v, out, lse, NESTED_SEGS, NESTED_RATES, **args)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, torch.bfloat16, name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_inputs_device_not_the_current_one():
    """Triton launches on the current device; the launchers make it the inputs' (dilated with the walk-0 kernel,
    block-sparse, the layout build), forward and backward, and match the same call on the current device."""
    from dilate_compiler import patterns as P

    g = torch.Generator(device="cuda:0").manual_seed(0)
    qkv0 = [torch.randn(1, 4, 2500, 64, device="cuda:0", generator=g, dtype=torch.bfloat16) for _ in range(3)]
    ops = {"dilated": lambda q, k, v: dc.ops.dilated_attention(q, k, v, NESTED_SEGS, NESTED_RATES, is_causal=True),
           "block-sparse": lambda q, k, v: dc.ops.block_sparse_attention(q, k, v, P.sliding_window(512),
                                                                         block_size=128, is_causal=True)}
    torch.cuda.set_device(0)
    for name, op in ops.items():
        results = []
        for device in ("cuda:0", "cuda:1"):
            q, k, v = (t.to(device, copy=True).requires_grad_() for t in qkv0)     # fresh leaves per call
            out = op(q, k, v)
            out.float().square().sum().backward()
            results.append([t.cpu() for t in (out, q.grad, k.grad, v.grad)])
        assert torch.cuda.current_device() == 0
        for what, a, b in zip(("out", "dq", "dk", "dv"), *results):
            assert torch.equal(a, b), f"{name} {what}: cuda:1 differs from cuda:0"


def test_strided_inputs_from_batch_first_layout():
    x = torch.randn(1, 700, 3, 8, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))        # [B, H, N, D] views, not contiguous
    out = dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=True)
    ref = dc.Dilated(SEGS, RATES).reference(q, k, v, is_causal=True)
    assert_close(out, ref, torch.bfloat16)


def test_fallbacks_are_exact_and_logged(caplog):
    from dilate_compiler.lowering.common import dispatch

    q, k, v = (torch.randn(1, 4, 200, 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dispatch._LOGGED.clear()
    with caplog.at_level("WARNING", logger="dilate_compiler"):
        assert not use_kernels(q, q, None, 0.0, 3)
    assert "runs the exact PyTorch path: head dim 80" in caplog.text
    out = dc.ops.dilated_attention(q, k, v, SEGS, RATES)
    assert_close(out, dc.Dilated(SEGS, RATES).reference(q, k, v), torch.bfloat16)


class Block(torch.nn.Module):
    def __init__(self, E=512, H=8):
        super().__init__()
        self.qkv, self.o, self.H = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E), H

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(B, N, E))


@pytest.mark.parametrize("segs,rates,kernels", [
    (SEGS, RATES, ("_dilated_attn_fwd_kernel",)),
    (NESTED_SEGS, NESTED_RATES, ("_dilated_attn_fwd_walk0_kernel", "_dilated_attn_fwd_kernel"))])
def test_kernels_appear_in_inductor_output_code(segs, rates, kernels):
    """Also on a causal chain, whose forward runs the walk-0 kernel, then the walks. The graph caches are off: on
    an AOTAutograd cache hit the forward call loads the backward graph too, and the backward would show no code."""
    import torch._functorch.config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, backend=dilated_backend, options={"strategy": dc.Dilated(segs, rates)})
    no_caches = (functorch_config.patch(enable_autograd_cache=False), inductor_config.patch(fx_graph_cache=False))
    with no_caches[0], no_caches[1]:
        out, code = run_and_get_code(compiled, x)
    for name in kernels:
        assert any(name in c for c in code), f"{name} not in Inductor's output code"
    with torch.no_grad():
        q, k, v = model.qkv(x).view(2, 1024, 3, 8, 64).permute(2, 0, 3, 1, 4)
        a = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=True)
        expected = x + model.o(a.transpose(1, 2).reshape(2, 1024, 512))
    assert_close(out, expected, torch.bfloat16)
    with no_caches[0], no_caches[1]:
        _, bwd_code = run_and_get_code(lambda: out.sum().backward())
    assert any("_dilated_attn_bwd_dkdv_kernel" in c for c in bwd_code), "backward kernels not in output code"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def tiles(space: list, *shapes) -> list:
    """The configs of ``space`` with these (BLOCK_M, BLOCK_N, warps), in that order (the first of each)."""
    return [next(c for c in space if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == shape)
            for shape in shapes]


def compiled_over_tiles(op, pins, q, k, v, g):
    """``op(q, k, v)`` compiled by Inductor, whose own autotuner runs over each ``(kernels, configs)`` of
    ``pins``, and its gradients for a random ``dout``: (out, dout, grads)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        stack.enter_context(inductor_config.patch(force_disable_caches=True))
        for kernels, configs in pins:
            stack.enter_context(_pinned(kernels, *configs))
        out = torch.compile(op, fullgraph=True, dynamic=False)(q, k, v)
        dout = torch.randn(out.shape, device=out.device, generator=g, dtype=out.dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    torch._dynamo.reset()
    return out, dout, grads


@pytest.mark.parametrize("reverse", [False, True])
def test_inductor_autotuning_over_tiles_of_two_shapes_matches_reference(reverse):
    """Inductor autotunes user kernels itself and launches its pick with that config's grid. Two tiles of
    different row (and key) counts per space, in both orders, so the one Inductor picks is the first in one run and
    the second in the other: the compiled op's output and gradients match float64 (compared with the reference,
    not with an eager output whose freed buffer the compiled one could reuse)."""
    from dilate_compiler.lowering.dilated import triton as dt

    order = (lambda c: c[::-1]) if reverse else (lambda c: c)
    fwd, bwd = ((128, 64, 4), (64, 64, 4)), ((128, 32, 4), (32, 128, 4))
    pins = [([dt._dilated_attn_fwd_kernel], order(tiles(dt.tile_space("fwd"), *fwd))),
            ([dt._dilated_attn_fwd_walk0_kernel], order(tiles(dt.tile_space("walk0"), *fwd))),
            ([dt._dilated_attn_bwd_dq_kernel, dt._dilated_attn_bwd_dkdv_kernel],
             order(tiles(dt.tile_space("bwd"), *bwd)))]
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 4, 3000, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    op = lambda q, k, v: dc.ops.dilated_attention(q, k, v, NESTED_SEGS, NESTED_RATES, is_causal=True)  # noqa: E731
    out, dout, grads = compiled_over_tiles(op, pins, q, k, v, g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dc.Dilated(NESTED_SEGS, NESTED_RATES).reference(q64, k64, v64, is_causal=True)
    assert_close(out, ref, torch.bfloat16)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, torch.bfloat16, name)


def test_export_traces_the_op_on_cuda():
    model = Block().cuda().to(torch.bfloat16)
    x = torch.randn(1, 512, 512, device="cuda", dtype=torch.bfloat16)
    res = dc.rewrite(model, (x,), dc.Dilated(SEGS, RATES))
    assert len(res.report.rewritten) == 1
    out = res.module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mixing,is_causal", [("lse", True), ("head_groups", False)])
def test_dropout_in_kernels_matches_reference_and_generator_state(mixing, is_causal):
    """The op's seed comes from the torch generator; the kernels' keep masks are the documented Philox ones."""
    from tests.lowering.dilated.test_triton import dropout_reference, reference_keep

    B, Hq, Hkv, N, D, p = 1, 4, 2, 300, 64, 0.2
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(B, h, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    assert use_kernels(q, v, None, p, len(SEGS))
    torch.manual_seed(123)
    seed_value = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    torch.manual_seed(123)
    out = dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=is_causal, mixing=mixing, dropout_p=p)
    torch.manual_seed(123)
    again = dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=is_causal, mixing=mixing, dropout_p=p)
    assert torch.equal(out, again)
    keep = reference_keep(seed_value, B, Hq, N, RATES, p).cuda()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    strategy = dc.Dilated(SEGS, RATES, mixing)
    ref = dropout_reference(q64, k64, v64, strategy, is_causal, D ** -0.5, keep, p)
    assert_close(out, ref, torch.bfloat16)
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, torch.bfloat16, name)


def test_dropout_runs_the_kernels_inside_inductor():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()

    class DropBlock(Block):
        def forward(self, x):
            B, N, E = x.shape
            q, k, v = self.qkv(x).view(B, N, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1 if self.training else 0.0)
            return x + self.o(a.transpose(1, 2).reshape(B, N, E))

    model = DropBlock().cuda().to(torch.bfloat16).train()
    x = torch.randn(1, 1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(model, backend=dilated_backend, options={"strategy": dc.Dilated(SEGS, RATES)})
    out, code = run_and_get_code(compiled, x)
    assert any("_dilated_attn_fwd_kernel" in c for c in code), "forward kernel not in Inductor's output code"
    assert not any("dilated_attention_forward_exact" in c for c in code), "dropout took the exact path"
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("segs,rates", [((128, 256, 512), (1, 2, 4)), ((2048, 4096), (1, 2))], ids=["small", "walk0"])
def test_key_padding_runs_the_kernels_and_matches_reference(segs, rates, is_causal):
    """Left padding, right padding, holes and a row that keeps nothing, bf16, GQA: outputs and every gradient."""
    N, D = 4096, 64
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(4, h, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    keep = torch.ones(4, N, dtype=torch.bool, device="cuda")
    keep[0, :1000] = False
    keep[1, N - 700:] = False
    keep[2, 5::9] = False
    keep[3] = False
    assert use_kernels(q, v, None, 0.0, len(segs))
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, key_keep=keep)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dc.Dilated(segs, rates).reference(q64, k64, v64, is_causal=is_causal, attn_mask=keep.view(4, 1, 1, N))
    assert_close(out, ref, torch.bfloat16)
    assert (out[3] == 0).all()
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, torch.bfloat16, f"d{name}")


def _eager_weighted(q, k, v, weights, out_scale=1.0):
    """Eager PyTorch at q's dtype over link counts ``weights [.., Nq, Nk]`` (``eager_dilated`` for queries that are
    the last Nq positions): dtype matmuls, a float32 softmax over log-multiplicity-weighted scores."""
    g = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.float().masked_fill(weights == 0, float("-inf")) + torch.log(weights.clamp_min(1).float())
    return (torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype) @ v.repeat_interleave(g, 1)) * out_scale


@pytest.mark.parametrize("nq", [1, 7, 300])
@pytest.mark.parametrize("mixing", ["lse", "head_groups"])
def test_op_on_trailing_queries_runs_the_kernels(nq, mixing):
    """Decoding: q holds the last Nq of Nk = 1000 positions (GQA, a left-padded batch row); the op runs the
    kernels at ``q_offset = Nk - Nq`` and gives the last Nq rows of the float64 reference, gradients too, within
    2x eager's error."""
    from dilate_compiler.strategies.reference import weighted_softmax_attention

    N, D = 1000, 64
    g = torch.Generator(device="cuda").manual_seed(nq)
    q = torch.randn(2, 8, nq, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 4, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    keep = torch.ones(2, N, dtype=torch.bool, device="cuda")
    keep[1, :37] = False
    assert use_kernels(q, v, None, 0.0, len(SEGS))
    out = dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=True, mixing=mixing, key_keep=keep)
    strategy = dc.Dilated(SEGS, RATES, mixing)
    weights = strategy.multiplicity(N, 8, is_causal=True, device="cuda")[:, N - nq:] * keep.view(2, 1, 1, N)
    out_scale = 1.0 / len(SEGS) if mixing == "head_groups" else 1.0
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = weighted_softmax_attention(q64, k64, v64, weights) * out_scale
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = _eager_weighted(qe, ke, ve, weights, out_scale)
    assert_close(out, ref, torch.bfloat16, eager_err=rel_err(eager, ref))
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    eager_grads = torch.autograd.grad(eager, (qe, ke, ve), dout)
    for name, a, b, e in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, torch.bfloat16, name, eager_err=rel_err(e, b))


def test_compiled_decoding_steps_run_the_kernels_with_dynamic_shapes():
    """torch.compile(dynamic=True) of a decoding step: two (Nq, Nk) without a recompile, each the last rows of the
    float64 reference."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(q, k, v):
        return dc.ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=True)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for nq, nk in ((3, 700), (5, 1000)):
        g = torch.Generator(device="cuda").manual_seed(nk)
        q = torch.randn(2, 8, nq, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(2, 8, nk, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        out = compiled(q, k, v)
        # the reference over all Nk positions; the earlier query rows (zeros here) change no later row
        full_q = torch.cat([torch.zeros(2, 8, nk - nq, 64, device="cuda", dtype=torch.bfloat16), q], 2)
        ref = dc.Dilated(SEGS, RATES).reference(full_q.double(), k.double(), v.double(), is_causal=True)
        assert_close(out, ref[:, :, nk - nq:], torch.bfloat16)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1], "the second (Nq, Nk) recompiled"


GROUPED_CASES = [  # causal, Hq, Hkv, N, segments, rates
    (False, 8, 8, 1000, SEGS, RATES),
    (True, 8, 2, 1000, SEGS, RATES),
    (True, 6, 6, 777, (128, 256, 512), (1, 2, 4)),     # H not a multiple of the rates
    (False, 4, 4, 1025, (128, 256), (2, 8)),             # r > H beside r < H
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: f"{'causal' if c[0] else 'full'}-H{c[1]}/{c[2]}-N{c[3]}")
def test_grouped_head_offsets_on_cuda(case):
    """head_offsets="grouped" (torchscale's LongNet) through the Triton kernels in bf16, against the float64
    transcription of torchscale's dilated attention (tests/strategies/test_head_offsets.py)."""
    from tests.strategies.test_head_offsets import torchscale_dilated_attention

    is_causal, Hq, Hkv, N, segs, rates = case
    g = torch.Generator(device="cuda").manual_seed(N + Hq)
    q, k, v = (torch.randn(1, h, N, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    assert use_kernels(q, v, None, 0.0, len(segs))
    out = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal, head_offsets="grouped")
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = torchscale_dilated_attention(q64, k64, v64, segs, rates, is_causal=is_causal, scale=0.125)
    assert_close(out.cpu(), ref, torch.bfloat16)
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double().cpu())):
        assert torch.isfinite(a).all(), name
        assert_close(a.cpu(), b, torch.bfloat16, name)


@pytest.mark.parametrize("n", [131072, 100003])
@pytest.mark.parametrize("num_splits", [1, 4, 16, None])
def test_split_decode_step_of_a_long_cache(n, num_splits):
    """One decode step of config A's pattern over a long cache (B=2, 8 query and 2 kv heads, D=128, bf16): the
    forward split into ``num_splits`` programs per query tile (None: the launcher's choice) gives the float64
    reference's row within 2x eager's error, and the lse the backward reads."""
    from dilate_compiler.lowering.dilated.triton import dilated_attn_fwd
    from dilate_compiler.strategies.reference import weighted_softmax_attention

    segs, rates, H, D = (2048, 4096, 8192, 16384), (1, 2, 4, 8), 8, 128
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(2, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, n, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, is_causal=True, scale=D ** -0.5, mixing="lse", q_offset=n - 1,
                                num_splits=num_splits)
    p, j = torch.tensor([n - 1], device="cuda").view(1, 1), torch.arange(n, device="cuda").view(1, -1)
    weights = dc.Dilated(segs, rates).link_count(torch.arange(H, device="cuda").view(-1, 1, 1), p, j, H)
    ref = weighted_softmax_attention(q, k, v, weights)
    assert_close(out, ref, torch.bfloat16, eager_err=rel_err(_eager_weighted(q, k, v, weights), ref))
    s = q.double() @ k.double().repeat_interleave(H // 2, 1).transpose(-1, -2) * D ** -0.5
    ref_lse = torch.logsumexp(s + torch.log(weights.double()), -1)
    assert_close(lse, ref_lse, torch.bfloat16, "lse")
