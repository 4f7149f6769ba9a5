"""GPU subset (marker ``gpu``): block-sparse kernels through the op against float64 and against eager PyTorch's
own error at the same dtype; the kernels appear in Inductor's output code."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from dilate_compiler import patterns as P
from dilate_compiler.backend import dilated_backend
from dilate_compiler.lowering.block_sparse.op import use_kernels
from dilate_compiler.patterns import layouts
from tests.lowering.block_sparse.test_op import dense_reference
from tests.tolerances import assert_close, rel_err

pytestmark = pytest.mark.gpu

PATTERNS = {
    "window": P.sliding_window(300),
    "local|global|random": P.local(2) | P.global_tokens(70) | P.random(1, seed=3),
    "perhead": P.random(2, seed=1, per_head=True) | P.local(1),
    "dilated&window": P.dilated((2, 3)) & P.sliding_window(700),
    "neighbourhood-hilbert": P.neighborhood((30, 33), 4).reordered(
        P.Grid((30, 33), dc.hilbert.curve_order((30, 33)))) | P.global_tokens(10),
    "neighbourhood-hilbert-32x32": P.neighborhood((32, 32), 3).reordered(
        P.Grid((32, 32), dc.hilbert.curve_order((32, 32)))),
}
CASES = [  # pattern, dtype, D, causal, Hq, Hkv, N, block size[, run through a random order table]
    ("window", torch.bfloat16, 64, True, 8, 8, 1000, 128),
    ("window", torch.bfloat16, 64, False, 8, 2, 1000, 64),
    ("local|global|random", torch.bfloat16, 128, False, 4, 4, 1025, 128),
    ("local|global|random", torch.float16, 32, True, 4, 2, 777, 32),
    ("perhead", torch.bfloat16, 64, True, 6, 3, 1000, 128),
    ("dilated&window", torch.float16, 64, False, 4, 4, 1000, 16),
    ("window", torch.float16, 128, True, 4, 1, 63, 128),
    ("neighbourhood-hilbert", torch.bfloat16, 64, False, 4, 2, 1000, 128),
    ("neighbourhood-hilbert", torch.float16, 128, False, 2, 2, 1000, 64),
    ("window", torch.bfloat16, 64, True, 4, 2, 1024, 64),                      # N a multiple of the block
    ("neighbourhood-hilbert-32x32", torch.bfloat16, 64, False, 4, 4, 1024, 64),
    ("neighbourhood-hilbert-32x32", torch.bfloat16, 64, False, 4, 2, 1024, 64, True),
    ("neighbourhood-hilbert", torch.float16, 32, True, 2, 1, 1000, 32, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-D{c[2]}-{'causal' if c[3] else 'full'}"
                                                     f"-H{c[4]}/{c[5]}-N{c[6]}-bs{c[7]}" + ("-order" if c[8:] else ""))
def test_op_on_cuda_runs_kernels_and_matches_reference(case):
    name, dtype, D, causal, Hq, Hkv, N, bs, *ordered = case
    pattern = PATTERNS[name]
    g = torch.Generator(device="cuda").manual_seed(N + D)
    q, k, v = (torch.randn(2, h, N, D, device="cuda", generator=g, dtype=dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    assert use_kernels(q, v, bs)
    order = torch.randperm(N, device="cuda", generator=g) if ordered else None
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=bs, is_causal=causal, order=order)
    mask = pattern.token_mask(N, bs, num_heads=Hq, is_causal=causal, device="cuda")
    if order is not None:   # the layout's position p is token order[p]: the mask in token order
        inv = torch.argsort(order)
        mask = mask[:, inv][:, :, inv]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, mask)
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g_ = Hq // Hkv
    eager = F.scaled_dot_product_attention(qe, ke.repeat_interleave(g_, 1), ve.repeat_interleave(g_, 1),
                                           attn_mask=mask.unsqueeze(0)).nan_to_num(0.0)
    assert_close(out, ref, dtype, eager_err=rel_err(eager, ref))
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    eager_grads = torch.autograd.grad(eager, (qe, ke, ve), dout)
    for name_, a, b, e in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert torch.isfinite(a).all(), name_
        assert_close(a, b, dtype, name_, eager_err=rel_err(e, b))


def _tile_cases():
    from dilate_compiler.lowering.block_sparse.triton import tile_space

    return [(kind, i) for kind in ("fwd", "bwd") for i in range(len(tile_space(kind, 128)))]


@pytest.mark.parametrize("kind,index", _tile_cases(), ids=lambda x: str(x))
def test_every_tile_of_the_autotuning_space_matches_reference(kind, index):
    """Whichever tile configuration the autotuner picks is exact: each one of the space, pinned in turn (the
    forward kernel, or both backward kernels), on a causal window with partial blocks, a ragged end and GQA,
    against float64."""
    from dilate_compiler.lowering.block_sparse import triton as bt
    from tests.lowering.pinning import pinned as _pinned

    config = bt.tile_space(kind, 128)[index]
    kernels = [bt._autotuned("fwd", 128)] if kind == "fwd" else [bt._autotuned("dq", 128), bt._autotuned("dkdv", 128)]
    N, D, pattern = 1000, 64, P.sliding_window(300) | P.global_tokens(5)
    g = torch.Generator(device="cuda").manual_seed(index)
    q, k, v = (torch.randn(1, h, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (4, 2, 2))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, pattern.token_mask(N, 128, num_heads=4, is_causal=True, device="cuda"))
    with _pinned(kernels if kind == "fwd" else [], config):
        out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=128, is_causal=True)
    assert_close(out, ref, torch.bfloat16)
    if kind == "fwd":
        return
    dout = torch.randn(ref.shape, device="cuda", generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    with _pinned(kernels, config):
        grads = torch.autograd.grad(out, (q, k, v), dout.to(torch.bfloat16))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, torch.bfloat16, name)


@pytest.mark.parametrize("reverse", [False, True])
def test_inductor_autotuning_over_tiles_of_two_shapes_matches_reference(reverse):
    """As the dilated test of that name: two tiles of different row (and key) counts per space, in both orders;
    the op compiled by Inductor, which autotunes and launches the kernels itself, matches float64."""
    from dilate_compiler.lowering.block_sparse import triton as bt
    from tests.lowering.dilated.test_gpu import compiled_over_tiles, tiles

    order = (lambda c: c[::-1]) if reverse else (lambda c: c)
    pins = [([bt._autotuned("fwd", 128)], order(tiles(bt.tile_space("fwd", 128), (128, 128, 4), (64, 64, 4)))),
            ([bt._autotuned("dq", 128), bt._autotuned("dkdv", 128)],
             order(tiles(bt.tile_space("bwd", 128), (128, 32, 4), (32, 128, 4))))]
    N, D, pattern = 1000, 64, P.sliding_window(300) | P.global_tokens(5)
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(1, h, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (4, 2, 2))
    lay = pattern.layout(N, 128, num_heads=4, is_causal=True, device="cuda")
    op = lambda q, k, v: dc.ops.block_sparse_attention(q, k, v, lay, block_size=128, is_causal=True)  # noqa: E731
    out, dout, grads = compiled_over_tiles(op, pins, q, k, v, g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, pattern.token_mask(N, 128, num_heads=4, is_causal=True, device="cuda"))
    assert_close(out, ref, torch.bfloat16)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(a, b, torch.bfloat16, name)


def test_block_size_256_runs_the_exact_path_and_says_why():
    q = torch.randn(1, 2, 600, 64, device="cuda", dtype=torch.bfloat16)
    assert not use_kernels(q, q, 256)
    out = dc.ops.block_sparse_attention(q, q, q, P.sliding_window(300), block_size=256, is_causal=True)
    ref = dense_reference(q.double(), q.double(), q.double(),
                          P.sliding_window(300).token_mask(600, 256, is_causal=True, device="cuda"))
    assert_close(out, ref, torch.bfloat16)


def test_kernels_in_inductor_output_code():
    """The Triton forward inlined in Inductor's code. With the warp-specialised Hopper forward on, a Hopper card runs
    that one through an opaque op instead (test_gluon.py checks it), so it is turned off here."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from dilate_compiler.lowering.common import hopper_gluon as hg

    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[2], device=q.device)
            mask = (i[:, None] - i[None, :] < 256) & (i[None, :] <= i[:, None])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    model = Model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=dilated_backend, options={"strategy": dc.BlockSparse("auto")})
    with hg.turned_off(), inductor_config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(compiled, q, k, v)
    assert any("_block_sparse_fwd_kernel" in c for c in codes)
    torch.testing.assert_close(out, model(q, k, v), atol=2e-2, rtol=2e-2)


