"""Whole models: one training step (forward + backward) of a Hugging Face Llama and of a plain causal GPT of the
same size, eager, compiled by Inductor, and compiled with this package's backend.

    python benchmarks/bench_models.py --out DIR [--models llama,gpt] [--methods eager,inductor,dilated]
        [--seq-len 16384] [--batch 1] [--padding] [--layers 4] [--steps 10] [--caches as-is|cold|cold,warm]

Models (built from a configuration, random weights, bf16 on CUDA, float32 with ``--device cpu``):
- ``llama``: ``transformers.LlamaModel``, ``attn_implementation="sdpa"``, called with ``input_ids`` (and, with
  ``--padding``, an ``attention_mask``: a batch of 2 whose second row is 25% left padding);
- ``gpt``: a plain causal GPT (learned positions, LayerNorm, GELU MLP) whose attention is
  ``F.scaled_dot_product_attention(..., is_causal=True)``; it takes no mask, so ``--padding`` only sets its batch.
Both default to 4 layers, hidden size 1024, 16 heads, MLP width 2816. The loss of a step is the mean of the last
hidden state.

Methods:
- ``eager``: the model as written (dense SDPA);
- ``inductor``: ``torch.compile(model)`` (Inductor, dense SDPA);
- ``dilated``: ``torch.compile(model, backend=dilated_backend, options={"strategy": STRATEGY})`` with
  ``STRATEGY = dc.Dilated((2048, 4096, 8192, 16384), (1, 2, 4, 8))``.

Each (model, method) runs in a fresh process, so its first call includes all its compilation and autotuning.
``--caches`` says with which caches on disk (this package's autotuning cache, Triton's and Inductor's): ``as-is``
(the default) the user's own; ``cold`` empty ones, made for the run; ``cold,warm`` a cold process, then a second
fresh process with the caches the first one filled (a row each). The workers log this package's INFO records
(autotuning progress, each compiled graph) to standard error as they run.
Reported: the first step's time (compile + autotune + the step), the median step time over ``--steps`` further
steps, tokens per second, and for ``dilated`` the compiler's report (``dilate_compiler.backend.REPORTS``):
attention sites found and rewritten, skip reasons, and whether any rewritten site runs the exact PyTorch path
instead of the kernels (on CUDA the op logs each reason once; on the CPU every site runs the exact path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

MODELS = ("llama", "gpt")
METHODS = ("eager", "inductor", "dilated")
VOCAB = 32000


class GPT(nn.Module):
    """A plain causal GPT: token and learned position embeddings, pre-norm blocks, SDPA with ``is_causal=True``."""

    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, max_len: int, vocab: int = VOCAB):
        super().__init__()
        self.heads = heads
        self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln1": nn.LayerNorm(hidden), "qkv": nn.Linear(hidden, 3 * hidden), "proj": nn.Linear(hidden, hidden),
            "ln2": nn.LayerNorm(hidden), "up": nn.Linear(hidden, intermediate), "down": nn.Linear(intermediate, hidden),
        }) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, input_ids):
        B, N = input_ids.shape
        x = self.tok(input_ids) + self.pos(torch.arange(N, device=input_ids.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["proj"](a.transpose(1, 2).reshape(B, N, -1))
            x = x + b["down"](F.gelu(b["up"](b["ln2"](x))))
        return self.norm(x)


def build(model: str, a, device, dtype):
    """The model and the keyword arguments of its call."""
    torch.manual_seed(0)
    batch = 2 if a.padding else a.batch
    ids = torch.randint(0, VOCAB, (batch, a.seq_len), device=device)
    if model == "gpt":
        net = GPT(a.layers, a.hidden, a.heads, a.intermediate, a.seq_len)
        kwargs = {"input_ids": ids}
    else:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                       num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                       num_key_value_heads=a.heads, max_position_embeddings=a.seq_len,
                                       use_cache=False, attn_implementation="sdpa")
        net = transformers.LlamaModel(cfg)
        kwargs = {"input_ids": ids}
        if a.padding:
            mask = torch.ones(batch, a.seq_len, dtype=torch.long, device=device)
            mask[1, : a.seq_len // 4] = 0
            kwargs["attention_mask"] = mask
    return net.to(device=device, dtype=dtype).train(), kwargs


def strategy():
    import dilate_compiler as dc

    return dc.Dilated((2048, 4096, 8192, 16384), (1, 2, 4, 8))


class _Warnings(logging.Handler):
    """The package's warnings during a run (the op logs, once per reason, each call that runs the exact path on
    CUDA)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


