"""AOTInductor on CUDA (marker gpu): the package embeds the dilated Triton kernels and runs in a fresh process."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch

import dilate_compiler as dc
from tests.test_export import Causal

pytestmark = pytest.mark.gpu


def test_plain_aoti_package_loads_on_this_gpu(tmp_path):
    """Baseline for the package-load crash once seen on this GPU kind: sin(x)."""
    class Sin(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x)

    x = torch.randn(64, device="cuda")
    package = torch._inductor.aoti_compile_and_package(torch.export.export(Sin(), (x,)),
                                                       package_path=str(tmp_path / "sin.pt2"))
    code = (f"import torch\nf = torch._inductor.aoti_load_package({package!r})\nx = torch.randn(64, device='cuda')\n"
            "torch.testing.assert_close(f(x), torch.sin(x))\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-3000:])


def test_cuda_package_embeds_kernels_and_runs_in_fresh_process(tmp_path):
    model = Causal().cuda().to(torch.bfloat16)
    x = torch.randn(2, 1000, 32, device="cuda", dtype=torch.bfloat16)
    strategy = dc.Dilated((128, 256), (1, 2))
    ep = dc.export(model, (x,), strategy)
    package = dc.aot_compile(ep, str(tmp_path / "cuda.pt2"))
    with zipfile.ZipFile(package) as z:
        cubins = " ".join(z.read(n).decode("latin-1") for n in z.namelist() if n.endswith(".cubin"))
    assert "_dilated_attn_fwd_kernel" in cubins, "the dilated Triton kernel is not among the package's cubins"
    expected = ep.module()(x)
    io = tmp_path / "io.pt"
    torch.save((x.cpu(), expected.cpu()), io)
    code = ("import torch, dilate_compiler\n"
            f"f = torch._inductor.aoti_load_package({package!r})\n"
            f"x, ref = torch.load({str(io)!r})\n"
            "out = f(x.cuda()).cpu()\n"
            "torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-3000:])
