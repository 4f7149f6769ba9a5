"""What the benchmarks share: timing, the run's environment, a printed table, the files a run writes, an optional
plot, and the dense ceiling (cuDNN and flash SDPA timed side by side, ours as a share of the faster:
``ceiling_tables``).

Every benchmark prints, and writes into its ``--out`` folder, a header (hardware, versions, command, date) and one
Markdown table per measurement, the form ``docs/results.md`` keeps; the raw rows go beside it as JSON.

Timing on CUDA is ``triton.testing.do_bench`` (median; it zeroes a 256 MB buffer before each call, so every call
starts with a cold L2). On the CPU (how the benchmarks are tested, at tiny sizes) it is the median wall time of
repeated calls after a warm-up.
"""

from __future__ import annotations

import collections
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Sequence

import torch

# Run from a clone without installing the package (``python benchmarks/bench_x.py``, and the fresh worker
# processes some benchmarks start): the package is the repository's own.
if importlib.util.find_spec("dilate_compiler") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def graph_ms(fn: Callable[[], object], device) -> tuple[float, str]:
    """``(ms, '')``: the median milliseconds of replaying ``fn()`` captured in a CUDA graph (the GPU's time for the
    call, without the Python and launch time of calling it); or ``(NaN, why)`` when it can't be captured (a call
    that copies between host and device or syncs, for instance), ``(NaN, "CUDA only")`` off CUDA."""
    if torch.device(device).type != "cuda":
        return float("nan"), "CUDA only"
    import triton

    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):       # warm-up off the capture: autotuning and compilation happen here
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        torch.cuda.synchronize(device)
        return float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median"), ""


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


# --- timing a set of methods ----------------------------------------------------------------------------------


def time_methods(row: dict, fns: dict, device, *, backward_inputs: Sequence[torch.Tensor] = (),
                 forward_only: Sequence[str] = ()) -> None:
    """Time each ``fns[name]()`` into ``row[f"{name}_fwd_ms"]`` and, with ``backward_inputs`` (unless ``name`` is in
    ``forward_only``), forward + backward into ``row[f"{name}_fwdbwd_ms"]``. A method that raises (a dense
    backend that refuses the shape or has no such backward) is recorded as ``{name}_error`` /
    ``{name}_fwdbwd_error``, not fatal."""
    for name, fn in fns.items():
        with torch.no_grad():
            try:
                fn()
            except RuntimeError as e:
                row[f"{name}_error"] = str(e).splitlines()[0][:200]
                continue
            row[f"{name}_fwd_ms"] = measure_ms(fn, device)
            row[f"{name}_fwd_peak_extra_mib"] = peak_extra_mib(fn, device)
        if backward_inputs and name not in forward_only:
            try:
                row[f"{name}_fwdbwd_ms"] = measure_ms(fn, device, backward_inputs=backward_inputs)
            except RuntimeError as e:
                row[f"{name}_fwdbwd_error"] = str(e).splitlines()[0][:200]


# --- the dense ceiling ----------------------------------------------------------------------------------------
# The dense ceiling is the fastest dense attention on the card: SDPA with the cuDNN backend and with the flash
# backend, both timed, the faster taken. On the CPU (a dry run) neither exists; PyTorch's default runs instead.

DENSE_NAMES = {"dense-cudnn": "cuDNN", "dense-flash": "flash", "dense-cpu": "CPU default"}
PHASES = (("fwd", "Forward", 1.0), ("fwdbwd", "Forward + backward", 3.5))   # FLOPs: 4·D per pair forward, 3.5×


