"""Sequence-parallel and head-parallel dilated attention on two GPUs with NCCL (marker ``gpu``; skipped with fewer
than two GPUs): each mode's output and dq/dk/dv shards equal the single-GPU op on the whole sequence (bf16).

On two GPUs the Triton kernels run each rank's key window (window.py), with and without rows received from the
other rank (the unaligned length makes segments cross the shard boundary)."""

import datetime
import os

import pytest
import torch

from dilate_compiler.distributed.launch import run_ranks, values
from tests.tolerances import REL_ERR, rel_err

pytestmark = pytest.mark.gpu

SEGS, RATES = (1024, 2048, 4096), (1, 2, 4)
# (mode, layout, causal, N)
CASES = [
    ("sparse", "contiguous", True, 32768),
    ("sparse", "zigzag", False, 32768),
    ("sparse", "contiguous", True, 32768 + 2 * 500),
    ("ring", "contiguous", False, 32768 + 2 * 500),
    ("head_parallel", "contiguous", True, 32768),
]


def _worker(rank, world):
    import torch.distributed as dist

    import dilate_compiler as dc
    from dilate_compiler.distributed import head_parallel_attention, ring_attention, shard_sequence, window

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60),
                            device_id=device)
    strategy = dc.Dilated(SEGS, RATES)
    errors = []
    for mode, layout, causal, n in CASES:
        g = torch.Generator(device=device).manual_seed(n)
        q, k, v, dout = (torch.randn(1, 8, n, 64, device=device, generator=g, dtype=torch.bfloat16) for _ in range(4))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = dc.ops.dilated_attention(*full, SEGS, RATES, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, full, dout)
        shard = lambda t: shard_sequence(t, layout=layout)  # noqa: E731
        local = [shard(t).requires_grad_() for t in (q, k, v)]
        calls = window.CALLS["forward"]
        if mode == "head_parallel":
            out = head_parallel_attention(*local, strategy, is_causal=causal, layout=layout)
        else:
            out = ring_attention(*local, strategy, is_causal=causal, mode=mode, layout=layout)
        grads = torch.autograd.grad(out, local, shard(dout))
        ran_window = window.CALLS["forward"] > calls
        errors.append((ran_window, max([rel_err(out, shard(ref))] +
                                       [rel_err(a, shard(b)) for a, b in zip(grads, ref_grads)])))
    dist.destroy_process_group()
    return errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_modes_on_two_gpus_equal_the_single_gpu_op():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    for errors in values(run_ranks(_worker, 2, init=False, timeout=600)):
        for (mode, *_), (ran_window, err) in zip(CASES, errors):
            assert ran_window == (mode != "head_parallel"), (mode, ran_window)
            assert err <= REL_ERR[torch.bfloat16], (mode, err)