def test_inductor_compiles_a_capped_tile_with_its_cap():
    """Under torch.compile with ``inductor_caps`` installed a register-capped tile keeps its cap: the config in
    Inductor's output code carries it, and the kernel Inductor compiled from it uses at most that many registers
    (the same tile uncapped takes 255)."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from torch._inductor.utils import run_and_get_code

    from dilate_compiler.lowering.block_sparse import triton as bt
    from dilate_compiler.lowering.common import inductor_caps
    from tests.lowering.pinning import pinned

    assert inductor_caps.install() == ""       # what the ops do at their first launch (unless the env var says 0)
    capped = next(c for c in bt.tile_space("fwd", 128) if c.maxnreg)
    q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = P.sliding_window(512).layout(2048, 128, is_causal=True, device="cuda")

    def op(q, k, v):
        return dc.ops.block_sparse_attention(q, k, v, lay, block_size=128, is_causal=True)

    launched = []                               # the autotuners Inductor's output code launches, in this process
    run = CachingAutotuner.run

    def recording_run(self, *args, **kwargs):
        launched.append(self)
        return run(self, *args, **kwargs)

    torch._dynamo.reset()
    with pinned([bt._autotuned("fwd", 128)], capped), mock.patch.object(CachingAutotuner, "run", recording_run):
        out, codes = run_and_get_code(torch.compile(op), q, k, v)
    assert any("_block_sparse_fwd_kernel" in c and f"'maxnreg': {capped.maxnreg}" in c for c in codes)
    names = [t.inductor_meta.get("kernel_name", "") for t in launched]
    regs = [launcher.n_regs for t, name in zip(launched, names) if name.startswith("_block_sparse_fwd_kernel")
            for launcher in t.launchers]
    assert regs and max(regs) <= capped.maxnreg, (regs, names)
    torch.testing.assert_close(out, op(q, k, v), atol=2e-2, rtol=2e-2)


def test_adaptive_on_cuda_matches_the_exact_path():
    strategy = dc.Adaptive(top_k=4, block_size=64, threshold=0.9, sink_blocks=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 1000, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    out = dc.ops.adaptive_block_sparse_attention(q, k, v, strategy, is_causal=True)
    chosen = strategy.select(q.detach(), k.detach(), is_causal=True)
    mask = chosen.repeat_interleave(64, -2).repeat_interleave(64, -1)[..., :1000, :1000]
    mask = mask & torch.ones(1000, 1000, dtype=torch.bool, device="cuda").tril()
    ref = dense_reference(*(t.detach().double() for t in (q, k, v)), mask)
    assert_close(out, ref, torch.bfloat16)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("name,pattern", [("window4096", P.sliding_window(4096)),
                                          ("local8|global1", P.local(8) | P.global_tokens(1)),
                                          ("dilated&window", P.dilated((2, 3)) & P.sliding_window(5000))])
@pytest.mark.parametrize("n,causal", [(262144, False), (100_000, True)])
def test_layout_built_on_cuda_equals_the_cpu_build(name, pattern, n, causal):
    """A layout built on CUDA (the list kernels, two chunks of 1024 columns per row at 256K) equals the PyTorch
    build on the CPU, tensor for tensor."""
    assert layouts._lists_on_gpu(pattern.terms, "cuda", "row")
    got = pattern.layout(n, 128, is_causal=causal, device="cuda")
    want = pattern.layout(n, 128, is_causal=causal)
    for field_name in P.LAYOUT_TENSORS:
        assert torch.equal(getattr(got, field_name).cpu(), getattr(want, field_name)), field_name
    assert got.checks == want.checks


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_runs_the_kernels_and_matches_reference(causal):
    N, D = 2048, 64
    g = torch.Generator(device="cuda").manual_seed(12)
    q, k, v = (torch.randn(4, h, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    keep = torch.ones(4, N, dtype=torch.bool, device="cuda")
    keep[0, :500] = False
    keep[1, N - 300:] = False
    keep[2, 5::9] = False
    keep[3] = False
    pattern = P.sliding_window(256) | P.global_tokens(16)
    assert use_kernels(q, v, 128)
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=128, is_causal=causal, key_keep=keep)
    mask = pattern.token_mask(N, 128, is_causal=causal, device="cuda") & keep.view(4, 1, 1, N)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, mask)
    assert_close(out, ref, torch.bfloat16)
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, torch.bfloat16, f"d{name}")


@pytest.mark.parametrize("nq", [1, 7, 300])
@pytest.mark.parametrize("name,bs", [("window", 128), ("local|global|random", 64), ("dilated&window", 32)])
def test_op_on_trailing_queries_runs_the_kernels(name, bs, nq):
    """Decoding: q holds the last Nq of Nk = 1000 positions (GQA, causal, a left-padded batch row): the layout
    built for Nk, only the query blocks holding queries launched; the last Nq rows of the float64 reference,
    gradients too, within 2x eager's error."""
    pattern, N, D = PATTERNS[name], 1000, 64
    g = torch.Generator(device="cuda").manual_seed(nq + bs)
    q = torch.randn(2, 8, nq, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 4, N, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    keep = torch.ones(2, N, dtype=torch.bool, device="cuda")
    keep[1, :37] = False
    assert use_kernels(q, v, bs)
    out = dc.ops.block_sparse_attention(q, k, v, pattern, block_size=bs, is_causal=True, key_keep=keep)
    mask = pattern.token_mask(N, bs, num_heads=8, is_causal=True, device="cuda")[:, N - nq:] & keep.view(2, 1, 1, N)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, mask)
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    eager = F.scaled_dot_product_attention(qe, ke.repeat_interleave(2, 1), ve.repeat_interleave(2, 1),
                                           attn_mask=mask).nan_to_num(0.0)
    assert_close(out, ref, torch.bfloat16, eager_err=rel_err(eager, ref))
    dout = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    eager_grads = torch.autograd.grad(eager, (qe, ke, ve), dout)
    for name_, a, b, e in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert torch.isfinite(a).all(), name_
        assert_close(a, b, torch.bfloat16, name_, eager_err=rel_err(e, b))
