"""torch.compile(backend="dilated"): registration, options, inference, training, graph breaks, dynamic N."""

import pytest
import torch
import torch.nn.functional as F

import dilate_compiler as dc
from dilate_compiler import backend


class Block(torch.nn.Module):
    def __init__(self, E=32, H=4, graph_break=False):
        super().__init__()
        self.qkv, self.o, self.H, self.graph_break = torch.nn.Linear(E, 3 * E), torch.nn.Linear(E, E), H, graph_break

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
        if self.graph_break:
            torch._dynamo.graph_break()
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(B, N, E))


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    backend.REPORTS.clear()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("dilated") is backend.dilated_backend


def test_inference_and_training_fullgraph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block())
    x = torch.randn(2, 40, 32)
    compiled = torch.compile(model, backend="dilated", options={"strategy": dc.Dilated((64,), (1,))}, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    report = backend.last_report()
    assert len(report.rewritten) == 2
    assert [s.location for s in report.rewritten] == ["0", "1"]
    out.sum().backward()
    g = model[0].qkv.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(g, model[0].qkv.weight.grad, atol=1e-5, rtol=1e-5)


def test_pattern_strategy_matches_the_op():
    torch.manual_seed(0)
    model = Block()
    strategy = dc.Dilated((8, 16), (1, 2))
    x = torch.randn(2, 40, 32)
    compiled = torch.compile(model, backend="dilated", options={"strategy": strategy})
    B, N, E = x.shape
    q, k, v = model.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    a = dc.ops.dilated_attention(q, k, v, (8, 16), (1, 2), is_causal=True)
    expected = x + model.o(a.transpose(1, 2).reshape(B, N, E))
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_graph_breaks_each_subgraph_rewritten():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(graph_break=True), Block(graph_break=True))
    x = torch.randn(2, 24, 32)
    compiled = torch.compile(model, backend="dilated", options={"strategy": dc.Dilated((64,), (1,))})
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert sum(len(r.rewritten) for r in backend.REPORTS) == 2
    assert len(backend.REPORTS) >= 2


@pytest.mark.slow
def test_dynamic_sequence_length_is_symbolic():
    torch.manual_seed(0)
    model = Block()
    compiled = torch.compile(model, backend="dilated", options={"strategy": dc.Dilated((128,), (1,))}, dynamic=True)
    for n in (24, 40, 56):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(backend.REPORTS) == 1  # one symbolic graph served every length


def test_options_are_checked():
    model = Block()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(model, backend="dilated", options={"stratgy": dc.Dilated((8,), (1,))})(torch.randn(1, 8, 32))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strategy must be"):
        torch.compile(model, backend="dilated", options={"strategy": "longnet"})(torch.randn(1, 8, 32))


def test_strict_option_raises_on_skip():
    class Cross(torch.nn.Module):
        def forward(self, q, kv):
            return F.scaled_dot_product_attention(q, kv, kv)

    compiled = torch.compile(Cross(), backend="dilated", options={"strategy": dc.Dilated((8,), (1,)), "strict": True})
    with pytest.raises(Exception, match="cross-attention"):
        compiled(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 12, 4))


def test_capture_reports_gathers_every_graph_of_a_call_with_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(graph_break=True), Block(graph_break=True))
    compiled = torch.compile(model, backend="dilated", options={"strategy": dc.Dilated((64,), (1,))})
    x = torch.randn(2, 40, 32)
    with backend.capture_reports() as report:
        out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert len(report.rewritten) == 2, str(report)
    assert len(backend.last_report().rewritten) == 1   # the last graph alone
    with backend.capture_reports() as again:
        compiled(x)                                   # nothing compiles: nothing captured
    assert not again.sites


def test_each_compiled_graph_logs_how_long_inductor_took(caplog):
    import logging

    compiled = torch.compile(Block(), backend="dilated", options={"strategy": dc.Dilated((64,), (1,))})
    with caplog.at_level(logging.INFO, logger="dilate_compiler"):
        compiled(torch.randn(1, 40, 32))
    timed = [r.getMessage() for r in caplog.records if "Inductor compiled the graph" in r.getMessage()]
    assert len(timed) == 1 and "(attention sites rewritten: 1)" in timed[0]
