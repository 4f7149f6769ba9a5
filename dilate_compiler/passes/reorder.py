"""Reorder once: move the token permutations ``dc.Hilbert`` puts around each attention site out to the edges of
the region of the graph that commutes with them, and grid inference from a conv patch embedding.

After the rewrite, every Hilbert site reads ``index_select(x, 2, perm)`` for q, k, v and returns
``index_select(out, 2, inv)``. A permutation of the tokens commutes with every op that treats tokens alike and
independently: elementwise ops and broadcasts against token-free tensors (weights, biases, scalars), linear
layers and matmuls against weights, norms and softmaxes over other dims, reshapes/transposes that keep the
token dim whole, splits along other dims. ``hoist_reorders`` grows the *region* of nodes that can be computed
in curve order instead, starting from the sites, through such ops, both upwards and downwards, and stops at
everything else: the patch-embedding convolution, concatenation with a CLS token, adding a position
embedding (it would need permuting too; the pass weighs it below), RoPE-style slicing along tokens, token
reductions that aren't permutation-invariant, graph inputs and outputs. Then it shrinks the region while that
removes gathers (e.g. it leaves ``cat(...) + pos_embed`` outside: one gather after the add beats one on each
operand), and finally puts one gather on each edge entering the region and one inverse gather on each value
leaving it (none for token reductions such as a mean over tokens, or for selecting a token the permutation
keeps in place, like a CLS token). In a ViT that is one gather after the embeddings and one at the end,
whatever the depth.

Equivariance is decided per op from the op and the tensors' shapes (``meta["val"]``); ops not in the table
are boundaries, so an unknown op costs a gather, never correctness.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx

from ..patterns import MAX_EXTRA_TOKENS
from .find_attention import IGNORED_USERS, val

A = torch.ops.aten
REORDER_TAG = "dilate_compiler_reorder"   # node.meta key of the gathers dc.Hilbert emits: ("to"|"from", key, reorder)

# Ops acting on each element alone (broadcasting their tensor operands).
ELEMENTWISE = {
    A.add.Tensor, A.add.Scalar, A.sub.Tensor, A.sub.Scalar, A.mul.Tensor, A.mul.Scalar, A.div.Tensor,
    A.div.Scalar, A.pow.Tensor_Scalar, A.pow.Tensor_Tensor, A.neg.default, A.relu.default, A.gelu.default,
    A.silu.default, A.sigmoid.default, A.tanh.default, A.exp.default, A.log.default, A.rsqrt.default,
    A.sqrt.default, A.erf.default, A.abs.default, A.reciprocal.default, A.square.default, A.clamp.default,
    A.maximum.default, A.minimum.default, A.where.self, A.where.ScalarSelf, A.where.ScalarOther,
    A.masked_fill.Scalar, A.masked_fill.Tensor, A.dropout.default, A.clone.default, A.contiguous.default,
    A.alias.default, A.detach.default, A._to_copy.default, A.to.dtype, A.to.dtype_layout, A.to.device,
    A.hardtanh.default, A.leaky_relu.default, A.softplus.default, A.mish.default, A.lerp.Scalar,
    A.sin.default, A.cos.default, A.relu_.default, A.gelu_.default, A.silu_.default, A.add_.Tensor,
    A.mul_.Tensor, A.new_ones.default, A.ones_like.default, A.zeros_like.default, A.empty_like.default,
}
NORMS = {A.layer_norm.default, A.rms_norm.default}
DIM_OPS = {A._softmax.default, A.softmax.int, A._log_softmax.default, A.log_softmax.int}
REDUCTIONS = {A.mean.dim, A.sum.dim_IntList, A.amax.default, A.amin.default}
SPLITS = {A.split.Tensor, A.split_with_sizes.default, A.chunk.default, A.unbind.int}
VIEWS = {A.view.default, A.reshape.default, A._unsafe_view.default, A.flatten.using_ints, A.unflatten.int}


def _shape(n) -> Optional[tuple]:
    """The node's output shape (a split's: that of its first piece)."""
    v = val(n)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _tensor_inputs(n: fx.Node) -> list:
    return [a for a in n.all_input_nodes if isinstance(val(a), torch.Tensor)]


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _aligned(u: fx.Node, lab: int, out_ndim: int, length: int):
    """The dim of broadcast operand ``u`` aligned with output dim ``lab``: None when ``u`` doesn't carry the
    tokens there (absent or size 1)."""
    shape = _shape(u)
    d = lab - (out_ndim - len(shape))
    if d < 0 or shape[d] == 1:
        return None
    return d if shape[d] == length else False


def _view_dim(src: tuple, dst: tuple, d: int):
    """The dim of ``dst`` that holds dim ``d`` of ``src`` whole under a row-major reshape, or None."""
    before = math.prod(src[:d])
    acc = 1
    for e, size in enumerate(dst):
        if acc == before and size == src[d]:
            return e
        acc *= size
    return None


def in_dims(n: fx.Node, lab: int, length: int):
    """For node ``n`` computed with its output's dim ``lab`` in curve order: ``{input: dim or None}`` saying in
    which dim each tensor input must be in curve order (None: that input carries no tokens), or None when
    ``n`` does not commute with the permutation."""
    out = _shape(n)
    if n.target is operator.getitem:
        src = n.args[0]
        if src.op == "call_function" and src.target in SPLITS:
            return {src: lab}
        return None
    if out is None or lab >= len(out) or out[lab] != length:
        return None
    ins = _tensor_inputs(n)
    t = n.target
    if t in ELEMENTWISE:
        dims = {}
        for u in ins:
            d = _aligned(u, lab, len(out), length)
            if d is False:
                return None
            dims[u] = d
        return dims
    x = n.args[0]
    xs = _shape(x)
    if t in NORMS:
        if lab >= len(out) - len(n.args[1]):
            return None
        return {u: (lab if u is x else None) for u in ins}
    if t in DIM_OPS:
        if _norm_dim(n.args[1], len(out)) == lab:
            return None
        return {x: lab}
    if t is A.linear.default:
        if lab == len(out) - 1:
            return None
        return {u: (lab if u is x else None) for u in ins}
    if t in (A.matmul.default, A.mm.default, A.bmm.default):
        y = n.args[1]
        ys = _shape(y)
        if lab != len(out) - 2 or len(ys) < 2 or ys[-2] == length or ys[-1] == length:
            return None   # tokens only as x's rows; y must be token-free (weights)
        return {x: len(xs) - 2, y: None}
    if t in VIEWS:
        d = _view_dim(out, xs, lab)
        return None if d is None else {x: d}
    if t is A.transpose.int:
        a, b = (_norm_dim(d, len(out)) for d in n.args[1:3])
        return {x: b if lab == a else a if lab == b else lab}
    if t is A.permute.default:
        return {x: _norm_dim(n.args[1][lab], len(out))}
    if t is A.t.default:
        return {x: 1 - lab}
    if t is A.unsqueeze.default:
        d = _norm_dim(n.args[1], len(out))
        return None if d == lab else {x: lab - (1 if d < lab else 0)}
    if t in (A.squeeze.dim, A.squeeze.dims):
        d = _view_dim(out, xs, lab)
        return None if d is None else {x: d}
    if t is A.expand.default:
        d = lab - (len(out) - len(xs))
        return None if d < 0 or xs[d] != length else {x: d}
    if t in SPLITS or t in (A.select.int, A.slice.Tensor):
        if t in (A.split.Tensor, A.split_with_sizes.default, A.chunk.default):
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        else:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        dim = _norm_dim(dim, len(xs))
        if t in (A.unbind.int, A.select.int):   # drop ``dim``: never the token dim of the output
            return {x: lab + (1 if dim <= lab else 0)}
        return None if dim == lab else {x: lab}   # split / slice along the tokens reorders or cuts them
    return None


def _label_from_input(w: fx.Node, u: fx.Node, d: int, length: int):
    """A label for user ``w`` under which its input ``u`` is in curve order along ``d``, or None."""
    shape = _shape(w)
    if w.target is operator.getitem:
        return d if in_dims(w, d, length) else None
    if shape is None:
        return None
    for lab in range(len(shape)):
        if shape[lab] != length:
            continue
        dims = in_dims(w, lab, length)
        if dims is not None and dims.get(u) == d:
            return lab
    return None


def _invariant_use(w: fx.Node, n: fx.Node, lab: int, fixed: int) -> bool:
    """True when user ``w`` of ``n`` gives the same result whatever the token order: a reduction over the token
    dim, or selecting a token the permutation keeps in place (one of the first ``fixed``)."""
    if w.target in IGNORED_USERS:
        return True
    if w.target in REDUCTIONS and w.args[0] is n:
        dims = w.args[1] if isinstance(w.args[1], (list, tuple)) else [w.args[1]]
        return lab in [_norm_dim(d, len(_shape(n))) for d in dims]
    if w.target is A.select.int and w.args[0] is n:
        index = w.args[2]
        return _norm_dim(w.args[1], len(_shape(n))) == lab and isinstance(index, int) and 0 <= index < fixed
    return False


def hoist_reorders(gm: fx.GraphModule) -> int:
    """Run the pass on ``gm`` in place (the gathers of ``dc.Hilbert(reorder="once")``); returns the number of
    gathers left. Graphs whose sites use different permutations are left as they are."""
    tagged = [n for n in gm.graph.nodes if REORDER_TAG in n.meta and n.meta[REORDER_TAG][2] == "once"]
    if not tagged:
        return 0
    keys = {n.meta[REORDER_TAG][1] for n in tagged}
    if len(keys) != 1:
        return len(tagged)
    to_nodes = [n for n in tagged if n.meta[REORDER_TAG][0] == "to"]
    from_nodes = [n for n in tagged if n.meta[REORDER_TAG][0] == "from"]
    perm_node, inv_node = to_nodes[0].args[2], from_nodes[0].args[2]
    length = _shape(perm_node)[0]
    fixed = _fixed_prefix(gm, perm_node)
    core = _core(to_nodes, from_nodes)

    # label[n]: n's output dim in curve order, for nodes of the region. Seeds: the to-gathers (their inputs
    # may join) and the from-gathers (their users may join), which stand for identity on the region's values.
    label = {n: n.args[1] for n in to_nodes + from_nodes}
    seeds = set(label)
    queue = list(label)
    while queue:
        n = queue.pop()
        lab = label[n]
        if n in seeds:
            ins = {n.args[0]: lab} if n.meta[REORDER_TAG][0] == "to" else {}
        else:
            ins = in_dims(n, lab, length) or {}
        for u, d in ins.items():
            if d is None or u in label or u in core or not _growable(u):
                continue
            if in_dims(u, d, length) is not None:
                label[u] = d
                queue.append(u)
        if n in seeds and n.meta[REORDER_TAG][0] == "to":
            continue   # a to-gather's users are the site's core
        for w in n.users:
            if w in label or w in core or not _growable(w) or _invariant_use(w, n, lab, fixed):
                continue
            lw = _label_from_input(w, n, lab, length)
            if lw is not None:
                label[w] = lw
                queue.append(w)

    _shrink(label, seeds, core, length, fixed)
    return _materialise(gm, label, seeds, core, perm_node, inv_node, length, fixed)


def _growable(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target not in IGNORED_USERS


def _core(to_nodes, from_nodes) -> set:
    """Nodes between the to-gathers and the from-gathers: the sites' own ops (fixed in curve order)."""
    stop = set(from_nodes)
    core, queue = set(), [u for t in to_nodes for u in t.users]
    while queue:
        n = queue.pop()
        if n in core or n in stop:
            continue
        core.add(n)
        queue.extend(n.users)
    return core


