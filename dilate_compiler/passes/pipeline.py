"""The one ordered pass pipeline every entry point (rewrite, explain, backend, export) runs."""

from __future__ import annotations

import collections
import contextlib

import torch
import torch.fx as fx

from .find_attention import find_attention
from .read_masks import read_masks
from .reorder import hoist_reorders
from .rewrite_attention import Where, rewrite_attention
from .site import Report

# Counters tests read: sites found / rewritten / skipped over the life of the process.
COUNTERS: collections.Counter = collections.Counter()


def clean_up(gm: fx.GraphModule) -> None:
    """Shared ending of every pass: dead code out, lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def run_pipeline(gm: fx.GraphModule, strategy, *, where: Where = None, strict: bool = False,
                 rewrite: bool = True) -> Report:
    """clean_up -> find_attention -> read_masks -> rewrite_attention -> hoist_reorders -> clean_up, on a
    pre-dispatch ATen graph, in place.

    The first clean-up drops dead uses (e.g. attention weights a caller discards) before matching.
    ``hoist_reorders`` only acts on the token permutations of ``dc.Hilbert(reorder="once")`` sites.
    """
    clean_up(gm)
    sites = find_attention(gm)
    read_masks(sites)
    if rewrite:
        rewrite_attention(gm, sites, strategy, where=where, strict=strict)
        hoist_reorders(gm)
        clean_up(gm)
    report = Report(sites)
    COUNTERS["found"] += len(report.found)
    COUNTERS["rewritten"] += len(report.rewritten)
    COUNTERS["skipped"] += len(report.skipped)
    return report


@contextlib.contextmanager
def attention_visible():
    """While tracing: keep nn.MultiheadAttention off its fused fast path (``_native_multi_head_attention``),
    so its attention appears as scaled_dot_product_attention / bmm + softmax in the graph."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
