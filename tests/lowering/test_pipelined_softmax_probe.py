"""The probe kernel of ``benchmarks/pipelined_softmax_probe.py`` (both loop forms) against float64, under the
interpreter: its timings compare two exact forms."""

import os
import sys

import pytest
import torch

from tests.tolerances import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from pipelined_softmax_probe import probe_attention  # noqa: E402


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32)])
def test_probe_forms_match_reference(pipelined, block_m, block_n):
    g = torch.Generator().manual_seed(block_n + pipelined)
    q, k, v = (torch.randn(2, 64, 16, generator=g) for _ in range(3))
    out = probe_attention(q, k, v, pipelined, 0, block_m, block_n)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1) @ v.double()
    assert_close(out, ref, torch.float32)


def test_probe_rejects_ragged_n():
    q = torch.zeros(1, 40, 16)
    with pytest.raises(ValueError, match="N \\(40\\) must be a multiple of block_m \\(16\\) and block_n \\(32\\)"):
        probe_attention(q, q, q, True, 0, 16, 32)