def _fixed_prefix(gm, perm_node) -> int:
    perm = getattr(gm, perm_node.target)
    fixed = 0
    while fixed < perm.numel() and int(perm[fixed]) == fixed:
        fixed += 1
    return fixed


def _needs(label, seeds, core, length, fixed):
    """The gathers the region implies: ``(to, from)``: sets of (node, dim) to permute / to restore."""
    to, back = set(), set()
    for n, lab in label.items():
        if n in seeds:
            if n.meta[REORDER_TAG][0] == "to":
                if n.args[0] not in label:
                    to.add((n.args[0], lab))
            elif any(w not in label and w not in core and not _invariant_use(w, n, lab, fixed) for w in n.users):
                back.add((n, lab))
            continue
        for u, d in (in_dims(n, lab, length) or {}).items():
            if d is not None and u not in label:
                to.add((u, d))
        if any(w not in label and not _invariant_use(w, n, lab, fixed) for w in n.users):
            back.add((n, lab))
    return to, back


def _shrink(label, seeds, core, length, fixed) -> None:
    """Drop parts of the region while that lowers the number of gathers: a node that reads values from outside,
    together with the region nodes that only feed it (e.g. ``transpose(flatten(conv)) + pos_embed``)."""
    cost = sum(map(len, _needs(label, seeds, core, length, fixed)))
    improved = True
    while improved:
        improved = False
        to, _ = _needs(label, seeds, core, length, fixed)
        candidates = {w for (u, _) in to for w in u.users if w in label and w not in seeds}
        for n in candidates:
            drop = _feeding(n, label, seeds)
            saved = {m: label.pop(m) for m in drop}
            new = sum(map(len, _needs(label, seeds, core, length, fixed)))
            if new < cost:
                cost, improved = new, True
                break
            label.update(saved)


