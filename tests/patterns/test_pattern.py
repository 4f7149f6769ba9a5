"""The named patterns and their combinations (``patterns/pattern.py``): bad arguments name the argument."""

import pytest
import torch

from dilate_compiler import patterns as P

N, BS = 77, 16


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="window_tokens"):
        P.sliding_window(0)
    with pytest.raises(ValueError, match="window_blocks"):
        P.local(-1)
    with pytest.raises(TypeError, match="bool tensor"):
        P.from_layout(torch.ones(2, 2))
    with pytest.raises(ValueError, match="3 x 3 blocks"):
        P.from_layout(torch.ones(3, 3, dtype=torch.bool)).layout(N, BS)
    with pytest.raises(TypeError, match="patterns"):
        P.union(P.local(1), "local")


def test_grid_patterns_reject_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        P.neighborhood((0, 4), 1)
    with pytest.raises(ValueError, match="radius"):
        P.neighborhood((4, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="seq_len"):
        P.neighborhood((4, 4), 1).layout(10, 16)
    with pytest.raises(ValueError, match="different grids"):
        P.neighborhood((4, 4), 1) | P.neighborhood((2, 8), 1)
