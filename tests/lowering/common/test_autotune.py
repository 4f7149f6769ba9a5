"""The autotuner (``lowering/common/autotune.py``) on the CPU, through a small kernel autotuned over three tiles
(``autotuned_copy.py``) run in the Triton interpreter: the disk cache round-trips across processes, its key
changes with every field it is keyed by, an unreadable file is ignored with a warning, pruning drops what does
not fit the shared memory, progress is logged."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import dilate_compiler
from dilate_compiler.lowering.common import autotune
from tests.lowering.common import autotuned_copy

ROOT = Path(__file__).resolve().parents[3]
HELPER = Path(autotuned_copy.__file__)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory for this test, the kernel's in-process choices and the counters cleared."""
    monkeypatch.setenv("DILATE_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DILATE_COMPILER_AUTOTUNE_CACHE", raising=False)
    autotuned_copy.scaled_copy_kernel.cache.clear()
    autotune.counters.clear()
    yield tmp_path
    autotuned_copy.scaled_copy_kernel.cache.clear()


def _fresh_process(cache_dir: Path, n: int, **env) -> dict:
    """Counters of a fresh process that copies ``n`` elements with ``cache_dir`` as its cache."""
    environ = {k: v for k, v in os.environ.items() if k != "DILATE_COMPILER_AUTOTUNE_CACHE"}
    environ.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TRITON_INTERPRET="1",
                   DILATE_COMPILER_CACHE_DIR=str(cache_dir), **env)
    res = subprocess.run([sys.executable, str(HELPER), str(n)], capture_output=True, text=True, env=environ,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _entries(cache_dir: Path) -> list:
    return sorted((cache_dir / "autotune").rglob("*.json"))


@pytest.mark.slow
def test_a_fresh_process_reads_the_best_config_and_times_none(cache):
    first = _fresh_process(cache, 100)
    assert first.get("configs_timed") == 3 and first.get("disk_writes") == 1 and not first.get("disk_hits")
    (entry,) = _entries(cache)
    stored = json.loads(entry.read_text())
    assert stored["fields"]["values"] == {"HEAD_DIM": "16", "N": "100", "SCALE": "2", "X.dtype": "torch.float32",
                                          "Y.dtype": "torch.float32"}
    assert stored["best"] in [autotune.describe_config(c) for c in autotuned_copy.CONFIGS]
    second = _fresh_process(cache, 100)
    assert second.get("disk_hits") == 1 and not second.get("configs_timed") and not second.get("disk_writes")
    other = _fresh_process(cache, 200)          # another key: timed and written beside the first
    assert other.get("configs_timed") == 3 and len(_entries(cache)) == 2


@pytest.mark.slow
def test_the_cache_turned_off_times_every_process(cache):
    for _ in range(2):
        counts = _fresh_process(cache, 100, DILATE_COMPILER_AUTOTUNE_CACHE="0")
        assert counts.get("configs_timed") == 3 and not counts.get("disk_hits")
    assert _entries(cache) == []


def test_a_bad_cache_setting_is_refused(monkeypatch):
    monkeypatch.setenv("DILATE_COMPILER_AUTOTUNE_CACHE", "yes")
    with pytest.raises(ValueError, match="DILATE_COMPILER_AUTOTUNE_CACHE must be '0'.*got 'yes'"):
        autotune.cache_enabled()


def test_the_cache_directory_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DILATE_COMPILER_CACHE_DIR", str(tmp_path / "here"))
    assert autotune.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("DILATE_COMPILER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "dilate_compiler"


def test_an_unreadable_cache_file_is_ignored_with_a_warning_and_written_again(cache, caplog):
    x = torch.arange(50, dtype=torch.float32)
    autotuned_copy.scaled_copy(x)
    (entry,) = _entries(cache)
    entry.write_text("{not json")
    autotuned_copy.scaled_copy_kernel.cache.clear()
    with caplog.at_level(logging.WARNING, logger="dilate_compiler"):
        assert torch.equal(autotuned_copy.scaled_copy(x), 2 * x)
    assert any("ignoring the autotuning cache file" in r.getMessage() and "can't be read" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    assert autotune.counters["disk_unreadable"] == 1 and autotune.counters["configs_timed"] == 6
    assert json.loads(entry.read_text())["best"]                    # rewritten whole
    autotuned_copy.scaled_copy_kernel.cache.clear()
    autotuned_copy.scaled_copy(x)
    assert autotune.counters["disk_hits"] == 1 and autotune.counters["configs_timed"] == 6


def test_an_entry_of_other_fields_or_an_unsearched_config_is_not_used(cache):
    x = torch.arange(40, dtype=torch.float32)
    autotuned_copy.scaled_copy(x)
    (entry,) = _entries(cache)
    stored = json.loads(entry.read_text())
    fields = stored["fields"]
    assert autotune.read_entry(entry, fields, autotuned_copy.CONFIGS) is not None
    assert autotune.read_entry(entry, dict(fields, torch="0.0"), autotuned_copy.CONFIGS) is None
    others = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    assert autotune.read_entry(entry, fields, others) is None
    assert autotune.counters["disk_unreadable"] == 0


def test_progress_is_logged_at_info_on_the_package_logger(cache, caplog):
    with caplog.at_level(logging.INFO, logger="dilate_compiler"):
        autotuned_copy.scaled_copy(torch.arange(30, dtype=torch.float32))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("dilate_compiler")]
    assert [m for m in messages if m.startswith("autotuning ")] == [
        f"autotuning test copy (D=16, N=30, float32): config {i} of 3" for i in (1, 2, 3)]
    assert any(m.startswith("autotuned test copy (D=16, N=30, float32): BLOCK_M=") and "3 configs in" in m
               for m in messages)


def _fields(**change):
    """The cache fields of a launch of the test kernel, with ``change`` applied to its arguments, configs or
    device."""
    x = change.pop("x", torch.zeros(8))
    named = {"X": x, "Y": x, "N": change.pop("N", 8)}
    kwargs = {"HEAD_DIM": change.pop("HEAD_DIM", 16), "SCALE": change.pop("SCALE", 2)}
    configs = change.pop("configs", autotuned_copy.CONFIGS)
    device = change.pop("device", torch.device("cpu"))
    name = change.pop("kernel", "tests.copy")
    source = change.pop("source", "abc")
    values = autotune.tuned_values(["N"], named, kwargs)
    return autotune.cache_fields(name, source, configs, values, device)


def test_every_keyed_field_changes_the_entry(monkeypatch):
    base = autotune.entry_path(_fields())
    assert autotune.entry_path(_fields()) == base
    changed = {
        "N": _fields(N=9), "a constexpr": _fields(SCALE=3), "the head dim": _fields(HEAD_DIM=32),
        "a dtype": _fields(x=torch.zeros(8, dtype=torch.float16)),
        "the configs": _fields(configs=autotuned_copy.CONFIGS[:2]),
        "a register cap": _fields(configs=autotuned_copy.CONFIGS[:2] + [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=3, maxnreg=128)]),
        "the device": _fields(device=torch.device("meta")),
        "the kernel": _fields(kernel="tests.other"), "its source": _fields(source="abd"),
    }
    for what, module, attr in (("torch", torch, "__version__"), ("triton", triton, "__version__"),
                               ("dilate_compiler", dilate_compiler, "__version__")):
        with monkeypatch.context() as m:
            m.setattr(module, attr, "0.0.0")
            changed[f"the {what} version"] = _fields()
    paths = {what: autotune.entry_path(f) for what, f in changed.items()}
    assert all(p != base for p in paths.values()), [w for w, p in paths.items() if p == base]
    assert len(set(paths.values())) == len(paths)


def test_a_positional_argument_outside_the_key_is_not_keyed():
    values = autotune.tuned_values(["N"], {"X": torch.zeros(2), "N": 8, "stride_x": 4}, {"SCALE": 2, "scale": 0.5})
    assert values == {"N": "8", "SCALE": "2", "X.dtype": "torch.float32"}


def test_a_symbolic_value_has_no_entry():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    n = ShapeEnv().create_unbacked_symint()
    assert autotune.tuned_values(["N"], {"N": n}, {}) is None


def test_pruning_drops_the_configs_that_exceed_a_shared_memory_limit():
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=s)
               for m, n, s in ((128, 128, 3), (128, 64, 3), (64, 64, 2), (128, 128, 1))]
    need = [autotune.streamed_bytes(c, ("BLOCK_N", 2), 128, 2) for c in configs]
    assert need == [3 * 2 * 128 * 128 * 2, 3 * 2 * 64 * 128 * 2, 2 * 2 * 64 * 128 * 2, 1 * 2 * 128 * 128 * 2]
    kept = autotune.fit_shared_memory(configs, ("BLOCK_N", 2), 128, 2, limit=99 * 1024)   # a 99 KiB card
    assert kept == [configs[1], configs[2], configs[3]]
    assert autotune.fit_shared_memory(configs, ("BLOCK_N", 2), 128, 2, limit=227 * 1024) == configs   # an H100
    assert autotune.fit_shared_memory(configs, ("BLOCK_N", 2), 128, 2, limit=1024) == [configs[2]]   # the least
    assert autotune.fit_shared_memory(configs, ("BLOCK_N", 2), 64, 2, limit=99 * 1024) == configs    # D=64: all fit