def _feeding(n, label, seeds) -> set:
    """``n`` and the region nodes upstream of it whose region users all lie in that set."""
    drop, queue = {n}, list(n.all_input_nodes)
    while queue:
        u = queue.pop()
        if u in drop or u not in label or u in seeds:
            continue
        if all(w in drop or w not in label for w in u.users):
            drop.add(u)
            queue.extend(u.all_input_nodes)
    return drop


def _materialise(gm, label, seeds, core, perm_node, inv_node, length, fixed) -> int:
    """Rewire the graph for the region: gathers on entering and leaving edges, seeds dissolved."""
    from torch._guards import detect_fake_mode

    graph = gm.graph
    fake_mode = detect_fake_mode([val(perm_node)])
    to, back = _needs(label, seeds, core, length, fixed)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # the index tensors, defined ahead of every gather (the sites' own get_attr nodes sit inside the graph)
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        perm_node, inv_node = (_refetch(graph, n) for n in (perm_node, inv_node))

    def gather(x, dim, index):
        where = placeholders[-1] if x.op == "placeholder" else x
        with graph.inserting_after(where):
            g = graph.call_function(A.index_select.default, (x, dim, index))
        with fake_mode:
            g.meta["val"] = torch.index_select(val(x), dim, val(index))
        return g

    # curve-order versions of the values entering the region (a site's own to-gather is reused)
    made = {}
    for n in seeds:
        if n in label and n.meta[REORDER_TAG][0] == "to" and n.args[0] not in label:
            made.setdefault((n.args[0], label[n]), n)
    for u, d in to:
        if (u, d) not in made:
            made[(u, d)] = gather(u, d, perm_node)
    # natural-order versions of the values leaving it (a site's own from-gather stays for its outside users)
    restored = {n: gather(n, lab, inv_node) for n, lab in back if n not in seeds}
    for n, lab in list(label.items()):
        if n in seeds:
            continue
        for u, d in (in_dims(n, lab, length) or {}).items():
            if d is not None and u not in label:
                n.replace_input_with(u, made[(u, d)])
        if n in restored:
            for w in list(n.users):
                if w not in label and w is not restored[n] and not _invariant_use(w, n, lab, fixed):
                    w.replace_input_with(n, restored[n])
    for n in [s for s in seeds if s in label]:
        if n.meta[REORDER_TAG][0] == "to":
            x = n.args[0]
            if x in label:
                n.replace_all_uses_with(x)
        else:
            for w in list(n.users):
                if w in label or _invariant_use(w, n, label[n], fixed):
                    w.replace_input_with(n, n.args[0])
        if not n.users:
            graph.erase_node(n)
    targets = {perm_node.target, inv_node.target}
    return sum(1 for n in graph.nodes if n.target is A.index_select.default and n.args[2].op == "get_attr"
               and n.args[2].target in targets)


