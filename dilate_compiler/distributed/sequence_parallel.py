"""Sequence-parallel attention: each rank holds a shard of the sequence; communication follows the pattern.

Modes (``ring_attention(..., mode=)``):

- ``"ring"``: K/V shards travel around the ring (``P - 1`` hops, each started before the step's compute so
  compute and communication overlap); each step's partial softmax merges into the running one by LSE. A step
  whose shard no local query links to skips its compute. The backward passes K/V around again, and the dK/dV
  accumulators travel with them back to their owners (``P`` hops), as in ring FlashAttention; each accumulator's
  hop is in flight while the next step computes its contribution (only the last hop, home, waits alone). Default
  for dense attention.
- ``"sparse"``: each rank sends each other rank exactly the K/V rows that rank's queries link to, worked out
  from the pattern on global positions (``links.py``), point to point, in one batch. Dilated: a branch whose
  segments don't cross a shard boundary sends nothing; a segment that does sends only the rows of each head's
  residue class (every r-th row, LongNet's sparse all-gather), so bytes per rank depend on the pattern, not on
  N. Block-sparse: only the key blocks some local query block lists. Then one softmax over local and received
  keys. The backward exchanges the same rows again and returns their gradients to their owners. Default for
  ``Dilated`` and ``BlockSparse``.

Key padding (``key_keep [B or 1, S]``, the shard's keys that attend) moves with the keys it belongs to: in ring
mode every shard's flags travel the ring's path (``_ring_key_keep``), in sparse mode each peer gets the flags of the
rows it gets (``_exchange_key_keep``); the per-rank compute drops those keys (the exact path adds -inf to their
scores, the kernels mask them), so a query row that keeps no key is 0 with LSE -inf, as in the single-process ops.

Both run as the custom ops ``dilate_compiler::sequence_parallel_forward/backward`` (opaque to torch.compile;
fake implementations for tracing). The forward first checks that every rank makes the same call
(``agreement.py``: one all_gather; where they differ, every rank raises the same error).

Per-rank compute, where the Triton kernels apply (CUDA, float16/bfloat16, head dim 32/64/128; block-sparse:
block size 16..128), on the strategy as the ranks hold the sequence (``DistributedStrategy.sharded``; for
``dc.Hilbert``, its inner strategy in curve order):

- ``Dilated``: the single-process kernels on the window of key positions around the rank's queries
  (``window.py``);
- block-sparse: the single-process kernels on the whole sequence's layout, restricted to the rank's query
  blocks, reading the rank's rows through an index table (``held_blocks.py``);
- dense, ring mode: each step on the block-sparse kernels (``dense_steps.py``), merged by LSE.

For the first two the sparse mode runs the kernels on the shard and the received rows; the ring mode keeps the
rows of each visiting shard that local queries link to and runs the kernels once the ring has passed (the
backward collects them again and returns their gradients in accumulators that travel the ring). With key padding
the kernels get the flags of the keys they hold, gathered as the keys were (``_held_keys``; a ring step, its
visiting shard's). ``mode="local"`` (the rank's heads over a whole sequence: head-parallel ranks and the
hybrid without a sequence stage) is a ring of one. Otherwise (CPU outside Triton's interpreter, float32/float64,
other head dims, and a subset of heads whose head-dependent rules the kernels would read by local head index;
logged once on CUDA) the exact path of ``attend.py``.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..lowering.common.dispatch import kernels_apply, lse_dtype
from . import comm, dense_steps, held_blocks, window
from .agreement import check_call, raise_on_every_rank, strategy_value
from .attend import attend_backward, attend_forward, merge
from .links import (LAYOUTS, BlockSparseLinks, Links, check_strategy, links_for, positions, shard_ranges,
                    sharded_strategy)

MODES = ("auto", "ring", "sparse")


@dataclass(frozen=True, eq=False)
class Config:
    """What one call site runs: strategy, process group, mode, shard layout, causality, scale."""

    strategy: Any
    group: Any
    mode: str
    layout: str
    is_causal: bool
    scale: Optional[float]
    # (first global query head, total query heads) of the heads this rank holds: mode "local", and the sequence
    # stage of the 2-D hybrid (``hybrid.py``); None: every head of the model
    head_range: Optional[tuple] = None


_CONFIGS: dict = {}
_CONFIG_KEYS: dict = {}
_LOCK = threading.Lock()


def register(config: Config) -> str:
    """A string key for ``config`` (custom ops take strings); equal configs share a key, and with it the plan
    cache: strategies are compared by value (``agreement.strategy_value``), process groups by identity."""
    ident = (strategy_value(config.strategy), id(config.group), config.mode, config.layout, config.is_causal,
             config.scale, config.head_range)
    with _LOCK:
        key = _CONFIG_KEYS.get(ident)
        if key is None:
            key = f"sp{len(_CONFIGS)}"
            _CONFIGS[key] = config
            _CONFIG_KEYS[ident] = key
    return key


def resolve_mode(strategy, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "ring" if strategy is None else "sparse"
    if mode == "sparse" and strategy is None:
        raise ValueError("mode='sparse' with dense attention (strategy=None) would send every rank every key; "
                         "use mode='ring'")
    return mode


@dataclass
class Plan:
    """Static per-rank plan: positions, links and (sparse mode) which rows go to and come from each peer."""

    links: Links
    heads: Tensor
    q_pos: Tensor
    rank_pos: list            # global positions of each rank's shard
    linked: list              # ring: does any local query link to rank b's shard (sparse: empty)
    send_idx: dict            # sparse: peer -> [Hkv, n] local rows to send (padding: row 0)
    recv_pos: dict            # sparse: peer -> [Hkv, n] positions received (padding: -1)
    scale: float
    windows: list = None      # Dilated: the key windows of this rank's query runs (window.py)
    window_rows: list = None  # kernels, ring mode: rows of each rank's shard this rank keeps (windows / held_blocks)
    held_pos: Tensor = None   # sparse: [Hkv, S + received] positions of the shard's rows, then each peer's (sorted)
    strategy: Any = None      # the strategy on the sequence as the ranks hold it (``Links`` are its)
    blocks: Any = None        # block-sparse: the kernels' rows and layout (held_blocks.HeldRows)
    blocks_cols: Tensor = None  # block-sparse, sparse mode: [Hkv, S + received] held row of each exchanged row


def _rows_needed(links: Links, heads: Tensor, ranges, pos: Tensor, num_kv_heads: int):
    """``[Hkv, n]`` indices into ``pos`` a query set needs per kv head (padding 0) and their positions (-1)."""
    need = links.needed(heads, ranges, pos)                          # [H, S]
    need = need.view(num_kv_heads, -1, pos.numel()).any(1)           # [Hkv, S]
    n = int(need.sum(1).max()) if need.numel() else 0
    order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=pos.device).view(1, -1) < need.sum(1, keepdim=True)
    return torch.where(valid, order, 0), torch.where(valid, pos[order], -1)


@functools.lru_cache(maxsize=256)
def _plan(key: str, rank: int, world: int, shard_len: int, num_heads: int, num_kv_heads: int, head_dim: int,
          device: str) -> Plan:
    cfg = _CONFIGS[key]
    dev = torch.device(device)
    scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(head_dim)
    mode = "ring" if cfg.mode == "local" else cfg.mode   # "local": a ring of one (rank 0 of 1) on head_range's heads
    N = shard_len * world
    strategy = sharded_strategy(cfg.strategy, N, cfg.is_causal)
    first, total = cfg.head_range if cfg.head_range is not None else (0, num_heads)
    links = links_for(strategy, N, total, cfg.is_causal, dev)
    heads = torch.arange(first, first + num_heads, device=dev)
    ranges = [shard_ranges(b, world, shard_len, cfg.layout) for b in range(world)]
    rank_pos = [positions(r, dev) for r in ranges]
    linked, send_idx, recv_pos = [], {}, {}
    for b in range(world):
        if mode == "ring":
            linked.append(bool(links.needed(heads, ranges[rank], rank_pos[b]).any()))
        elif b != rank:
            send_idx[b] = _rows_needed(links, heads, ranges[b], rank_pos[rank], num_kv_heads)[0]
            recv_pos[b] = _rows_needed(links, heads, ranges[rank], rank_pos[b], num_kv_heads)[1]
    plan = Plan(links, heads, rank_pos[rank], rank_pos, linked, send_idx, recv_pos, scale, strategy=strategy)
    if mode == "sparse":
        plan.held_pos = torch.cat([plan.q_pos.view(1, -1).expand(num_kv_heads, -1)] +
                                  [recv_pos[b] for b in sorted(recv_pos)], dim=1)
    span = None if strategy is None else strategy.key_window_span(N)
    if span is not None:
        plan.windows = window.windows(span, N, ranges[rank])
        if mode == "ring":
            plan.window_rows = [torch.nonzero(sum((pos >= w.a) & (pos < w.e) for w in plan.windows)).flatten()
                                for pos in rank_pos]
    elif isinstance(links, BlockSparseLinks):
        _plan_held_blocks(plan, mode, ranges[rank], rank, world)
    return plan


def _plan_held_blocks(plan: Plan, mode: str, my_ranges, rank: int, world: int) -> None:
    """The rows the block-sparse kernels run on (``held_blocks``): sparse mode, the shard and every row received
    (for any kv head); ring mode, the whole shard and the rows of each other shard some local query links."""
    S = plan.q_pos.numel()
    if mode == "sparse":
        received = plan.held_pos[:, S:]
        plan.blocks = held_blocks.plan(plan.links, plan.q_pos, torch.unique(received[received >= 0]))
        rows = plan.blocks.table[plan.held_pos.clamp(min=0)].long()
        plan.blocks_cols = torch.where(plan.held_pos >= 0, rows, plan.blocks.held)
        return
    plan.window_rows = [torch.arange(S, device=plan.q_pos.device) if b == rank else
                        torch.nonzero(plan.links.needed(plan.heads, my_ranges, pos).any(0)).flatten()
                        for b, pos in enumerate(plan.rank_pos)]
    others = [(rank - t) % world for t in range(1, world)]   # in the order the ring brings them
    other_pos = [plan.rank_pos[b][plan.window_rows[b]] for b in others]
    plan.blocks = held_blocks.plan(plan.links, plan.q_pos, torch.cat(other_pos) if other_pos else
                                   plan.q_pos.new_empty(0))


def _setup(key: str, q: Tensor, k: Tensor):
    cfg = _CONFIGS[key]
    if cfg.mode == "local":
        return cfg, None, 0, 1, _plan(key, 0, 1, q.shape[2], q.shape[1], k.shape[1], q.shape[3], str(q.device))
    group, rank, world = comm.resolve_group(cfg.group)
    plan = _plan(key, rank, world, q.shape[2], q.shape[1], k.shape[1], q.shape[3], str(q.device))
    return cfg, group, rank, world, plan


# --- ring -----------------------------------------------------------------------------------------------------


def _ring_forward(q, k, v, group, rank, world, plan: Plan, dense_kernels: bool = False, key_keep=None):
    """``dense_kernels``: dense attention whose steps run the Triton kernels (``dense_steps``); ``key_keep``: this
    shard's key padding ``[B', S]`` (it travels the ring as the shard does: ``_ring_key_keep``)."""
    keep_of = _ring_key_keep(key_keep, group, rank, world)
    B, H, S, D = q.shape
    dt = lse_dtype(q.dtype)
    out = torch.zeros(B, H, S, D, dtype=dt, device=q.device)
    lse = torch.full((B, H, S), float("-inf"), dtype=dt, device=q.device)
    kv = torch.stack((k, v))
    for t in range(world):
        src = (rank - t) % world
        shift = comm.RingShift(group, rank, world, "kv").start(kv) if t < world - 1 else None
        if plan.linked[src]:
            got = dense_steps.forward(q, kv[0], kv[1], plan.q_pos, plan.rank_pos[src], plan.links.is_causal,
                                      plan.scale, _shard_keep(keep_of, src)) if dense_kernels else None
            if got is None:
                got = attend_forward(q, kv[0], kv[1], plan.q_pos, plan.rank_pos[src].view(1, -1), plan.links,
                                     plan.heads, plan.scale, _visiting_keep(keep_of, src))
            out, lse = merge(out, lse, *got)
        if shift is not None:
            kv = shift.wait()
    return out, lse


def _ring_backward(dout, q, k, v, lse, delta, group, rank, world, plan: Plan, dense_kernels: bool = False,
                   key_keep=None):
    """Each step computes the visiting shard's dK/dV contribution while that shard's accumulator is on its way
    here (sent at the end of the previous step), then adds it and sends the accumulator on: every dK/dV hop but
    the last (which takes each accumulator home) overlaps a step's compute, as the K/V hops do."""
    keep_of = _ring_key_keep(key_keep, group, rank, world)
    dt = lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    kv = torch.stack((k, v))
    grads = None   # the hop bringing the visiting shard's accumulator
    for t in range(world):
        src = (rank - t) % world
        shift = comm.RingShift(group, rank, world, "kv").start(kv) if t < world - 1 else None
        got = None
        if plan.linked[src]:
            got = dense_steps.backward(dout, q, kv[0], kv[1], lse, delta, plan.q_pos, plan.rank_pos[src],
                                       plan.links.is_causal, plan.scale, _shard_keep(keep_of, src)) if dense_kernels \
                else None
            if got is None:
                got = attend_backward(dout, q, kv[0], kv[1], plan.q_pos, plan.rank_pos[src].view(1, -1),
                                      plan.links, plan.heads, plan.scale, lse, delta, _visiting_keep(keep_of, src))
        dkv = torch.zeros(kv.shape, dtype=dt, device=q.device) if grads is None else grads.wait()
        if got is not None:
            dq += got[0]
            dkv[0] += got[1]
            dkv[1] += got[2]
        if world > 1:   # the accumulator follows its shard; after P hops it is back with its owner
            grads = comm.RingShift(group, rank, world, "grad").start(dkv)
        if shift is not None:
            kv = shift.wait()
    if grads is not None:
        dkv = grads.wait()
    return dq, dkv[0], dkv[1]


