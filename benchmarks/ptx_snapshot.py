"""PTX of the dilated and block-sparse kernels over a matrix of specialisations, compiled without a GPU, for
checking that a source change leaves the kernels the GPU runs unchanged.

    python benchmarks/ptx_snapshot.py DIR [--arch 90]      # before the change, then into another DIR after it
    diff -r DIR_BEFORE DIR_AFTER                           # no output: the same machine code is generated

Line-number (``.loc``, ``.file``) directives, comments and labels are dropped, so moving code around doesn't
count as a change. The numbers are for the installed Triton version: compare two snapshots from the same one.
"""

import argparse
import os
import re

from kernel_spills import CONFIG_A, KERNELS, _jit_fn, compile_for, dilated_values, window_values

from dilate_compiler.lowering.block_sparse import triton as bt

N, H, D = 262144, 16, 64
PATTERNS = {"A": CONFIG_A, "flat": ((2048, 3000), (2, 3), "lse"),
            "groups": ((2048, 4096, 8192), (1, 2, 4), "head_groups"), "eight": ((64,) * 8, (1,) * 8, "lse")}
# pattern, causal, dropout constexpr, forward tile, backward tile, first query position (Q_LO)
DILATED = [("A", False, 0, (128, 64, 4, 3), (64, 64, 4, 2), 0), ("A", True, 0, (128, 64, 4, 3), (128, 32, 4, 5), 0),
           ("A", True, 1, (64, 64, 4, 3), (64, 64, 4, 2), 0), ("A", False, 0, (64, 64, 4, 3), (32, 64, 4, 3), 0),
           ("flat", True, 0, (128, 64, 4, 3), (64, 64, 4, 2), 0),
           ("groups", False, 2, (64, 64, 4, 3), (64, 64, 4, 2), 0),
           ("eight", True, 0, (64, 64, 4, 3), (64, 64, 4, 2), 0), ("A", True, 0, (64, 64, 4, 3), (64, 64, 4, 2), 100)]


def _text(ptx: str) -> str:
    keep = [line for line in ptx.splitlines()
            if not re.match(r"\s*\.(loc|file)\b", line) and "$L__" not in line and not line.strip().startswith("//")]
    text = "\n".join(keep)
    return text[:text.find(".section\t.debug")] if ".section\t.debug" in text else text


def dilated_cases():
    for name, causal, dropout, fwd_tile, bwd_tile, q_lo in DILATED:
        for kind, kernel in KERNELS["dilated"].items():
            bm, bn, w, s = fwd_tile if kind in ("fwd", "walk0") else bwd_tile
            if kind == "walk0" and not dilated_values(N, PATTERNS[name], causal, "fwd", bm, bn, q_lo=q_lo)["SEEDED"]:
                continue
            values = dilated_values(N, PATTERNS[name], causal, kind, bm, bn, dropout=dropout, gqa=2, q_lo=q_lo,
                                    drop_thr=123, h=H, d=D)
            tag = f"dilated_{name}_{'causal' if causal else 'full'}_drop{dropout}_{kind}_{bm}x{bn}_qlo{q_lo}"
            yield tag, kernel, values, w, s


BLOCK_SPARSE_Q_LO = (None, N - 1)   # self-attention; a decoding step (the last query of N)


def block_sparse_cases():
    for q_lo in BLOCK_SPARSE_Q_LO:
        for kind, kernel in KERNELS["block-sparse"].items():
            for cfg in bt.tile_space("fwd" if kind == "fwd" else "bwd", 128)[:3]:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                tag = f"block_sparse_window_{kind}_{bm}x{bn}" + ("" if q_lo is None else f"_qlo{q_lo}")
                yield (tag, kernel, dict(window_values(N, q_lo=q_lo), BLOCK_M=bm, BLOCK_N=bn), cfg.num_warps,
                       cfg.num_stages)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", type=int, default=90)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for tag, kernel, values, warps, stages in (*dilated_cases(), *block_sparse_cases()):
        names = _jit_fn(kernel).arg_names
        ck, _ = compile_for(kernel, {k: v for k, v in values.items() if k in names}, warps, stages, a.arch)
        with open(os.path.join(a.out, tag + ".ptx"), "w") as f:
            f.write(_text(ck.asm["ptx"]))
        print(tag, flush=True)


if __name__ == "__main__":
    main()
