"""Register caps (``triton.Config.maxnreg``) for the kernels Inductor compiles from the ops' ``wrap_triton`` calls.

Some tiles of the autotuning spaces hold an 8-warp CTA to 128 registers per thread so that two fit an SM
(``launch.tile_configs``). Triton's own autotuner passes the cap to ptxas. Inductor (torch 2.11 to 2.13)
compiles user-defined Triton kernels through its own autotuner and drops it in two places:

- ``triton_heuristics.config_to_dict`` writes a config into the generated code without ``maxnreg`` (its
  ``config_from_dict`` already reads it back);
- ``CachingAutotuner._create_compile_options`` builds ``triton.compile``'s options without it.

``install`` forwards the cap in both places. The compile options are built where the kernel compiles, and
Inductor's compile workers are separate processes that don't import this package: so a generated kernel whose
configs carry a cap compiles in the process that generated it (other kernels still compile in the workers).
Configs without a cap are untouched. Without the forwarding a capped tile compiles uncapped under torch.compile:
correct, but slower (``docs/design-notes.md``, register caps under torch.compile).

On by default: the ops call ``install`` when they first launch a kernel on a GPU. ``DILATE_COMPILER_INDUCTOR_CAPS=0``
turns it off (Inductor's three functions are then left as they are, and capped tiles compile uncapped under
torch.compile). The GPU tests that compile the ops under Inductor pass with it on and off.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_SETTING = os.environ.get("DILATE_COMPILER_INDUCTOR_CAPS", "1")
if _SETTING not in ("0", "1"):
    raise ValueError(f"DILATE_COMPILER_INDUCTOR_CAPS must be '0' (off) or '1' (on, the default), got {_SETTING!r}")
ENABLED = _SETTING == "1"

_STATE = {"installed": False, "reason": ""}
MARK = "'maxnreg'"   # how a capped config appears in generated source (``repr`` of its dict)


def _config_to_dict(original):
    def config_to_dict(config):
        d = original(config)
        if getattr(config, "maxnreg", None) is not None:
            d["maxnreg"] = config.maxnreg
        return d

    config_to_dict.__wrapped__ = original
    return config_to_dict


def _create_compile_options(original):
    def _create_compile_options(self, cfg, compile_meta):
        options = original(self, cfg, compile_meta)
        if getattr(cfg, "maxnreg", None) is not None and self.device_props.type == "cuda":
            options["maxnreg"] = cfg.maxnreg
        return options

    _create_compile_options.__wrapped__ = original
    return _create_compile_options


def _triton(original):
    def triton(self, kernel_name, source_code, *args, **kwargs):
        if MARK not in source_code:
            return original(self, kernel_name, source_code, *args, **kwargs)
        self.use_process_pool = lambda: False   # this instance only: shadows the classmethod for this call
        try:
            return original(self, kernel_name, source_code, *args, **kwargs)
        finally:
            del self.use_process_pool

    triton.__wrapped__ = original
    return triton


def install() -> str:
    """Forward register caps through Inductor (idempotent). Returns '' when installed, else why not (logged once:
    capped tiles then compile uncapped under torch.compile)."""
    if _STATE["installed"]:
        return _STATE["reason"]
    _STATE["installed"] = True
    try:
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.runtime import triton_heuristics as th
    except ImportError as e:   # no Inductor, or one laid out differently
        _STATE["reason"] = f"Inductor's autotuner could not be imported ({e})"
    else:
        needed = [(th, "config_to_dict"), (th.CachingAutotuner, "_create_compile_options"), (AsyncCompile, "triton"),
                  (AsyncCompile, "use_process_pool")]
        missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]
        if missing:
            _STATE["reason"] = f"this torch's Inductor has no {', '.join(missing)}"
        else:
            th.config_to_dict = _config_to_dict(th.config_to_dict)
            th.CachingAutotuner._create_compile_options = _create_compile_options(
                th.CachingAutotuner._create_compile_options)
            AsyncCompile.triton = _triton(AsyncCompile.triton)
    if _STATE["reason"]:
        log.warning("register caps are not forwarded through Inductor: %s; capped tiles compile uncapped under "
                    "torch.compile", _STATE["reason"])
    return _STATE["reason"]
