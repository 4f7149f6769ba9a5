"""Triton kernels that build a block layout's lists on the GPU: two launches and one host sync.

``patterns.build_layout`` classifies every (query block, key block) pair by interval arithmetic on the blocks'
ranges of ``p``, ``j`` and ``p - j`` and turns the classes into index lists. In PyTorch that is ~120 small
operations over ``nb x nb`` tensors, so on a GPU the build costs milliseconds of launch overhead whatever N is.
Here one program owns one list row (a query block's key blocks, or, for the transposed lists, a key block's
query blocks) and walks its ``nb`` columns in chunks, recomputing each pair's class from the term table:

1. ``_layout_count_kernel``: each row's (partial, total) counts, and the ``state`` table;
2. the host reads the two list widths (the longest row of each direction: the one sync);
3. ``_layout_list_kernel``: each column's slot is a running count (partials first, then fulls, then the empty
   columns that fill the width), as in ``patterns.block_lists``, written with one scattered store per chunk.

It serves patterns whose block sets depend on ``I - J`` only (``local``, ``dilated``: a per-term table over the
``2 nb - 1`` diagonals), without grid terms, with one layout head and the row schedule; the others build in
PyTorch. The lists equal PyTorch's slot for slot. The kernels launch directly (never inside a traced graph:
``build_layout`` takes the PyTorch path while compiling).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common.launch import launch_device

CHUNK = 1024


@triton.jit
def _pair_class(Terms, Diag, I, J, N, NB, BS, NUM_TERMS: tl.constexpr, COLUMNS: tl.constexpr,
                DIAG_TERMS: tl.constexpr, IS_CAUSAL: tl.constexpr, RAGGED: tl.constexpr):
    """(full, bits) of block pairs ``(I, J)`` (vectors): as ``patterns.build_layout``. Term row ``t`` holds the
    inclusive intervals on ``(p - j, p, j)`` in its first 6 of ``COLUMNS`` ints; unbounded ends are +-2**30, beyond
    any position."""
    p_lo = I * BS
    p_hi = tl.minimum(p_lo + BS - 1, N - 1)
    j_lo = J * BS
    j_hi = tl.minimum(j_lo + BS - 1, N - 1)
    d_lo = p_lo - j_hi
    d_hi = p_hi - j_lo
    full = I < 0
    bits = I * 0
    for t in tl.static_range(1, NUM_TERMS):
        row = Terms + t * COLUMNS
        dl = tl.load(row)
        dh = tl.load(row + 1)
        pl = tl.load(row + 2)
        ph = tl.load(row + 3)
        jl = tl.load(row + 4)
        jh = tl.load(row + 5)
        possible = (d_hi >= dl) & (d_lo <= dh) & (p_hi >= pl) & (p_lo <= ph) & (j_hi >= jl) & (j_lo <= jh)
        always = (d_lo >= dl) & (d_hi <= dh) & (p_lo >= pl) & (p_hi <= ph) & (j_lo >= jl) & (j_hi <= jh)
        if ((DIAG_TERMS >> t) & 1) != 0:
            on = tl.load(Diag + t * (2 * NB - 1) + (I - J + NB - 1), mask=(J < NB) & (I < NB), other=0)
            possible = possible & (on != 0)
        full = full | (possible & always)
        bits = bits | ((possible & ~always).to(tl.int32) << t)
    edge = I < 0
    if IS_CAUSAL:
        above = j_lo > p_hi
        full = full & ~above
        bits = tl.where(above, 0, bits)
        edge = j_hi > p_lo
    if RAGGED:
        edge = edge | (I == NB - 1) | (J == NB - 1)
    demote = full & edge
    bits = tl.where(demote, bits | 1, bits)
    full = full & ~demote
    return full, tl.where(full, 0, bits)


@triton.jit
def _chunk(Terms, Diag, row, tr, c0, N, NB, BS, NUM_TERMS: tl.constexpr, COLUMNS: tl.constexpr,
           DIAG_TERMS: tl.constexpr, IS_CAUSAL: tl.constexpr, RAGGED: tl.constexpr, CHUNK: tl.constexpr):
    """Columns ``c0 ..`` of list row ``row`` (direction ``tr``: 0 the key blocks of query block ``row``, 1 the
    query blocks of key block ``row``): ``col``, ``inside`` (< NB), and the pairs' ``full``, ``part``, ``bits``
    (full and partial false past NB)."""
    col = c0 + tl.arange(0, CHUNK)
    inside = col < NB
    rows = row + col * 0
    I = tl.where(tr == 0, rows, col)
    J = tl.where(tr == 0, col, rows)
    full, bits = _pair_class(Terms, Diag, I, J, N, NB, BS, NUM_TERMS, COLUMNS, DIAG_TERMS, IS_CAUSAL, RAGGED)
    return col, inside, full & inside, (bits != 0) & inside, bits


@triton.jit
def _layout_count_kernel(Terms, Diag, State, Count, N, NB, BS, NUM_TERMS: tl.constexpr, COLUMNS: tl.constexpr,
                         DIAG_TERMS: tl.constexpr, IS_CAUSAL: tl.constexpr, RAGGED: tl.constexpr,
                         CHUNK: tl.constexpr):
    row = tl.program_id(0)
    tr = tl.program_id(1)
    n_part = 0
    n_full = 0
    for c0 in range(0, NB, CHUNK):
        col, inside, full, part, bits = _chunk(Terms, Diag, row, tr, c0, N, NB, BS, NUM_TERMS, COLUMNS, DIAG_TERMS,
                                               IS_CAUSAL, RAGGED, CHUNK)
        n_part += tl.sum(part.to(tl.int32), 0)
        n_full += tl.sum(full.to(tl.int32), 0)
        state = tl.where(full, 2, tl.where(part, 1, 0)).to(tl.int8)
        tl.store(State + row.to(tl.int64) * NB + col, state, mask=inside & (col * 0 + tr == 0))
    tl.store(Count + (tr * NB + row) * 2, n_part)
    tl.store(Count + (tr * NB + row) * 2 + 1, n_part + n_full)


@triton.jit
def _layout_list_kernel(Terms, Diag, Count, Idx, Bits, N, NB, BS, KW, QW, NUM_TERMS: tl.constexpr,
                        COLUMNS: tl.constexpr, DIAG_TERMS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        RAGGED: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    tr = tl.program_id(1)
    W = tl.where(tr == 0, KW, QW)
    base = tr.to(tl.int64) * NB * KW + row.to(tl.int64) * W     # the q lists follow the kv lists in one buffer
    n_part = tl.load(Count + (tr * NB + row) * 2)
    n_tot = tl.load(Count + (tr * NB + row) * 2 + 1)
    seen_part = 0
    seen_full = 0
    seen_empty = 0
    for c0 in range(0, NB, CHUNK):
        col, inside, full, part, bits = _chunk(Terms, Diag, row, tr, c0, N, NB, BS, NUM_TERMS, COLUMNS, DIAG_TERMS,
                                               IS_CAUSAL, RAGGED, CHUNK)
        empty = inside & ~full & ~part
        c_part = tl.cumsum(part.to(tl.int32), 0) + seen_part
        c_full = tl.cumsum(full.to(tl.int32), 0) + seen_full
        c_empty = tl.cumsum(empty.to(tl.int32), 0) + seen_empty
        slot = tl.where(part, c_part, tl.where(full, n_part + c_full, n_tot + c_empty)) - 1
        ok = inside & (slot < W)
        tl.store(Idx + base + slot, col, mask=ok)
        tl.store(Bits + base + slot, bits, mask=ok)
        seen_part += tl.sum(part.to(tl.int32), 0)
        seen_full += tl.sum(full.to(tl.int32), 0)
        seen_empty += tl.sum(empty.to(tl.int32), 0)


def build_lists(terms: torch.Tensor, diag, seq_len: int, block_size: int, is_causal: bool, chunk: int = CHUNK):
    """``(state, kv_count, kv_idx, kv_bits, q_count, q_idx, q_bits)`` of one layout head, as
    ``patterns.block_lists`` gives them, on ``terms``' device. ``terms``: the contiguous int32 term table
    (``patterns.term_table``: row 0 the always-true term, each row's intervals on ``(p - j, p, j)`` first);
    ``diag``: int8 ``[T, 2 nb - 1]``, row ``t`` the diagonals ``I - J + nb - 1`` that term ``t``'s block sets
    allow, or None when no term has block sets. ``chunk``: columns per step of a program (a power of two)."""
    device = terms.device
    nb = -(-seq_len // block_size)
    num_terms = terms.shape[0]
    diag_terms = 0
    if diag is None:
        diag = torch.zeros(1, dtype=torch.int8, device=device)
    else:
        diag_terms = sum(1 << t for t in range(1, num_terms))
    flags = dict(NUM_TERMS=num_terms, COLUMNS=terms.shape[1], DIAG_TERMS=diag_terms, IS_CAUSAL=bool(is_causal),
                 RAGGED=seq_len % block_size != 0, CHUNK=min(chunk, triton.next_power_of_2(nb)))
    state = torch.empty(1, nb, nb, dtype=torch.int8, device=device)
    count = torch.empty(2, nb, 2, dtype=torch.int32, device=device)
    with launch_device(terms):
        _layout_count_kernel[(nb, 2)](terms, diag, state, count, seq_len, nb, block_size, **flags)
        kw, qw = (max(w, 1) for w in count[:, :, 1].amax(1).tolist())    # the one host sync
        idx = torch.empty(nb * (kw + qw), dtype=torch.int32, device=device)
        bits = torch.empty(nb * (kw + qw), dtype=torch.int32, device=device)
        _layout_list_kernel[(nb, 2)](terms, diag, count, idx, bits, seq_len, nb, block_size, kw, qw, **flags)
    split = nb * kw
    return (state, count[:1], idx[:split].view(1, nb, kw), bits[:split].view(1, nb, kw), count[1:],
            idx[split:].view(1, nb, qw), bits[split:].view(1, nb, qw))
