"""Decoding: one decode step of attention over a long KV cache, and generation with a small Llama, dense against a
strategy.

    python benchmarks/bench_decode.py --out DIR [--cached 32768,131072,524288] [--batch 8] [--heads 32]
        [--kv-heads 8] [--head-dim 128] [--generate-prompt 131072] [--generate-tokens 256] [--device cuda]

Attention step (bf16 on CUDA, float32 with ``--device cpu``): a query of one token per sequence over ``N`` cached
keys, ``[B, H, 1, D]`` against ``[B, Hkv, N, D]``:
- ``dense``: ``F.scaled_dot_product_attention`` (PyTorch's choice of backend for one query, with ``enable_gqa``);
- ``dilated``: ``dc.ops.dilated_attention`` with config A's pattern (segments 2048..16384, rates 1..8), causal,
  the query the last of the ``N`` positions;
- ``window``: ``dc.ops.block_sparse_attention`` with ``sliding_window(4096)``, causal, block size 128.
Reported: milliseconds of one eager call (Python and kernel launches included) and of replaying the call captured in
a CUDA graph (the GPU's time alone: how a decoding loop under CUDA graphs runs it), the keys the newest position
links, and the speed-up over dense for each; the window's layout is built once per length and its build timed
apart.

Generation: a 4-layer Llama from a configuration (hidden 1024, 16 heads, 8 kv heads) generates
``--generate-tokens`` tokens after a ``--generate-prompt``-token prompt, greedy: ``attn_implementation="sdpa"``
with transformers' ``DynamicCache`` against ``dc.hf.register("dilated", strategy=config A)`` with
``dc.hf.EvictingCache``. Reported: tokens per second of the decode phase, the prefill time, and the cache's memory
after generation (keys and values held, all layers) against the dense cache's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import dilate_compiler as dc  # noqa: E402

CONFIG_A = dc.Dilated((2048, 4096, 8192, 16384), (1, 2, 4, 8))
WINDOW = dc.patterns.sliding_window(4096)


def linked_keys(strategy, n: int) -> int:
    """The most keys the newest of ``n`` positions links in one head under a causal ``Dilated`` pattern (heads
    differ by their offsets ``h % r``)."""
    p = n - 1
    most = 0
    for offset in range(max(strategy.dilation_rates)):
        keys = set()
        for w, r in zip(strategy.segment_lengths, strategy.dilation_rates):
            if p % r == offset % r:
                keys.update(range((p // w) * w + p % r, p + 1, r))
        most = max(most, len(keys))
    return most


def _linked(name: str, n: int) -> int:
    return n if name == "dense" else linked_keys(CONFIG_A, n) if name == "dilated" else min(n, 4096)


def step_rows(args, device, dtype, res):
    rows = []
    for n in args.cached:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(args.batch, args.heads, 1, args.head_dim, device=device, dtype=dtype, generator=g)
        k = torch.randn(args.batch, args.kv_heads, n, args.head_dim, device=device, dtype=dtype, generator=g)
        v = torch.randn_like(k)
        # The window's layout is built once for the n cached positions (timed apart): a call that builds it from
        # the pattern copies the pattern's tables to the device, which a CUDA graph can't hold.
        build = lambda: WINDOW.layout(n, 128, is_causal=True, device=device)   # noqa: E731
        layout = build()
        layout_ms = harness.measure_ms(build, device)
        methods = {
            "dense": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "dilated": lambda: dc.ops.dilated_attention(q, k, v, CONFIG_A.segment_lengths, CONFIG_A.dilation_rates,
                                                        is_causal=True),
            "window": lambda: dc.ops.block_sparse_attention(q, k, v, layout, block_size=128, is_causal=True),
        }
        times = {}
        for name, fn in methods.items():
            with torch.no_grad():
                call = harness.measure_ms(fn, device)
                graph, why = harness.graph_ms(fn, device)
            times[name] = (call, graph)
            res.row({"part": "step", "cached": n, "method": name, "ms": call, "graph_ms": graph,
                     "graph_failed": why, "linked_keys": _linked(name, n),
                     "layout_ms": layout_ms if name == "window" else None})
        for name, (call, graph) in times.items():
            dense_call, dense_graph = times["dense"]
            rows.append([n, name, call, graph, _linked(name, n), dense_call / call, dense_graph / graph,
                         layout_ms if name == "window" else "-"])
        del q, k, v, layout
    return rows


def _llama(attn: str, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1 << 21)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(device=device, dtype=dtype).eval()


def _cache_mib(cache) -> float:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**20


def generate_rows(args, device, dtype, res):
    from transformers import DynamicCache

    dc.hf.register("dilated", strategy=CONFIG_A)
    prompt = torch.randint(0, 32000, (1, args.generate_prompt), device=device)
    rows = []
    for name, attn in (("dense", "sdpa"), ("dilated", "dilated")):
        model = _llama(attn, device, dtype)
        cache = DynamicCache() if name == "dense" else dc.hf.EvictingCache(CONFIG_A)
        with torch.no_grad():
            harness.sync(device)
            t0 = time.perf_counter()
            out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            harness.sync(device)
            prefill = time.perf_counter() - t0
            token = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.generate_tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            harness.sync(device)
            decode = time.perf_counter() - t0
        row = {"part": "generate", "method": name, "prompt": args.generate_prompt, "tokens": args.generate_tokens,
               "prefill_s": prefill, "tokens_per_s": args.generate_tokens / decode, "cache_mib": _cache_mib(cache)}
        res.row(row)
        rows.append(row)
        del model, cache, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense_mib = rows[0]["cache_mib"]
    return [[r["method"], r["prefill_s"], r["tokens_per_s"], r["cache_mib"], r["cache_mib"] / dense_mib]
            for r in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cached", default="32768,131072,524288")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--generate-prompt", type=int, default=131072)
    ap.add_argument("--generate-tokens", type=int, default=256)
    ap.add_argument("--device", default=harness.default_device())
    args = ap.parse_args(argv)
    args.cached = [int(x) for x in args.cached.split(",") if x]
    device = harness.check_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = harness.Results("bench_decode", args.out, harness.environment(device))
    res.add_table(f"One decode step of attention (B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, "
                  f"D={args.head_dim}, {str(dtype).replace('torch.', '')})",
                  ["cached keys", "method", "ms / call", "ms / graph replay", "keys linked", "× dense (call)",
                   "× dense (graph)", "layout build ms"], step_rows(args, device, dtype, res),
                  "dilated: config A (segments 2048..16384, rates 1..8), causal; window: sliding_window(4096), "
                  "block size 128, its layout built once per length (timed apart). The query is the newest "
                  "position. ms / call: one eager call, Python and launches included; ms / graph replay: the "
                  "call captured in a CUDA graph, the GPU's time alone (NaN: not capturable, reason in the JSON).")
    if args.generate_tokens > 0:
        import transformers  # noqa: F401  (recorded in the environment)

        res.env = harness.environment(device)
        res.add_table(f"Generation: {args.generate_tokens} tokens after a {args.generate_prompt}-token prompt "
                      f"(4-layer Llama, hidden 1024, greedy, B=1)",
                      ["method", "prefill s", "tokens/s", "cache MiB", "× dense cache"],
                      generate_rows(args, device, dtype, res),
                      "dense: sdpa with DynamicCache; dilated: dc.hf.register with config A and dc.hf.EvictingCache.")
    res.write()


if __name__ == "__main__":
    main()
