"""The warp-specialised Gluon forward of ``benchmarks/gluon_rows_probe.py`` against float64 (GPU only: Gluon has
no interpreter), with few programs so that each walks many tiles and its K/V ring and Q buffers wrap; and the
probe's input checks (anywhere)."""

import os
import sys

import pytest
import torch

from dilate_compiler import patterns as P
from tests.tolerances import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from gluon_rows_probe import check_inputs, gluon_rows_attention, reference, rows_schedule  # noqa: E402

PATTERNS = {"local(2)": P.local(2), "local+global": P.local(1) | P.global_tokens(128),
            "random": P.random(3, seed=2) | P.local(1)}


@pytest.mark.gpu
@pytest.mark.parametrize("defer", [False, True], ids=["in-order", "defer-pv"])
@pytest.mark.parametrize("programs", [1, 5, None])
@pytest.mark.parametrize("d, stages", [(64, 2), (64, 3), (128, 2)])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_gluon_rows_matches_float64(name, d, programs, stages, defer):
    torch.manual_seed(d + (programs or 0))
    h, n = 3, 1024
    q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = PATTERNS[name].layout(n, 128, device="cuda")
    out = gluon_rows_attention(q, k, v, lay, programs=programs, stages=stages, defer_pv=defer)
    assert_close(out, reference(q, k, v, lay, heads=h), torch.bfloat16)


def test_probe_rejects_what_its_kernel_does_not_take():
    with pytest.raises(ValueError, match="bf16 CUDA tensors"):
        check_inputs(*(torch.zeros(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3)), 2)
    with pytest.raises(ValueError, match="no partial blocks"):
        rows_schedule(*(torch.zeros(1, 2, 200, 64) for _ in range(3)), P.local(1).layout(200, 128), 4)
    with pytest.raises(ValueError, match="block size 128"):
        rows_schedule(*(torch.zeros(1, 2, 256, 64) for _ in range(3)), P.local(1).layout(256, 64), 4)
    with pytest.raises(ValueError, match=r"stages must be in \[2, 2\] at D=128"):
        check_inputs(*(torch.zeros(1, 2, 256, 128) for _ in range(3)), 3)
