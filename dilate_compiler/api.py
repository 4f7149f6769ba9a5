"""Public compiler API: ``rewrite`` and ``explain``."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from .passes.pipeline import attention_visible, run_pipeline
from .passes.rewrite_attention import Where
from .passes.site import Report
from .strategies.contract import Strategy
from .strategies.dilated import Dilated

log = logging.getLogger("dilate_compiler")

# Used when no strategy is given: LongNet's geometric schedule.
DEFAULT_STRATEGY = Dilated(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8))


def check_strategy(strategy) -> Any:
    if strategy is None:
        return DEFAULT_STRATEGY
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a dilate_compiler strategy (e.g. dc.Dilated(...), or an object with "
                        f"check_site, emit_call and reference: dilate_compiler.strategies.contract), got {strategy!r}")
    return strategy


@dataclass
class RewriteResult:
    module: fx.GraphModule
    report: Report

    def __iter__(self):  # allows ``module, report = dc.rewrite(...)``
        return iter((self.module, self.report))


def export_program(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None,
                   dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """``model`` exported to pre-dispatch ATen (``torch.export``, non-strict, attention kept visible).

    The model's current train/eval mode is captured (dropout in the graph follows it).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or fx.GraphModule, got {type(model).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    with attention_visible(), without_cache_output(model, example_kwargs or {}):
        return torch.export.export(model, args, example_kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)


@contextlib.contextmanager
def without_cache_output(model: torch.nn.Module, kwargs: dict):
    """While tracing a transformers model called without ``use_cache``: its ``config.use_cache`` off. A traced graph
    is fixed to one call and can't generate, and the KV cache object a model returns by default is no tensor output
    (``torch.export`` refuses it): the traced module returns the model's outputs with no cache (for generation:
    ``dc.hf.register``)."""
    config = getattr(model, "config", None)
    if "use_cache" in kwargs or not getattr(config, "use_cache", False):
        yield
        return
    log.info("tracing %s with config.use_cache=False: a traced graph returns no KV cache", type(model).__name__)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def trace(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None) -> fx.GraphModule:
    """Pre-dispatch ATen graph of ``model``, callable like the model."""
    return export_program(model, example_inputs, example_kwargs).module()


def rewrite(model, example_inputs, strategy=None, *, where: Where = None, strict: bool = False,
            example_kwargs: Optional[dict] = None) -> RewriteResult:
    """Find every attention in ``model`` and rewrite it into ``strategy``'s op.

    Args:
        model: an ``nn.Module`` (a ``fx.GraphModule`` too); traced to pre-dispatch ATen with ``example_inputs``.
        strategy: e.g. ``dc.Dilated(...)``; default ``DEFAULT_STRATEGY``.
        where: None (all sites), an int (minimum sequence length), or ``callable(site) -> bool``.
        strict: raise ``AttentionSkipped`` on the first site that can't be rewritten.

    Returns: ``.module`` (callable like the model) and ``.report``.
    """
    strategy = check_strategy(strategy)
    gm = trace(model, example_inputs, example_kwargs)
    report = run_pipeline(gm, strategy, where=where, strict=strict)
    return RewriteResult(gm, report)


def explain(model, example_inputs, strategy=None, *, where: Where = None,
            example_kwargs: Optional[dict] = None) -> Report:
    """The report ``rewrite`` would give (which sites would be rewritten, which skipped and why)."""
    return rewrite(model, example_inputs, strategy, where=where, example_kwargs=example_kwargs).report
