"""Build each Triton kernel the way Inductor builds a user-defined kernel, without a GPU: from the source Inductor
emits for it (the kernel and the transitive closure of its helpers, ``user_defined_triton_kernel_transitive_closure_
source_code``), with its float arguments typed fp64, as Inductor types Python floats, compiled for sm_90. Run by
``test_kernels_build_from_inductor_source`` in a process without ``TRITON_INTERPRET`` (exit status 1 on a failure).
"""

import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code  # noqa: E402

from kernel_spills import CONFIG_A, KERNELS, _jit_fn, compile_for, dilated_values, window_values  # noqa: E402

from dilate_compiler.lowering.dilated import triton as dt  # noqa: E402

# (family, kernel kind, causal, tile, key padding, first query position): config A's walks (causal: seeded by the
# walk-0 kernel), the backward's, and the block-sparse window's forward and backward, each without and with key
# padding; the block-sparse kernels also for a decoding step (q holds the last position only)
CASES = [case + (key_mask, None) for key_mask in (False, True) for case in (
    ("dilated", "fwd", True, (128, 64)), ("dilated", "fwd", False, (128, 64)), ("dilated", "walk0", True, (128, 64)),
    ("dilated", "dq", True, (64, 64)), ("dilated", "dkdv", True, (64, 64)), ("block-sparse", "fwd", True, (128, 64)),
    ("block-sparse", "dq", True, (64, 64)), ("block-sparse", "dkdv", True, (64, 64)))]
CASES += [("block-sparse", kind, True, (64, 64), True, 262143) for kind in ("fwd", "dq", "dkdv")]
# split-K: the dilated forward of a decoding step (q holds the last position) in 4 splits, and their combine
SPLIT_CASES = [("dilated", "fwd", causal, (64, 64), key_mask, 262143) for causal in (True, False)
               for key_mask in (False, True)]


def split_values(values: dict, q_lo: int) -> dict:
    """A forward's arguments for a decoding step split in 4: fp32 partials, the last position's row only."""
    return dict(values, Out="*fp32", Lse="*fp32", Q_LO=("i32", q_lo), N_Q=("i32", 1), SPLITS=4)


def combine_values(head_dim: int) -> dict:
    return dict(Part="*fp32", PartLse="*fp32", Out="*bf16", Lse="*fp32", N_Q=("i32", 3), stride_ob=("i32", 16 * 3 * 64),
                stride_oh=("i32", 3 * 64), stride_on=("i32", 64), H=("i32", 16), HEAD_DIM=head_dim, SPLITS=4,
                BLOCK_R=16)


def inductor_kernel(kernel, tmp: str):
    """The kernel as Inductor re-emits it: its source and its helpers', loaded from a fresh module."""
    fn = _jit_fn(kernel)
    path = os.path.join(tmp, f"emitted_{fn.__name__}.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n@triton.jit\n"
                + user_defined_triton_kernel_transitive_closure_source_code(fn))
    spec = importlib.util.spec_from_file_location(f"emitted_{fn.__name__}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, fn.__name__)


def main() -> int:
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for split, (family, kind, causal, (bm, bn), key_mask, q_lo) in [(False, c) for c in CASES] + [
                (True, c) for c in SPLIT_CASES]:
            kernel = inductor_kernel(KERNELS[family][kind], tmp)
            if family == "dilated":
                values = dict(dilated_values(262144, CONFIG_A, causal, kind, bm, bn, key_mask=key_mask,
                                             q_lo=q_lo or 0), SPLITS=1)
                if split:
                    values = split_values(values, q_lo)
            else:
                values = dict(window_values(262144, key_mask=key_mask, q_lo=q_lo), BLOCK_M=bm, BLOCK_N=bn)
            values = {name: ("fp64" if name in ("sm_scale", "out_scale") else v) for name, v in values.items()
                      if name in kernel.arg_names}
            try:
                compile_for(kernel, values, 4, 3, 90)
                print(f"{family} {kind} causal={causal} key_mask={key_mask} q_lo={q_lo}: built")
            except Exception as e:  # noqa: BLE001 -- report every kernel, then fail
                failed += 1
                print(f"{family} {kind} causal={causal} key_mask={key_mask} q_lo={q_lo}: FAILED {type(e).__name__}: "
                      f"{e}")
        kernel = inductor_kernel(dt._dilated_attn_fwd_combine_kernel, tmp)
        try:
            compile_for(kernel, combine_values(64), 4, 1, 90)
            print("dilated split-K combine: built")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"dilated split-K combine: FAILED {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