CACHE_VARIABLES = {"DILATE_COMPILER_CACHE_DIR": "dilate_compiler", "TRITON_CACHE_DIR": "triton",
                   "TORCHINDUCTOR_CACHE_DIR": "inductor"}


def worker(model_name: str, method: str, a) -> dict:
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter(f"[{model_name} / {method}] %(message)s"))
    logging.getLogger("dilate_compiler").addHandler(progress)
    logging.getLogger("dilate_compiler").setLevel(logging.INFO)
    device = harness.check_device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, kwargs = build(model_name, a, device, dtype)
    warnings = _Warnings()
    logging.getLogger("dilate_compiler").addHandler(warnings)
    if method == "inductor":
        model = torch.compile(model)
    elif method == "dilated":
        from dilate_compiler.backend import dilated_backend

        model = torch.compile(model, backend=dilated_backend, options={"strategy": strategy()})

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        hidden.float().mean().backward()

    harness.sync(device)
    t0 = time.perf_counter()
    step()
    harness.sync(device)
    first_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    harness.sync(device)
    second_ms = (time.perf_counter() - t0) * 1e3
    ms = harness.measure_ms(step, device, rep_ms=a.steps * second_ms)
    tokens = kwargs["input_ids"].numel()
    row = {"model": model_name, "method": method, "seq_len": a.seq_len, "batch": kwargs["input_ids"].shape[0],
           "padding": bool(a.padding and model_name == "llama"), "layers": a.layers, "first_call_s": first_s,
           "step_ms": ms, "tokens_per_s": tokens / (ms / 1e3),
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}
    if method == "dilated":
        from dilate_compiler.backend import REPORTS

        sites = [s for report in REPORTS for s in report.sites]
        rewritten = [s for s in sites if s.status == "rewritten"]
        row.update(sites_found=len(sites), sites_rewritten=len(rewritten),
                   skipped=sorted({s.reason for s in sites if s.status == "skipped"}),
                   masked_sites=sum(s.mask_kind != "none" for s in rewritten),
                   exact_path=("every site (the CPU runs the exact path)" if device.type != "cuda" else
                               "; ".join(m for m in warnings.messages if "exact" in m) or "no"))
    row["warnings"] = warnings.messages
    return row


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--models", default="llama,gpt")
    ap.add_argument("--methods", default="eager,inductor,dilated")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--padding", action="store_true",
                    help="a batch of 2 whose second row is 25%% left padding (the Llama gets an attention_mask)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--steps", type=int, default=10, help="about how many steps the step time is a median of")
    ap.add_argument("--device", default=harness.default_device())
    ap.add_argument("--caches", default="as-is", choices=("as-is", "cold", "cold,warm"),
                    help="the caches on disk each worker starts with (see above)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for name, value, accepted in (("--models", a.models, MODELS), ("--methods", a.methods, METHODS)):
        unknown = [x for x in value.split(",") if x not in accepted]
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown}; accepted: {', '.join(accepted)} (comma-separated)")
    if a.padding and a.batch not in (1, 2):
        raise SystemExit(f"--padding runs a batch of 2; got --batch {a.batch}")
    if a.hidden % a.heads:
        raise SystemExit(f"--hidden {a.hidden} must be a multiple of --heads {a.heads}")
    return a


