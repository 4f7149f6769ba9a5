"""Export a model with its attention rewritten, save/load it, and compile it ahead of time to a .pt2 package
that runs without the model's Python code (only ``import dilate_compiler`` is needed, to register the ops).

    python examples/export_aot.py [--out DIR] [--seq-len N]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.export import Dim

import dilate_compiler as dc


class Block(torch.nn.Module):
    def __init__(self, dim=256, heads=8):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, E))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=tempfile.mkdtemp())
    ap.add_argument("--seq-len", type=int, default=2048)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).to(device, dtype).eval()
    x = torch.randn(1, a.seq_len, 256, device=device, dtype=dtype)
    strategy = dc.Dilated((512, 1024, 2048), (1, 2, 4))

    ep = dc.export(model, (x,), strategy, dynamic_shapes={"input": {1: Dim("N", min=2, max=1 << 20)}})
    print(ep.dilate_report)
    program = os.path.join(a.out, "model_exported.pt2")
    torch.export.save(ep, program)
    package = dc.aot_compile(ep, os.path.join(a.out, "model_aoti.pt2"))
    print(f"saved ExportedProgram: {program}\nAOTInductor package: {package}")

    x2 = torch.randn(1, a.seq_len // 2 + 3, 256, device=device, dtype=dtype)
    torch.save((x2.cpu(), ep.module()(x2).cpu()), os.path.join(a.out, "io.pt"))
    code = ("import torch, dilate_compiler\n"
            f"f = torch._inductor.aoti_load_package({package!r})\n"
            f"x, ref = torch.load({os.path.join(a.out, 'io.pt')!r})\n"
            f"out = f(x.to({device!r})).cpu()\n"
            "print('fresh process: max |package - exported| =', (out.float() - ref.float()).abs().max().item())\n")
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