def _refetch(graph, node):
    fresh = graph.get_attr(node.target)
    fresh.meta["val"] = val(node)
    return fresh


# --- grid inference -------------------------------------------------------------------------------------------

CONVS = {A.conv2d.default, A.conv3d.default, A.convolution.default}


def infer_grid(graph: fx.Graph, seq_len: int):
    """``(grid, "")`` from a patch embedding ``conv -> flatten(2) -> transpose(1, 2)`` whose cells, possibly
    after a few extra tokens, make up the ``seq_len`` tokens; ``(None, reason)`` otherwise."""
    found = set()
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in CONVS:
            continue
        shape = _shape(n)
        if shape is None or len(shape) not in (4, 5):
            continue
        grid = tuple(int(s) for s in shape[2:])
        cells = math.prod(grid)
        if not 0 <= seq_len - cells <= MAX_EXTRA_TOKENS:
            continue
        for flat in n.users:
            fs = _shape(flat)
            if flat.target in VIEWS and fs is not None and tuple(fs) == tuple(shape[:2]) + (cells,):
                if any(u.target is A.transpose.int and _shape(u) == (shape[0], cells, shape[1])
                       for u in flat.users):
                    found.add(grid)
    if len(found) == 1:
        return found.pop(), ""
    if not found:
        return None, (f"no conv patch embedding (conv -> flatten -> transpose) in the graph makes up the "
                      f"{seq_len} tokens")
    return None, f"several patch embeddings fit ({sorted(found)})"
