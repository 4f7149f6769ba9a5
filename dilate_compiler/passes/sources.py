"""Which graph inputs a tensor is computed from: how self-attention is told from cross-attention, and what the
in-place ops of a graph may write.

A self-attention's q, k and v are projections of one sequence: they are computed from the same graph inputs
(``x`` below), whatever their lengths. Cross-attention reads k and v from another sequence::

    self:   q = view(linear(x, Wq)); k = view(linear(x, Wk)); v = ...          # q, k, v from {x}
    cross:  q = view(linear(x, Wq)); k = view(linear(mem, Wk)); v = ...        # q from {x}, k from {mem}

Model state (parameters, buffers, lifted constants) is not an input in this sense: placeholders that hold it are
marked with ``meta[STATE]`` by the entry points (``mark_state``); ``get_attr`` nodes never count.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx

STATE = "dilate_compiler_state"
INPUT_NAME = "dilate_compiler_input_name"   # a placeholder's name as the user's program knew it, where it differs


def mark_state(gm: fx.GraphModule, names: Iterable[str]) -> None:
    """Mark the placeholders named ``names`` as model state (not inputs a sequence comes from)."""
    names = set(names)
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name in names:
            n.meta[STATE] = True


class Sources:
    """``sources.of(node)``: the input placeholders ``node`` is computed from (a frozenset), for every node of a
    graph, computed once in topological order."""

    def __init__(self, gm: fx.GraphModule):
        self._of: dict = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                is_tensor = isinstance(n.meta.get("val"), torch.Tensor)
                self._of[n] = frozenset((n,)) if is_tensor and not n.meta.get(STATE) else frozenset()
            else:
                deps = frozenset()
                for a in n.all_input_nodes:
                    deps |= self._of.get(a, frozenset())
                self._of[n] = deps

    def of(self, n) -> frozenset:
        return self._of.get(n, frozenset()) if isinstance(n, fx.Node) else frozenset()


def names(nodes: Iterable[fx.Node]) -> str:
    return "{" + ", ".join(sorted(n.meta.get(INPUT_NAME, n.name) for n in nodes)) + "}"


def is_view(n: fx.Node) -> bool:
    """The op's output may share storage with its first tensor argument (schema alias annotation)."""
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return False
    return any(r.alias_info is not None for r in schema.returns)


def storage_root(n) -> Optional[fx.Node]:
    """The node whose storage ``n`` views (``n`` itself when it is not a view)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and is_view(n) and n.args:
        n = n.args[0]
    return n if isinstance(n, fx.Node) else None


def written_args(n: fx.Node) -> list:
    """The argument nodes an in-place / out= op writes to (schema ``(a!)`` annotations)."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            x = n.args[i] if i < len(n.args) and not arg.kwarg_only else n.kwargs.get(arg.name)
            if isinstance(x, fx.Node):
                out.append(x)
    return out
