"""The autotuner of the project's Triton kernels: Triton's, with the search space pruned by what the card can run,
progress logged, and the best configuration of each tuning key kept on disk across processes.

- **Pruning** (``fit_shared_memory``): a configuration whose streamed tiles alone need more shared memory than the
  card gives one block (its opt-in limit) cannot compile; it is dropped before it is compiled and timed.
- **Progress**: each configuration timed logs ``autotuning <kernel> (<call>): config i of n`` at INFO on the
  ``dilate_compiler`` logger (compiling a configuration is most of a first call's time), and the choice with its
  time once all are timed.
- **Disk cache**: the best configuration of each tuning key is a JSON file under ``cache_dir() / "autotune"``
  (``DILATE_COMPILER_CACHE_DIR``, default ``$XDG_CACHE_HOME/dilate_compiler`` or ``~/.cache/dilate_compiler``),
  named by the SHA-256 of the key's fields (``cache_fields``): the device's name; the torch, triton and
  dilate_compiler versions; the kernel's name and source hash; the configurations searched; and every value the
  kernel is tuned on (the autotuner's key, each tensor argument's dtype, each constexpr, i.e. each UPPER_CASE
  keyword). A process that finds its key there runs that configuration and times none.
  ``DILATE_COMPILER_AUTOTUNE_CACHE=0`` turns the cache off; a file that can't be read is ignored (with a logged
  warning) and written again once the configurations are timed.

Under ``torch.compile`` (and export) Inductor compiles and times the kernels itself and keeps both in its own
caches; it calls the same pruning when it traces a launch, so it times only the configurations the card can run,
and when the disk cache holds the key it compiles that one configuration and times none.

``counters`` counts what happened in this process (configurations timed, cache hits, writes, unreadable files),
as Inductor's ``counters`` do: the tests read it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.runtime.autotuner import Autotuner

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
counters: collections.Counter = collections.Counter()

_CACHE_SETTINGS = ("0", "1")


def cache_dir() -> Path:
    """Where the project keeps what it computes once per machine: ``DILATE_COMPILER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dilate_compiler``, else ``~/.cache/dilate_compiler``."""
    explicit = os.environ.get("DILATE_COMPILER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dilate_compiler"


def cache_enabled() -> bool:
    """Whether autotuning results are read from and written to disk (``DILATE_COMPILER_AUTOTUNE_CACHE``, '1' by
    default, '0' off)."""
    setting = os.environ.get("DILATE_COMPILER_AUTOTUNE_CACHE", "1")
    if setting not in _CACHE_SETTINGS:
        raise ValueError(f"DILATE_COMPILER_AUTOTUNE_CACHE must be '0' (off) or '1' (on, the default), got {setting!r}")
    return setting == "1"


# --- what a configuration needs ------------------------------------------------------------------------------


def streamed_bytes(config: triton.Config, streamed: tuple, head_dim: int, itemsize: int) -> int:
    """A lower bound of the shared memory ``config`` needs: ``streamed = (block, count)`` says that the kernel's
    loop loads ``count`` tiles of ``[config.kwargs[block], head_dim]`` elements of ``itemsize`` bytes (K and V in
    a forward), which Triton's software pipeline keeps in ``num_stages`` buffers (what its sm_90 compiler
    allocates, ``benchmarks/kernel_spills.py``: the dilated forward's 128 x 64 tile of 3 stages at D=64 holds 3 x
    16 KiB of K and V beside 16 KiB of Q). Tiles held across the loop (Q in a forward) are left out: a bound
    below what the compiler asks for, so no configuration that fits is dropped."""
    block, count = streamed
    return config.num_stages * count * config.kwargs[block] * head_dim * itemsize


def fit_shared_memory(configs: list, streamed: tuple, head_dim: int, itemsize: int, limit: int) -> list:
    """The configurations of ``configs`` whose streamed tiles fit ``limit`` bytes of shared memory per block
    (``streamed_bytes``); the one needing least when none fits (the autotuner needs one, and compiling it reports
    what is short)."""
    kept = [c for c in configs if streamed_bytes(c, streamed, head_dim, itemsize) <= limit]
    return kept or [min(configs, key=lambda c: streamed_bytes(c, streamed, head_dim, itemsize))]


# The cache entries whose Inductor autotuning was announced in this process (``CachedAutotuner._prune``).
_ANNOUNCED: set = set()


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device_index: int) -> int:
    """Shared memory one block may use on CUDA device ``device_index`` (the opt-in maximum), in bytes."""
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except (ImportError, AttributeError, KeyError, RuntimeError):   # a Triton laid out otherwise: ask torch
        props = torch.cuda.get_device_properties(device_index)
        return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


# --- the cache's key ------------------------------------------------------------------------------------------


def describe_config(config: triton.Config) -> dict:
    """``config`` as JSON: its constexprs, warps, stages, CTAs and register cap."""
    return {"kwargs": dict(sorted(config.kwargs.items())), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": getattr(config, "num_ctas", 1),
            "maxnreg": getattr(config, "maxnreg", None)}


def device_name(device: torch.device) -> str:
    """The name the cache keys a device by: the CUDA device's name (``NVIDIA H100 80GB HBM3``), or the device
    type elsewhere (the Triton interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def tuned_values(keys: list, named_args: dict, kwargs: dict) -> dict | None:
    """Every value a launch is tuned on, as text: the arguments the autotuner keys on (``keys``), each tensor
    argument's dtype, each constexpr (an UPPER_CASE keyword); None when one is symbolic (traced with dynamic
    shapes: nothing to look up)."""
    values = {}
    for name, value in {**named_args, **kwargs}.items():
        if isinstance(value, torch.Tensor):
            values[f"{name}.dtype"] = str(value.dtype)
        elif name in keys or (name in kwargs and name.isupper()):
            if isinstance(value, (torch.SymInt, torch.SymBool, torch.SymFloat)):
                return None
            values[name] = repr(value)
    return dict(sorted(values.items()))


def cache_fields(kernel_name: str, source: str, configs: list, values: dict, device: torch.device) -> dict:
    """What one cache entry is keyed by (``entry_path`` hashes it; the file holds it too, and a file whose fields
    differ is not used)."""
    from ... import __version__

    return {"format": CACHE_FORMAT, "device": device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "dilate_compiler": __version__, "kernel": kernel_name, "source": source,
            "configs": [describe_config(c) for c in configs], "values": values}


def entry_path(fields: dict) -> Path:
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "autotune" / fields["kernel"].rsplit(".", 1)[-1] / f"{digest}.json"


def read_entry(path: Path, fields: dict, configs: list):
    """The configuration of ``configs`` that the entry at ``path`` names best, or None: no such file, another key's
    fields, or a configuration no longer searched. A file that can't be read is logged and ignored."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry["fields"] != fields:
            return None
        best = entry["best"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        counters["disk_unreadable"] += 1
        log.warning("ignoring the autotuning cache file %s, which can't be read (%s: %s); the configurations are "
                    "timed again", path, type(e).__name__, e)
        return None
    for config in configs:
        if describe_config(config) == best:
            return config
    return None


def write_entry(path: Path, fields: dict, best: triton.Config, timings: dict, seconds: float) -> None:
    """Write one entry atomically (a temporary file renamed over it); a cache that can't be written is logged
    and skipped."""
    entry = {"fields": fields, "best": describe_config(best), "tuning_seconds": round(seconds, 3),
             "timings_ms": [[describe_config(c), t if isinstance(t, (int, float)) else list(t)[0]]
                            for c, t in timings.items()]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the autotuning cache file %s (%s); the next process times the "
                    "configurations again", path, e)
        return
    counters["disk_writes"] += 1


def source_hash(fn) -> str:
    """A hash of a Triton kernel's source and what it calls (``JITFunction.cache_key``), or of its Python source
    under the interpreter."""
    key = getattr(fn, "cache_key", None)
    if isinstance(key, str):
        return key
    import inspect

    base = fn
    while not inspect.isfunction(base):
        base = base.fn
    return hashlib.sha256(inspect.getsource(base).encode()).hexdigest()


# --- the autotuner ------------------------------------------------------------------------------------------


def _inductor_caches_off() -> bool:
    """Whether Inductor was told to use no cache (``force_disable_caches``): a launch it traces then reads none of
    this one either, and Inductor times every configuration."""
    try:
        from torch._inductor import config
    except ImportError:
        return False
    return bool(getattr(config, "force_disable_caches", False))


def describe_call(call: dict) -> str:
    """The parts of a launch a person tells tunings apart by: causality, head dim, length, dtype."""
    parts = []
    if "IS_CAUSAL" in call:
        parts.append("causal" if call["IS_CAUSAL"] else "non-causal")
    if "HEAD_DIM" in call:
        parts.append(f"D={call['HEAD_DIM']}")
    if "N" in call:
        parts.append(f"N={call['N']}")
    dtype = next((v.dtype for v in call.values() if isinstance(v, torch.Tensor)), None)
    if dtype is not None:
        parts.append(str(dtype).replace("torch.", ""))
    return ", ".join(parts)


def _config_text(config: triton.Config) -> str:
    tiles = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    cap = f", {config.maxnreg} registers" if getattr(config, "maxnreg", None) else ""
    return f"{tiles}, {config.num_warps} warps, {config.num_stages} stages{cap}"


class CachedAutotuner(Autotuner):
    """Triton's ``Autotuner`` with the search pruned to what the card can run (``streamed``: the kernel's
    streamed tiles, ``(block name, count)``), progress logged under ``name``, and the best configuration of each
    key kept on disk (module docstring)."""

    def __init__(self, fn, configs: list, key: list, *, name: str, streamed: tuple):
        super().__init__(fn, fn.arg_names, configs, key, None, None,
                         prune_configs_by={"early_config_prune": self.prune}, do_bench=self.benchmark)
        self.name, self.streamed = name, streamed
        self._pending = None      # (path, fields) of the key being tuned, when it is to be written
        self._searched = 0        # configurations timed for that key
        self._timed = 0           # of which timed so far
        self._call = ""
        self._device_type = "cpu"

    def prune(self, configs: list, named_args: dict, **kwargs) -> list:
        """Triton's ``early_config_prune`` (also called by Inductor when it traces a launch): the configurations
        that fit the card's shared memory; only the best one when the disk cache holds this call's key."""
        self._pending = None
        kept = self._prune(configs, named_args, kwargs)
        self._searched, self._timed = len(kept), 0
        return kept

    def _prune(self, configs: list, named_args: dict, kwargs: dict) -> list:
        if torch.compiler.is_dynamo_compiling():   # a launch Dynamo itself traces: its pruning stays side-effect free
            return configs
        call = {**named_args, **kwargs}
        tensor = next((v for v in call.values() if isinstance(v, torch.Tensor)), None)
        if tensor is None:
            return configs
        self._device_type = tensor.device.type
        if tensor.device.type == "cuda" and "HEAD_DIM" in call:
            before = len(configs)
            configs = fit_shared_memory(configs, self.streamed, call["HEAD_DIM"], tensor.element_size(),
                                        shared_memory_limit(tensor.device.index or 0))
            counters["configs_pruned"] += before - len(configs)
        self._call = describe_call(call)
        traced = type(tensor) is not torch.Tensor
        values = tuned_values(self.keys, named_args, kwargs) if cache_enabled() and not (
            traced and _inductor_caches_off()) else None
        if values is None:
            return configs
        fields = cache_fields(f"{self.base_fn.__module__}.{self.base_fn.__qualname__}", source_hash(self.fn),
                              configs, values, tensor.device)
        path = entry_path(fields)
        best = read_entry(path, fields, configs)
        if best is not None:
            counters["disk_hits"] += 1
            log.log(logging.INFO if traced else logging.DEBUG, "%s (%s): %s, read from %s%s", self.name, self._call,
                    _config_text(best), path, " (the one configuration Inductor compiles)" if traced else "")
            return [best]
        if traced and path not in _ANNOUNCED:   # once per kernel and shape: every call site of a graph traces here
            _ANNOUNCED.add(path)
            log.info("%s (%s): Inductor compiles and times %d configurations when the graph first runs", self.name,
                     self._call, len(configs))
        else:
            self._pending = (path, fields)
        return configs

    def benchmark(self, kernel_call, quantiles):
        """Time one configuration (Triton's benchmarker on a GPU, wall time under the interpreter), logging
        progress. A search left with one configuration times nothing (older Triton versions ask for its time)."""
        if self._searched == 1:
            return [0.0] * len(quantiles)
        self._timed += 1
        counters["configs_timed"] += 1
        log.info("autotuning %s (%s): config %d of %d", self.name, self._call, self._timed, self._searched)
        if self._device_type == "cuda":
            from triton.runtime import driver

            return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            kernel_call()
            times.append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(times)] * len(quantiles)

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        self._timed = 0
        result = super().run(*args, **kwargs)
        if self._timed:
            seconds = time.perf_counter() - t0
            log.info("autotuned %s (%s): %s, %d configs in %.1f s", self.name, self._call,
                     _config_text(self.best_config), self._timed, seconds)
            if self._pending is not None:
                write_entry(*self._pending, self.best_config, getattr(self, "configs_timings", {}), seconds)
            self._pending, self._timed = None, 0
        return result


def autotune(configs: list, key: list, *, name: str, streamed: tuple):
    """Decorator: ``CachedAutotuner`` over ``configs`` (``launch.autotune_configs``), tuned per ``key`` like
    ``triton.autotune``; ``name`` says what the kernel computes in the progress log ("dilated forward");
    ``streamed``: ``(block name, count)`` of the tiles its loop streams (``streamed_bytes``)."""
    def decorator(fn):
        return CachedAutotuner(fn, configs, key, name=name, streamed=streamed)
    return decorator
