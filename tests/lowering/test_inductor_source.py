"""Every Triton attention kernel builds from the source Inductor re-emits for it (both op families)."""

import pytest


@pytest.mark.slow
def test_kernels_build_from_inductor_source():
    """Every kernel builds as Inductor builds a user-defined kernel: from the source it re-emits (the kernel and
    its helpers) with float arguments typed fp64 (``inductor_source_compile.py``, compiled for sm_90 without a
    GPU). The walks once failed this way: scores scaled by an fp64 scalar made ``tl.dot`` accumulate into fp64."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("inductor_source_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
