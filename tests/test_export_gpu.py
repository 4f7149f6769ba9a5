"""AOTInductor on CUDA (marker gpu): the package embeds the dilated Triton kernels (on Hopper, calls the
warp-specialised forward where eager mode runs it) and runs in a fresh process."""

import subprocess
import sys
import zipfile

import pytest
import torch

import dilate_compiler as dc
from dilate_compiler.export import shared_cxx_runtime
from tests.test_export import Causal

pytestmark = pytest.mark.gpu


def test_plain_aoti_package_loads_on_this_gpu(tmp_path):
    """Baseline: sin(x), built as dc.aot_compile builds (see dilate_compiler.export.shared_cxx_runtime: the
    benchmark H100's compiler links a static libstdc++ into packages otherwise, and loading them segfaults)."""
    class Sin(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x)

    x = torch.randn(64, device="cuda")
    with shared_cxx_runtime():   # as dc.aot_compile builds
        package = torch._inductor.aoti_compile_and_package(torch.export.export(Sin(), (x,)),
                                                           package_path=str(tmp_path / "sin.pt2"))
    code = (f"import torch\nf = torch._inductor.aoti_load_package({package!r})\nx = torch.randn(64, device='cuda')\n"
            "torch.testing.assert_close(f(x), torch.sin(x))\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-3000:])


def _cuda_package(tmp_path):
    model = Causal(dim=256, heads=4).cuda().to(torch.bfloat16)  # head dim 64: the kernels apply
    x = torch.randn(2, 1000, 256, device="cuda", dtype=torch.bfloat16)
    ep = dc.export(model, (x,), dc.Dilated((128, 256), (1, 2)))
    return ep, x, dc.aot_compile(ep, str(tmp_path / "cuda.pt2"))


def test_cuda_package_embeds_the_kernels(tmp_path):
    _, _, package = _cuda_package(tmp_path)
    with zipfile.ZipFile(package) as z:
        cubins = " ".join(z.read(n).decode("latin-1") for n in z.namelist() if n.endswith(".cubin"))
        wrapper = " ".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert "_dilated_attn_fwd_kernel" in cubins, "the dilated Triton kernel is not among the package's cubins"
    assert "dilated_attention_forward_exact" not in wrapper, "the package calls the exact path instead"


def test_cuda_package_runs_in_fresh_process(tmp_path):
    ep, x, package = _cuda_package(tmp_path)
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


class _Attend(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="needs compute capability 9.0")
def test_hopper_package_calls_the_warp_specialised_forward_in_a_fresh_process(tmp_path):
    """A call eager mode sends to the warp-specialised forward (non-causal nested chain, D=64, contiguous q, k, v):
    the package calls it through ``dilated_attention_forward_hopper`` and runs in a fresh process."""
    q, k, v = (torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ep = dc.export(_Attend(), (q, k, v), dc.Dilated((1024, 2048), (1, 2)))
    package = dc.aot_compile(ep, str(tmp_path / "hopper.pt2"))
    with zipfile.ZipFile(package) as z:
        wrapper = " ".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert "dilated_attention_forward_hopper" in wrapper
    expected = dc.ops.dilated_attention(q, k, v, (1024, 2048), (1, 2))
    io = tmp_path / "io.pt"
    torch.save(((q.cpu(), k.cpu(), v.cpu()), expected.cpu()), io)
    code = ("import torch, dilate_compiler\n"
            f"f = torch._inductor.aoti_load_package({package!r})\n"
            f"(q, k, v), ref = torch.load({str(io)!r})\n"
            "out = f(q.cuda(), k.cuda(), v.cuda()).cpu()\n"
            "torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-3000:])
