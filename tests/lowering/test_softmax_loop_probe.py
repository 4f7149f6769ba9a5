"""The probe kernel of ``benchmarks/softmax_loop_probe.py`` (every loop form) against float64, under the
interpreter: its timings compare exact forms."""

import os
import sys

import pytest
import torch

from tests.tolerances import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from softmax_loop_probe import FORMS, probe_attention  # noqa: E402


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32)])
def test_probe_forms_match_reference(form, block_m, block_n):
    g = torch.Generator().manual_seed(block_n + FORMS.index(form))
    q, k, v = (torch.randn(2, 64, 16, generator=g) for _ in range(3))
    out = probe_attention(q, k, v, form, block_m, block_n)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1) @ v.double()
    assert_close(out, ref, torch.float32)


def test_probe_rejects_ragged_n():
    q = torch.zeros(1, 40, 16)
    with pytest.raises(ValueError, match="N \\(40\\) must be a multiple of block_m \\(16\\) and block_n \\(32\\)"):
        probe_attention(q, q, q, "pipelined", 16, 32)


def test_lazy_rescale_rescales_when_a_row_max_rises_past_tau():
    """Scores that rise tile by tile by far more than 2^8 force rescales: without them the weights, cast to
    float16 for P @ V, would overflow (tau = 1e9, rescaling only from the first tile's -inf, gives inf). With
    tau = 0 every tile rescales, as the in-order form does."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 64, 16, generator=g) for _ in range(3))
    k = k * torch.linspace(0.1, 12.0, 64)[:, None]    # row maxima grow tile by tile
    q, k, v = (t.half() for t in (q, k, v))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1) @ v.double()
    for tau in (0.0, 8.0):
        assert_close(probe_attention(q, k, v, "lazy rescale", 16, 16, tau=tau), ref, torch.float16)
    assert not probe_attention(q, k, v, "lazy rescale", 16, 16, tau=1e9).isfinite().all()


def test_probe_rejects_unknown_form():
    q = torch.zeros(1, 32, 16)
    with pytest.raises(ValueError, match="form must be one of .*got 'async'"):
        probe_attention(q, q, q, "async", 16, 16)
