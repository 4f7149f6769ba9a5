import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dilate_compiler as dc


@pytest.mark.parametrize(
    "segs, rates, match",
    [
        ((), (), "non-empty"),
        ((8, 16), (1,), "equal lengths"),
        ((8, 0), (1, 1), "positive ints"),
        ((8, -16), (1, 2), "positive ints"),
        ((8, 10), (1, 4), "multiple of its dilation rate"),
        ((8.0,), (1,), "positive ints"),
        ((True,), (1,), "positive ints"),
    ],
)
def test_invalid_parameters_raise_value_error(segs, rates, match):
    with pytest.raises(ValueError, match=match):
        dc.Dilated(segs, rates)


def test_invalid_mixing_names_the_choices():
    with pytest.raises(ValueError, match=r"mixing must be one of \('lse', 'head_groups'\), got 'sum'"):
        dc.Dilated((8,), (1,), mixing="sum")


def test_frozen_and_normalised_to_tuples():
    s = dc.Dilated([8, 16], [1, 2])
    assert s.segment_lengths == (8, 16) and s.dilation_rates == (1, 2)
    with pytest.raises(Exception):
        s.mixing = "head_groups"
    assert s == dc.Dilated((8, 16), (1, 2)) and hash(s) == hash(dc.Dilated((8, 16), (1, 2)))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    heads=st.integers(1, 6),
    branches=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=3),
    mixing=st.sampled_from(["lse", "head_groups"]),
)
def test_plan_covers_exactly_the_multiplicity(n, heads, branches, mixing):
    """Rows/keys the plan visits, counted per (head, p, j), equal the definition's multiplicity."""
    segs = tuple(a * r for a, r in branches)
    rates = tuple(r for _, r in branches)
    s = dc.Dilated(segs, rates, mixing)
    m = torch.zeros(heads, n, n, dtype=torch.int64)
    for br in s.plan(n, heads).branches:
        w, r = br.segment_length, br.dilation_rate
        for g in br.head_groups:
            rows = [p for p in range(n) if p % r == g.offset]
            for h in g.heads():
                for p in rows:
                    for j in rows:
                        if p // w == j // w:
                            m[h, p, j] += 1
    assert torch.equal(m, s.multiplicity(n, heads))


def test_head_groups_split_first_groups_get_the_extra_head():
    s = dc.Dilated((4, 8, 16), (1, 2, 4), mixing="head_groups")
    assert s.head_group_bounds(8) == [(0, 3), (3, 6), (6, 8)]
    assert s.head_group_bounds(2) == [(0, 1), (1, 2), (2, 2)]
    assert s.plan(32, 8).output_scale == pytest.approx(1 / 3)


def test_multiplicity_counts_overlapping_branches():
    s = dc.Dilated((4, 8), (1, 1))
    m = s.multiplicity(8, 1)
    assert m[0, 0, 1] == 2 and m[0, 0, 5] == 1 and m[0, 5, 0] == 1
    assert torch.equal(s.multiplicity(8, 1, is_causal=True)[0], m[0].tril())
