"""Split-K in the dilated forward (decode steps: a few query rows against many keys): the choice of the split
count, and the split kernels (launchers under TRITON_INTERPRET=1 on CPU) against float64 references for forced
split counts, against the unsplit kernel, and through the backward."""

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler.lowering.dilated import triton as dilated_triton
from dilate_compiler.lowering.dilated.triton import (MAX_SPLITS, choose_splits, dilated_attn_bwd, dilated_attn_fwd,
                                                      forward_splits)
from dilate_compiler.strategies.reference import weighted_softmax_attention
from tests.tolerances import assert_close

SCALE = 0.25
CAP = 2.0

# name: segments, rates, mixing, Nk, Nq, causal, key padding ("", "left", "hole"), softcap
CASES = {
    "lse-decode": ((8, 16, 32), (1, 2, 4), "lse", 63, 1, True, "", None),
    "lse-3-rows-full": ((8, 16, 32), (1, 2, 4), "lse", 63, 3, False, "", None),
    "odd-segments": ((6, 15), (2, 3), "lse", 47, 3, True, "", None),
    "longer-than-keys": ((8, 16, 64), (1, 2, 4), "lse", 50, 1, True, "", None),
    "head_groups": ((8, 16, 64), (1, 2, 4), "head_groups", 63, 3, True, "", None),
    "head_groups-full": ((8, 16, 32), (1, 2, 4), "head_groups", 61, 1, False, "", None),
    "left-padding": ((8, 16, 32), (1, 2, 4), "lse", 63, 3, True, "left", None),
    "hole": ((8, 16, 32), (1, 2, 4), "lse", 63, 1, False, "hole", None),
    "softcap": ((8, 16, 32), (1, 2, 4), "lse", 63, 3, True, "", CAP),
    # walks of several key tiles each (16-key tiles under the interpreter): the splits share every loop
    "walks-decode": ((64, 128), (1, 2), "lse", 200, 1, True, "", None),
    "walks-3-rows": ((64, 128), (1, 2), "lse", 193, 3, False, "", None),
    "branches-padded": ((64, 128), (1, 2), "head_groups", 200, 3, True, "left", None),
}


