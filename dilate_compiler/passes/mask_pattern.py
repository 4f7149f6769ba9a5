"""Exact mask detection: a model's attention mask built in the graph from ``arange`` comparisons (causal, sliding
window, global tokens, ``tril``/``triu``) as a block-sparse pattern, statically, with no accuracy change.

The mask subgraph is read as a boolean expression over index predicates ``lo <= a*p + b*j <= hi`` (``p`` the
query position, ``j`` the key position, ``a, b`` in {-1, 0, 1}); NOT is pushed to the leaves (De Morgan; a
negated interval is two intervals) and the expression is expanded to a union of conjunctions: exactly the
terms of :mod:`dilate_compiler.patterns`. Anything else in the mask (a tensor that depends on the inputs, such
as a padding mask, a constant tensor, an op we don't read) stops the analysis with a reason naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..patterns import INF, MAX_TERMS, Pattern, Term
from .find_attention import constant, drops, kwargs_of, val
from .site import static_int

A = torch.ops.aten


def same(a, b) -> bool:
    """``a == b`` for sizes that may be symbolic: true only when it holds for every value of the symbols."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


class NotStructured(Exception):
    """The mask is not a static index predicate (the message says which node and why)."""


@dataclass(frozen=True)
class Index:
    """``a*p + b*j + c`` (integer)."""
    a: int
    b: int
    c: int


@dataclass(frozen=True)
class Abs:
    """``|a*p + b*j + c|``: only compared with a constant."""
    x: Index


@dataclass(frozen=True)
class Leaf:
    """``lo <= a*p + b*j <= hi``."""
    a: int
    b: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Op:
    kind: str       # "and" | "or" | "not"
    args: tuple


@dataclass(frozen=True, eq=False)
class KeyKeep:
    """A term of the mask that depends on the data but only through (batch, key): ``node`` is a bool tensor of
    shape ``[B or 1, 1, 1, N]`` (or fewer leading dims) saying which keys attend, e.g. a model's padding mask
    ``attention_mask[:, None, None, :]`` or transformers' ``padding_mask[batch_idx, kv_idx]``. ``negated``: the
    tensor says which keys are dropped."""
    node: fx.Node
    negated: bool = False


TRUE = Leaf(0, 0, -INF, INF)
FALSE = Leaf(0, 0, 1, 0)
Expr = Union[Index, Leaf, Op]

_PASS = {A.clone.default, A.contiguous.default, A.alias.default, A._to_copy.default, A.to.dtype, A.to.dtype_layout,
         A.view.default, A.reshape.default, A.expand.default, A.unsqueeze.default, A.squeeze.dim, A.detach.default,
         A.lift_fresh_copy.default, A._assert_tensor_metadata.default}
_CMP = {A.lt.Tensor: "lt", A.lt.Scalar: "lt", A.le.Tensor: "le", A.le.Scalar: "le", A.gt.Tensor: "gt",
        A.gt.Scalar: "gt", A.ge.Tensor: "ge", A.ge.Scalar: "ge", A.eq.Tensor: "eq", A.eq.Scalar: "eq"}
_AND = {A.logical_and.default, A.bitwise_and.Tensor, A.__and__.Tensor}
_OR = {A.logical_or.default, A.bitwise_or.Tensor, A.__or__.Tensor}
_NOT = {A.logical_not.default, A.bitwise_not.default}


