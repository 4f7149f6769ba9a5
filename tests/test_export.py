"""dc.export / dc.aot_compile on the CPU: save/load round trip, AOTInductor package in a fresh process,
GQA + padding mask, dynamic sequence length, an unsupported site."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import dilate_compiler as dc

STRATEGY = dc.Dilated((16, 32), (1, 2))
OP = torch.ops.dilate_compiler.dilated_attention_forward.default


class GQAPadded(torch.nn.Module):
    """GQA (4 query heads, 2 kv heads) with a key-padding mask, through SDPA."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

    def forward(self, x, pad):
        B, N, E = x.shape
        q = self.q(x).view(B, N, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :], enable_gqa=True)
        return a.transpose(1, 2).reshape(B, N, E)


class Causal(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(dim, 3 * dim), heads

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, E)


def _inputs(n=40):
    torch.manual_seed(0)
    x = torch.randn(2, n, 32)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[0, n - 10:] = False
    return x, pad


def test_export_holds_the_op_and_round_trips(tmp_path):
    model, (x, pad) = GQAPadded(), _inputs()
    ep = dc.export(model, (x, pad), STRATEGY)
    assert len(ep.dilate_report.rewritten) == 1 and ep.dilate_report.rewritten[0].gqa_ratio == 2
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert OP in targets and torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert all("val" in n.meta for n in ep.graph.nodes if n.op != "output")
    expected = dc.rewrite(model, (x, pad), STRATEGY).module(x, pad)
    torch.testing.assert_close(ep.module()(x, pad), expected, atol=0, rtol=0)
    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    torch.testing.assert_close(loaded.module()(x, pad), expected, atol=0, rtol=0)


