"""What the ranks of one distributed attention call must agree on, and the check that they do.

A sequence- or head-parallel call is collective: every rank of the group runs the same exchanges in the same
order, on tensors of the same shapes. Ranks whose calls differ would hang, abort inside the communication
backend, or each return a mixture of two attentions (one rank's queries causal, the other's not). So every call
first compares, in one all_gather of a fixed-size int64 fingerprint (``comm.check_agreement``)::

    q, k, v shard shapes | their dtypes | strategy (a hash of its value) | mode (ring, sparse, head_parallel, hybrid)
    | shard layout | is_causal | scale (None: 1/sqrt(D)) | key padding (none, or the shape of ``key_keep``)
    | groups (the hybrid's group sizes; none) | the rank's own argument checks (passed, or the error)

and every rank raises the same ``ValueError``, naming each field that differs and every rank's value. The check
runs inside the ops' implementations (``sequence_parallel_forward``, ``head_parallel_pack``), which run eagerly in
compiled and exported graphs too. A rank whose own arguments fail their checks joins the same all_gather with its
error (``raise_on_every_rank``), so the other ranks raise instead of waiting for it. The backward needs no check
of its own: it follows a forward that passed one. Ranks that pass different process groups can't be compared (a
collective needs a group they share); a rank outside the group it passes gets an error of its own
(``comm.resolve_group``).

``strategy_value`` is a strategy's value as a hashable key: equal strategies built separately (on each rank, or
on each call) have the same one. The config registry (``sequence_parallel.register``) keys on it too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref

import torch
from torch import Tensor

from ..patterns import Pattern
from . import comm

WHAT = "distributed attention"           # how errors name the call
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
    """``(value, hash of the value, text)`` of a strategy (the value is None where it has none: an invalid one)."""
    if strategy is None:
        return ("dense",), value_hash(("dense",)), "None"
    try:
        got = _VALUES.get(strategy)
    except TypeError:                     # unhashable: not a strategy; only a rank that failed its checks gets here
        got = (None, value_hash(repr(strategy)), repr(strategy))
    if got is None:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():   # a pattern's tensors are constants, also while a graph is traced
            value = _canonical(strategy, "strategy")
        got = _VALUES[strategy] = (value, value_hash(value), repr(strategy))
    return got


def strategy_value(strategy) -> tuple:
    """``strategy`` (None, ``Dilated``, ``BlockSparse``) as a hashable value: equal for equal strategies."""
    return _strategy_entry(strategy)[0]


def key_padding_text(key_keep) -> str:
    """How a call's key padding reads in the fingerprint: ``none``, or ``key_keep``'s shape."""
    if key_keep is None:
        return "none"
    return f"{tuple(key_keep.shape)}" if isinstance(key_keep, Tensor) else f"not a tensor ({type(key_keep).__name__})"


def _fields(q, k, v, strategy, mode: str, layout: str, is_causal, scale, error: str, key_keep=None,
            groups: str = "none") -> list:
    """The fingerprint of one call: the same fields, one int64 each, for every entry point, so ranks calling
    different ones (or failing their own argument checks) still meet in one all_gather. A field's value is the
    hash of its text, which is exact (a float's repr round-trips), except the strategy's: the hash of its value."""
    def tensor_text(t, what):
        if not isinstance(t, Tensor):
            return f"not a tensor ({type(t).__name__})"
        return str(tuple(t.shape)) if what == "shape" else str(t.dtype)

    try:
        _, strategy_hash, strategy_text = _strategy_entry(strategy)
    except TypeError as e:   # a rank whose strategy is not one: its own check failed, the error says so
        strategy_hash, strategy_text = value_hash(repr(strategy)), f"{strategy!r} ({e})"
    if scale is None and isinstance(q, Tensor):
        scale = 1.0 / math.sqrt(q.shape[-1])
    dtypes = [tensor_text(t, "dtype") for t in (q, k, v)]
    texts = [(f"{name} shape", tensor_text(t, "shape")) for name, t in (("q", q), ("k", k), ("v", v))] + [
        ("dtype", dtypes[0] if len(set(dtypes)) == 1 else f"q {dtypes[0]}, k {dtypes[1]}, v {dtypes[2]}"),
        ("strategy", strategy_text),
        ("mode", repr(mode)),
        ("layout", repr(layout)),
        ("is_causal", repr(bool(is_causal) if isinstance(is_causal, int) else is_causal)),
        ("scale", repr(float(scale) if isinstance(scale, (int, float)) else scale)),
        ("key padding", key_padding_text(key_keep)),
        ("groups", groups),
        ("argument checks", error or "passed"),
    ]
    return [comm.Field(name, (strategy_hash if name == "strategy" else value_hash(text),), text)
            for name, text in texts]


def check_call(q: Tensor, k: Tensor, v: Tensor, config, key_keep=None, groups: str = "none") -> None:
    """Every rank of ``config.group`` makes the same call (``config``: its ``sequence_parallel.Config``;
    ``key_keep``: its key padding or None; ``groups``: how the hybrid's groups read, ``hybrid.groups_text``), or
    every rank raises the same ``ValueError``."""
    group, _, world = comm.resolve_group(config.group)
    comm.check_agreement(group, world, WHAT, _fields(q, k, v, config.strategy, config.mode, config.layout,
                                                     config.is_causal, config.scale, "", key_keep, groups), q.device)


def raise_on_every_rank(error: Exception, group, q, k, v, strategy, mode, layout, is_causal, scale, key_keep=None,
                        groups: str = "none"):
    """A rank whose own arguments failed their checks (``error``) still takes part in the check the other ranks
    run, so they raise too instead of waiting for it; then it raises the check's error (every rank's), or
    ``error`` itself where every rank failed alike. ``group``: the resolved process group."""
    world = comm.resolve_group(group)[2]
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    fields = _fields(q, k, v, strategy, mode, layout, is_causal, scale, f"{type(error).__name__}: {error}",
                     key_keep, groups)
    comm.check_agreement(group, world, WHAT, fields, device, cause=error)
    raise error
