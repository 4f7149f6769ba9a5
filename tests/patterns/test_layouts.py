"""Block layouts built from patterns (interval arithmetic on blocks) against brute-force token masks written
here from each pattern's definition."""

import math

import pytest
import torch

from dilate_compiler import patterns as P
from dilate_compiler.hilbert import curve_order
from dilate_compiler.patterns import layouts

N, BS, H = 77, 16, 4  # ragged: 77 = 4 * 16 + 13


def grid(n=N):
    return torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)


def brute(name, n=N, bs=BS):
    p, j = grid(n)
    return {
        "local2": (p // bs - j // bs).abs() < 2,
        "window20": (p - j).abs() < 20,
        "window1": p == j,
        "dilated23": ((p // bs - j // bs) % 2 == 0) | ((p // bs - j // bs) % 3 == 0),
        "global5": (p < 5) | (j < 5),
        "global40": (p < 40) | (j < 40),
    }[name]


PATTERNS = {
    "local2": P.local(2), "window20": P.sliding_window(20), "window1": P.sliding_window(1),
    "dilated23": P.dilated((2, 3)), "global5": P.global_tokens(5), "global40": P.global_tokens(40),
}


def expand_blocks(block_mask, n=N, bs=BS):
    return block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :n, :n]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_layout_equals_brute_force(name, causal):
    layout = PATTERNS[name].layout(N, BS, num_heads=H, is_causal=causal)
    want = brute(name)
    if causal:
        p, j = grid()
        want = want & (j <= p)
    assert torch.equal(layout.token_mask()[0], want)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_union_and_intersection(causal):
    p, j = grid()
    causal_mask = (j <= p) if causal else torch.ones(N, N, dtype=torch.bool)
    u = (P.sliding_window(20) | P.global_tokens(5)).layout(N, BS, is_causal=causal)
    assert torch.equal(u.token_mask()[0], (brute("window20") | brute("global5")) & causal_mask)
    i = (P.local(2) & P.sliding_window(20)).layout(N, BS, is_causal=causal)
    assert torch.equal(i.token_mask()[0], brute("local2") & brute("window20") & causal_mask)
    mixed = P.intersection(P.union(P.dilated((2, 3)), P.sliding_window(1)), P.global_tokens(40))
    got = mixed.layout(N, BS, is_causal=causal).token_mask()[0]
    assert torch.equal(got, (brute("dilated23") | brute("window1")) & brute("global40") & causal_mask)


def test_random_is_deterministic_per_seed_and_per_head():
    a = P.random(2, seed=3).layout(N, BS, num_heads=H)
    b = P.random(2, seed=3).layout(N, BS, num_heads=H)
    c = P.random(2, seed=4).layout(N, BS, num_heads=H)
    assert torch.equal(a.state, b.state) and not torch.equal(a.state, c.state)
    assert ((a.state > 0).sum(-1) == 2).all()
    ph = P.random(1, seed=0, per_head=True).layout(N, BS, num_heads=H)
    assert ph.num_heads == H and not all(torch.equal(ph.state[0], ph.state[h]) for h in range(1, H))
    # token level: the drawn blocks, expanded
    assert torch.equal(ph.token_mask(), expand_blocks(ph.state > 0))


def test_from_layout_per_head_and_full_blocks_skip_masking():
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(H, 5, 5, generator=g) < 0.4
    lay = P.from_layout(blocks).layout(N, BS, num_heads=H)
    assert torch.equal(lay.token_mask(), expand_blocks(blocks))
    # interior blocks are full (no masking); only the ragged last row/column is partial
    interior = lay.state[:, :4, :4]
    assert ((interior == P.FULL) == blocks[:, :4, :4]).all() and (interior != P.PARTIAL).all()
    causal = P.from_layout(blocks).layout(N, BS, num_heads=H, is_causal=True)
    diag = torch.arange(5)
    assert (causal.state[:, diag, diag] != P.FULL).all()                  # diagonal blocks are masked
    assert (torch.triu(causal.state.int(), 1) == 0).all()                  # blocks above are skipped


def test_sliding_window_layout_is_banded_and_cheap():
    lay = P.sliding_window(4096).layout(262144, 128, is_causal=True)
    assert lay.kv_idx.shape == (1, 2048, 33)                              # 32 full + 1 partial diagonal block
    assert lay.kv_count[0, 100].tolist() == [2, 33]                        # window edge and diagonal partial


def neighbourhood_brute(grid, radius, order=None, extra=0):
    """Token mask of a grid neighbourhood from coordinates (cells in ``order``, ``extra`` tokens first)."""
    from dilate_compiler.hilbert import coordinates

    c = coordinates(grid)
    if order is not None:
        c = c[order]
    close = ((c.view(-1, 1, len(grid)) - c.view(1, -1, len(grid))).abs() <= torch.tensor(radius)).all(-1)
    n = extra + close.shape[0]
    out = torch.zeros(n, n, dtype=torch.bool)
    out[extra:, extra:] = close
    return out


@pytest.mark.parametrize("grid,radius,bs,extra", [((7, 13), (1, 1), 16, 0), ((14, 14), (2, 2), 32, 1),
                                                  ((4, 6, 5), (1, 1, 2), 16, 2)], ids=str)
@pytest.mark.parametrize("curve", [None, "hilbert", "zorder"])
def test_neighborhood_layout_equals_brute_force(grid, radius, bs, extra, curve):
    from dilate_compiler.hilbert import curve_order

    pattern = P.neighborhood(grid, radius) | P.global_tokens(extra) if extra else P.neighborhood(grid, radius)
    order = None
    if curve is not None:
        order = curve_order(grid, curve)
        pattern = pattern.reordered(P.Grid(grid, order))
    want = neighbourhood_brute(grid, radius, order, extra)
    if extra:
        want[:extra, :] = True
        want[:, :extra] = True
    n = want.shape[0]
    assert torch.equal(pattern.token_mask(n, bs)[0], want)
    lay = pattern.layout(n, bs)
    assert torch.equal(lay.token_mask()[0], want)
    # coordinate boxes are conservative: an empty block has no linked pair, a full block links every pair
    nb = lay.num_blocks
    blocks = want.new_zeros(nb * bs, nb * bs)
    blocks[:n, :n] = want
    per_block = blocks.view(nb, bs, nb, bs)
    assert not per_block.any(3).any(1)[lay.state[0] == P.EMPTY].any()
    assert per_block.all(3).all(1)[lay.state[0] == P.FULL].all()


@pytest.mark.parametrize("grid", [(4, 4), (2, 2, 4)], ids=str)
def test_tokens_before_the_grid_attend_only_themselves(grid):
    """A token before the grid is no cell: it links only itself, and no cell links it (on 2-D grids too)."""
    n = 2 + math.prod(grid)
    for pattern in (P.neighborhood(grid, 1), P.neighborhood(grid, 1).reordered(P.Grid(grid, curve_order(grid)))):
        mask = pattern.token_mask(n, 4)[0]
        assert mask[:2].nonzero().tolist() == [[0, 0], [1, 1]]
        assert mask[:, :2].nonzero().tolist() == [[0, 0], [1, 1]]
        assert torch.equal(pattern.layout(n, 4).token_mask()[0], mask)


def test_hilbert_order_makes_neighbourhood_blocks_dense():
    from dilate_compiler.hilbert import curve_order

    grid = (64, 64)   # radius 8 against 16-token blocks: the published case in miniature
    row = P.neighborhood(grid, 8).layout(4096, 16)
    hil = P.neighborhood(grid, 8).reordered(P.Grid(grid, curve_order(grid))).layout(4096, 16)
    assert (hil.state > 0).float().mean() < 0.75 * (row.state > 0).float().mean()
    assert (hil.state == P.FULL).sum() > 2 * (row.state == P.FULL).sum()


def test_schedule_orders_lists_without_changing_the_mask():
    from dilate_compiler.hilbert import curve_order, inverse

    pattern = P.local(3) | P.global_tokens(20)
    row = pattern.layout(200, 16, is_causal=True)
    hil = pattern.layout(200, 16, is_causal=True, schedule="hilbert")
    assert torch.equal(row.token_mask(), hil.token_mask())
    assert torch.equal(row.state, hil.state)
    rank = inverse(curve_order((row.num_blocks,) * 2)).view(row.num_blocks, row.num_blocks)
    for i in range(row.num_blocks):
        n_part, n_tot = hil.kv_count[0, i].tolist()
        for lo, hi in ((0, n_part), (n_part, n_tot)):
            r = rank[i, hil.kv_idx[0, i, lo:hi].long()]
            assert torch.equal(r, r.sort().values)
    with pytest.raises(ValueError, match="schedule"):
        pattern.layout(200, 16, schedule="snake")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lists_by_prefix_sums_equal_the_sorted_lists(seed):
    """The row-order lists (prefix sums and a scatter) equal sorting each row by (kind, column), slot for slot,
    including the empty columns past each row's count; rows of every kind, per-head states, and the transpose."""
    g = torch.Generator().manual_seed(seed)
    heads, nb = 3, 37
    state = torch.randint(0, 3, (heads, nb, nb), generator=g).to(torch.int8)
    state[0, 5] = P.EMPTY                                              # an empty row
    state[1, 7] = P.FULL
    state[2, 9] = P.PARTIAL
    bits = torch.randint(1, 8, (heads, nb, nb), generator=g, dtype=torch.int32) * (state == P.PARTIAL)
    by_column = torch.arange(nb).expand(nb, nb)
    for st, bt in ((state, bits), (state.transpose(1, 2), bits.transpose(1, 2))):
        got = P.block_lists(st, bt)
        want = P.block_lists(st, bt, rank=by_column)                        # the sort, ranked by column index
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        count, idx, _ = got
        assert count[0, 5].tolist() == [0, 0] if st is state else True
        for h, i in ((0, 0), (1, 7), (2, 9)):
            n_part, n_tot = count[h, i].tolist()
            assert (st[h, i, idx[h, i, :n_part].long()] == P.PARTIAL).all()
            assert (st[h, i, idx[h, i, n_part:n_tot].long()] == P.FULL).all()


GPU_LIST_PATTERNS = {
    "window20": P.sliding_window(20),
    "local3|global5": P.local(3) | P.global_tokens(5),
    "dilated23&window40": P.dilated((2, 3)) & P.sliding_window(40),
    "local2|dilated(4)|global40": P.local(2) | P.dilated((4,)) | P.global_tokens(40),
}


@pytest.mark.slow
@pytest.mark.parametrize("name,causal,n", [(name, causal, 77) for name in sorted(GPU_LIST_PATTERNS)
                                            for causal in (False, True)]
                         + [("window20", True, 160), ("local3|global5", False, 160)])
def test_list_kernels_equal_the_pytorch_build(name, causal, n):
    """``build_layout``'s GPU path (``lowering.block_sparse.layout_triton``, run here under the interpreter on CPU
    tensors) gives the PyTorch build's state, counts, lists and bits, slot for slot; chunks of 4 columns make each
    row's running counts cross chunks. Ragged (77) and whole (160) blocks."""
    from dilate_compiler.lowering.block_sparse.layout_triton import build_lists

    pattern = GPU_LIST_PATTERNS[name]
    want = pattern.layout(n, 8, is_causal=causal)
    assert layouts._lists_on_gpu(pattern.terms, "cuda", "row")
    nb = -(-n // 8)
    diag = layouts._diagonals(pattern.terms, nb)
    got = build_lists(P.term_table(pattern.terms), diag, n, 8, causal, chunk=4)
    names = ("state", "kv_count", "kv_idx", "kv_bits", "q_count", "q_idx", "q_bits")
    for field_name, tensor in zip(names, got):
        assert torch.equal(tensor, getattr(want, field_name)), field_name


def test_list_kernels_serve_diagonal_block_sets_only():
    """Random and per-head block sets, grid terms and the Hilbert schedule keep the PyTorch build."""
    assert not layouts._lists_on_gpu((P.local(2) | P.random(2, seed=0)).terms, "cuda", "row")
    assert not layouts._lists_on_gpu(P.neighborhood((4, 4), 1).terms, "cuda", "row")
    assert not layouts._lists_on_gpu(P.local(2).terms, "cuda", "hilbert")
    assert not layouts._lists_on_gpu(P.local(2).terms, "cpu", "row")
    assert layouts._diagonals(P.sliding_window(8).terms, 4) is None
    assert layouts._diagonals(P.local(2).terms, 4)[1].tolist() == [0, 0, 1, 1, 1, 0, 0]
