"""``torch.compile(model, backend="dilated", options={"strategy": ..., "where": ..., "strict": ...})``.

An installed package registers the name through the ``torch_dynamo_backends`` entry point (pyproject.toml);
where that entry point is absent (the package on ``PYTHONPATH``), ``import dilate_compiler`` registers it
(``register``). Each Dynamo graph (one per graph break) is re-traced to pre-dispatch ATen with ``make_fx`` under
Dynamo's fake mode, run through the pass pipeline, and handed to Inductor's ``compile_fx`` (which adds autograd,
so training works).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Optional

import torch
import torch.fx as fx

from .api import check_strategy
from .passes.pipeline import attention_visible, run_pipeline
from .passes.site import Report
from .passes.sources import INPUT_NAME, mark_state

log = logging.getLogger(__name__)
OPTIONS = ("strategy", "where", "strict", "inductor")
NAME = "dilated"
ENTRY_POINT_GROUP = "torch_dynamo_backends"

# Reports of the graphs compiled in this process, newest last (read them after a compile).
REPORTS: list = []
# The open ``capture_reports`` blocks: each gets the sites of every graph compiled while it is open.
_CAPTURES: list = []


def _check_options(options: Optional[dict]) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backend 'dilated'; accepted: {list(OPTIONS)}")
    options["strategy"] = check_strategy(options.get("strategy"))
    return options


def to_pre_dispatch(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Re-trace a Dynamo graph to pre-dispatch ATen with ``make_fx``, under Dynamo's own fake mode (so sizes
    stay the symbols Dynamo guards on; a dynamic sequence length stays symbolic)."""
    from torch._guards import TracingContext
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(*args):  # through an Interpreter, so each new node can copy the meta of the node it came from
        return fx.Interpreter(gm).run(*args)

    ctx = TracingContext.try_get()
    fake_mode = ctx.fake_mode if ctx is not None else None
    # preserve_node_meta: new nodes keep nn_module_stack / stack_trace of their Dynamo node (report locations).
    with attention_visible(), fx_traceback.preserve_node_meta():
        if fake_mode is None:
            traced = make_fx(run, pre_dispatch=True, tracing_mode="fake")(*example_inputs)
        else:
            fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            with fake_mode:
                traced = make_fx(run, pre_dispatch=True, tracing_mode="real")(*fakes)
    state = []
    for old, new, x in zip(_placeholders(gm), _placeholders(traced), example_inputs):
        new.meta[INPUT_NAME] = old.name   # reports name Dynamo's inputs, not make_fx's arg0_1
        if _is_model_state(old, x):
            state.append(new.name)
    mark_state(traced, state)
    return traced


def _placeholders(gm: fx.GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _is_model_state(node: fx.Node, example) -> bool:
    """Dynamo lifts parameters and buffers to graph inputs: they are the model's state, not a sequence."""
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else name   # a method in older torch, a property in newer
    return "._buffers[" in str(name)


def dilated_backend(gm: fx.GraphModule, example_inputs, options: Optional[dict] = None):
    """Dynamo backend: rewrite attention, then compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    opts = _check_options(options)
    traced = to_pre_dispatch(gm, example_inputs)
    report = run_pipeline(traced, opts["strategy"], where=opts.get("where"), strict=bool(opts.get("strict", False)))
    REPORTS.append(report)
    for captured in _CAPTURES:
        captured.extend(report)
    log.info("backend 'dilated':\n%s", report)
    start = time.perf_counter()
    compiled = compile_fx(traced, example_inputs, config_patches=opts.get("inductor"))
    log.info("backend 'dilated': Inductor compiled the graph in %.1f s (attention sites rewritten: %d); kernels not "
             "in its caches compile and tune when the graph first runs", time.perf_counter() - start,
             len(report.rewritten))
    return compiled


def last_report() -> Report:
    """The report of the most recently compiled graph: one graph of a call with graph breaks (``capture_reports``
    gathers every graph of a call)."""
    if not REPORTS:
        raise RuntimeError("no graph has been compiled with backend='dilated' in this process yet")
    return REPORTS[-1]


@contextlib.contextmanager
def capture_reports() -> Iterator[Report]:
    """One report of every graph ``backend="dilated"`` compiles inside the block (each graph break and each
    recompilation adds its sites)::

        with dilate_compiler.backend.capture_reports() as report:
            compiled(x)
        print(report)
    """
    report = Report()
    _CAPTURES.append(report)
    try:
        yield report
    finally:
        _CAPTURES.remove(report)


def entry_point_present() -> bool:
    """Whether an installed distribution declares ``backend="dilated"`` through the entry point group Dynamo
    reads."""
    from importlib.metadata import entry_points

    return any(ep.name == NAME for ep in entry_points(group=ENTRY_POINT_GROUP))


def register() -> bool:
    """Register ``dilated_backend`` as ``backend="dilated"`` unless the entry point provides it (Dynamo loads
    that on first use, and a second registration of the name is an error) or the name is registered already.
    Returns whether this call registered it."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if NAME in _COMPILER_FNS or entry_point_present():
        return False
    register_backend(dilated_backend, name=NAME)
    return True
