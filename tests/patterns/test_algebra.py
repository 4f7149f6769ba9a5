"""The term table (``patterns/algebra.py``): which columns the kernels compile a comparison for, and the
always-true row 0 they rely on."""

import pytest

from dilate_compiler import patterns as P


def test_term_checks_name_the_bounded_columns():
    # the kernels compile a comparison only for the columns some term bounds
    assert P.neighborhood((8, 8), 2).layout(64, 16).checks == 0b1111 << 8   # 2-D grid: axes 1, 2 of 3
    assert P.neighborhood((2, 4, 8), 1).layout(64, 16).checks == 0b111111 << 6
    assert P.sliding_window(5).layout(64, 16).checks == 0b11
    lay = (P.sliding_window(5) | P.global_tokens(2)).layout(64, 16)
    assert lay.checks & 0b11 == 0b11 and lay.checks >> 6 == 0
    assert P.local(1).layout(64, 16).checks == 0           # whole blocks: every visited block is full
    assert lay.to("cpu").checks == lay.checks


def test_a_term_table_without_the_always_true_row_0_is_refused():
    """The kernels skip row 0's bounds in the backward: a table whose row 0 bounds something is an error."""
    from dilate_compiler.patterns import term_checks

    lay = P.sliding_window(5).layout(64, 16)
    assert term_checks(lay.terms) == 0b11
    with pytest.raises(ValueError, match="row 0 is the always-true row"):
        term_checks(lay.terms[1:])
    with pytest.raises(ValueError, match="row 0 is the always-true row"):
        term_checks(lay.terms[:0])
