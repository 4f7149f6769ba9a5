"""Compile time of a 12-layer GPT-2-small-sized model: backend="dilated" vs backend="inductor".

    python experiments/compile_time.py [--seq-len 1024] [--device cpu|cuda]

Each backend is timed in a fresh process (cold caches: FX graph cache and Inductor caches disabled),
first call = compile + one forward; a second call's time is subtracted to leave the compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _worker(backend: str, seq_len: int, device: str) -> dict:
    import torch
    import transformers

    import dilate_compiler as dc

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=max(1024, seq_len),
                                  attn_implementation="sdpa", use_cache=False)
    model = transformers.GPT2Model(cfg).to(device).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), device=device)
    opts = {"options": {"strategy": dc.Dilated((256, 512, 1024), (1, 2, 4))}} if backend == "dilated" else {}
    compiled = torch.compile(model, backend=backend, **opts)
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(ids)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled(ids)
        second = time.perf_counter() - t0
    return {"backend": backend, "compile_s": first - second, "first_call_s": first, "run_s": second}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", default=None)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker, a.seq_len, a.device)))
        return
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0",
               TORCHINDUCTOR_CACHE_DIR=os.path.join("/tmp", f"dc_compile_time_{os.getpid()}"))
    rows = []
    for backend in ("inductor", "dilated"):
        out = subprocess.run([sys.executable, __file__, "--worker", backend, "--seq-len", str(a.seq_len),
                              "--device", a.device], capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"GPT-2 small (12 layers), N={a.seq_len}, device={a.device}")
    for r in rows:
        print(f"{r['backend']:<10} compile {r['compile_s']:7.1f} s   (first call {r['first_call_s']:.1f} s, "
              f"then {r['run_s'] * 1e3:.0f} ms)")
    print(f"ratio dilated / inductor: {rows[1]['compile_s'] / rows[0]['compile_s']:.2f}")


if __name__ == "__main__":
    main()
