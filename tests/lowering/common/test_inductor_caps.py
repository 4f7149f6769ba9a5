"""Register caps forwarded through Inductor (``lowering/common/inductor_caps.py``): the pieces, on CPU. The GPU test
``tests/lowering/block_sparse/test_gpu.py::test_inductor_compiles_a_capped_tile_with_its_cap`` compiles one."""

import types

import triton
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.runtime import triton_heuristics as th

from dilate_compiler.lowering.common import inductor_caps

CAPPED = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3, maxnreg=128)
PLAIN = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3)


def test_install_forwards_the_cap_in_inductors_config_dicts_and_compile_options():
    assert inductor_caps.install() == ""
    assert inductor_caps.install() == ""                      # idempotent: wrapped once
    assert th.config_to_dict.__wrapped__ is not None
    assert not hasattr(th.config_to_dict.__wrapped__, "__wrapped__")
    d = th.config_to_dict(CAPPED)
    assert d["maxnreg"] == 128 and inductor_caps.MARK in repr([d])   # as the generated code writes it
    assert th.config_from_dict(d).maxnreg == 128              # and as Inductor reads it back
    assert "maxnreg" not in th.config_to_dict(PLAIN)
    meta = {"num_warps": 8, "num_stages": 3, "debug": False}
    make = th.CachingAutotuner._create_compile_options
    cuda = types.SimpleNamespace(device_props=types.SimpleNamespace(type="cuda"))
    assert make(cuda, CAPPED, dict(meta))["maxnreg"] == 128
    assert "maxnreg" not in make(cuda, PLAIN, dict(meta))


def test_kernels_with_a_capped_config_compile_in_this_process():
    seen = []

    def original(self, kernel_name, source_code, device_str="cuda"):
        seen.append(self.use_process_pool())
        return kernel_name

    triton_ = inductor_caps._triton(original)
    pool = AsyncCompile()
    pool_default = AsyncCompile.use_process_pool
    try:
        AsyncCompile.use_process_pool = classmethod(lambda cls: True)
        assert triton_(pool, "k1", f"configs=[{{'BLOCK_M': 128, {inductor_caps.MARK}: 128}}]") == "k1"
        assert triton_(pool, "k2", "configs=[{'BLOCK_M': 128}]", "cuda") == "k2"
    finally:
        AsyncCompile.use_process_pool = pool_default
    assert seen == [False, True]                     # capped: in this process; the rest: Inductor's choice
    assert "use_process_pool" not in vars(pool)      # the instance's override is gone after the call


def test_a_missing_inductor_piece_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(inductor_caps, "_STATE", {"installed": False, "reason": ""})
    monkeypatch.delattr(th.CachingAutotuner, "_create_compile_options")
    reason = inductor_caps.install()
    assert "CachingAutotuner._create_compile_options" in reason, reason
    assert "capped tiles compile uncapped" in caplog.text


def _enabled_in_a_fresh_process(setting):
    """``inductor_caps.ENABLED`` in a new interpreter with ``DILATE_COMPILER_INDUCTOR_CAPS`` set to ``setting``
    (None: unset): (returncode, stdout, stderr)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DILATE_COMPILER_INDUCTOR_CAPS"}
    if setting is not None:
        env["DILATE_COMPILER_INDUCTOR_CAPS"] = setting
    # the module alone, from its file: the package would import torch (seconds per process)
    code = ("import importlib.util as u; s = u.spec_from_file_location('caps', {!r}); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(m.ENABLED)").format(inductor_caps.__file__)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout.strip(), r.stderr


def test_the_forwarding_is_on_by_default_and_off_with_0():
    assert _enabled_in_a_fresh_process(None)[:2] == (0, "True")
    assert _enabled_in_a_fresh_process("1")[:2] == (0, "True")
    assert _enabled_in_a_fresh_process("0")[:2] == (0, "False")


def test_an_unknown_setting_is_refused_by_name():
    rc, _, err = _enabled_in_a_fresh_process("yes")
    assert rc != 0
    assert "DILATE_COMPILER_INDUCTOR_CAPS must be '0' (off) or '1' (on, the default), got 'yes'" in err
