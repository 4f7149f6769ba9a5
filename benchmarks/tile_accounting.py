"""How many (query, key) pairs the dilated forward computes with the walks, part by part, against the distinct
pairs it must compute (no GPU: a model of the forward's loops, mirroring ``_walk_keys`` and ``_fwd_run`` in
``lowering/dilated/triton.py``; every tile counts BLOCK_M x BLOCK_N pairs).

    python benchmarks/tile_accounting.py [--n 262144] [--heads 16] [--block-m 128] [--block-n 64]

Config A's pattern (segments 2048..16384, rates 1..8). With --contiguous-walk0 it also prints what a causal
forward would compute if walk 0 (branch 0, rate 1) ran over contiguous query rows instead of one residue class
per program: each 128-row block against the keys of its segment up to its last row.
"""

import argparse
import math

from bench_dilated import distinct_pairs

SEGS, RATES = (2048, 4096, 8192, 16384), (1, 2, 4, 8)


def forward_pairs(n: int, heads: int, causal: bool, bm: int, bn: int) -> dict:
    """Computed pairs per part of the walks: ``walk0 full``, ``walk0 diagonal`` (causal, masked per pair),
    ``walkB before`` / ``walkB after`` (keys of branch B's segment before / after branch B-1's)."""
    L = math.lcm(*RATES)
    parts = {}

    def run(key, keys):
        if keys > 0:
            parts[key] = parts.get(key, 0) + math.ceil(keys / bn) * bm * bn

    rows_per_class = math.ceil(n / L)
    for h in range(heads):
        for c in range(L):
            for t in range(math.ceil(rows_per_class / bm)):
                i0, i1 = t * bm, min(rows_per_class, t * bm + bm)
                p_first, p_last = c + L * i0, c + L * (i1 - 1)
                for b, (w, r) in enumerate(zip(SEGS, RATES)):
                    if c % r != h % r:
                        continue
                    seg = p_first // w
                    j0 = seg * w + h % r
                    j_end = min(seg * w + w, n, p_last + 1 if causal else n)
                    n_keys = -(-max(j_end - j0, 0) // r)
                    if b == 0:
                        b_hi = min(n_keys, (p_first - j0) // r + 1) // bn * bn if causal else n_keys
                        run("walk0 full", b_hi)
                        run("walk0 diagonal", n_keys - b_hi)
                    else:
                        hole = p_first // SEGS[b - 1] * SEGS[b - 1]
                        run(f"walk{b} before", -(-(hole - j0) // r))
                        if not causal:
                            run(f"walk{b} after", n_keys - -(-(hole + SEGS[b - 1] - j0) // r))
    return parts


def contiguous_walk0_pairs(n: int, heads: int, bm: int, bn: int) -> int:
    """Causal walk 0 over contiguous rows: a block of bm rows against its segment's keys up to its last row."""
    total = 0
    for r0 in range(0, n, bm):
        seg_start = r0 // SEGS[0] * SEGS[0]
        total += math.ceil((min(r0 + bm, n) - seg_start) / bn) * bm * bn
    return heads * total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--contiguous-walk0", action="store_true")
    a = ap.parse_args()
    for causal in (False, True):
        parts = forward_pairs(a.n, a.heads, causal, a.block_m, a.block_n)
        total, distinct = sum(parts.values()), distinct_pairs(a.n, a.heads, SEGS, RATES, causal)
        print(f"causal={causal}: computed {total:.4e} pairs, distinct {distinct:.4e}, computed / distinct "
              f"{total / distinct:.3f}")
        for key, value in sorted(parts.items()):
            print(f"    {key:<16} {value / total:6.1%} of computed")
        if causal and a.contiguous_walk0:
            walk0 = parts.get("walk0 full", 0) + parts.get("walk0 diagonal", 0)
            other = total - walk0
            contiguous = contiguous_walk0_pairs(a.n, a.heads, a.block_m, a.block_n)
            print(f"    walk 0 over contiguous rows: {contiguous:.4e} pairs instead of {walk0:.4e}; computed / "
                  f"distinct {(other + contiguous) / distinct:.3f}, {1 - (other + contiguous) / total:.1%} fewer pairs")


if __name__ == "__main__":
    main()
