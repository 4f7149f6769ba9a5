"""Replace accepted attention sites with the strategy's op, keeping mask, scale, dropout and GQA.

Before (a hand-written site)::

    mm = matmul(q, transpose(k, -1, -2)); s = add(mul(mm, 0.125), mask); p = softmax(s, -1); out = matmul(p, v)

After::

    fwd = dilate_compiler.dilated_attention_forward(q, k, mask, ..., scale=0.125, ...); out = getitem(fwd, 0)
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map

from .find_attention import IGNORED_USERS, val
from ..strategies.contract import SiteCall
from .site import AttentionSkipped, AttentionSite, static_int

A = torch.ops.aten

Where = Union[None, int, Callable[[AttentionSite], bool]]


def selected(site: AttentionSite, where: Where) -> bool:
    if where is None:
        return True
    if isinstance(where, int) and not isinstance(where, bool):
        n = static_int(site.k_shape[2]) if site.k_shape else None
        return n is None or n >= where   # a symbolic length is kept: the op handles any N
    if callable(where):
        return bool(where(site))
    raise TypeError(f"where must be None, a minimum sequence length (int) or a callable(site) -> bool, got {where!r}")


def rewrite_attention(gm: fx.GraphModule, sites: list, strategy, *, where: Where = None, strict: bool = False) -> list:
    """Rewrite every accepted site of ``gm`` in place; returns the sites with their final status."""
    for site in sites:
        if site.status == "skipped":
            if strict:
                raise AttentionSkipped(f"{site.name} at {site.location or '?'}: {site.reason}")
            continue
        if not selected(site, where):
            site.skip("not selected by where=")
            continue
        reason = softcap_reason(site, strategy) or strategy.check_site(site)
        if reason:
            site.skip(reason)
            if strict:
                raise AttentionSkipped(f"{site.name} at {site.location or '?'}: {reason}")
            continue
        _replace(gm, site, strategy)
        site.status = "rewritten"
    return sites


def softcap_reason(site, strategy) -> str:
    """Why ``strategy`` can't take the site's soft-capped scores (it applies no score modifier), or ''."""
    if site.softcap is None or getattr(strategy, "applies_softcap", False):
        return ""
    return (f"soft-capping of the scores (softcap {site.softcap:g}: c * tanh(s / c)): {type(strategy).__name__} "
            f"applies no score modifier; dc.Dilated and dc.BlockSparse do")


CONSTANT_PREFIX = "_dilate_compiler_constant"


def _emitter(gm: fx.GraphModule, fake_mode):
    graph = gm.graph

    def emit(target, args, kwargs=None):
        kwargs = kwargs or {}
        node = graph.call_function(target, tuple(args), kwargs)
        to_val = lambda a: val(a) if isinstance(a, fx.Node) else a  # noqa: E731
        with fake_mode:
            node.meta["val"] = target(*tree_map(to_val, tuple(args)), **tree_map(to_val, kwargs))
        return node

    def constant(t: torch.Tensor) -> fx.Node:
        """A tensor computed at compile time (e.g. a block layout), held by the module as a buffer."""
        names = {id(b): n for n, b in gm.named_buffers() if n.startswith(CONSTANT_PREFIX)}
        name = names.get(id(t))
        if name is None:
            name = f"{CONSTANT_PREFIX}{len(names)}"
            gm.register_buffer(name, t)
        node = graph.get_attr(name)
        node.meta["val"] = fake_mode.from_tensor(t, static_shapes=True)
        return node

    emit.constant = constant
    return emit


def _build_mask(emit, terms: list, heads_3d: Optional[tuple] = None,
                work_dtype: torch.dtype = torch.float32) -> Optional[fx.Node]:
    """The site's mask terms as one mask for the op: bool (True attends) when every term is a keep-mask, else
    additive in ``work_dtype`` (the op's: float32, float64 for float64 sites)."""
    if not terms:
        return None
    if heads_3d is not None:  # [B*H, N, N] masks of a merged-head site -> [B, H, N, N]
        B, H = heads_3d
        split = lambda m: emit(A.reshape.default, (m, [B, H] + list(val(m).shape[1:])))  # noqa: E731
        terms = [(t[0], split(t[1])) + tuple(t[2:]) if val(t[1]).dim() == 3 and val(t[1]).shape[0] == B * H
                 else t for t in terms]
    if all(t[0] == "keep" for t in terms):
        mask = None
        for _, m, keep_when in terms:
            m = m if keep_when else emit(A.logical_not.default, (m,))
            mask = m if mask is None else emit(A.logical_and.default, (mask, m))
        return mask
    mask = None
    for t in terms:
        if t[0] == "add":
            term = t[1] if t[2] == 1.0 else emit(A.mul.Tensor, (t[1], t[2]))
        elif t[0] == "fill":
            # The model sets a dropped score to ``fill`` exactly: a row it drops everywhere is uniform. The op adds
            # the mask, so a finite fill becomes its working dtype's lowest value, which swallows any score.
            _, m, fill, keep_when = t
            if fill != float("-inf"):
                fill = torch.finfo(work_dtype).min
            zero, drop = (emit(A.scalar_tensor.default, (x,), {"dtype": work_dtype}) for x in (0.0, fill))
            term = emit(A.where.self, (m, zero, drop) if keep_when else (m, drop, zero))
        else:  # a bool keep-mask beside additive terms
            _, m, keep_when = t
            term = emit(A.where.Scalar, (m, 0.0, float("-inf")) if keep_when else (m, float("-inf"), 0.0))
        mask = term if mask is None else emit(A.add.Tensor, (mask, term))
    return mask


def _site_mask(emit, site: AttentionSite, heads_3d) -> Optional[fx.Node]:
    """The site's mask terms as one mask for an op's ``attn_mask`` (``SiteCall.mask``)."""
    mask = _build_mask(emit, site.nodes["terms"], heads_3d,
                       torch.float64 if site.dtype == torch.float64 else torch.float32)
    if site.kind == "sdpa" and mask is not None and val(mask).dtype in (torch.float16, torch.bfloat16):
        # SDPA's fused kernels add a mask in float32; the op adds one in q's low-precision dtype as a hand-written
        # ``scores + mask`` does (the mask of a hand-written site stays in the dtype it is added in)
        mask = emit(A.to.dtype, (mask, torch.float32))
    return mask


def _key_keep(emit, site: AttentionSite) -> Optional[fx.Node]:
    """The split mask's per-key terms ANDed, bool ``[B or 1, Nk]`` (``SiteCall.key_keep``)."""
    keep = None
    for term in site.key_keep:
        # [B, 1, 1, Nk] (or a shape with every leading size 1): no size is written into the graph, so symbolic
        # batch sizes and lengths stay symbolic
        if len(val(term.node).shape) == 4:
            node = emit(A.squeeze.dims, (term.node, [1, 2]))
        else:
            node = emit(A.reshape.default, (term.node, [1, -1]))
        if term.negated:
            node = emit(A.logical_not.default, (node,))
        keep = node if keep is None else emit(A.logical_and.default, (keep, node))
    return keep


def _empty_rows(emit, site: AttentionSite, emitted, call) -> fx.Node:
    """The output with the model's value on rows that keep no key (the op's log-sum-exp is -inf there and its
    output 0): NaN where the model's ``torch.softmax`` met only -inf; where every score was one finite drop value
    (``passes.read_masks``: "mean"), the softmax is uniform over every key, so the row is the mean of v, and its
    gradient is the model's too: autograd differentiates ``s + drop`` as if it did not swallow ``s``, so the
    model's row carries the uniform softmax's gradient to q and k (``_uniform_row_gradient``)."""
    out = emitted.out
    if emitted.lse is None or site.empty_rows not in ("nan", "mean"):
        return out
    empty = emit(A.unsqueeze.default, (emit(A.eq.Scalar, (emitted.lse, float("-inf"))), -1))
    if site.empty_rows == "nan":
        return emit(A.where.ScalarSelf, (empty, float("nan"), out))
    fill = _uniform_row_gradient(emit, call.q, call.k, call.v, call.scale, site.gqa_ratio)
    return emit(A.where.self, (empty, emit(A.to.dtype, (fill, val(out).dtype)), out))


def _uniform_row_gradient(emit, q: fx.Node, k: fx.Node, v: fx.Node, scale: float, group: int) -> fx.Node:
    """``[B, Hq, Nq, Dv]``: what a row whose softmax is uniform over all ``Nk`` keys computes, value and
    gradient. Value: ``v̄ = mean_j v_j``. Gradient: d out / d s_j = (v_j - v̄) / Nk, with s_j = scale q . k_j, carried
    by ``scale ((q - sg q) M + sg(q) M')``, M = Kᵀ (V - v̄) / Nk, M' = (K - sg K)ᵀ (V - v̄) / Nk (both 0 in value;
    sg = stop-gradient), in O(N D Dv) per head."""
    n = val(k).shape[-2]
    if not isinstance(n, int):   # a symbolic length is read from k in the graph, never written in as a number
        n = emit(A.sym_size.int, (k, len(val(k).shape) - 2))
    v_bar = emit(A.mean.dim, (v, [-2], True))                                        # [B, Hkv, 1, Dv]
    centred = emit(A.sub.Tensor, (v, v_bar))
    k_moving = emit(A.sub.Tensor, (k, emit(A.detach.default, (k,))))
    m = emit(A.div.Scalar, (emit(A.matmul.default, (emit(A.transpose.int, (k, -1, -2)), centred)), n))
    m2 = emit(A.div.Scalar, (emit(A.matmul.default, (emit(A.transpose.int, (k_moving, -1, -2)), centred)), n))
    if group > 1:
        v_bar, m, m2 = (emit(A.repeat_interleave.self_int, (t, group, 1)) for t in (v_bar, m, m2))
    q_still = emit(A.detach.default, (q,))
    q_moving = emit(A.sub.Tensor, (q, q_still))
    moves = emit(A.add.Tensor, (emit(A.matmul.default, (q_moving, m)), emit(A.matmul.default, (q_still, m2))))
    return emit(A.add.Tensor, (v_bar, emit(A.mul.Scalar, (moves, scale))))


def _give_shape(emit, user: fx.Node, node: fx.Node, nodes: dict) -> None:
    """``user`` read only the shape of ``node``, an intermediate the rewrite removes: give it the shape, read from
    q (leading dims and queries) and k (keys) where it is symbolic."""
    shape = list(val(node).shape)
    k = nodes["k"] if nodes.get("k") is not None else nodes["kT"]
    k_len_dim = -2 if nodes.get("k") is not None else -1

    def size(d: int):
        if not isinstance(shape[d], torch.SymInt):
            return int(shape[d])
        src, dim = (k, k_len_dim) if d == len(shape) - 1 else (nodes["q"], d)
        return emit(A.sym_size.int, (src, dim))

    if user.target == A.sym_size.int:
        d = user.args[1] % len(shape)
        new = size(d)
        if isinstance(new, int):   # a static size: fold it into the users
            for u in list(user.users):
                u.args = tuple(new if a is user else a for a in u.args)
            return
    else:   # expand_as(mask, node)
        new = emit(A.expand.default, (user.args[0], [size(d) for d in range(len(shape))]))
    user.replace_all_uses_with(new)


def _replace(gm: fx.GraphModule, site: AttentionSite, strategy) -> None:
    nodes = site.nodes
    out = nodes["out"]
    fake_mode = detect_fake_mode([val(nodes["q"])])
    with gm.graph.inserting_before(out):
        emit = _emitter(gm, fake_mode)
        q, v = nodes["q"], nodes["v"]
        k = nodes["k"] if nodes.get("k") is not None else emit(A.transpose.int, (nodes["kT"], -2, -1))
        heads_3d = None
        B, H = site.q_shape[0], site.q_shape[1]
        if "heads_3d" in nodes:  # [B*H, N, D] -> [B, H, N, D]; index b * H + h
            q, k, v = (emit(A.reshape.default, (t, [B, H] + list(val(t).shape[1:]))) for t in (q, k, v))
        if nodes.get("merged_terms"):
            heads_3d = (B, H)
        for t, divides in nodes.get("tensor_scales", []):   # s * t == (q * t) . k: the op scales q, autograd sees it
            if isinstance(val(t), torch.Tensor):   # else a symbolic number, which multiplies as it is
                t = emit(A.reshape.default, (t, []))
                if val(t).dtype != val(q).dtype:
                    t = emit(A.to.dtype, (t, val(q).dtype))
            q = emit(A.div.Tensor if divides else A.mul.Tensor, (q, t))
        call = SiteCall(q, k, v, site.is_causal, float(site.scale), site.dropout_p,
                        mask=lambda: _site_mask(emit, site, heads_3d), key_keep=lambda: _key_keep(emit, site))
        emitted = strategy.emit_call(emit, site, call)
        new = _empty_rows(emit, site, emitted, call)
        if "heads_3d" in nodes:
            new = emit(A.reshape.default, (new, list(val(out).shape)))
        if val(new).dtype != val(out).dtype:
            new = emit(A.to.dtype, (new, val(out).dtype))
    new.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
    new.meta["dilate_compiler_site"] = site.name
    out.replace_all_uses_with(new)
    for user, node in nodes.get("shape_users", []):
        with gm.graph.inserting_before(user):
            _give_shape(_emitter(gm, fake_mode), user, node, nodes)
    for n in nodes["remove"]:
        for u in list(n.users):
            if u.target in IGNORED_USERS and not u.users:
                gm.graph.erase_node(u)
        if not n.users:
            gm.graph.erase_node(n)
