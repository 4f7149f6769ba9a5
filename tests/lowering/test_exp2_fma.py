"""exp2 on the FMA units (``exp2_fma``): the polynomial's steps against float64, the PTX against those steps,
and the switch's validation. The kernels with it run in the GPU tests (inline PTX has no interpreter)."""

import re
import struct

import numpy as np
import pytest

from dilate_compiler.lowering import exp2_fma as E
from tests.tolerances import EXP2_POLY_REL_ERR


def test_polynomial_steps_match_exp2():
    x = np.concatenate([np.linspace(-126, 0, 1_000_001, dtype=np.float32),
                        -np.logspace(-38, 1, 10_001, dtype=np.float32), np.float32([1e-7, 2e-7])])
    y = E.emulate(x).astype(np.float64)
    rel = np.abs(y / np.exp2(x.astype(np.float64)) - 1)
    assert rel.max() <= EXP2_POLY_REL_ERR, rel.max()


def test_polynomial_ends_and_nan():
    y = E.emulate(np.float32([-np.inf, -127.0, -1000.0, 0.0, -1.0, -2.0, -64.0, np.nan]))
    assert y[:3].tolist() == [0.0, 0.0, 0.0]            # masked scores weigh exactly 0
    assert y[3:7].tolist() == [1.0, 0.5, 0.25, 2.0**-64]   # integers exactly (the row max weighs 1)
    assert np.isnan(y[7])                                # NaN in, NaN out, as ex2.approx


def _f32(token: str) -> float:
    return struct.unpack(">f", bytes.fromhex(token[2:]))[0]


@pytest.mark.parametrize("on_fma", [1, 2, 3, 4])
def test_ptx_runs_the_steps_on_the_first_weights_and_ex2_on_the_rest(on_fma):
    asm = E.ptx(on_fma)
    blocks = re.findall(r"\{(.*?)\}", asm, re.S)
    assert len(blocks) == on_fma
    for i, body in enumerate(blocks):   # output $i from input $(PACK + i), by the documented steps
        assert f"max.NaN.f32 xc, ${E.PACK + i}, " in body
        assert body.strip().splitlines()[-1].startswith(f"fma.rn.f32 ${i}, xc, ")
        consts = [_f32(t) for t in re.findall(r"0f[0-9A-F]{8}", body)]
        assert consts == [E.MIN_X, E.MAGIC, E.MAGIC, np.float32(E.POLY[3]), np.float32(E.POLY[2]),
                          np.float32(E.POLY[1]), np.float32(E.POLY[0]), 1.0, 0.0]
        assert "add.rm.f32" in body and "shl.b32 ib, ib, 23;" in body
    rest = re.sub(r"\{.*?\}", "", asm, flags=re.S).split()
    ex2 = [" ".join(rest[j:j + 3]) for j in range(len(rest)) if rest[j] == "ex2.approx.ftz.f32"]
    assert ex2 == [f"ex2.approx.ftz.f32 ${i}, ${E.PACK + i};" for i in range(on_fma, E.PACK)]


def test_switch_is_validated(monkeypatch):
    monkeypatch.delenv(E.ENV, raising=False)
    assert E.from_env(interpret=True) == 0
    monkeypatch.setenv(E.ENV, "2")
    assert E.from_env(interpret=False) == 2
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        E.from_env(interpret=True)
    for bad in ("5", "-1", "yes", ""):
        monkeypatch.setenv(E.ENV, bad)
        with pytest.raises(ValueError, match=E.ENV + r" must be one of 0, 1, 2, 3, 4 .*got " + re.escape(repr(bad))):
            E.from_env(interpret=False)
    with pytest.raises(ValueError, match="on_fma must be one of"):
        E.ptx(0)