def _run_worker(model: str, method: str, argv, cache_root=None) -> dict:
    """One (model, method) in a fresh process, its standard error passed on as it runs; its JSON row, or the error
    it ended with. ``cache_root``: a folder holding the worker's caches (``CACHE_VARIABLES``), else the user's."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{model}:{method}"] + list(argv)
    env = dict(os.environ)
    if cache_root is not None:
        env.update({var: os.path.join(cache_root, sub) for var, sub in CACHE_VARIABLES.items()})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    tail = "(no output)"
    for line in proc.stderr:
        sys.stderr.write(line)
        tail = line.strip() or tail
    lines = proc.stdout.read().strip().splitlines()
    code = proc.wait()
    if code != 0 or not lines:
        return {"model": model, "method": method, "error": f"exit {code}: {tail[:300]}"}
    return json.loads(lines[-1])


def _runs(model: str, method: str, argv, caches: str) -> list:
    """The rows of one (model, method): one process with the caches ``caches`` names (``--caches``)."""
    if caches == "as-is":
        return [dict(_run_worker(model, method, argv), caches="as-is")]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_models_caches_") as root:
        rows = [dict(_run_worker(model, method, argv, root), caches="cold")]
        if caches == "cold,warm":
            rows.append(dict(_run_worker(model, method, argv, root), caches="warm"))
    return rows


def _against(speed: float) -> str:
    """A speed ratio against eager in words: "2.1× faster" or "3.4× slower", never a slowdown as a speed-up."""
    if speed != speed:
        return "-"
    return f"{harness.fmt(speed)}× faster" if speed >= 1 else f"{harness.fmt(1 / speed)}× slower"


def summarise(results, rows):
    nan = float("nan")
    eager = {r["model"]: r.get("step_ms") for r in rows if r["method"] == "eager" and "step_ms" in r}
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["model"], r["method"], r.get("caches", "-"), "-", "-", "-", "-", "-", r["error"]])
            continue
        base = eager.get(r["model"])
        speed = base / r["step_ms"] if base else nan
        if r["method"] == "dilated":
            note = f"{r['sites_rewritten']} of {r['sites_found']} sites rewritten; exact path: {r['exact_path']}"
            if r["skipped"]:
                note += "; skipped: " + ", ".join(r["skipped"])
        else:
            note = "dense SDPA"
        cells.append([r["model"], r["method"], r.get("caches", "as-is"), r["first_call_s"], r["step_ms"],
                      r["tokens_per_s"],
                      _against(speed) if r["method"] != "eager" else "(baseline)",
                      r["peak_gib"], note])
    results.add_table("One training step (forward + backward)",
                      ["model", "method", "caches", "first call s", "ms / step", "tokens / s", "against eager",
                       "peak GiB", "attention"], cells,
                      notes="first call: compilation, autotuning and one step, in a fresh process with the caches on "
                            "disk said (cold: empty; warm: filled by the cold run before it); ms / step: median of "
                            "later steps.")


def plot(results, rows):
    def draw(plt):
        ok = [r for r in rows if "error" not in r]
        models = sorted({r["model"] for r in ok})
        fig, ax = plt.subplots(figsize=(6, 3.8))
        width = 0.8 / max(1, len(METHODS))
        for i, method in enumerate(METHODS):
            xs = [j + i * width for j, m in enumerate(models) for r in ok if r["model"] == m and r["method"] == method]
            ys = [r["tokens_per_s"] for m in models for r in ok if r["model"] == m and r["method"] == method]
            if xs:
                ax.bar(xs, ys, width, label=method)
        ax.set_xticks([j + width for j in range(len(models))], models)
        ax.set(ylabel="tokens / s (training step)", title=f"N = {ok[0]['seq_len'] if ok else '-'}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    results.plot(draw)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _args(argv)
    if a.worker:
        model, method = a.worker.split(":")
        print(json.dumps(worker(model, method, a), default=str), flush=True)
        return None
    device = harness.check_device(a.device)
    import transformers  # noqa: F401  (its version goes into the header)

    results = harness.Results("bench_models", a.out, harness.environment(device))
    for model in a.models.split(","):
        for method in a.methods.split(","):
            print(f"{model} / {method}: building, compiling and timing in a fresh process ...", flush=True)
            for row in _runs(model, method, argv, a.caches):
                results.row(row)
    summarise(results, results.rows)
    results.write()
    plot(results, results.rows)
    return results.rows


if __name__ == "__main__":
    main()
