"""What the package does, in a few minutes: a GPT-style model compiled with ``backend="dilated"``, the dilated
attention op and the drop-in module, each against its dense-attention counterpart on one long sequence.

    python examples/demo.py [--seq-len N] [--min-time S] [--plot PATH]

Runs on CUDA when present, else on the CPU. Each method runs in a fresh process (so its peak memory is its own):
one warm-up call (which compiles, for the compiled model), then timed calls until at least ``--min-time`` seconds
and 5 calls have passed; the table gives the median and the fastest and slowest call.

LongNet's dilated attention is a different attention from dense attention (each token attends to a sparse,
structured subset of the others), so outputs differ by design: the comparison is the cost of each at this length.
A single segment at least as long as the sequence with rate 1 reproduces dense attention exactly (the tests check
it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SEGMENTS = (1024, 2048, 4096)
RATES = (1, 2, 4)
HEADS, HEAD_DIM = 8, 64

# (name, what it is, the dense method it is compared with)
METHODS = [
    ("gpt-dense", "GPT (4 layers), eager PyTorch, dense attention", None),
    ("gpt-dilated", "the same GPT, torch.compile(backend=\"dilated\")", "gpt-dense"),
    ("sdpa", "F.scaled_dot_product_attention (dense)", None),
    ("op", "dc.ops.dilated_attention", "sdpa"),
    ("mha", "nn.MultiheadAttention (dense)", None),
    ("mdha", "dc.nn.MultiheadDilatedAttention", "mha"),
]


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _gpt():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GPT(nn.Module):
        """A small GPT-style decoder: plain PyTorch and F.scaled_dot_product_attention, nothing of this package."""

        def __init__(self, layers=4, dim=256, heads=8, vocab=1000):
            super().__init__()
            self.emb, self.heads = nn.Embedding(vocab, dim), heads
            self.blocks = nn.ModuleList(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                "ln2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(),
                                                               nn.Linear(4 * dim, dim))})
                for _ in range(layers))
            self.head = nn.Linear(dim, vocab)

        def forward(self, ids):
            x = self.emb(ids)
            B, N, E = x.shape
            for b in self.blocks:
                q, k, v = b["qkv"](b["ln1"](x)).view(B, N, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + b["proj"](a.transpose(1, 2).reshape(B, N, E))
                x = x + b["mlp"](b["ln2"](x))
            return self.head(x)

    torch.manual_seed(0)
    return GPT()


def _say(text: str) -> None:
    print(f"    {text}", file=sys.stderr, flush=True)


def _measure(method: str, seq_len: int, device: str, min_time: float) -> dict:
    """One warm-up call, then timed calls: at least 5 and at least ``min_time`` seconds."""
    import torch
    import torch.nn.functional as F

    import dilate_compiler as dc

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    E = HEADS * HEAD_DIM
    if method.startswith("gpt"):
        model = _gpt().to(device=device, dtype=dtype).eval()
        ids = torch.randint(0, 1000, (1, seq_len), device=device)
        if method == "gpt-dilated":
            model = torch.compile(model, backend="dilated", options={"strategy": dc.Dilated(SEGMENTS, RATES)})
        fn = lambda: model(ids)  # noqa: E731
    elif method in ("sdpa", "op"):
        q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
        if method == "sdpa":
            fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        else:
            fn = lambda: dc.ops.dilated_attention(q, k, v, SEGMENTS, RATES, is_causal=True)  # noqa: E731
    else:
        x = torch.randn(1, seq_len, E, device=device, dtype=dtype)
        if method == "mha":
            mod = torch.nn.MultiheadAttention(E, HEADS, batch_first=True, device=device, dtype=dtype).eval()
            mask = torch.nn.Transformer.generate_square_subsequent_mask(seq_len, device=device, dtype=dtype)
            fn = lambda: mod(x, x, x, need_weights=False, is_causal=True, attn_mask=mask)  # noqa: E731
        else:
            mod = dc.nn.MultiheadDilatedAttention(E, HEADS, SEGMENTS, RATES, device=device, dtype=dtype).eval()
            fn = lambda: mod(x, is_causal=True)  # noqa: E731

    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        _say("compiling and warming up (about a minute on a CPU)" if method == "gpt-dilated" else "warming up")
        t0 = time.perf_counter()
        call()
        first_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _peak_rss_bytes()
        call()
        peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()) - base
        times, start = [], time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        _say(f"timed {len(times)} calls")
    res = {"method": method, "ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
           "calls": len(times), "first_call_s": first_s, "peak_mib": max(peak, 0) / 2**20}
    if method == "gpt-dilated":
        from dilate_compiler.backend import last_report

        res["report"] = str(last_report())
    return res


def _compare(ms: float, base_ms: float) -> str:
    """The ratio in words: a slowdown is called a slowdown."""
    ratio = base_ms / ms
    if ratio >= 1.05:
        return f"{ratio:.1f}x faster"
    if ratio <= 1 / 1.05:
        return f"{1 / ratio:.1f}x slower"
    return "about the same"


def _plot(rows: list, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [r["label"] for r in rows][::-1]
    ax.barh(names, [r["ms"] for r in rows][::-1],
            color=["tab:blue" if r["base"] else "tab:gray" for r in rows][::-1])
    ax.set(xlabel="time per call, ms (median; lower is better)", title=title)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (default: 65536 on CUDA, 8192 on a CPU)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per method")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                       "benchmarks", "out", "demo.png"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker, args.seq_len, args.device, args.min_time)))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_len = args.seq_len or (65536 if device == "cuda" else 8192)
    where = torch.cuda.get_device_name() if device == "cuda" else f"the CPU ({os.cpu_count()} cores)"
    print(f"dilate_compiler demo on {where}: {seq_len:,} tokens, {HEADS} heads of {HEAD_DIM}, causal, "
          f"{'bfloat16' if device == 'cuda' else 'float32'}")
    print(f"dilated attention: segments {SEGMENTS}, dilation rates {RATES} (LongNet's pattern)\n")
    rows = []
    for i, (method, label, base) in enumerate(METHODS, 1):
        print(f"[{i}/{len(METHODS)}] {label} ...", flush=True)
        res = subprocess.run([sys.executable, __file__, "--worker", method, "--seq-len", str(seq_len), "--device",
                              device, "--min-time", str(args.min_time)], stdout=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{label} failed (exit {res.returncode}); its error is printed above")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(label=label, base=base is None)
        print(f"    {row['ms']:.1f} ms per call (median of {row['calls']})", flush=True)
        rows.append(row)
    by_method = {r["method"]: r for r in rows}

    print("\nWhat torch.compile(GPT(), backend=\"dilated\") did to the model's attention:")
    print(by_method["gpt-dilated"]["report"])
    print(f"\n{'method':<50}{'ms per call':>12}{'fastest-slowest':>18}{'peak extra MiB':>16}   compared with dense")
    for (method, label, base), r in zip(METHODS, rows):
        versus = _compare(r["ms"], by_method[base]["ms"]) if base else "(dense)"
        spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        print(f"{label:<50}{r['ms']:>12.1f}{spread:>18}{r['peak_mib']:>16.1f}   {versus}")
    print(f"\nAt {seq_len:,} tokens:")
    for method, label, base in METHODS:
        if base:
            print(f"  {label}: {_compare(by_method[method]['ms'], by_method[base]['ms'])} than "
                  f"{dict((m, lbl) for m, lbl, _ in METHODS)[base]}")
    print("Dilated attention's advantage grows with the sequence length (its cost is linear in N, dense "
          "attention's quadratic); on a CPU at short lengths the compiled model may be slower.")
    _plot(rows, args.plot, f"{seq_len:,} tokens on {where}")


if __name__ == "__main__":
    main()
