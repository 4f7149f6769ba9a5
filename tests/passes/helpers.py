import torch

import dilate_compiler as dc

DENSE = dc.Dilated((4096,), (1,))  # dense-equivalent for N <= 4096
OP = torch.ops.dilate_compiler.dilated_attention_forward.default
OPS = {dc.Dilated: OP, dc.BlockSparse: torch.ops.dilate_compiler.block_sparse_attention_forward.default}
A = torch.ops.aten
ATTENTION_OPS = {A.softmax.int, A._softmax.default, A.scaled_dot_product_attention.default}


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def check_rewrite(model, args, n_sites, *, strategy=DENSE, grads=True, kwargs=None, tol=1e-5, allow_skipped=False):
    """Rewrite, assert the graph holds the op n_sites times and no attention is left (unless ``allow_skipped``:
    skipped sites keep theirs), and compare outputs (and gradients of every float input) with the model's own."""
    kwargs = kwargs or {}
    res = dc.rewrite(model, args, strategy, example_kwargs=kwargs)
    assert len(res.report.rewritten) == n_sites, str(res.report)
    t = targets(res.module)
    assert t.count(OPS.get(type(strategy), OP)) == n_sites
    if not allow_skipped:
        assert not res.report.skipped and not (set(t) & ATTENTION_OPS), t
    if not grads:
        with torch.no_grad():
            torch.testing.assert_close(res.module(*args, **kwargs), model(*args, **kwargs), atol=tol, rtol=tol)
        return res
    ins = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    out, ref = res.module(*ins, **kwargs), model(*ins, **kwargs)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    floats = [a for a in ins if a.is_floating_point()]
    g1 = torch.autograd.grad(out.sum(), floats)
    g2 = torch.autograd.grad(ref.sum(), floats)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    return res
