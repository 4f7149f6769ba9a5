"""``experiments/pinned_tiles.py``'s tile names: the inverse of ``tile_name`` over every autotuning space."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from autotune_timings import tile_name  # noqa: E402
from pinned_tiles import parse_tile  # noqa: E402

from dilate_compiler.lowering.block_sparse import triton as bt  # noqa: E402
from dilate_compiler.lowering.dilated import triton as dt  # noqa: E402


def _key(c):
    return c.kwargs, c.num_warps, c.num_stages, c.maxnreg


def test_parse_tile_inverts_tile_name_over_every_space():
    spaces = [dt.tile_space(k) for k in ("fwd", "walk0", "bwd")] + [bt.tile_space(k, 128) for k in ("fwd", "bwd")]
    configs = [c for space in spaces for c in space]
    assert any(c.maxnreg for c in configs)          # capped tiles are in the spaces and named with their cap
    for c in configs:
        assert _key(parse_tile(tile_name(c))) == _key(c)
    assert tile_name(parse_tile("128x64/8w/3s@128")) == "128x64/8w/3s@128"


@pytest.mark.parametrize("spec", ["128x64/8w", "128x64/8w/3s@", "x64/8w/3s", "128x64/8w/3s@128 "])
def test_parse_tile_names_what_it_refuses(spec):
    with pytest.raises(ValueError, match="128x64/8w/3s@128"):
        parse_tile(spec)


def test_kernel_of_each_problem_and_what_it_refuses():
    from pinned_tiles import kernel_of

    assert kernel_of("window", "dq") is bt._autotuned("dq", 128)
    assert kernel_of("A-causal", "walk0") is dt._dilated_attn_fwd_walk0_kernel
    assert kernel_of("B", "dkdv") is dt._dilated_attn_bwd_dkdv_kernel
    with pytest.raises(ValueError, match="kernel of problem 'A' must be one of"):
        kernel_of("A", "walk0")
    with pytest.raises(ValueError, match="problem must be one of"):
        kernel_of("C", "fwd")
