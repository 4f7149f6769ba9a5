"""The probe kernels of ``benchmarks/persistent_rows_probe.py`` (one program per row, and persistent programs with
and without Q prefetch) against float64, under the interpreter: its timings compare exact variants."""

import os
import sys

import pytest
import torch

from dilate_compiler import patterns as P
from tests.tolerances import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from persistent_rows_probe import lpt_schedule, persistent_attention, rows_attention  # noqa: E402


def _reference(q, k, v, lay, bs):
    mask = lay.state[0].ne(P.EMPTY).repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    s = (q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 96, 16, generator=g) for _ in range(3))


@pytest.mark.parametrize("pattern", [P.local(2), P.local(1) | P.global_tokens(16)], ids=["local", "local+global"])
def test_rows_matches_reference(pattern):
    q, k, v = _inputs(1)
    lay = pattern.layout(96, 16)
    out = rows_attention(q, k, v, lay, num_warps=4, num_stages=1)
    assert_close(out, _reference(q, k, v, lay, 16), torch.float32)


@pytest.mark.parametrize("prefetch_q", [False, True])
@pytest.mark.parametrize("programs", [1, 4, 7])
def test_persistent_matches_reference(programs, prefetch_q):
    q, k, v = _inputs(programs)
    lay = (P.local(1) | P.global_tokens(16)).layout(96, 16)
    out = persistent_attention(q, k, v, lay, programs, prefetch_q=prefetch_q, num_warps=4, num_stages=1)
    assert_close(out, _reference(q, k, v, lay, 16), torch.float32)


def test_lpt_schedule_balances_and_covers_every_tile():
    lengths = torch.tensor([6, 2, 2, 2])                     # row 0 is long
    order = torch.tensor([0, 4, 1, 2, 3, 5, 6, 7])           # two heads, row 0 of each first
    rows, heads, lens, count = lpt_schedule(lengths, order, 3, 4)
    got = sorted((int(heads[p, i]) * 4 + int(rows[p, i])) for p in range(3) for i in range(int(count[p])))
    assert got == list(range(8))
    loads = [int((lens[p] + (lens[p] > 0)).sum()) for p in range(3)]
    assert sorted(loads) == [10, 10, 12]                    # 7, 7, then the short tiles to the least loaded
    assert sorted(int(lens[p, 0]) for p in range(3)) == [2, 6, 6]   # the long rows first, on two programs
    assert (lens[:, -2:] == 0).all()                        # two zero entries past each program's last tile


def test_probe_rejects_partial_blocks_and_strided_inputs():
    q = torch.zeros(1, 2, 64, 16)
    with pytest.raises(ValueError, match="no partial blocks"):
        rows_attention(q, q, q, P.sliding_window(20).layout(64, 16))
    k = torch.zeros(1, 64, 2, 16).transpose(1, 2)          # the kernels read k with q's strides
    with pytest.raises(ValueError, match="q, k, v must be contiguous"):
        persistent_attention(q, k, q, P.local(1).layout(64, 16), 2)


def test_analyse_reads_a_saved_timeline():
    from persistent_rows_probe import analyse

    lengths = torch.tensor([8, 2, 2, 2])                      # row 0 visits every block; one head
    # rows: (SM, start, loop end, end) in ns; the long tile on SM 0, the others on SM 1
    rows = torch.tensor([[0, 1000, 8000, 9000], [1, 1000, 2000, 3000], [1, 3000, 4000, 5000],
                         [1, 5000, 6000, 7000]])
    # persistent, two programs on one SM, W = 3: program 0 runs the long tile, program 1 the rest
    persistent = torch.tensor([[0, 1000, 8000, 9000], [0, 0, 0, 0], [0, 0, 0, 0],
                               [0, 1000, 2000, 2500], [0, 2500, 3000, 4000], [0, 4000, 5000, 5500]])
    got = analyse({"lengths": lengths, "rows": rows, "persistent 2/SM": persistent}, programs_per_sm=2)
    assert got["rows"] == {"span_us": 8.0, "longest_tiles": 1, "longest_us": 8.0, "longest_end_us": 8.0,
                           "other_tiles_us_median": 2.0, "other_us_per_block": 1.0}
    assert got["persistent 2/SM"]["other_tiles_us_median"] == 1.5
    assert got["persistent 2/SM"]["first_on_sm_end_us_median"] == 8.0
    assert got["persistent 2/SM"]["second_on_sm_end_us_median"] == 4.5