class _Reader:
    """Reads a mask over ``q_len`` query rows and ``seq_len`` keys. With ``q_len < seq_len`` (a decode step) the
    query rows are the last key positions: an ``arange`` as long as the queries indexes them as ``p - offset``, so
    the predicate comes out on absolute positions (``p`` the query's key position).

    The lengths may be symbolic (``torch.compile`` with dynamic shapes): the predicate is then read only where it
    is the same for every length, an offset in an index comparison must cancel (a decode step's query positions
    ``arange(Nq) + past`` against ``Nk = past + Nq`` keys), and the sizes compared are compared symbolically."""

    def __init__(self, seq_len, q_len=None):
        self.N = seq_len
        self.Nq = seq_len if q_len is None else q_len
        self.offset = self.N - self.Nq
        self.drops: list = []   # the drop values read_additive met

    def axis_of(self, n: fx.Node) -> str:
        """For a 1-axis index tensor: which axis it varies along, from its broadcast shape."""
        shape = tuple(val(n).shape)
        if len(shape) >= 1 and same(shape[-1], self.N) and all(same(s, 1) for s in shape[:-1]):
            return "j"
        if (len(shape) >= 2 and same(shape[-1], 1) and same(shape[-2], self.Nq)
                and all(same(s, 1) for s in shape[:-2])):
            return "p"
        raise NotStructured(f"{n.name} has shape {list(shape)}: not an index over the query or key axis")

    def place(self, x: Index, n: fx.Node) -> Index:
        """Re-derive the axis of a single-axis index after a view/unsqueeze (``n`` is the viewed node)."""
        if x.a and x.b:
            return x
        k = x.a or x.b
        if k == 0:
            return x
        if x.a and not same(self.Nq, self.N) and len(val(n).shape) == 1:
            return x   # the query rows, still 1-D (a cast of the arange): placed when viewed
        return Index(k, 0, x.c) if self.axis_of(n) == "p" else Index(0, k, x.c)

    def read(self, n) -> Expr:
        """The expression ``n`` computes; a bool tensor the analysis can't read that varies over batch and key only
        is a :class:`KeyKeep` leaf."""
        try:
            return self._read(n)
        except NotStructured:
            x = self.read_constant(n)
            if x is not None:
                return x
            if self.key_only(n):
                return KeyKeep(n)
            raise

    def read_constant(self, n) -> Optional[Expr]:
        """``n`` read from its value when it depends on no graph input (a table built from ``arange`` alone, such
        as transformers' position ids and packed-sequence ids of an unpacked batch): an index that is constant or
        steps by one along the query or the key axis, or a mask that is all True or all False. None otherwise."""
        value = constant_value(n)
        if value is None or value.dim() > 4 or value.numel() == 0:
            return None
        shape = (1,) * (4 - value.dim()) + tuple(value.shape)
        rows = value.reshape(-1, shape[-2], shape[-1])
        if not bool((rows == rows[:1]).all()):
            return None   # differs across batch or heads
        if value.dtype == torch.bool:
            return TRUE if bool(value.all()) else FALSE if not bool(value.any()) else None
        if value.is_floating_point() or value.is_complex():
            return None
        if shape[-2] == 1 and (shape[-1] == 1 or same(shape[-1], self.N)):
            line, axis = rows[0, 0], "j"
        elif shape[-1] == 1 and same(shape[-2], self.Nq):
            line, axis = rows[0, :, 0], "p"
        else:
            return None
        c0 = int(line[0])
        steps = line - c0
        if bool((steps == 0).all()):
            return Index(0, 0, c0)
        if not bool((steps == torch.arange(line.numel())).all()):
            return None
        return Index(0, 1, c0) if axis == "j" else Index(1, 0, c0 - self.offset)

    def key_only(self, n) -> bool:
        v = val(n) if isinstance(n, fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.dim() < 1 or v.dim() > 4:
            return False
        shape = (1,) * (4 - v.dim()) + tuple(v.shape)
        return same(shape[-1], self.N) and same(shape[1], 1) and same(shape[2], 1)

    def _read(self, n) -> Expr:
        if not isinstance(n, fx.Node):
            if isinstance(n, torch.SymInt):
                return Index(0, 0, n)
            c = constant(n)
            if c is None or c != int(c):
                raise NotStructured(f"constant {n!r} in the mask is not an integer")
            return Index(0, 0, int(c))
        if isinstance(val(n), torch.SymInt):   # a symbolic size (an input, or arithmetic on one): a constant
            return Index(0, 0, val(n))
        t = n.target
        kw = kwargs_of(n) if n.op == "call_function" else {}
        if n.op != "call_function":
            raise NotStructured(f"{n.name} ({n.op}) is an input or a constant tensor, not built from arange")
        if t in (A.arange.default, A.arange.start, A.arange.start_step):
            start, end, step = (_size(kw.get("start", 0)), _size(kw["end"]), _size(kw.get("step", 1)))
            if step == 1 and not same(self.Nq, self.N) and same(end - start, self.Nq):
                return Index(1, 0, start - self.offset)   # the query rows, as p - offset
            if step != 1 or not same(end - start, self.N):
                raise NotStructured(f"{n.name}: arange({start}, {end}, {step}) does not index the {self.N} positions")
            return Index(0, 1, start)   # 1-D: broadcasts along the key axis until viewed
        if t in _PASS:
            x = self.read(n.args[0])
            return self.place(x, n) if isinstance(x, Index) else x
        if t == A.slice.Tensor:
            x = self.read(kw["self"])
            size = val(kw["self"]).shape[kw.get("dim", 0)]
            start, end = _size(kw.get("start") or 0), _size(kw.get("end"))
            to_the_end = end is None or (isinstance(end, int) and end >= 2**62) or statically_known_true(end >= size)
            if not same(start, 0) or not to_the_end:
                raise NotStructured(f"{n.name}: a slice [{start}:{end}] of the mask shifts positions")
            return x
        if t in (A.add.Tensor, A.add.Scalar, A.sub.Tensor, A.sub.Scalar):
            a, b = self.read(kw["self"]), self.read(kw["other"])
            sign = -1 if t in (A.sub.Tensor, A.sub.Scalar) else 1
            sign *= kw.get("alpha", 1)
            if not (isinstance(a, Index) and isinstance(b, Index)):
                raise NotStructured(f"{n.name}: arithmetic on a boolean mask")
            return Index(a.a + sign * b.a, a.b + sign * b.b, a.c + sign * b.c)
        if t == A.abs.default:
            x = self.read(n.args[0])
            if not isinstance(x, Index):
                raise NotStructured(f"{n.name}: abs of a mask")
            return Abs(x)
        if t == A.neg.default:
            x = self.read(n.args[0])
            return Index(-x.a, -x.b, -x.c)
        if t in _CMP:
            a, b = self.read(kw["self"]), self.read(kw["other"])
            if isinstance(a, Abs) and isinstance(b, Index) and not (b.a or b.b):
                if static_int(b.c) is None:
                    raise NotStructured(f"{n.name}: |index| is compared with a symbolic size ({b.c})")
                return _abs_leaf(a.x, _CMP[t], static_int(b.c), n)
            if not (isinstance(a, Index) and isinstance(b, Index)):
                raise NotStructured(f"{n.name}: comparison of boolean masks or of |index| with an index")
            d = Index(a.a - b.a, a.b - b.b, a.c - b.c)            # compare d = a - b with 0
            lo, hi = {"lt": (-INF, -1), "le": (-INF, 0), "gt": (1, INF), "ge": (0, INF), "eq": (0, 0)}[_CMP[t]]
            return _leaf(d, lo, hi, n)
        if t in _AND or (t == A.mul.Tensor and val(n).dtype == torch.bool):
            return Op("and", (self.read(n.args[0]), self.read(n.args[1])))
        if t in _OR:
            return Op("or", (self.read(n.args[0]), self.read(n.args[1])))
        if t in _NOT:
            return Op("not", (self.read(n.args[0]),))
        if t in (A.ones.default, A.ones_like.default, A.new_ones.default):
            return TRUE
        if t in (A.zeros.default, A.zeros_like.default, A.new_zeros.default) and val(n).dtype == torch.bool:
            return FALSE
        if t in (A.full.default, A.full_like.default) and val(n).dtype == torch.bool:
            return TRUE if kw["fill_value"] else FALSE
        if t in (A.tril.default, A.triu.default):
            x = self.read(kw["self"])
            k = int(kw.get("diagonal", 0))
            # tril keeps j - p <= k (d >= -k); triu keeps j - p >= k (d <= -k)
            band = Leaf(1, -1, -k, INF) if t == A.tril.default else Leaf(1, -1, -INF, -k)
            return Op("and", (x, band))
        raise NotStructured(f"{n.name}: {t} is not read as part of an index predicate")

    def read_bool(self, n: fx.Node) -> Expr:
        x = self.read(n)
        if isinstance(x, Index):
            raise NotStructured(f"{n.name} is an index, not a mask")
        return x

    def read_additive(self, n: fx.Node) -> Expr:
        """An additive float mask of 0 (keep) and a very negative value (drop): the keep predicate."""
        if not isinstance(n, fx.Node) or n.op != "call_function":
            raise NotStructured(f"{n}: an additive mask given as an input or constant holds data, not an index "
                                f"predicate")
        kw = kwargs_of(n)
        t = n.target
        if t in _PASS:
            return self.read_additive(n.args[0])
        if t in (A.where.self, A.where.ScalarSelf, A.where.ScalarOther, A.where.Scalar):
            a, b = constant(kw["self"]), constant(kw["other"])
            cond = self.read_bool(kw["condition"])
            if a == 0 and b is not None and _drops(b):
                self.drops.append(b)
                return cond
            if b == 0 and a is not None and _drops(a):
                self.drops.append(a)
                return Op("not", (cond,))
        if t in (A.masked_fill.Scalar, A.masked_fill.Tensor):
            base, fill = kw["self"], constant(kw["value"])
            if fill is not None and _drops(fill) and _zeros(base):
                self.drops.append(fill)
                return Op("not", (self.read_bool(kw["mask"]),))
        if t in (A.triu.default, A.tril.default) and _drops_everywhere(kw["self"]):
            self.drops.append(kwargs_of(kw["self"])["fill_value"])
            k = int(kw.get("diagonal", 0))
            # the kept region is where tril/triu zeroed the fill
            return Leaf(1, -1, -INF, -k - 1) if t == A.tril.default else Leaf(1, -1, -k + 1, INF)
        raise NotStructured(f"{n.name}: additive mask {t} is not 0 / -inf of an index predicate")


# Largest tensor evaluated to read a constant part of a mask (an index table, not an N x N mask).
_CONSTANT_ELEMENTS = 1 << 22


def constant_value(n) -> Optional[torch.Tensor]:
    """The value of ``n`` when it and everything it is computed from are ops on constants (no graph input, no
    parameter, no random op), each at most ``_CONSTANT_ELEMENTS`` elements, with static shapes: computed on the CPU.
    None otherwise."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    nodes, stack, seen = [], [n], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        v = val(x)
        if x.op != "call_function" or not isinstance(v, torch.Tensor) or v.numel() > _CONSTANT_ELEMENTS:
            return None
        if any(not isinstance(d, int) for d in v.shape):
            return None
        schema = getattr(x.target, "_schema", None)
        if schema is None or schema.is_mutable or "rand" in x.target.__name__ or "bernoulli" in x.target.__name__:
            return None
        nodes.append(x)
        stack.extend(x.all_input_nodes)
    env = {}

    def arg(a):
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(arg(b) for b in a)
        if isinstance(a, torch.device):
            return torch.device("cpu")
        return a

    order = {x: i for i, x in enumerate(n.graph.nodes)}
    try:
        for x in sorted(nodes, key=order.__getitem__):
            kwargs = {k: arg(v) for k, v in x.kwargs.items()}
            env[x] = x.target(*arg(tuple(x.args)), **kwargs)
    except Exception:   # an op this reading can't run on the CPU: the mask stays unread
        return None
    out = env[n]
    return out if isinstance(out, torch.Tensor) else None


def _drops(x) -> bool:
    return drops(x)


def _zeros(n) -> bool:
    if not isinstance(n, fx.Node):
        return constant(n) == 0
    if n.op != "call_function":
        return False
    kw = kwargs_of(n)
    if n.target in (A.zeros.default, A.zeros_like.default):
        return True
    return n.target in (A.full.default, A.full_like.default) and kw["fill_value"] == 0


def _drops_everywhere(n) -> bool:
    kw = kwargs_of(n) if isinstance(n, fx.Node) else {}
    return isinstance(n, fx.Node) and n.target in (A.full.default, A.full_like.default) and _drops(kw["fill_value"])


def _size(x):
    """An ``arange``/``slice`` bound: an int, or the symbolic size a node holds."""
    return val(x) if isinstance(x, fx.Node) else x


def _leaf(d: Index, lo: int, hi: int, n) -> Leaf:
    if d.a not in (-1, 0, 1) or d.b not in (-1, 0, 1) or (d.a and d.b and d.a != -d.b):
        raise NotStructured(f"{n.name}: predicate {d.a}*p + {d.b}*j + {d.c} is not on p - j, p or j")
    c = static_int(d.c)
    if c is None:
        raise NotStructured(f"{n.name}: predicate {d.a}*p + {d.b}*j + {d.c} compares with a symbolic size, so it "
                            f"differs between lengths")
    lo = lo - c if lo > -INF else lo
    hi = hi - c if hi < INF else hi
    return Leaf(d.a, d.b, lo, hi)


def _abs_leaf(x: Index, cmp: str, k: int, n) -> Expr:
    """``|x| cmp k`` as an interval on x (or its complement)."""
    inside = {"le": k, "lt": k - 1, "ge": k - 1, "gt": k, "eq": None}[cmp]
    if inside is None:
        return Op("or", (_leaf(x, k, k, n), _leaf(x, -k, -k, n)))
    leaf = _leaf(x, -inside, inside, n) if inside >= 0 else FALSE
    return leaf if cmp in ("le", "lt") else Op("not", (leaf,))


def _interval(leaf: Leaf) -> Term:
    a, b, lo, hi = leaf.a, leaf.b, leaf.lo, leaf.hi
    if a == 0 and b == 0:
        return Term() if lo <= 0 <= hi else Term(d=(1, 0))
    flip = (a == -1) if a else (b == -1)
    if flip:
        lo, hi = (-hi if hi < INF else -INF), (-lo if lo > -INF else INF)
    if a and b:
        return Term(d=(lo, hi))
    return Term(p=(lo, hi)) if a else Term(j=(lo, hi))


def _negate(leaf: Leaf) -> list:
    out = []
    if leaf.lo > -INF:
        out.append(Leaf(leaf.a, leaf.b, -INF, leaf.lo - 1))
    if leaf.hi < INF:
        out.append(Leaf(leaf.a, leaf.b, leaf.hi + 1, INF))
    return out or [FALSE]


def _dnf(x: Expr, negated: bool = False) -> list:
    """A list of conjunctions (each a list of leaves) equal to ``x`` (or to NOT x)."""
    if isinstance(x, Leaf):
        return [[leaf] for leaf in _negate(x)] if negated else [[x]]
    if x.kind == "not":
        return _dnf(x.args[0], not negated)
    kind = x.kind if not negated else ("or" if x.kind == "and" else "and")
    parts = [_dnf(a, negated) for a in x.args]
    if kind == "or":
        return [c for p in parts for c in p]
    out = [[]]
    for p in parts:
        out = [a + b for a in out for b in p]
        if len(out) > MAX_TERMS:
            raise NotStructured(f"the mask expands to more than {MAX_TERMS} terms")
    return out


def to_pattern(expr: Expr, name: str) -> Pattern:
    terms = []
    for conj in _dnf(expr):
        term = Term()
        for leaf in conj:
            term = term & _interval(leaf)
        if not term.is_void():
            terms.append(term)
    if len(terms) > MAX_TERMS - 1:
        raise NotStructured(f"the mask expands to {len(terms)} terms (at most {MAX_TERMS - 1})")
    return Pattern(tuple(terms), name)


@dataclass(frozen=True)
class MaskSplit:
    """A site's mask read as a static predicate on (query position, key position) AND per-key data terms.

    ``pattern``: the predicate (the pairs the mask can link). ``key_keep``: :class:`KeyKeep` leaves, all to hold
    (key padding). ``drops``: ``(value, how)`` for each term, how the model drops a key: ``how`` is ``"fill"``
    (the score is replaced by ``value``) or ``"add"`` (``value`` is added to the score).
    """

    pattern: Pattern
    key_keep: tuple
    drops: tuple


def split_mask(site, seq_len: int, q_len: Optional[int] = None) -> MaskSplit:
    """The site's mask terms (AND of all) as a :class:`MaskSplit`, or ``NotStructured`` with the reason. ``q_len``
    (default ``seq_len``): fewer query rows than keys are the last key positions (a decode step)."""
    reader = _Reader(seq_len, q_len)
    parts, drop_list = [], []
    for term in site.nodes.get("terms", []):
        if term[0] == "keep":
            x = reader.read_bool(term[1])
            parts.append(x if term[2] else Op("not", (x,)))
            drop_list.append((float("-inf"), "fill"))
        elif term[0] == "fill":
            _, m, fill, keep_when = term
            x = reader.read_bool(m)
            parts.append(x if keep_when else Op("not", (x,)))
            drop_list.append((fill, "fill"))
        else:
            _, m, coef = term
            if coef <= 0:
                raise NotStructured(f"an additive mask is scaled by {coef}")
            reader.drops = []
            parts.append(reader.read_additive(m))
            drop_list += [(d * coef, "add") for d in reader.drops]
    static, keys = [], []
    for x in parts:
        _conjuncts(x, False, static, keys)
    expr = TRUE
    for x in static:
        expr = Op("and", (expr, x))
    pattern = to_pattern(expr, "auto")
    return MaskSplit(Pattern(pattern.terms, "auto: " + describe(pattern)), tuple(keys), tuple(drop_list))


def _conjuncts(x, negated: bool, static: list, keys: list) -> None:
    """Split ``x`` (or NOT x) into conjuncts: key terms into ``keys``, the rest into ``static``."""
    if isinstance(x, KeyKeep):
        keys.append(KeyKeep(x.node, x.negated != negated))
        return
    if isinstance(x, Op) and x.kind == "not":
        _conjuncts(x.args[0], not negated, static, keys)
        return
    if isinstance(x, Op) and x.kind == ("or" if negated else "and"):   # NOT(a OR b) == NOT a AND NOT b
        for a in x.args:
            _conjuncts(a, negated, static, keys)
        return
    if _holds_key_term(x):
        raise NotStructured(f"the per-key term {_key_term(x).node.name} is combined with other terms by OR: the "
                            f"mask is not a predicate AND key padding")
    static.append(Op("not", (x,)) if negated else x)


def _holds_key_term(x) -> bool:
    return _key_term(x) is not None


def _key_term(x):
    if isinstance(x, KeyKeep):
        return x
    if isinstance(x, Op):
        for a in x.args:
            found = _key_term(a)
            if found is not None:
                return found
    return None


def site_pattern(site, seq_len: int) -> Pattern:
    """The pattern equal to the site's own mask terms (AND of all), or ``NotStructured`` with the reason."""
    split = split_mask(site, seq_len)
    if split.key_keep:
        raise NotStructured(f"{split.key_keep[0].node.name} depends on the data (a per-key term such as padding)")
    return split.pattern


def describe(pattern: Pattern) -> str:
    def iv(name, r):
        lo, hi = r
        if (lo, hi) == (-INF, INF):
            return ""
        if lo == -INF:
            return f"{name}<={hi}"
        if hi == INF:
            return f"{name}>={lo}"
        return f"{lo}<={name}<={hi}"
    terms = [" & ".join(s for s in (iv("p-j", t.d), iv("p", t.p), iv("j", t.j)) if s) or "all" for t in pattern.terms]
    return " | ".join(f"({t})" for t in terms) if terms else "none"
