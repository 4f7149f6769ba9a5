"""The benchmarks: their work counts against the definitions, and each script run end to end on the CPU at tiny
sizes (its tables written, its checks passed). Timings are not checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler import patterns as P
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_block_sparse  # noqa: E402
import bench_dilated  # noqa: E402
import harness  # noqa: E402


@pytest.mark.parametrize("N", [1, 15, 64, 100, 300])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_pair_counts_equal_the_multiplicity(N, causal):
    segs, rates, H = (8, 16, 32, 64), (1, 2, 4, 8), 8
    m = dc.Dilated(segs, rates).multiplicity(N, H, is_causal=causal)
    assert bench_dilated.linked_pairs(N, H, segs, rates, causal) == int(m.sum())
    assert bench_dilated.distinct_pairs(N, H, segs, rates, causal) == int((m > 0).sum())
    assert bench_dilated.dense_pairs(N, H, causal) == H * (N * (N + 1) // 2 if causal else N * N)


def test_distinct_pairs_refuses_a_pattern_that_is_not_a_chain():
    assert bench_dilated.chain((8, 16), (2, 3)) is None
    with pytest.raises(ValueError, match="chains"):
        bench_dilated.distinct_pairs(64, 2, (8, 16), (2, 3), False)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_pair_counts_equal_the_layout(causal):
    layout = (P.sliding_window(20) | P.global_tokens(3)).layout(77, 16, is_causal=causal)
    allowed, visited = bench_block_sparse.allowed_pairs(layout)
    assert allowed == int(layout.token_mask()[0].sum())
    assert visited == int((layout.state[0] != P.EMPTY).sum()) * 16 * 16


def test_gather_anchor_is_the_dilated_function():
    """The gather anchor computes the same outputs as the op, to float32 (it merges the branches in float32; its
    backward differs: constant mixing weights)."""
    q, k, v = (torch.randn(1, 4, 64, 16, dtype=torch.float64) for _ in range(3))
    segs, rates = (16, 32, 64), (1, 2, 4)
    for causal in (False, True):
        ours = dc.ops.dilated_attention(q, k, v, segs, rates, is_causal=causal)
        assert_close(bench_dilated.gather_sdpa(q, k, v, segs, rates, causal), ours, torch.float32)


def test_table_cells_and_ratios_in_words():
    assert harness.table(["a", "b"], [[1.23456, float("nan")], [1234.5, True]]) == (
        "| a | b |\n|---|---|\n| 1.23 | - |\n| 1234 | yes |")
    import bench_models

    assert bench_models._against(2.0) == "2× faster" and bench_models._against(0.25) == "4× slower"


def test_ceiling_tables_take_the_faster_dense_backend_and_say_why_one_is_missing(tmp_path, capsys):
    env = {"hardware": "test"}
    results = harness.Results("t", str(tmp_path), env)
    rows = [
        {"config": "A", "N": 8, "distinct_flop": 1e12, "dense_flop": 4e12, "ours_fwd_ms": 1.0,
         "ours-compiled_fwd_ms": 2.0,
         "dense-cudnn_fwd_ms": 2.0, "dense-flash_fwd_ms": 4.0, "ours_fwdbwd_ms": 10.0, "dense-cudnn_fwdbwd_ms": 20.0,
         "dense-flash_fwdbwd_error": "no backward"},
        {"config": "A", "N": 16, "distinct_flop": 1e12, "dense_flop": 4e12, "ours_fwd_ms": 1.0,
         "dense-cudnn_error": "No available kernel", "dense-flash_fwd_ms": 8.0},
    ]
    harness.ceiling_tables(results, rows, ["ours", "ours-compiled", "dense-cudnn", "dense-flash"], backward=True,
                           labels=("config", "N"), ours_rates=(("ours TF/s", "distinct_flop"),),
                           share_flop="distinct_flop")
    text = "\n".join(results.sections)
    forward, both = text.split("## Forward + backward")
    # row 1: cuDNN 2000 TF/s beats flash 1000; ours 1000 TF/s = 0.5 of it, compiled 0.25
    assert "| A | 8 | 1 | 2 | 2 | 4 | 1000 | 2000 | 1000 | cuDNN | 0.5 | 0.25 |" in forward
    # row 2: cuDNN refused the shape: flash (500 TF/s) is the ceiling, ours 2x its rate
    assert "| A | 16 | 1 | - | - | 8 | 1000 | failed | 500.0 | flash | 2 | - |" in forward
    assert "cuDNN in 1 of 2 rows, flash in 1 of 2 rows" in forward
    assert "| A | 8 | 10.0 | 20.0 | 350.0 | 700.0 | failed | cuDNN | 0.5 |" in both  # × 3.5 forward + backward
    assert "dense-cudnn: No available kernel" in capsys.readouterr().out            # failures listed first


def _script(name: str, args: list, tmp_path) -> Path:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--out", str(out)] + args,
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def _rows(out: Path, name: str) -> list:
    return json.loads((out / f"{name}.json").read_text())["rows"]


@pytest.mark.slow
def test_bench_dilated_runs_on_the_cpu(tmp_path):
    out = _script("bench_dilated.py", ["--device", "cpu", "--configs", "A", "--ns", "128,256", "--causal", "both",
                                       "--methods", "ours,dense,gather", "--backward"], tmp_path)
    rows = _rows(out, "bench_dilated")
    assert len(rows) == 4 and all("ours_fwdbwd_ms" in r and "gather_fwd_ms" in r and "dense-cpu_fwd_ms" in r
                                  for r in rows)
    assert all(r["dense-cudnn_unavailable"] == r["dense-flash_unavailable"] == "no CUDA device" for r in rows)
    table = (out / "bench_dilated.md").read_text()
    assert "## Forward, ms (median)" in table and "## Forward + backward" in table and "| hardware |" in table
    assert "| cuDNN TF/s | flash TF/s | CPU default TF/s | ceiling | ours / ceiling |" in table
    assert "| unavailable (no CUDA device) | unavailable (no CUDA device) |" in table
    assert "Ceiling (the faster dense backend): CPU default in 4 of 4 rows" in table


@pytest.mark.slow
def test_bench_block_sparse_runs_on_the_cpu(tmp_path):
    out = _script("bench_block_sparse.py", ["--device", "cpu", "--ns", "256", "--methods", "ours,dense"], tmp_path)
    rows = _rows(out, "bench_block_sparse")
    assert {r["pattern"] for r in rows} == {"window", "local+global"}
    assert all(0 < r["useful_flop"] <= r["computed_flop"] and r["useful_flop"] <= r["dense_flop"] for r in rows)
    N, H, D = 256, bench_block_sparse.H, bench_block_sparse.D
    assert {r["pattern"]: r["dense_flop"] for r in rows} == {"window": 4 * D * H * N * (N + 1) // 2,   # causal
                                                               "local+global": 4 * D * H * N * N}
    table = (out / "bench_block_sparse.md").read_text()
    assert "## Forward, ms (median)" in table and "| ours TF/s useful | ours TF/s computed |" in table
    assert "| ceiling | ours / ceiling | × ours-compiled | × flex | layout ms |" in table


@pytest.mark.slow
def test_bench_hilbert_runs_on_the_cpu(tmp_path):
    out = _script("bench_hilbert.py", ["--device", "cpu", "--side", "16", "--skip-flex"], tmp_path)
    doc = json.loads((out / "bench_hilbert.json").read_text())
    assert doc["environment"]["max_abs_diff_hilbert_vs_rowmajor"] < 1e-4
    assert {r["gathers"] for r in doc["rows"] if r["method"].startswith("model")} == {2, 16, 0}


@pytest.mark.slow
def test_bench_multi_gpu_dry_run_on_gloo_ranks(tmp_path):
    out = _script("bench_multi_gpu.py", ["--world", "2", "--n", "256", "--weak-per-rank", "128", "--heads", "2",
                                         "--head-dim", "16", "--segments", "32,64", "--rates", "1,2", "--dtype",
                                         "float32", "--longest", "", "--reps", "2", "--unaligned-extra", "8",
                                         "--phases", "check,scaling"], tmp_path)
    rows = [json.loads(line) for line in (out / "multi_gpu.jsonl").read_text().splitlines()]
    checks = [r for r in rows if r.get("phase") == "check"]
    assert len(checks) == 6 and all(r.get("ok") for r in checks), checks
    assert "## Times" in (out / "bench_multi_gpu.md").read_text()


@pytest.mark.slow
def test_bench_models_times_a_cold_and_a_warm_first_call(tmp_path):
    out = _script("bench_models.py", ["--device", "cpu", "--seq-len", "64", "--layers", "1", "--hidden", "64",
                                      "--heads", "4", "--intermediate", "128", "--steps", "2", "--models", "gpt",
                                      "--methods", "dilated", "--caches", "cold,warm"], tmp_path)
    rows = _rows(out, "bench_models")
    assert [r["caches"] for r in rows] == ["cold", "warm"] and all(r["first_call_s"] > 0 for r in rows)
    table = (out / "bench_models.md").read_text()
    assert "| gpt | dilated | cold |" in table and "| gpt | dilated | warm |" in table


@pytest.mark.slow
def test_bench_sequence_parallel_rank_dry_run_on_gloo_ranks(tmp_path):
    out = _script("bench_sequence_parallel_rank.py", ["--device", "cpu", "--world", "2", "--n", "256", "--heads", "2",
                                                      "--head-dim", "16", "--dtype", "float32", "--reps", "1",
                                                      "--strategies", "dense,sliding,hilbert-dilated", "--overlap"],
                  tmp_path)
    rows = _rows(out, "bench_sequence_parallel_rank")
    ratio = [r for r in rows if r["phase"] == "ratio"]
    assert [(r["strategy"], r["mode"]) for r in ratio] == [("dense", "ring"), ("sliding", "sparse"),
                                                            ("sliding", "ring"), ("hilbert-dilated", "sparse"),
                                                            ("hilbert-dilated", "ring")]
    assert all(r["ratio"] > 0 and r["ran"] == "exact path" for r in ratio), ratio   # float32 on CPU: exact path
    overlap = [r for r in rows if r["phase"] == "overlap"]
    assert [r["what"] for r in overlap] == ["forward", "backward"], overlap
    assert all(0.0 <= r["hidden_fraction"] <= 1.0 for r in overlap), overlap
    assert "## Per-rank forward + backward" in (out / "bench_sequence_parallel_rank.md").read_text()


@pytest.mark.slow
def test_bench_models_runs_on_the_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = _script("bench_models.py", ["--device", "cpu", "--seq-len", "64", "--layers", "1", "--hidden", "64",
                                      "--heads", "4", "--intermediate", "128", "--steps", "2", "--padding",
                                      "--methods", "eager,dilated"], tmp_path)
    rows = {(r["model"], r["method"]): r for r in _rows(out, "bench_models")}
    assert set(rows) == {("llama", "eager"), ("llama", "dilated"), ("gpt", "eager"), ("gpt", "dilated")}
    assert not [r["error"] for r in rows.values() if "error" in r]
    for model in ("llama", "gpt"):
        dilated = rows[(model, "dilated")]
        assert dilated["sites_found"] == dilated["sites_rewritten"] == 1, dilated
        assert dilated["batch"] == 2 and dilated["step_ms"] > 0 and dilated["first_call_s"] > 0
    assert rows[("llama", "dilated")]["masked_sites"] == 1         # the padding mask is kept
    assert rows[("gpt", "dilated")]["masked_sites"] == 0
    assert "| llama | dilated |" in (out / "bench_models.md").read_text()


def test_decode_benchmark_runs_on_the_cpu(tmp_path):
    import bench_decode

    strategy = dc.Dilated((8, 16), (1, 2))
    m = strategy.multiplicity(21, 2, is_causal=True)
    assert bench_decode.linked_keys(strategy, 21) == int((m[:, -1] > 0).sum(-1).max())
    bench_decode.main(["--out", str(tmp_path), "--cached", "64", "--batch", "1", "--heads", "4", "--kv-heads", "2",
                       "--head-dim", "16", "--generate-prompt", "24", "--generate-tokens", "2", "--device", "cpu"])
    text = (tmp_path / "bench_decode.md").read_text()
    assert "One decode step" in text and "Generation" in text