def test_the_project_kernels_tune_through_the_cached_autotuner():
    from dilate_compiler.lowering.block_sparse import triton as bs_triton
    from dilate_compiler.lowering.dilated import triton as dl_triton

    kernels = [dl_triton._dilated_attn_fwd_kernel, dl_triton._dilated_attn_fwd_walk0_kernel,
               dl_triton._dilated_attn_bwd_dq_kernel, dl_triton._dilated_attn_bwd_dkdv_kernel]
    kernels += [bs_triton._autotuned(kind, 64) for kind in ("fwd", "dq", "dkdv")]
    for kernel in kernels:
        assert isinstance(kernel, autotune.CachedAutotuner), kernel
        block, count = kernel.streamed
        assert all(block in c.kwargs for c in kernel.configs) and count == 2
    assert {k.name for k in kernels} >= {"dilated forward", "dilated backward dK/dV"}


def test_a_traced_launch_is_pruned_to_the_cached_config(cache, caplog):
    """What Inductor sees when it traces a launch (it calls the autotuner's pruning on fake tensors): every
    configuration while the cache lacks the key, the cached best one once it holds it, and a log line saying which."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernel = autotuned_copy.scaled_copy_kernel
    x = torch.arange(60, dtype=torch.float32)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        with caplog.at_level(logging.INFO, logger="dilate_compiler"):
            cold = kernel.prune(kernel.configs, {"X": fake, "Y": fake, "N": 60}, HEAD_DIM=16, SCALE=2)
            again = kernel.prune(kernel.configs, {"X": fake, "Y": fake, "N": 60}, HEAD_DIM=16, SCALE=2)
    assert cold == again == kernel.configs and _entries(cache) == []   # a trace writes nothing
    # said once per kernel and shape, however many call sites of a graph trace the launch
    assert caplog.text.count("Inductor compiles and times 3 configurations") == 1
    autotuned_copy.scaled_copy(x)                                    # an eager call tunes and writes the key
    caplog.clear()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        with caplog.at_level(logging.INFO, logger="dilate_compiler"):
            warm = kernel.prune(kernel.configs, {"X": fake, "Y": fake, "N": 60}, HEAD_DIM=16, SCALE=2)
    assert warm == [kernel.best_config] and "the one configuration Inductor compiles" in caplog.text


def test_a_traced_launch_reads_no_cache_when_inductor_is_told_to_use_none(cache):
    from torch._inductor import config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernel = autotuned_copy.scaled_copy_kernel
    x = torch.arange(70, dtype=torch.float32)
    autotuned_copy.scaled_copy(x)                                    # the key is on disk
    with FakeTensorMode() as mode, inductor_config.patch(force_disable_caches=True):
        fake = mode.from_tensor(x)
        assert kernel.prune(kernel.configs, {"X": fake, "Y": fake, "N": 70}, HEAD_DIM=16, SCALE=2) == kernel.configs