def test_exported_output_can_be_the_attention_itself():
    class Bare(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    ep = dc.export(Bare(), (q, k, v), STRATEGY)
    torch.testing.assert_close(ep.module()(q, k, v), dc.ops.dilated_attention(q, k, v, (16, 32), (1, 2)))


def test_unsupported_site_is_skipped_and_export_still_works():
    class Cross(torch.nn.Module):
        def forward(self, q, kv):
            return F.scaled_dot_product_attention(q, kv, kv)

    q, kv = torch.randn(1, 2, 24, 8), torch.randn(1, 2, 40, 8)
    ep = dc.export(Cross(), (q, kv), STRATEGY)
    assert not ep.dilate_report.rewritten and "cross-attention" in ep.dilate_report.skipped[0].reason
    torch.testing.assert_close(ep.module()(q, kv), F.scaled_dot_product_attention(q, kv, kv))
    with pytest.raises(dc.AttentionSkipped):
        dc.export(Cross(), (q, kv), STRATEGY, strict=True)


def test_block_sparse_site_with_a_dynamic_length_is_skipped_and_the_program_runs_at_any_length():
    """A layout is built for one length: a symbolic length is never specialised to the example's."""
    model = Causal()
    strategy = dc.BlockSparse(dc.patterns.sliding_window(16), block_size=16)
    ep = dc.export(model, (torch.randn(2, 64, 32),), strategy, dynamic_shapes={"x": {1: Dim("N", min=2, max=4096)}})
    (site,) = ep.dilate_report.skipped
    assert site.reason.startswith("block-sparse layouts are built at compile time for a static sequence length")
    for n in (64, 96):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(ep.module()(x), model(x))


def test_where_with_a_dynamic_length_does_not_specialise_it():
    model = Causal()
    ep = dc.export(model, (torch.randn(2, 40, 32),), STRATEGY, dynamic_shapes={"x": {1: Dim("N", min=2, max=4096)}},
                   where=16)
    assert len(ep.dilate_report.rewritten) == 1
    x = torch.randn(2, 77, 32)
    torch.testing.assert_close(ep.module()(x), dc.rewrite(model, (x,), STRATEGY).module(x))


def _run_package_in_fresh_process(package, inputs, expected, tmp_path):
    io = tmp_path / "io.pt"
    torch.save((inputs, expected), io)
    code = ("import torch, dilate_compiler\n"
            f"f = torch._inductor.aoti_load_package({str(package)!r})\n"
            f"inputs, expected = torch.load({str(io)!r})\n"
            "for args, ref in zip(inputs, expected):\n"
            "    torch.testing.assert_close(f(*args), ref, atol=1e-5, rtol=1e-5)\n"
            "print('ok', len(inputs))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == f"ok {len(inputs)}", res.stderr[-3000:]


@pytest.mark.slow
def test_aot_compile_gqa_padding_loads_in_fresh_process(tmp_path):
    model, (x, pad) = GQAPadded(), _inputs()
    ep = dc.export(model, (x, pad), STRATEGY)
    package = dc.aot_compile(ep, str(tmp_path / "gqa.pt2"))
    _run_package_in_fresh_process(package, [(x, pad)], [ep.module()(x, pad)], tmp_path)


@pytest.mark.slow
def test_aot_compile_dynamic_sequence_length(tmp_path):
    model = Causal()
    ep = dc.export(model, (torch.randn(2, 40, 32),), STRATEGY, dynamic_shapes={"x": {1: Dim("N", min=2, max=4096)}})
    package = dc.aot_compile(ep, str(tmp_path / "dyn.pt2"))
    inputs = [(torch.randn(2, n, 32),) for n in (40, 77, 300)]
    expected = [dc.rewrite(model, args, STRATEGY).module(*args) for args in inputs]
    _run_package_in_fresh_process(package, inputs, expected, tmp_path)


def test_aot_compile_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="ExportedProgram"):
        dc.aot_compile(Causal(), str(tmp_path / "x.pt2"))
    ep = dc.export(Causal(), (torch.randn(1, 8, 32),), STRATEGY)
    with pytest.raises(ValueError, match="must end with '.pt2'"):
        dc.aot_compile(ep, str(tmp_path / "x.so"))


def test_package_links_the_shared_cxx_runtime_when_the_compiler_cannot_find_it(tmp_path):
    # A compiler that finds no shared libstdc++.so would link its static archive into the package (two C++
    # runtimes in one process: the loader segfaults); aot_compile then points it at the loaded runtime.
    from dilate_compiler.export import cxx_runtime_link_dir, shared_cxx_runtime

    assert cxx_runtime_link_dir("g++") is None            # this machine's compiler finds it itself
    blind = tmp_path / "blind-cxx"
    blind.write_text("#!/bin/sh\necho libstdc++.so\n")    # what g++ -print-file-name prints when it finds none
    blind.chmod(0o755)
    link_dir = cxx_runtime_link_dir(str(blind))
    target = os.path.realpath(os.path.join(link_dir, "libstdc++.so"))
    with open("/proc/self/maps") as f:
        assert target in {os.path.realpath(line.split()[-1]) for line in f if "libstdc++" in line}
    shutil.rmtree(link_dir)
    from torch._inductor import config
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the entry, which hides cpp.cxx from every
    # later compilation in this process
    before = config.cpp.cxx
    with config.patch({"cpp.cxx": (None, str(blind))}):
        with shared_cxx_runtime():
            wrapper = config.cpp.cxx[1]
            assert os.path.basename(wrapper) == "blind-cxx"
            link_dir = os.path.dirname(wrapper)
            assert os.path.realpath(os.path.join(link_dir, "libstdc++.so")) == target
            res = subprocess.run([wrapper, "-print-file-name=libstdc++.so"], capture_output=True, text=True)
            assert res.stdout.strip() == "libstdc++.so"          # the wrapper runs the compiler it stands for
            assert f'-L"{link_dir}"' in open(wrapper).read()
        assert config.cpp.cxx == (None, str(blind)) and not os.path.exists(link_dir)
    assert config.cpp.cxx == before                       # still readable for later compilations
