"""The distributed ops on CUDA with NCCL, on a group of one GPU (the benchmark machines have one): CUDA tensors
through the custom ops, NCCL collectives and the head-parallel kernels, against the float64 reference."""

import pytest
import torch
import torch.distributed as dist

import dilate_compiler as dc
from dilate_compiler import patterns as P
from tests.distributed.test_sequence_parallel import reference
from tests.tolerances import REL_ERR, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_group():
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("api,strategy,causal", [
    ("ring", None, True),
    ("ring", dc.Dilated((256, 512, 1024), (1, 2, 4)), False),
    ("ring", dc.BlockSparse(P.sliding_window(200) | P.global_tokens(16), block_size=64), True),
    ("heads", dc.Dilated((256, 512, 1024), (1, 2, 4)), True),
    ("heads", None, False),
])
def test_distributed_ops_on_cuda_match_float64(nccl_group, api, strategy, causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 1024, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    dout = torch.randn(1, 8, 1024, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    full = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(strategy, *full, causal)
    ref_grads = torch.autograd.grad(ref, full, dout.double())
    fn = dc.distributed.ring_attention if api == "ring" else dc.distributed.head_parallel_attention
    out = fn(q, k, v, strategy, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= REL_ERR[torch.bfloat16]
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("mode,strategy,causal,counted", [
    ("ring", None, True, "dense_steps"),
    ("sparse", dc.Dilated((256, 512, 1024), (1, 2, 4)), True, "window"),
    ("ring", dc.Dilated((256, 512, 1024), (1, 2, 4)), False, "window"),
    ("sparse", dc.BlockSparse(P.sliding_window(200) | P.global_tokens(16), block_size=64), True, "held_blocks"),
    ("ring", dc.BlockSparse(P.sliding_window(200), block_size=64), False, "held_blocks"),
])
def test_key_padding_runs_the_kernels_on_cuda_and_matches_float64(nccl_group, mode, strategy, causal, counted):
    import importlib

    from tests.distributed.test_sequence_parallel_masks import single_process

    calls_of = importlib.import_module(f"dilate_compiler.distributed.{counted}").CALLS
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 1024, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for h in (8, 4, 4))
    dout = torch.randn(2, 8, 1024, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    keep = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    keep[0, :300] = False                  # left padding: with causality its first queries keep no key
    keep[1, 500:620] = False               # a hole and right padding
    keep[1, 900:] = False
    full = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = single_process(strategy, *full, causal, keep)
    ref_grads = torch.autograd.grad(ref, full, dout.double())
    before = dict(calls_of)
    out = dc.distributed.ring_attention(q, k, v, strategy, is_causal=causal, mode=mode, key_keep=keep)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert (calls_of["forward"] - before["forward"], calls_of["backward"] - before["backward"]) == (1, 1)
    assert rel_err(out, ref) <= REL_ERR[torch.bfloat16]
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= REL_ERR[torch.bfloat16]
    empty = (ref == 0).all(-1)                                         # query rows that keep no key
    assert bool(empty.any()) or not causal
    assert bool((out[empty] == 0).all())
