"""A distributed strategy's value, as a hashable key.

``strategy_value``: equal strategies built separately (on each rank, or on each call) have the same value, and
the same ``value_hash`` in every process. The config registry (``sequence_parallel.register``) keys on it, so a
new but equal strategy object reuses its config and plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref

import torch
from torch import Tensor

from ..patterns import Pattern

_VALUES = weakref.WeakKeyDictionary()   # strategy -> (value, hash of the value, text)


def _canonical(x, where: str):
    """``x`` as nested tuples of plain values: equal for equal values, across processes."""
    if x is None or isinstance(x, (bool, int, float, str, bytes)):
        return x
    if isinstance(x, (tuple, list)):
        return tuple(_canonical(e, where) for e in x)
    if isinstance(x, Tensor):
        flat = x.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes()
        return ("tensor", str(x.dtype), tuple(x.shape), hashlib.blake2b(data, digest_size=16).hexdigest())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        # compare=False fields are caches; a pattern's name is a label, not part of its meaning
        fields = [f for f in dataclasses.fields(x) if f.compare and not (isinstance(x, Pattern) and f.name == "name")]
        return (type(x).__qualname__,) + tuple((f.name, _canonical(getattr(x, f.name), where)) for f in fields)
    raise TypeError(f"{where}: a {type(x).__qualname__} can't be compared by value across ranks (distributed "
                    f"strategies hold dataclasses, tensors and plain values), got {x!r}")


def value_hash(value) -> int:
    """A signed 64-bit hash of a canonical value (``repr`` of plain values is the same in every process)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def _strategy_entry(strategy) -> tuple:
    """``(value, hash of the value, text)`` of a strategy."""
    if strategy is None:
        return ("dense",), value_hash(("dense",)), "None"
    got = _VALUES.get(strategy)
    if got is None:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():   # a pattern's tensors are constants, also while a graph is traced
            value = _canonical(strategy, "strategy")
        got = _VALUES[strategy] = (value, value_hash(value), repr(strategy))
    return got


def strategy_value(strategy) -> tuple:
    """``strategy`` (None, ``Dilated``, ``BlockSparse``) as a hashable value: equal for equal strategies."""
    return _strategy_entry(strategy)[0]