def _ring_key_keep(key_keep, group, rank, world) -> Optional[dict]:
    """Every shard's key padding as it visits this rank: ``{src: [B', S]}`` (None without key padding). The flags
    travel the ring's path, ``P - 1`` hops of one byte per key and batch row, ahead of the K/V hops."""
    if key_keep is None:
        return None
    keep_of, held = {rank: key_keep}, key_keep.to(torch.uint8)      # as uint8, a dtype every backend sends
    for t in range(1, world):
        held = comm.RingShift(group, rank, world, "keep").start(held).wait()
        keep_of[(rank - t) % world] = held.bool()
    return keep_of


def _shard_keep(keep_of: Optional[dict], src: int):
    """The key padding of shard ``src``, ``[B', S]`` (None without)."""
    return None if keep_of is None else keep_of[src]


def _visiting_keep(keep_of: Optional[dict], src: int):
    """The key padding of shard ``src`` as ``attend_*`` take it, ``[B', 1, S]`` (None without)."""
    return None if keep_of is None else keep_of[src].unsqueeze(1)


# --- sparse exchange ------------------------------------------------------------------------------------------


def _gather_rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t [..., B, Hkv, S, D]`` rows ``idx [Hkv, n]`` per kv head -> ``[..., B, Hkv, n, D]``."""
    shape = t.shape[:-2] + (idx.shape[1], t.shape[-1])
    return torch.gather(t, -2, idx.view(*(1,) * (t.dim() - 3), idx.shape[0], idx.shape[1], 1).expand(shape))


def _exchange_kv(k, v, group, rank, world, plan: Plan):
    """The keys this rank holds after the exchange: ``k, v [B, Hkv, S + received, D]`` (the shard first; the
    shard itself, uncopied, when nothing moves), their positions ``[Hkv, S + received]`` and the peers."""
    sends = {b: torch.stack((_gather_rows(k, idx), _gather_rows(v, idx))) for b, idx in plan.send_idx.items()
             if idx.shape[1]}
    shapes = {b: (2,) + k.shape[:-2] + (pos.shape[1], k.shape[-1]) for b, pos in plan.recv_pos.items()}
    got = comm.exchange(group, sends, shapes, k.dtype, k.device, "kv")
    peers = sorted(got)
    pos = plan.held_pos
    if pos.shape[1] == k.shape[2]:
        return k, v, pos, peers
    keys = torch.cat([torch.stack((k, v))] + [got[b] for b in peers], dim=-2)
    return keys[0], keys[1], pos, peers


def _exchange_key_keep(key_keep, group, rank, world, plan: Plan):
    """The key padding of the keys this rank holds after the exchange, ``[B', Hkv, S + received]`` in
    ``_exchange_kv``'s order (None without key padding): each peer is sent the flags of the rows it is sent."""
    if key_keep is None:
        return None
    Hkv = plan.held_pos.shape[0]
    flags = key_keep.to(torch.uint8)                                   # as uint8, a dtype every backend sends
    sends = {b: flags[:, idx] for b, idx in plan.send_idx.items() if idx.shape[1]}             # [B', Hkv, n]
    shapes = {b: (key_keep.shape[0],) + tuple(pos.shape) for b, pos in plan.recv_pos.items()}
    got = comm.exchange(group, sends, shapes, torch.uint8, key_keep.device, "keep")
    own = key_keep.unsqueeze(1).expand(-1, Hkv, -1)
    return torch.cat([own] + [got[b].bool() for b in sorted(got)], dim=-1)


def _sparse_forward(q, k, v, group, rank, world, plan: Plan, key_keep=None):
    k_all, v_all, pos, _ = _exchange_kv(k, v, group, rank, world, plan)
    keep = _exchange_key_keep(key_keep, group, rank, world, plan)
    return attend_forward(q, k_all, v_all, plan.q_pos, pos, plan.links, plan.heads, plan.scale, keep)


def _sparse_backward(dout, q, k, v, lse, delta, group, rank, world, plan: Plan, key_keep=None):
    k_all, v_all, pos, peers = _exchange_kv(k, v, group, rank, world, plan)
    keep = _exchange_key_keep(key_keep, group, rank, world, plan)
    dq, dk, dv = attend_backward(dout, q, k_all, v_all, plan.q_pos, pos, plan.links, plan.heads, plan.scale,
                                 lse, delta, keep)
    return (dq,) + _return_grads(dk, dv, k.shape[2], peers, group, rank, world, plan)


def _return_grads(dk, dv, S, peers, group, rank, world, plan: Plan):
    """``dk, dv [B, Hkv, S + received, D]``: the received rows' gradients go back to their owners and are added
    to theirs; returns this shard's ``(dk, dv)`` (as they are when nothing was received or sent)."""
    if dk.shape[2] == S and all(idx.shape[1] == 0 for idx in plan.send_idx.values()):
        return dk, dv
    dkv = torch.stack((dk, dv))
    sends, start = {}, S
    for b in peers:
        n = plan.recv_pos[b].shape[1]
        sends[b] = dkv[..., start:start + n, :]
        start += n
    shapes = {b: dkv.shape[:-2] + (idx.shape[1], dkv.shape[-1]) for b, idx in plan.send_idx.items()}
    back = comm.exchange(group, sends, shapes, dkv.dtype, dkv.device, "grad")
    mine = dkv[..., :S, :].clone()
    for b, g in back.items():
        idx = plan.send_idx[b]
        mine.scatter_add_(-2, idx.view(1, 1, idx.shape[0], idx.shape[1], 1).expand(g.shape), g)
    return mine[0], mine[1]


# --- the kernels on the keys a rank holds (Dilated: key windows; block-sparse: held rows) ------------------------


def _ring_collect(k, v, group, rank, world, plan: Plan):
    """K/V shards pass around the ring (each hop started before the copy of the visiting shard); each rank keeps
    the visiting rows its kernels read (``plan.window_rows``: inside its windows, or the held rows). Returns the
    kept rows ``k, v [B, Hkv, K, D]``, their positions ``[Hkv, K]`` and ``[(src, rows)]`` in the order kept."""
    rows = plan.window_rows[rank]
    if world == 1 and rows.numel() == k.shape[2]:   # a ring of one that keeps its whole shard: the shard itself
        return k, v, plan.rank_pos[rank].view(1, -1).expand(k.shape[1], -1), [(rank, rows)]
    kv = torch.stack((k, v))
    parts, pos, kept = [], [], []
    for t in range(world):
        src = (rank - t) % world
        shift = comm.RingShift(group, rank, world, "kv").start(kv) if t < world - 1 else None
        rows = plan.window_rows[src]
        if rows.numel():
            parts.append(kv if rows.numel() == kv.shape[3] else kv.index_select(3, rows))
            pos.append(plan.rank_pos[src][rows])
            kept.append((src, rows))
        if shift is not None:
            kv = shift.wait()
    Hkv = k.shape[1]
    held = parts[0] if len(parts) == 1 else torch.cat(parts, 3)
    return held[0], held[1], torch.cat(pos).view(1, -1).expand(Hkv, -1), kept


def _ring_return_grads(dk, dv, k, kept, group, rank, world):
    """``dk, dv`` of the kept rows (``_ring_collect``'s order) go home in accumulators that travel the ring with
    their shard, each rank adding its part; returns this shard's ``(dk, dv)`` (float32; as they are on one rank
    that kept its whole shard)."""
    if world == 1 and kept[0][1].numel() == k.shape[2]:
        return dk[:, :, :k.shape[2]], dv[:, :, :k.shape[2]]
    mine, start = {}, 0
    for src, rows in kept:
        n = rows.numel()
        mine[src] = (rows, torch.stack((dk[:, :, start:start + n], dv[:, :, start:start + n])).float())
        start += n
    acc = torch.zeros((2,) + tuple(k.shape), dtype=torch.float32, device=k.device)
    for t in range(world):          # the accumulator of shard (rank - t) is here at step t; P hops take it home
        src = (rank - t) % world
        if src in mine:
            acc.index_add_(3, *mine[src])
        if world > 1:
            acc = comm.RingShift(group, rank, world, "grad").start(acc).wait()
    return acc[0], acc[1]


def _held_keys(k, v, cfg, group, rank, world, plan: Plan, key_keep=None):
    """The keys a rank holds for the kernels: sparse mode, its shard and the rows received (4th item: the peers);
    ring mode (and "local", a ring of one), the kept rows of every shard (4th item: which rows of which shard).
    Block-sparse, sparse mode: the received rows of every kv head in the held rows of ``plan.blocks`` (one row per
    position). 5th item: the held keys' padding flags from this shard's ``key_keep`` (None without), moved as the
    exact path moves them: ``[B', Hkv or 1, K]`` beside k's rows (``window``), block-sparse ``[B', rows]`` by held
    row (``held_blocks``)."""
    if cfg.mode != "sparse":
        keep_of = _ring_key_keep(key_keep, group, rank, world)
        k_held, v_held, pos, kept = _ring_collect(k, v, group, rank, world, plan)
        keep = None if keep_of is None else torch.cat([keep_of[src][:, rows] for src, rows in kept], 1)
        return k_held, v_held, pos, kept, keep if keep is None or plan.blocks is not None else keep.unsqueeze(1)
    k_all, v_all, pos, peers = _exchange_kv(k, v, group, rank, world, plan)
    keep = _exchange_key_keep(key_keep, group, rank, world, plan)
    if plan.blocks is None:
        return k_all, v_all, pos, peers, keep
    if pos.shape[1] == k.shape[2]:   # nothing received: the shard's rows are the held rows
        return k_all, v_all, pos, peers, key_keep
    B, Hkv, n, D = k_all.shape
    U = plan.blocks.held
    held = k_all.new_zeros(2, B, Hkv, U + 1, D)
    held.scatter_(3, plan.blocks_cols.view(1, 1, Hkv, n, 1).expand(2, B, Hkv, n, D), torch.stack((k_all, v_all)))
    held[:, :, :, U] = 0          # the exchange's padding rows landed on row U (the spare row, or a scratch row)
    return (held[0, :, :, :plan.blocks.rows], held[1, :, :, :plan.blocks.rows], pos, peers,
            None if keep is None else _held_row_keep(keep, plan))


def _held_row_keep(keep: Tensor, plan: Plan) -> Tensor:
    """The exchanged keys' flags ``[B', Hkv, S + received]`` (``_exchange_key_keep``) as flags of the held rows of
    ``plan.blocks``, ``[B', rows]``: a position's flag is the same in every kv head that holds it; the exchange's
    padding entries land on row U, which is dropped."""
    Bk, U = keep.shape[0], plan.blocks.held
    flags = torch.zeros(Bk, U + 1, dtype=torch.uint8, device=keep.device)   # uint8: scatter_reduce on any device
    flags.scatter_reduce_(1, plan.blocks_cols.reshape(1, -1).expand(Bk, -1), keep.reshape(Bk, -1).to(torch.uint8),
                          "amax")
    flags[:, U] = 0
    return flags[:, :plan.blocks.rows].bool()


def _held_forward(q, k, v, cfg, group, rank, world, plan: Plan, key_keep=None):
    k_held, v_held, pos, _, keep = _held_keys(k, v, cfg, group, rank, world, plan, key_keep)
    if plan.blocks is not None:
        return held_blocks.forward(q, k_held, v_held, plan.blocks, plan.scale, keep)
    return window.forward(q, k_held, v_held, pos, plan.windows, plan.strategy, cfg.is_causal, plan.scale, keep)


def _held_backward(dout, q, k, v, out, lse, cfg, group, rank, world, plan: Plan, key_keep=None):
    k_held, v_held, pos, where, keep = _held_keys(k, v, cfg, group, rank, world, plan, key_keep)
    if plan.blocks is not None:
        dq, dk, dv = held_blocks.backward(dout, q, k_held, v_held, out, lse, plan.blocks, plan.scale, keep)
        # the returned gradients travel in float32 on every rank (a receiver's buffers take its own dtype)
        if cfg.mode == "sparse" and pos.shape[1] == k.shape[2]:   # nothing received: the shard's rows
            dk, dv = (g[:, :, :k.shape[2]] if world == 1 else g[:, :, :k.shape[2]].float() for g in (dk, dv))
        elif cfg.mode == "sparse":   # back in the exchange's rows, per kv head (padding: row U, zero)
            B, Hkv, _, D = k.shape
            idx = plan.blocks_cols.view(1, Hkv, -1, 1).expand(B, -1, -1, D)
            dk, dv = (held_blocks.with_rows(g.float(), plan.blocks.held + 1).gather(2, idx) for g in (dk, dv))
    else:
        dq, dk, dv = window.backward(dout, q, k_held, v_held, pos, out, lse, plan.windows, plan.strategy,
                                     cfg.is_causal, plan.scale, keep)
    if cfg.mode == "sparse":
        return (dq,) + _return_grads(dk, dv, k.shape[2], where, group, rank, world, plan)
    return (dq,) + _ring_return_grads(dk, dv, k, where, group, rank, world)


def _held_kernels(cfg, plan: Plan, q) -> bool:
    """Whether this rank runs the kernels on the keys it holds: ``Dilated`` on key windows (``window``), block-sparse
    on its held rows (``held_blocks``), with or without key padding, where the kernels take the call: not on a
    subset of heads whose head-dependent rules the kernels would read by local head index (logged once on CUDA)."""
    if plan.windows is None and plan.blocks is None:
        return False
    what = "sequence-parallel " + ("dilated" if plan.windows is not None else "block-sparse") + " attention"
    if cfg.head_range is not None and (plan.windows is None or plan.strategy.mixing != "lse"
                                       or cfg.head_range[0] % plan.strategy.head_period):
        return kernels_apply(what, q, f"this rank's heads (hybrid or head-parallel) start at {cfg.head_range[0]} "
                                      f"(dilated: not a multiple of the rates' lcm, or mixing='head_groups'; "
                                      f"block-sparse: any subset): the held-key kernels read head-dependent rules by "
                                      f"local head index")
    if plan.windows is not None:
        return window.use_window_kernels(plan.strategy, q)
    if plan.blocks is not None:
        return held_blocks.use_kernels(plan.links.layout.block_size, q)
    return False


# --- the ops --------------------------------------------------------------------------------------------------


def _forward_impl(q, k, v, key, key_keep=None):
    if _CONFIGS[key].mode != "local":
        check_call(q, k, v, _CONFIGS[key], key_keep)
    cfg, group, rank, world, plan = _setup(key, q, k)
    if _held_kernels(cfg, plan, q):
        out, lse = _held_forward(q, k, v, cfg, group, rank, world, plan, key_keep)
        return _unaliased(out, q.dtype), _unaliased(lse, lse_dtype(q.dtype))
    if cfg.mode == "sparse":
        out, lse = _sparse_forward(q, k, v, group, rank, world, plan, key_keep=key_keep)
    else:   # ring; "local" is a ring of one
        out, lse = _ring_forward(q, k, v, group, rank, world, plan, _dense_kernels(cfg, q), key_keep=key_keep)
    return (out * plan.links.output_scale).to(q.dtype), lse


def _dense_kernels(cfg, q) -> bool:
    """Dense attention in ring mode (or "local", a ring of one) whose steps can run the Triton kernels
    (``dense_steps``, with or without key padding)."""
    if cfg.strategy is not None or cfg.mode not in ("ring", "local"):
        return False
    return dense_steps.use_kernels(q)


def _unaliased(t: Tensor, dtype) -> Tensor:
    """``t`` in ``dtype``, copied when it is a view (custom op outputs must not alias each other)."""
    return t if t.dtype == dtype and t._base is None else t.to(dtype, copy=True).contiguous()


def _backward_impl(dout, q, k, v, out, lse, key, key_keep=None):
    cfg, group, rank, world, plan = _setup(key, q, k)
    if _held_kernels(cfg, plan, q):
        dq, dk, dv = _held_backward(dout, q, k, v, out, lse, cfg, group, rank, world, plan, key_keep)
        return _unaliased(dq, q.dtype), _unaliased(dk, k.dtype), _unaliased(dv, v.dtype)
    dt = lse_dtype(q.dtype)
    delta = (dout.to(dt) * out.to(dt)).sum(-1)                 # rowsum(dO * O), both on the output's scale
    dout = dout.to(dt) * plan.links.output_scale
    if cfg.mode == "sparse":
        dq, dk, dv = _sparse_backward(dout, q, k, v, lse, delta, group, rank, world, plan, key_keep=key_keep)
    else:
        dq, dk, dv = _ring_backward(dout, q, k, v, lse, delta, group, rank, world, plan, _dense_kernels(cfg, q),
                                    key_keep=key_keep)
    return dq.to(q.dtype), _unaliased(dk, k.dtype), _unaliased(dv, v.dtype)


@torch.library.custom_op("dilate_compiler::sequence_parallel_forward", mutates_args=())
def sequence_parallel_forward(q: Tensor, k: Tensor, v: Tensor, config: str,
                              key_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """This rank's output shard and its log-sum-exp (``config``: a key from ``register``; ``key_keep``: this
    shard's key padding, bool ``[B or 1, S]``, True where the key attends)."""
    return _forward_impl(q, k, v, config, key_keep)


@sequence_parallel_forward.register_fake
def _(q, k, v, config, key_keep=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))   # contiguous, as the impl


@torch.library.custom_op("dilate_compiler::sequence_parallel_backward", mutates_args=())
def sequence_parallel_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               config: str, key_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(dout, q, k, v, out, lse, config, key_keep)


@sequence_parallel_backward.register_fake
def _(dout, q, k, v, out, lse, config, key_keep=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, config, key_keep = inputs
    ctx.save_for_backward(q, k, v, *output, key_keep)
    ctx.config = config


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_keep = ctx.saved_tensors
    dq, dk, dv = torch.ops.dilate_compiler.sequence_parallel_backward(dout.contiguous(), q, k, v, out, lse,
                                                                       ctx.config, key_keep)
    return dq, dk, dv, None, None


sequence_parallel_forward.register_autograd(_backward, setup_context=_setup_context)


# --- public entry -----------------------------------------------------------------------------------------------


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N_local, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, local length and head dim "
                         "(sequence-parallel attention is self-attention over one sharded sequence)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def check_shard_key_keep(key_keep, q: Tensor) -> None:
    """``key_keep`` is None or bool ``[B or 1, S]`` on q's device (this shard's key padding)."""
    from ..lowering.common.key_padding import check_key_keep

    check_key_keep(key_keep, q.shape[0], q.shape[2], q.device)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, strategy=None, *, is_causal: bool = False, group=None,
                   scale: Optional[float] = None, mode: str = "auto", layout: str = "contiguous",
                   key_keep: Optional[Tensor] = None) -> Tensor:
    """Attention over a sequence sharded across the ranks of ``group``; exact, forward and backward.

    Args:
        q: this rank's query shard ``[B, Hq, S, D]`` (S = N / world size, the same on every rank).
        k, v: this rank's key/value shards ``[B, Hkv, S, D]`` (GQA when ``Hq % Hkv == 0``).
        strategy: ``None`` (dense), ``dc.Dilated`` (both mixings), ``dc.BlockSparse`` with a fixed pattern, or
            ``dc.Hilbert`` around either (its grid given); its semantics are those of the single-process op on the
            whole sequence. With ``dc.Hilbert`` the ranks hold shards of the sequence in curve order
            (``shard_sequence(x, order=strategy)``), and the output shard is of the curve-ordered output
            (``gather_sequence(out, order=strategy)`` puts it back in the model's order).
        is_causal: causal masking on global positions.
        group: process group (default: the world).
        mode: ``"auto"`` (sparse exchange for Dilated/BlockSparse, ring for dense), ``"ring"`` or ``"sparse"``.
        layout: ``"contiguous"`` (rank r holds ``[r*S, (r+1)*S)``) or ``"zigzag"`` (chunks ``r`` and ``2P-1-r``
            of ``2P``: balances causal work; shard with ``shard_sequence``).
        key_keep: optional bool ``[B or 1, S]``: which keys of this rank's shard attend (key padding, sharded as
            k is); the flags travel with the keys they belong to. A query row that keeps no key is 0, as in the
            single-process ops.

    Returns this rank's output shard ``[B, Hq, S, D]``. Every rank of ``group`` must make the same call (shard
    shapes, dtypes, strategy by value, mode, layout, causality, scale); where they differ, every rank raises the
    same ``ValueError`` naming what differs (``agreement.py``).
    """
    group, _, _ = comm.resolve_group(group)
    try:
        check_inputs(q, k, v)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        check_strategy(strategy)
        mode = resolve_mode(strategy, mode)
        sharded_strategy(strategy, q.shape[2] * comm.resolve_group(group)[2], bool(is_causal))
        check_shard_key_keep(key_keep, q)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise_on_every_rank(e, group, q, k, v, strategy, mode, layout, is_causal, scale, key_keep)
    key = register(Config(strategy, group, mode, layout, bool(is_causal), scale))
    return torch.ops.dilate_compiler.sequence_parallel_forward(q, k, v, key, key_keep)[0]


def local_attention(q: Tensor, k: Tensor, v: Tensor, strategy, *, first_head: int, num_heads: int,
                    is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Single-process attention for query heads ``first_head .. first_head + Hq`` of a ``num_heads``-head model (the
    strategy's head-dependent rules use the global head index): a ring of one, on the kernels where they take these
    heads, else on the exact path."""
    cfg = Config(strategy, None, "local", "contiguous", bool(is_causal), scale, (int(first_head), int(num_heads)))
    return torch.ops.dilate_compiler.sequence_parallel_forward(q, k, v, register(cfg))[0]