def dense_runs(device) -> tuple[dict, dict]:
    """``(runs, unavailable)``: the dense attention timed here, name -> ``SDPBackend`` (None: PyTorch's choice), and
    the dense backends that can't run here, name -> why (said so in the tables)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"dense-cpu": None}, {"dense-cudnn": "no CUDA device", "dense-flash": "no CUDA device"}
    from torch.nn.attention import SDPBackend

    runs, unavailable = {}, {}
    if torch.backends.cudnn.is_available():
        runs["dense-cudnn"] = SDPBackend.CUDNN_ATTENTION
    else:
        unavailable["dense-cudnn"] = "this torch has no cuDNN"
    runs["dense-flash"] = SDPBackend.FLASH_ATTENTION
    return runs, unavailable


def dense_call(q, k, v, causal: bool, backend) -> Callable[[], torch.Tensor]:
    """Dense ``F.scaled_dot_product_attention`` with ``backend`` (None: PyTorch's choice)."""
    import torch.nn.functional as F

    def run():
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def add_dense(row: dict, fns: dict, q, k, v, causal: bool) -> None:
    """Add the dense runs of ``q``'s device to ``fns`` and note in ``row`` those that can't run here."""
    runs, unavailable = dense_runs(q.device)
    for name, backend in runs.items():
        fns[name] = dense_call(q, k, v, causal, backend)
    for name, why in unavailable.items():
        row[f"{name}_unavailable"] = why


def rate(row: dict, method: str, flop_key: str, phase: str) -> float:
    """TFLOP/s of ``method`` in ``phase``, crediting it with ``row[flop_key]`` forward FLOPs (× 3.5 forward +
    backward); nan when it wasn't timed."""
    ms = row.get(f"{method}_{phase}_ms")
    factor = dict((p, f) for p, _, f in PHASES)[phase]
    return float("nan") if ms is None else factor * row[flop_key] / ms / 1e9


def ceiling(row: dict, phase: str) -> tuple[str, float]:
    """``(name, TFLOP/s)`` of the faster dense run of ``row`` in ``phase``, or ``("-", nan)``."""
    rates = {m: rate(row, m, "dense_flop", phase) for m in DENSE_NAMES if f"{m}_{phase}_ms" in row}
    if not rates:
        return "-", float("nan")
    name = max(rates, key=rates.get)
    return name, rates[name]


def dense_cell(row: dict, method: str, phase: str) -> str:
    """A dense run's TFLOP/s, or why there is none: unavailable here, or failed (the error is listed above the
    tables)."""
    if f"{method}_unavailable" in row:
        return f"unavailable ({row[f'{method}_unavailable']})"
    if f"{method}_{phase}_ms" in row:
        return fmt(rate(row, method, "dense_flop", phase))
    if f"{method}_error" in row or f"{method}_{phase}_error" in row:
        return "failed"
    return "-"


def report_failures(rows: Sequence[dict]) -> None:
    failed = sorted({f"{k[:-6]}: {r[k]}" for r in rows for k in r if k.endswith("_error")})
    if failed:
        print("\nfailed (not timed):\n  " + "\n  ".join(failed), flush=True)


def ceiling_tables(results: "Results", rows: Sequence[dict], timed: Sequence[str], *, backward: bool,
                   labels: Sequence[str], ours_rates: Sequence[tuple], share_flop: str,
                   extras: Sequence[tuple] = (), notes: str = "") -> None:
    """One table per phase (forward; forward + backward with ``backward``): the ``labels`` columns of each row, each
    timed method's milliseconds, ours' rates (``ours_rates``: ``(title, flop key)``), each dense backend's rate (or
    why there is none), which one is the ceiling, each of ours' runs (``ours``, ``ours-compiled``,
    ``ours-triton``) as a share of the ceiling's rate with ours credited with ``row[share_flop]``, and ``extras``
    (``(title, fn(row, phase))``)."""
    report_failures(rows)
    dense = [m for m in DENSE_NAMES if any(f"{m}_fwd_ms" in r or f"{m}_unavailable" in r or f"{m}_error" in r
                                          for r in rows)]
    for phase, title, factor in PHASES:
        if phase == "fwdbwd" and not backward:
            continue
        shown = [m for m in timed if any(f"{m}_{phase}_ms" in r for r in rows)]
        ours = [m for m in ("ours", "ours-compiled", "ours-triton") if m in shown]
        columns = (list(labels) + [f"{m} ms" for m in shown] + [t for t, _ in ours_rates]
                   + [f"{DENSE_NAMES[m]} TF/s" for m in dense] + ["ceiling"] + [f"{m} / ceiling" for m in ours]
                   + [t for t, _ in extras])
        cells, won = [], collections.Counter()
        for r in rows:
            best, best_rate = ceiling(r, phase)
            if best != "-":
                won[DENSE_NAMES[best]] += 1
            cells.append([r[c] for c in labels] + [r.get(f"{m}_{phase}_ms", float("nan")) for m in shown]
                         + [rate(r, "ours", key, phase) for _, key in ours_rates]
                         + [dense_cell(r, m, phase) for m in dense]
                         + [DENSE_NAMES.get(best, best)] + [rate(r, m, share_flop, phase) / best_rate for m in ours]
                         + [fn(r, phase) for _, fn in extras])
        said = ", ".join(f"{name} in {n} of {len(rows)} rows" for name, n in won.most_common()) or "none timed"
        results.add_table(f"{title}, ms (median)", columns, cells,
                          notes=" ".join(filter(None, (
                              f"Ceiling (the faster dense backend): {said}. TF/s: 4·D FLOPs per pair"
                              + (", × 3.5 forward + backward" if factor != 1.0 else "")
                              + "; dense attention is credited with its own pairs (N², or N(N+1)/2 causal).",
                              notes))))


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
