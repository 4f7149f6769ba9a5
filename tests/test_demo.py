"""``make demo`` (examples/demo.py): its comparison words and, at a small size on the CPU, a whole run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402


def test_a_slowdown_is_worded_as_a_slowdown():
    assert demo._compare(50.0, 100.0) == "2.0x faster"
    assert demo._compare(200.0, 100.0) == "2.0x slower"
    assert demo._compare(101.0, 100.0) == "about the same"


@pytest.mark.slow
def test_demo_reports_progress_and_ends_with_a_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--seq-len", "512", "--min-time",
                          "0.2", "--plot", str(tmp_path / "demo.png")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert [f"[{i}/6]" in out for i in range(1, 7)] == [True] * 6          # progress, method by method
    assert "4 attention site(s): 4 rewritten, 0 skipped" in out
    rows = re.findall(r"^(.+?)\s+([\d.]+)\s+([\d.]+)-([\d.]+)\s+([\d.]+)\s+(.+)$", out, re.M)
    assert len(rows) == 6, out
    for label, ms, lo, hi, _, versus in rows:
        assert float(lo) <= float(ms) <= float(hi)
        assert versus == "(dense)" or re.fullmatch(r"\d+\.\dx (faster|slower)|about the same", versus), versus
