"""The probe kernel of ``benchmarks/fused_heads_probe.py`` (both loop forms, several heads per program) against
float64, under the interpreter: its timings compare exact variants."""

import os
import sys

import pytest
import torch

from dilate_compiler import patterns as P
from tests.tolerances import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from fused_heads_probe import FORMS, fused_heads_attention  # noqa: E402


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("heads_per_program", [1, 2, 4])
def test_probe_matches_reference(form, heads_per_program):
    g = torch.Generator().manual_seed(heads_per_program + 7 * FORMS.index(form))
    q, k, v = (torch.randn(1, 4, 64, 16, generator=g) for _ in range(3))
    lay = P.local(2).layout(64, 16)
    out = fused_heads_attention(q, k, v, lay, heads_per_program, form, num_warps=4, num_stages=1)
    mask = lay.state[0].ne(P.EMPTY).repeat_interleave(16, 0).repeat_interleave(16, 1)
    s = (q.double() @ k.double().transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf"))
    assert_close(out, torch.softmax(s, -1) @ v.double(), torch.float32)


def test_probe_rejects_heads_that_do_not_divide():
    q = torch.zeros(1, 4, 64, 16)
    with pytest.raises(ValueError, match="heads_per_program \\(3\\) must divide the heads \\(4\\)"):
        fused_heads_attention(q, q, q, P.local(2).layout(64, 16), 3, "loop")