def _inputs(nk, nq, b=2, hq=4, hkv=2, d=16, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, nk, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _key_keep(kind, b, nk):
    if not kind:
        return None
    keep = torch.ones(b, nk, dtype=torch.bool)
    if kind == "left":
        keep[1, :37] = False            # batch row 1: a shorter prompt, left-padded
    else:
        keep[0, 5:29] = False           # batch row 0: a hole over whole key tiles and parts of others
        keep[1, 40:43] = False
    return keep


def _reference(q, k, v, segs, rates, mixing, is_causal, keep, softcap):
    """float64 output and natural-log LSE of the last Nq rows of the pattern over Nk keys."""
    nq, nk, hq = q.shape[2], k.shape[2], q.shape[1]
    w = dc.Dilated(segs, rates, mixing).multiplicity(nk, hq, is_causal=is_causal)[:, nk - nq:].double()
    if keep is not None:
        w = w * keep.view(keep.shape[0], 1, 1, nk)
    out = weighted_softmax_attention(q, k, v, w, scale=SCALE, softcap=softcap)
    s = q.double() @ k.double().repeat_interleave(hq // k.shape[1], 1).transpose(-1, -2) * SCALE
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    lse = torch.logsumexp(s + torch.log(w), -1)
    return (out / len(segs) if mixing == "head_groups" else out), lse


def _finite(lse):
    return torch.where(torch.isinf(lse), 0.0, lse)


def _run(name, splits, dtype=torch.float16):
    segs, rates, mixing, nk, nq, is_causal, padding, softcap = CASES[name]
    q, k, v = _inputs(nk, nq, dtype=dtype, seed=nk + nq)
    keep = _key_keep(padding, 2, nk)
    args = dict(is_causal=is_causal, scale=SCALE, mixing=mixing, q_offset=nk - nq, key_keep=keep, softcap=softcap)
    out, lse = dilated_attn_fwd(q, k, v, segs, rates, num_splits=splits, **args)
    return (q, k, v, keep, args), out, lse


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_split_forward_matches_reference(name, splits):
    segs, rates, mixing, _, _, is_causal, _, softcap = CASES[name]
    (q, k, v, keep, _), out, lse = _run(name, splits)
    ref, ref_lse = _reference(q, k, v, segs, rates, mixing, is_causal, keep, softcap)
    assert out.dtype == q.dtype and out.shape == ref.shape and lse.shape == ref_lse.shape
    assert_close(out, ref, torch.float16)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows linked by no split differ"
    assert_close(_finite(lse), _finite(ref_lse), torch.float16, "lse")


@pytest.mark.parametrize("name", ["lse-decode", "walks-3-rows", "hole"])
def test_unsplit_forward_matches_reference_and_the_split_one(name):
    """num_splits=1 is the kernel without split-K; splitting moves the output by rounding only (float32)."""
    segs, rates, mixing, _, _, is_causal, _, softcap = CASES[name]
    (q, k, v, keep, _), out, lse = _run(name, 1, torch.float32)
    ref, ref_lse = _reference(q, k, v, segs, rates, mixing, is_causal, keep, softcap)
    assert_close(out, ref, torch.float32)
    assert_close(_finite(lse), _finite(ref_lse), torch.float32, "lse")
    _, out3, lse3 = _run(name, 3, torch.float32)
    assert_close(out3, out, torch.float32, "split against unsplit")
    assert_close(_finite(lse3), _finite(lse), torch.float32, "split lse against unsplit")


def test_splits_beyond_the_key_tiles_leave_some_split_empty():
    """Seven splits of a decode row whose walks hold fewer tiles: the splits given no tile write lse -inf and
    weigh nothing in the combine."""
    name = "lse-decode"     # at most 8 + 8 + 8 keys per row: at most two 16-key tiles per walk
    segs, rates, mixing, _, _, is_causal, _, softcap = CASES[name]
    (q, k, v, keep, _), out, lse = _run(name, 7)
    ref, ref_lse = _reference(q, k, v, segs, rates, mixing, is_causal, keep, softcap)
    assert_close(out, ref, torch.float16)
    assert_close(_finite(lse), _finite(ref_lse), torch.float16, "lse")


def test_rows_no_split_links_are_zero_with_lse_minus_inf():
    """Rates all 2: head 0 links only even positions; key padding drops every key of batch row 1. Every output
    element is written (the output starts as uninitialised memory)."""
    nk, nq = 40, 3
    q, k, v = _inputs(nk, nq, hq=2, hkv=2, seed=4)
    keep = torch.ones(2, nk, dtype=torch.bool)
    keep[1] = False
    out, lse = dilated_attn_fwd(q, k, v, (4, 8), (2, 2), is_causal=True, scale=SCALE, mixing="lse", q_offset=nk - nq,
                                key_keep=keep, num_splits=3)
    ref, ref_lse = _reference(q, k, v, (4, 8), (2, 2), "lse", True, keep, None)
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse[1]).all()
    assert torch.isinf(ref_lse[0, 0, 0]) and torch.isinf(ref_lse[1]).all()    # position 37, odd; row 1 dropped
    assert (out[torch.isinf(ref_lse)] == 0).all()
    assert_close(out, ref, torch.float16)


def test_split_forward_feeds_the_backward():
    """The combined lse is what the backward kernels read: gradients of a split decode forward against float64."""
    name = "walks-3-rows"
    segs, rates, mixing, _, _, is_causal, _, softcap = CASES[name]
    (q, k, v, keep, args), out, lse = _run(name, 2)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = _reference(q64, k64, v64, segs, rates, mixing, is_causal, keep, softcap)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    grads = dilated_attn_bwd(dout, q, k, v, out, lse, segs, rates, **args)
    for what, a, b in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert_close(a, b, torch.float16, what)


# --- the choice of the split count ----------------------------------------------------------------------------


def test_choose_splits_fills_the_card_only_when_programs_are_few():
    assert choose_splits(256, 64, 132) == 3                 # decode B=8, Hq=32 on an H100: 528 / 256 -> 3
    assert choose_splits(32, 64, 132) == MAX_SPLITS          # one sequence: capped
    assert choose_splits(32, 5, 132) == 5                    # at most one split per key tile
    assert choose_splits(528, 64, 132) == 1                  # enough programs
    assert choose_splits(8, 1, 132) == 1                     # one key tile: nothing to share
    assert choose_splits(0, 64, 132) == 1


def _choice(num_splits=None, batch=2, n_q=1, n=63, dropout_p=0.0, mixing="lse"):
    return forward_splits(num_splits, batch=batch, num_heads=4, n_q=n_q, n=n, L=4, segment_lengths=(8, 16, 32),
                          dilation_rates=(1, 2, 4), mixing=mixing, dropout_p=dropout_p, device=torch.device("cpu"))


@pytest.mark.skipif(not dilated_triton.INTERPRET, reason="the interpreter's choice")
def test_decode_calls_split_under_the_interpreter_and_prefill_calls_do_not():
    assert _choice() == 2                                # 8 programs, 2 key tiles of 16
    assert _choice(n_q=63, n=63) == 1                    # 32 programs fill the interpreter's card
    assert _choice(n_q=100, n=100) == 1                  # long query tiles
    assert _choice(batch=8, n_q=4) == 1                  # 128 programs fill the interpreter's card
    assert _choice(dropout_p=0.1) == 1


def test_forced_split_counts_and_their_errors():
    assert _choice(num_splits=5, n_q=100, n=100) == 5
    assert _choice(num_splits=1) == 1
    for bad in (0, 65, True, 2.0, "2"):
        with pytest.raises(ValueError, match=r"num_splits must be None .* or an int in \[1, 64\], got " + repr(bad)):
            _choice(num_splits=bad)
    with pytest.raises(NotImplementedError, match=r"num_splits=2\) with dropout \(dropout_p=0.1\).*num_splits=1"):
        _choice(num_splits=2, dropout_p=0.1)


def test_the_split_count_variable_is_checked(monkeypatch):
    for bad in ("0", "x", "-1", "65"):
        monkeypatch.setenv("DILATE_COMPILER_FWD_SPLITS", bad)
        with pytest.raises(ValueError, match=r"DILATE_COMPILER_FWD_SPLITS must be an integer in \[1, 64\]"):
            dilated_triton._forced_splits_from_env()
    monkeypatch.setenv("DILATE_COMPILER_FWD_SPLITS", "6")
    assert dilated_triton._forced_splits_from_env() == 6
    monkeypatch.delenv("DILATE_COMPILER_FWD_SPLITS")
    assert dilated_triton._forced_splits_from_env() is None
