"""Find attention in a pre-dispatch ATen graph.

Two structural anchors, each followed by a semantic check that reads ``meta["val"]`` and either accepts
the site or records why not (never a bare False):

- ``aten.scaled_dot_product_attention`` with any argument spelling (positional or keyword);
- ``aten.softmax`` with, above it, a chain of score ops over a q.kᵀ product and, below it, casts and dropout
  into a product with v. Before::

      mm = matmul(q, transpose(k, -1, -2)); s = mul(mm, 0.125); s = add(s, mask)
      p = softmax(s, -1, float32); p = to(p, bf16); p = dropout(p, 0.1, True); out = matmul(p, v)

  The product may be ``matmul``/``bmm``/``baddbmm``/``einsum``; score ops are ``mul``/``div`` by constants,
  additive masks, ``masked_fill``/``where`` with -inf or very negative fills, dtype casts, and soft-capping of the
  scaled scores before any mask term (Gemma2's ``s = tanh(s / c) * c``, or ``mul(s, 1 / c)``; ``site.softcap =
  c``). GQA written as ``repeat_kv`` (unsqueeze + expand + reshape) or ``repeat_interleave`` is peeled back to the
  kv heads.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .site import AttentionSite
from .sources import Sources, is_view, names, storage_root, written_args

A = torch.ops.aten
SOFTMAX = {A.softmax.int, A._softmax.default, A._safe_softmax.default}
CASTS = {A.to.dtype, A._to_copy.default, A.clone.default, A.contiguous.default, A.alias.default, A.type_as.default}
DTYPE_CASTS = {A.to.dtype, A._to_copy.default, A.type_as.default}   # casts that may change the dtype
VIEWS = {A.view.default, A.reshape.default, A._unsafe_view.default}
# Users that read only an intermediate's shape; the rewrite gives them the shape instead.
SHAPE_READERS = {A.expand_as.default: 1, A.sym_size.int: 0}   # op -> argument index that is read for its shape
IGNORED_USERS = {A._assert_tensor_metadata.default}
PRODUCTS = {A.matmul.default, A.bmm.default}
QK_PRODUCTS = PRODUCTS | {A.baddbmm.default, A.einsum.default}  # what a q.kᵀ product can be
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# masked_fill / where fills at or below this are "excluded"; their additive form is exact in float32.
VERY_NEGATIVE = -1e30
# The lowest finite value of each low-precision dtype: the fill models use for a dropped key in that dtype.
DTYPE_MINS = {float(torch.finfo(torch.float16).min), float(torch.finfo(torch.bfloat16).min)}


def drops(x) -> bool:
    """``x`` is a value a model fills or adds to drop a key: -inf, or a very negative finite value."""
    return x is not None and (x == -math.inf or x <= VERY_NEGATIVE or x in DTYPE_MINS)


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def real_users(n: fx.Node) -> list:
    return [u for u in n.users if u.target not in IGNORED_USERS]


def kwargs_of(n: fx.Node) -> dict:
    """The node's arguments by their schema names, defaults filled in (never read arguments by position)."""
    out = {}
    positional = list(n.args)
    for arg in n.target._schema.arguments:
        if positional and not arg.kwarg_only:
            out[arg.name] = positional.pop(0)
        elif arg.name in n.kwargs:
            out[arg.name] = n.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def constant(x) -> Optional[float]:
    """A Python number, or a node that builds a 0-d constant (``torch.full([], c)``); else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.target in (A.full.default, A.scalar_tensor.default):
        kw = kwargs_of(x)
        if x.target == A.full.default and list(kw["size"]) != []:
            return None
        return constant(kw.get("fill_value", kw.get("s")))
    if isinstance(x, fx.Node) and x.target in (A.zeros.default, A.ones.default) and list(kwargs_of(x)["size"]) == []:
        return 0.0 if x.target == A.zeros.default else 1.0
    return None


def location(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo spells paths from its frame's locals: L['self'].blocks[0].attn, L['fn']._modules['0']
    path = re.sub(r"^L\['[^']*'\]", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]",
                  lambda m: "." + (m.group(1) or m.group(2) or m.group(3)), path)
    return path.lstrip(".")


# --- score chain ---------------------------------------------------------------------------------------


class Scores:
    """``softmax`` input == ``factor * (q @ kᵀ) + sum(terms)``; terms are ("add", node, f) or ("fill", mask, value, keep_when)."""

    def __init__(self):
        self.factor = 1.0
        self.terms: list = []
        self.nodes: list = []  # intermediate nodes, softmax input first
        self.qk: Optional[fx.Node] = None
        self.views: list = []  # shapes the scores are viewed as on the way (leading dims split or merged)
        self.tensor_scales: list = []   # (node, divides): run-time scalars the scores are multiplied / divided by
        self.add_dtypes: list = []      # the dtype each additive term is added in, in the order of the terms
        self.softcap: Optional[float] = None   # c of c * tanh(s / c) on the scaled scores, before the terms
        self.reason = ""


def walk_scores(n: fx.Node, sc: Scores) -> bool:
    """Walk from the softmax input up to the q.kᵀ product, recording the ops outer -> inner."""
    ops = []
    while True:
        if n.target in QK_PRODUCTS:
            sc.qk = n
            break
        sc.nodes.append(n)
        if n.target in CASTS:
            n = n.args[0]
            continue
        if n.target in VIEWS:
            src = n.args[0]
            if not isinstance(src, fx.Node) or tuple(val(src).shape[-2:]) != tuple(val(n).shape[-2:]):
                sc.reason = f"a view ({n.name}) between the q.kᵀ product and the softmax changes the [queries, keys] dims"
                return False
            sc.views.append(tuple(val(n).shape))
            n = src
            continue
        cap = _soft_cap(n)
        if cap is not None:
            c, tanh, inner = cap
            sc.nodes += [tanh, inner]
            ops.append(("softcap", c))
            n = kwargs_of(inner)["self"]
            continue
        if n.target in (A.mul.Tensor, A.mul.Scalar, A.div.Tensor, A.div.Scalar):
            kw = kwargs_of(n)
            a, b = kw["self"], kw["other"]
            c = constant(b)
            if c is None and n.target in (A.mul.Tensor, A.mul.Scalar):
                a, c = b, constant(a)
            if c is None:
                scores, t = _tensor_scale(n)
                if scores is None:
                    sc.reason = (f"the scores are scaled by {n.name}, neither a constant nor a run-time scalar "
                                 f"(a tensor of one element)")
                    return False
                ops.append(("scale_tensor", t, n.target in (A.div.Tensor, A.div.Scalar)))
                n = scores
                continue
            if not isinstance(a, fx.Node):
                sc.reason = f"the scores are scaled by a run-time tensor ({n.name}), not a constant"
                return False
            ops.append(("scale", 1.0 / c if n.target in (A.div.Tensor, A.div.Scalar) else c))
            n = a
            continue
        if n.target == A.add.Tensor:
            kw = kwargs_of(n)
            if kw.get("alpha", 1) != 1:
                sc.reason = f"add with alpha={kw['alpha']} ({n.name})"
                return False
            branch = _score_operand(kw["self"], kw["other"])
            if branch is None:
                sc.reason = f"could not tell scores from mask in {n.name}"
                return False
            scores, mask = branch
            ops.append(("add", mask, val(n).dtype))
            n = scores
            continue
        if n.target in (A.masked_fill.Scalar, A.masked_fill.Tensor):
            kw = kwargs_of(n)
            fill = constant(kw["value"])
            if not drops(fill):
                sc.reason = (f"masked_fill with value {kw['value']!r} ({n.name}): only -inf, fills <= "
                             f"{VERY_NEGATIVE:g} or a low-precision dtype's lowest value keep their meaning as a mask")
                return False
            ops.append(("fill", kw["mask"], fill, False))
            n = kw["self"]
            continue
        if n.target in (A.where.self, A.where.ScalarOther):
            kw = kwargs_of(n)
            fill = constant(kw["other"])
            if not drops(fill) or not isinstance(kw["self"], fx.Node):
                sc.reason = (f"where with a fill that is not -inf, a constant <= {VERY_NEGATIVE:g} or a low-precision "
                             f"dtype's lowest value ({n.name})")
                return False
            ops.append(("fill", kw["condition"], fill, True))
            n = kw["self"]
            continue
        sc.reason = f"unsupported op {n.target} between the q.kᵀ product and the softmax ({n.name})"
        if n.target == A.tanh.default:
            sc.reason += (": a tanh that is not the soft-capping c * tanh(s / c) of the scores (a constant c > 0 "
                          "dividing its input and multiplying its output)")
        return False
    # Apply inner -> outer.
    for op in reversed(ops):
        if sc.softcap is not None and op[0] in ("scale", "scale_tensor", "softcap"):
            sc.reason = ("the soft-capped scores are scaled or capped again before the softmax; the ops read one "
                         "scale before the cap and one cap")
            return False
        if op[0] == "softcap":
            if sc.terms:
                sc.reason = ("a mask term is added to the scores before the soft-capping; the ops cap the scaled "
                             "scores, then add the mask")
                return False
            sc.softcap = op[1]
            continue
        if op[0] == "scale_tensor":
            if sc.terms:   # (s + m) * t: the mask would be scaled by a run-time value of unknown sign
                sc.reason = (f"a run-time scale ({op[1].name}) multiplies the scores after a mask term; only scales "
                             f"applied before the mask are read")
                return False
            sc.tensor_scales.append(op[1:])
            continue
        if op[0] == "scale":
            sc.factor *= op[1]
            sc.terms = [(t[0], t[1], t[2] * op[1]) if t[0] == "add" else (t[0], t[1], t[2] * op[1], t[3])
                        for t in sc.terms]
        elif op[0] == "add":
            sc.terms.append(("add", op[1], 1.0))
            sc.add_dtypes.append(op[2])
        else:
            sc.terms.append(op)
    for t in sc.terms:
        if t[0] == "fill" and not t[2] < 0:
            sc.reason = "a mask fill was scaled by a negative factor"
            return False
    return True


def _soft_cap(n: fx.Node):
    """``(c, tanh_node, inner_node)`` when ``n`` is ``tanh(inner) * c`` (or ``c * tanh(...)``) and ``inner`` is
    ``s / c`` or ``s * (1 / c)`` with the same constant ``c > 0``; else None."""
    if n.target not in (A.mul.Tensor, A.mul.Scalar):
        return None
    kw = kwargs_of(n)
    for t, c in ((kw["self"], constant(kw["other"])), (kw["other"], constant(kw["self"]))):
        if c is None or not c > 0 or not math.isfinite(c) or not isinstance(t, fx.Node) or t.target != A.tanh.default:
            continue
        inner = kwargs_of(t)["self"]
        if not isinstance(inner, fx.Node) or len(real_users(t)) != 1 or len(real_users(inner)) != 1:
            continue
        if inner.target in (A.div.Tensor, A.div.Scalar):
            ikw = kwargs_of(inner)
            d = constant(ikw["other"])
            if d is not None and isinstance(ikw["self"], fx.Node) and math.isclose(d, c, rel_tol=1e-6):
                return c, t, inner
        if inner.target in (A.mul.Tensor, A.mul.Scalar):
            ikw = kwargs_of(inner)
            d = constant(ikw["other"])
            if d is not None and isinstance(ikw["self"], fx.Node) and math.isclose(d * c, 1.0, rel_tol=1e-6):
                return c, t, inner
    return None


def _tensor_scale(n: fx.Node):
    """``(scores, t)`` when ``n`` is ``scores * t`` or ``scores / t`` (or ``t * scores``) with ``t`` a tensor of one
    element (a learned temperature, a scale computed at run time) or a symbolic number (a Python float attribute
    such as transformers' ``self.scaling``, which Dynamo passes as an input under dynamic shapes); else
    ``(None, None)``."""
    kw = kwargs_of(n)
    a, b = kw["self"], kw["other"]
    candidates = [(a, b)] + ([(b, a)] if n.target == A.mul.Tensor else [])
    for scores, t in candidates:
        tv = val(t)
        one_number = (isinstance(tv, torch.Tensor) and tv.numel() == 1 and tv.is_floating_point()
                      or isinstance(tv, (torch.SymFloat, torch.SymInt)))
        if isinstance(scores, fx.Node) and isinstance(t, fx.Node) and one_number and _leads_to_product(scores):
            return scores, t
    return None, None


def _leads_to_product(n, depth=12) -> bool:
    while isinstance(n, fx.Node) and depth > 0:
        if n.target in QK_PRODUCTS:
            return True
        if n.target == A.mul.Tensor and isinstance(n.args[1], fx.Node):
            return _leads_to_product(n.args[0], depth - 1) or _leads_to_product(n.args[1], depth - 1)
        if n.target in CASTS or n.target in VIEWS or n.target in (A.mul.Tensor, A.div.Tensor, A.mul.Scalar,
                                                                   A.div.Scalar, A.masked_fill.Scalar,
                                                                   A.masked_fill.Tensor, A.tanh.default):
            n = n.args[0]
        elif n.target in (A.where.self, A.where.ScalarOther):
            n = n.args[1]
        elif n.target == A.add.Tensor:
            return _leads_to_product(n.args[0], depth - 1) or _leads_to_product(n.args[1], depth - 1)
        else:
            return False
        depth -= 1
    return False


def _near_product(n: fx.Node, up: bool, depth: int = 8) -> bool:
    """A q.kᵀ-style product within ``depth`` nodes above ``n`` (``up``) or below it (its users)."""
    frontier, seen = [n], set()
    for _ in range(depth):
        nxt = []
        for x in frontier:
            if not isinstance(x, fx.Node) or x in seen:
                continue
            seen.add(x)
            if x is not n and x.target in QK_PRODUCTS:
                return True
            nxt.extend(x.all_input_nodes if up else x.users)
        frontier = nxt
    return False


def _score_operand(a, b):
    """``(scores, mask)`` of an ``add``: the operand the q.kᵀ product flows into is the scores (through the ops the
    walk reads, or else through any ops: the walk then stops at the op it can't read and names it)."""
    for reaches in (_leads_to_product, lambda n: isinstance(n, fx.Node) and (
            n.target in QK_PRODUCTS or _near_product(n, up=True))):
        if reaches(a) and not reaches(b):
            return a, b
        if reaches(b) and not reaches(a):
            return b, a
    return None


# --- products --------------------------------------------------------------------------------------------


def _swaps_last_two(n: fx.Node) -> bool:
    rank = len(val(n).shape)
    if n.target == A.mT.default:
        return True
    if n.target == A.transpose.int:
        kw = kwargs_of(n)
        return sorted(d % rank for d in (kw["dim0"], kw["dim1"])) == [rank - 2, rank - 1]
    if n.target == A.permute.default:
        dims = [d % rank for d in kwargs_of(n)["dims"]]
        return dims == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def _einsum_operands(n: fx.Node, kind: str):
    """(left, right) if the einsum is a batched q.kᵀ (``kind='qk'``) or p.v (``'pv'``) product."""
    kw = kwargs_of(n)
    eq, operands = kw["equation"].replace(" ", ""), kw["tensors"]
    if "->" not in eq or len(operands) != 2 or "." in eq:
        return None
    lhs, out = eq.split("->")
    a, b = lhs.split(",")
    if not (len(a) == len(b) == len(out) >= 3):
        return None
    batch = out[:-2]
    if a[:-2] != batch or b[:-2] != batch:
        return None
    if kind == "qk" and a[-1] == b[-1] and out[-2:] == a[-2] + b[-2] and a[-1] not in out:
        return operands
    if kind == "pv" and a[-1] == b[-2] and out[-2:] == a[-2] + b[-1] and a[-1] not in out:
        return operands
    return None


def qk_operands(n: fx.Node):
    """``(q, k_or_None, kT, extra_term)``: k is None when kᵀ isn't a plain transpose (then k = kᵀ.mT)."""
    extra = None
    if n.target == A.einsum.default:
        ops = _einsum_operands(n, "qk")
        if ops is None:
            return None
        return ops[0], ops[1], None, None
    kw = kwargs_of(n)
    if n.target == A.baddbmm.default:
        if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
            return None
        extra = kw["self"]
        a, b = kw["batch1"], kw["batch2"]
    else:
        a, b = list(kw.values())[:2]  # matmul(self, other) / bmm(self, mat2)
    transposes = (A.transpose.int, A.permute.default, A.mT.default)
    k = b.args[0] if isinstance(b, fx.Node) and b.target in transposes and _swaps_last_two(b) else None
    return a, k, b, extra


def pv_operands(n: fx.Node):
    if n.target == A.einsum.default:
        return _einsum_operands(n, "pv")
    if n.target in PRODUCTS:
        return tuple(list(kwargs_of(n).values())[:2])
    return None


def _through_full_slices(n):
    """``n`` past slices that keep the whole dim (``x[:, :, None]`` under symbolic shapes traces as one)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target == A.slice.Tensor:
        kw = kwargs_of(n)
        if kw.get("step", 1) != 1 or (kw.get("start") or 0) != 0 or not (
                kw.get("end") is None or (isinstance(kw["end"], int) and kw["end"] >= 2**62)):
            break
        n = kw["self"]
    return n


def peel_repeat_kv(k: fx.Node):
    """``(k_kv, g)`` when k is k_kv repeated g times per head (repeat_kv or repeat_interleave), else ``(k, 1)``."""
    if not isinstance(k, fx.Node):
        return k, 1
    if k.target == A.repeat_interleave.self_int:
        kw = kwargs_of(k)
        if kw.get("dim") in (1, -3) and isinstance(kw["repeats"], int) and len(val(k).shape) == 4:
            return kw["self"], kw["repeats"]
    if k.target in (A.reshape.default, A.view.default, A._unsafe_view.default):
        e = k.args[0]
        if isinstance(e, fx.Node) and e.target == A.expand.default:
            u = _through_full_slices(e.args[0])
            if isinstance(u, fx.Node) and u.target == A.unsqueeze.default and kwargs_of(u)["dim"] in (2, -3):
                src, shape = u.args[0], val(e).shape
                out = val(k).shape
                if (len(shape) == 5 and len(out) == 4 and len(val(src).shape) == 4
                        and out[1] == shape[1] * shape[2] and shape[1] == val(src).shape[1]):
                    g = shape[2]
                    return (src, int(g)) if isinstance(g, int) or hasattr(g, "node") else (k, 1)
    return k, 1


# --- the pass ----------------------------------------------------------------------------------------------


def find_attention(gm: fx.GraphModule) -> list:
    """Every attention site of ``gm``, accepted (``status="found"``) or skipped with a reason."""
    sites = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sources = Sources(gm)
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        site = None
        if n.target == A.scaled_dot_product_attention.default:
            site = _sdpa_site(n, len(sites))
        elif n.target in SOFTMAX:
            site = _softmax_site(n, len(sites))
        if site is None:
            continue
        if site.status != "skipped":
            reason = _self_attention_reason(site, sources) or _mutation_reason(site, order)
            if reason:
                site.skip(reason)
        sites.append(site)
    return sites


def _sdpa_site(n: fx.Node, index: int) -> AttentionSite:
    kw = kwargs_of(n)
    q, k, v, mask = kw["query"], kw["key"], kw["value"], kw.get("attn_mask")
    site = AttentionSite(f"attention_{index}", "sdpa", location(n))
    site.is_causal = bool(kw.get("is_causal", False))
    site.dropout_p = float(kw.get("dropout_p", 0.0))
    site.scale = kw.get("scale")
    site.nodes = {"out": n, "q": q, "k": k, "v": v, "mask": mask, "remove": [n]}
    if mask is not None:
        site.mask_kind = "bool" if val(mask).dtype == torch.bool else "additive"
        site.nodes["terms"] = [("keep", mask, True)] if site.mask_kind == "bool" else [("add", mask, 1.0)]
    else:
        site.nodes["terms"] = []
    return _check_shapes(site)


def _softmax_site(sm: fx.Node, index: int) -> Optional[AttentionSite]:
    kw = kwargs_of(sm)
    rank = val(kw["self"]).dim()
    if kw["dim"] % rank != rank - 1:
        if _near_product(sm, up=True) and _near_product(sm, up=False):
            return AttentionSite(f"attention_{index}", "matmul-softmax", location(sm)).skip(
                f"the softmax ({sm.name}) normalises dim {kw['dim']} of {rank}, not the key axis (the last)")
        return None
    sc = Scores()
    if not walk_scores(kw["self"], sc):
        if sc.reason and _near_product(kw["self"], up=True) and _near_product(sm, up=False):
            # softmax(f(q @ kᵀ)) @ v with an f we can't read: report it, don't pass over it in silence
            return AttentionSite(f"attention_{index}", "matmul-softmax", location(sm)).skip(sc.reason)
        return None  # not attention: softmax elsewhere is not a site
    q, k, kT, extra = qk_operands(sc.qk) or (None, None, None, None)
    if q is None:
        return None
    site = AttentionSite(f"attention_{index}", "matmul-softmax", location(sm))
    if extra is not None:
        sc.terms.append(("add", extra, sc.factor))
        sc.add_dtypes.append(val(sc.qk).dtype)
    # below the softmax: casts, dropout, then the product with v
    chain, x, dropout_p = [sm], sm, 0.0
    while True:
        users = real_users(x)
        if len(users) != 1:
            return site.skip(_escape_reason(x, users))
        u = users[0]
        if u.target in CASTS:
            chain.append(u)
            x = u
            continue
        if u.target == A.dropout.default:
            dkw = kwargs_of(u)
            dropout_p = float(dkw["p"]) if dkw["train"] else 0.0
            chain.append(u)
            x = u
            continue
        break
    pv = pv_operands(u)
    if pv is None or pv[0] is not x:
        site.q_shape = tuple(val(q).shape)
        return site.skip(f"the softmax output goes to {u.target} ({u.name}), not into a product with v")
    v = pv[1]
    transposes = [kT] if (kT is not None and k is not None) else []
    shape_users = []
    for node in sc.nodes + [sc.qk] + transposes:
        users = real_users(node)
        readers = [u for u in users if _reads_shape_of(u, node)]
        if len(users) - len(readers) != 1:
            site.q_shape = tuple(val(q).shape)
            others = ", ".join(f"{u.name} ({u.target})" for u in users if u not in readers) or "nothing"
            return site.skip(f"an intermediate of the attention ({node.name}) is used elsewhere too: its users are "
                             f"{others}, and the rewrite removes it")
        if readers and val(node).dim() != val(q).dim():
            site.q_shape = tuple(val(q).shape)
            return site.skip(f"{readers[0].name} reads the shape of {node.name}, a view of the scores of another rank")
        shape_users += [(u, node) for u in readers]
    site.scale, site.dropout_p, site.softcap = sc.factor, dropout_p, sc.softcap
    fills = [t for t in sc.terms if t[0] == "fill"]
    adds = [t for t in sc.terms if t[0] == "add"]
    site.mask_kind = "none" if not sc.terms else ("bool" if not adds and all(t[2] == -math.inf for t in fills)
                                                  else "additive")
    terms = [("add", t[1], t[2]) for t in adds]
    for _, m, fill, keep_when in fills:
        terms.append(("keep", m, keep_when) if site.mask_kind == "bool" else ("fill", m, fill, keep_when))
    remove = [u] + chain[::-1] + sc.nodes + [sc.qk] + transposes
    site.nodes = {"out": u, "q": q, "k": k, "kT": kT, "v": v, "terms": terms, "remove": remove,
                  "tensor_scales": sc.tensor_scales, "add_dtypes": sc.add_dtypes,
                  "shape_users": shape_users, "score_views": sc.views,
                  # torch.softmax of a row whose every score is -inf is NaN (_safe_softmax gives 0, as the op does)
                  "softmax": "safe" if sm.target == A._safe_softmax.default else "softmax"}
    return _check_shapes(site)


def _graph_input(n) -> Optional[fx.Node]:
    """The input placeholder ``n`` is a view, copy or constant multiple of (through layout ops, casts and scales),
    else None."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.args:
        if n.target in (A.mul.Tensor, A.mul.Scalar, A.div.Tensor, A.div.Scalar) and constant(n.args[1]) is not None:
            n = n.args[0]
        elif n.target in CASTS or n.target in _LAYOUT_OPS or is_view(n):   # views, in-place ops
            n = n.args[0]
        else:
            break
    return n if isinstance(n, fx.Node) and n.op == "placeholder" else None


def _cache_append(x, nq) -> Optional[tuple]:
    """``(past, new)`` when ``x`` (a site's k or v, its head repeat peeled) is ``cat([past..., new], dim=-2)`` on
    ``[B, H, N, D]`` tensors with ``new`` holding the last ``nq`` rows: a KV cache appending this step's keys.
    Casts and contiguous copies between the cat and the site are followed."""
    x, _ = peel_repeat_kv(x)
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in CASTS:
        x = x.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target == A.cat.default):
        return None
    kw = kwargs_of(x)
    parts, dim = list(kw["tensors"]), kw.get("dim", 0)
    out = val(x)
    if len(parts) < 2 or out is None or out.dim() != 4 or dim not in (2, -2):
        return None
    new = parts[-1]
    if not isinstance(new, fx.Node) or val(new) is None or not statically_known_true(val(new).shape[2] == nq):
        return None
    return parts[:-1], new


def _self_attention_reason(site: AttentionSite, sources: Sources) -> str:
    """Why the site is not self-attention over one sequence, or ''; marks ``site.decode`` when the keys are a KV
    cache that this step's keys extend (the queries are then the last positions of the key sequence).

    q, k and v must be computed from the same graph inputs (``sources``); when q and k are graph inputs
    themselves (a function ``f(q, k, v)``), the graph cannot tell, and equal lengths are taken as self-attention.
    A KV cache reads: k and v are ``cat([past, new])`` along the sequence, ``new`` computed from q's inputs alone
    and as long as q, ``past`` from none of them.
    """
    nodes = site.nodes
    q, k, v = nodes["q"], nodes["k"] if nodes.get("k") is not None else nodes["kT"], nodes["v"]
    nq, nk = site.q_shape[2], site.k_shape[2]
    sq, sk, sv = sources.of(q), sources.of(k), sources.of(v)
    appended = [_cache_append(x, nq) for x in (nodes.get("k"), v)]
    if all(appended) and all(sources.of(new) <= sq and all(not (sources.of(p) & sq) for p in past)
                             for past, new in appended):
        if site.is_causal and not statically_known_true(nq == nk):
            return (f"SDPA's is_causal with {nq} queries over {nk} keys aligns the queries with the first keys "
                    f"(top-left), not with the newest ones as a KV cache holds them: the model's own meaning here is "
                    f"not a decode step")
        site.decode = not statically_known_true(nq == nk)   # a prefill through an empty cache: plain attention
        return ""
    direct = _graph_input(q) is not None and _graph_input(k) is not None
    if not direct and (sq != sk or not sv <= sk):
        if sq <= sk and sv <= sk and nq != nk:
            return (f"keys extend the queries' sequence (query length {nq}, key length {nk}) in a way not read as a "
                    f"KV cache (k and v each cat([past, new]) along the sequence, new as long as q)")
        return (f"cross-attention: k/v are computed from other inputs than q (q from {names(sq)}, k from "
                f"{names(sk)}, v from {names(sv)})")
    if nq != nk:
        return f"cross-attention: query length {nq} != key length {nk}"
    return ""


def _mutation_reason(site: AttentionSite, order: dict) -> str:
    """Why the op, placed where the attention's output is, would not read q, k and the mask as the model did, or
    ''. The model reads them at the q.kᵀ product and the score ops; an in-place op between there and the output
    that writes to their storage (``q.mul_(2)`` after ``s = q @ k.mT``) changes what the op would read."""
    nodes = site.nodes
    if site.kind == "sdpa":
        return ""  # one node reads everything
    first = min(order[n] for n in nodes["remove"])
    last = order[nodes["out"]]
    reads = [nodes["q"], nodes["k"] if nodes.get("k") is not None else nodes["kT"]] + [t[1] for t in nodes["terms"]]
    reads += [t for t, _ in nodes.get("tensor_scales", [])]
    roots = {storage_root(x) for x in reads if isinstance(x, fx.Node)}
    for n, i in order.items():
        if first < i < last:
            for w in written_args(n):
                if storage_root(w) in roots:
                    return (f"the in-place op {n.target} ({n.name}) between the q.kᵀ product and the output writes to "
                            f"a tensor the attention read ({w.name})")
    return ""


def _reads_shape_of(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only the shape of ``node`` (``expand_as(mask, scores)``, ``sym_size(scores, d)``)."""
    index = SHAPE_READERS.get(user.target)
    return index is not None and len(user.args) > index and user.args[index] is node and (
        sum(a is node for a in user.args) == 1)


def _escape_reason(x, users) -> str:
    if not users:
        return f"the attention weights ({x.name}) are not used by a product with v"
    outputs = [u for u in users if u.op == "output"]
    what = "returned from the graph" if outputs else f"used by {', '.join(u.name for u in users)}"
    return f"the attention weights ({x.name}) escape: {what}"


_LAYOUT_OPS = {A.transpose.int, A.permute.default, A.view.default, A.reshape.default, A._unsafe_view.default,
               A.expand.default, A.unsqueeze.default, A.squeeze.dim, A.mT.default, A.t.default, A.slice.Tensor,
               A.select.int, A.detach.default, A.repeat_interleave.self_int, A.repeat.default}
_SHAPE_OPS = CASTS | {A.transpose.int, A.permute.default, A.mul.Tensor, A.div.Tensor, A.view.default,
                      A.reshape.default, A._unsafe_view.default, A.select.int}


def merged_heads(n: fx.Node, depth: int = 8) -> Optional[int]:
    """H for a merged-head tensor ``[B*H, N, D]``, found at the reshape that merged B and H, so that index
    ``i`` of the merged dim is ``b * H + h``: either ``[.., B, H*D] -> [.., B*H, D]`` (``nn.MultiheadAttention``:
    ``view(q, [N, B * H, D])`` of ``q [N, B, E]``) or ``[B, H, N, D] -> [B*H, N, D]``. None when no such
    reshape is visible."""
    shape = val(n).shape
    bh, d = shape[0], shape[-1]
    while isinstance(n, fx.Node) and depth > 0 and n.target in _SHAPE_OPS:
        if n.target in (A.view.default, A.reshape.default, A._unsafe_view.default):
            out, inp = list(val(n).shape), list(val(n.args[0]).shape)
            for i in range(len(out)):
                if out[i] == bh:
                    for j in range(len(inp) - 1):
                        if inp[j] * inp[j + 1] == bh and inp[j + 2:] == out[i + 1:] and inp[:j] == out[:i]:
                            return int(inp[j + 1])
            for i in range(len(out) - 1):
                if (out[i], out[i + 1]) == (bh, d):
                    for j in range(len(inp) - 1):
                        b, e = inp[j], inp[j + 1]
                        if b * e == bh * d and e % d == 0 and bh % b == 0 and bh // b == e // d:
                            return int(e // d)
        n = n.args[0]
        depth -= 1
    return None


def _merged_head_shapes(site: AttentionSite, qv, kv, vv) -> Optional[str]:
    """For 3-D ``[B*H, N, D]`` sites: recover H from q, k and v, or say why not."""
    nodes = site.nodes
    k = nodes["k"] if nodes.get("k") is not None else nodes["kT"]
    heads = {merged_heads(nodes["q"]), merged_heads(k), merged_heads(nodes["v"])}
    if len(heads) != 1 or None in heads:
        return ("3-D attention [B*H, N, D] whose head split is not visible in the graph (no reshape "
                "[.., B, H*D] -> [.., B*H, D] found for q, k and v)")
    if any(isinstance(x, torch.SymInt) for x in tuple(qv.shape) + tuple(kv.shape)):
        return "3-D attention [B*H, N, D] with symbolic sizes"
    h = heads.pop()
    nodes["heads_3d"] = h
    return None


def _peel_dtype_casts(site: AttentionSite) -> str:
    """q, k, v of different dtypes where the model casts them (``v.to(p.dtype)``, ``q.float()``): read them from
    before their dtype casts when that gives one dtype (the op computes in float32 or better either way, and its
    output is cast to the model's); else the reason."""
    nodes = site.nodes
    names = ("q", "k" if nodes.get("k") is not None else "kT", "v")
    given = [val(nodes[n]).dtype for n in names]
    peeled = [_before_dtype_casts(nodes[n]) for n in names]
    if len({val(n).dtype for n in peeled}) != 1:
        return (f"q, k, v dtypes differ ({', '.join(str(d) for d in given)}), also before the casts that make them "
                f"({', '.join(str(val(n).dtype) for n in peeled)})")
    for n, node in zip(names, peeled):
        nodes[n] = node
    return ""


def _before_dtype_casts(n: fx.Node) -> fx.Node:
    """``n`` before the dtype casts that made it (on the same device)."""
    while n.target in DTYPE_CASTS or n.target in CASTS:
        src = n.args[0]
        if not isinstance(src, fx.Node) or val(src).device != val(n).device or not val(src).is_floating_point():
            break
        n = src
    return n


def _check_shapes(site: AttentionSite) -> AttentionSite:
    nodes = site.nodes
    q, v = nodes["q"], nodes["v"]
    k = nodes["k"] if nodes.get("k") is not None else None
    qv, vv = val(q), val(v)
    kv = val(k) if k is not None else val(nodes["kT"]).transpose(-1, -2)
    site.q_shape, site.k_shape, site.dtype = tuple(qv.shape), tuple(kv.shape), qv.dtype
    if qv.dim() == kv.dim() == vv.dim() == 3 and site.kind == "matmul-softmax":
        reason = _merged_head_shapes(site, qv, kv, vv)
        if reason:
            return site.skip(reason)
        h = nodes["heads_3d"]
        split = lambda t: (t.shape[0] // h, h) + tuple(t.shape[1:])  # noqa: E731
        qv, kv, vv = (torch.empty(split(t), dtype=t.dtype, device="meta") for t in (qv, kv, vv))
        site.q_shape, site.k_shape = tuple(qv.shape), tuple(kv.shape)
    site.v_shape = tuple(vv.shape)
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return site.skip(f"q/k/v must be 4-D [B, H, N, D] (or [B*H, N, D] with a visible head split); got "
                         f"{qv.dim()}-D q {tuple(qv.shape)}")
    if not (qv.dtype == kv.dtype == vv.dtype):
        reason = _peel_dtype_casts(site)
        if reason:
            return site.skip(reason)
        qv = torch.empty(qv.shape, dtype=val(nodes["q"]).dtype, device="meta")
        site.dtype = qv.dtype
    if qv.dtype not in DTYPES:
        return site.skip(f"dtype {qv.dtype} is not supported (float16, bfloat16, float32, float64)")
    B, H = qv.shape[0], qv.shape[1]
    for shape in nodes.get("score_views", []):
        if tuple(shape[:-2]) not in ((B, H), (B * H,)):
            return site.skip(f"the scores are viewed as {list(shape)} between the q.kᵀ product and the softmax; "
                             f"accepted: [B, H, Nq, Nk] = {[B, H] + list(shape[-2:])} or [B*H, Nq, Nk]")
    merged = "heads_3d" in nodes or any(len(shape) == 3 for shape in nodes.get("score_views", []))
    nodes["merged_terms"] = merged
    if site.scale is None:
        site.scale = 1.0 / math.sqrt(qv.shape[-1])
    if k is not None and "heads_3d" not in nodes:
        k0, g = peel_repeat_kv(k)
        v0, gv = peel_repeat_kv(v)
        if g > 1 and g == gv:
            nodes["k"], nodes["v"] = k0, v0
            site.gqa_ratio = int(g)
    if site.gqa_ratio == 1 and kv.shape[1] != qv.shape[1]:
        if kv.shape[1] == 0 or qv.shape[1] % kv.shape[1]:
            return site.skip(f"query heads {qv.shape[1]} not a multiple of kv heads {kv.shape[1]}")
        site.gqa_ratio = int(qv.shape[1] // kv.shape[1])
    for t in nodes["terms"]:
        m = val(t[1])
        if m is None or m.dim() > 4:
            return site.skip(f"mask {t[1]} has no shape or more than 4 dims")
        shape = (1,) * (4 - m.dim()) + tuple(m.shape)
        if merged and m.dim() == 3 and m.shape[0] not in (1,):
            if m.shape[0] != qv.shape[0] * qv.shape[1]:
                return site.skip(f"mask {t[1].name} of shape {tuple(m.shape)} does not match [B*H, N, N]")
            shape = (qv.shape[0], qv.shape[1]) + tuple(m.shape[1:])
        try:
            torch.broadcast_shapes(shape, (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2]))
        except RuntimeError:
            return site.skip(f"mask {t[1].name} of shape {tuple(m.shape)} does not broadcast to the scores")
        if shape[1] not in (1, qv.shape[1]):
            return site.skip(f"mask {t[1].name} of shape {tuple(m.shape)}: head dim must be 1 or {qv.shape[1]}")
    return site
