"""What the benchmarks share: timing, the run's environment, a printed table, the files a run writes and an optional
plot.

Every benchmark prints, and writes into its ``--out`` folder, a header (hardware, versions, command, date) and one
Markdown table per measurement, the form ``docs/results.md`` keeps; the raw rows go beside it as JSON.

Timing on CUDA is ``triton.testing.do_bench`` (median; it zeroes a 256 MB buffer before each call, so every call
starts with a cold L2). On the CPU (how the benchmarks are tested, at tiny sizes) it is the median wall time of
repeated calls after a warm-up.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Sequence

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    if device not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a dry run at small sizes)")
    return torch.device(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(fn: Callable[[], object], device, *, backward_inputs: Sequence[torch.Tensor] = (),
               rep_ms: float = 200.0) -> float:
    """Median milliseconds of ``fn()``. With ``backward_inputs``, of ``fn()`` and ``out.backward(ones)``, the
    inputs' gradients cleared between calls."""
    call = fn
    if backward_inputs:
        def call():
            out = fn()
            out.backward(torch.ones_like(out))
    if torch.device(device).type == "cuda":
        import triton

        return triton.testing.do_bench(call, warmup=50, rep=rep_ms, grad_to_none=list(backward_inputs) or None,
                                       return_mode="median")
    call()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 100):
        for t in backward_inputs:
            t.grad = None
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device) -> float:
    """Memory allocated beyond what was live before one call of ``fn`` (CUDA; nan elsewhere)."""
    if torch.device(device).type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def environment(device) -> dict:
    """Hardware, versions, command and date of this run."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if "transformers" in sys.modules:
        env["transformers"] = sys.modules["transformers"].__version__
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["hardware"] = f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        env["cuda"] = torch.version.cuda or "-"
    else:
        env["hardware"] = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return env


def header(env: dict) -> str:
    keys = ("hardware", "python", "torch", "triton", "transformers", "cuda", "command", "date")
    lines = ["| | |", "|---|---|"] + [f"| {k} | {fmt(env[k])} |" for k in keys if k in env]
    return "\n".join(lines)


def fmt(value) -> str:
    """A table cell: floats to 3 significant digits below 10, one decimal below 1000; nan and None as '-'."""
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    return str(value).replace("|", "/")


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; floats get 3 significant digits below 10, one decimal below 1000; nan prints '-'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Results:
    """The printed and written output of one benchmark run: ``NAME.md`` (header and tables) and ``NAME.json``
    (environment and raw rows) in ``out_dir``, and ``NAME.png`` where a plot is drawn."""

    def __init__(self, name: str, out_dir: str, env: dict):
        self.name, self.out_dir, self.env = name, out_dir, env
        os.makedirs(out_dir, exist_ok=True)
        self.sections = [f"# {name}", "", header(env)]
        self.rows: list = []
        print(header(env), flush=True)

    def row(self, row: dict) -> None:
        """Keep one raw row and print it at once (a long run shows its progress)."""
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        self._write_json()

    def add_table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence], notes: str = "") -> None:
        text = f"## {title}\n\n{table(columns, rows)}" + (f"\n\n{notes}" if notes else "")
        self.sections += ["", text]
        print("\n" + text, flush=True)

    def write(self) -> str:
        path = os.path.join(self.out_dir, f"{self.name}.md")
        with open(path, "w") as f:
            f.write("\n".join(self.sections) + "\n")
        self._write_json()
        print(f"\nwrote {path}", flush=True)
        return path

    def _write_json(self) -> None:
        with open(os.path.join(self.out_dir, f"{self.name}.json"), "w") as f:
            json.dump({"environment": self.env, "rows": self.rows}, f, indent=1, default=str)

    def plot(self, draw: Callable) -> None:
        """``draw(plt)`` makes a figure; saved as ``NAME.png`` when matplotlib is installed, skipped (said so)
        when it isn't."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot", flush=True)
            return
        fig = draw(plt)
        path = os.path.join(self.out_dir, f"{self.name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}", flush=True)


# --- what the op chose: the benchmarks report which forward ran ----------------------------------------------
# These read the package's lowering modules, whose layout is internal; they are kept here, in one place.


def dilated_forward_taken(q, k, v, segment_lengths, dilation_rates, is_causal: bool) -> str:
    """Which forward ``dc.ops.dilated_attention`` runs for this call: "warp-specialised", or why the Triton
    forward runs instead."""
    from dilate_compiler.lowering.dilated.op import warp_specialised_reason

    return (warp_specialised_reason(q, k, v, None, segment_lengths, dilation_rates, is_causal, "lse", 0.0)
            or "warp-specialised")


def block_sparse_forward_taken(q, k, v, layout, block_size: int, is_causal: bool) -> str:
    """Which forward ``dc.ops.block_sparse_attention`` runs for this call."""
    from dilate_compiler.lowering.block_sparse.op import warp_specialised_reason

    return warp_specialised_reason(q, k, v, layout.kv_count, block_size, is_causal, None) or "warp-specialised"


def triton_forward(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the ops' warp-specialised Hopper forwards turned off (their Triton forwards run)."""
    from dilate_compiler.lowering.common import hopper_gluon

    def run():
        with hopper_gluon.turned_off():
            return fn()
    return run
