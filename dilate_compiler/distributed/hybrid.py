"""The 2-D hybrid: head-parallel inside a head group of ranks, sequence-parallel across the head groups.

``P = Ph x Ps`` ranks hold contiguous shards of ``S`` positions of every head, rank ``r`` the ``r``-th shard (as
``shard_sequence`` cuts it). Ranks ``g * Ph .. g * Ph + Ph - 1`` form head group ``g``: together they hold the
sub-sequence ``[g * Ph * S, (g + 1) * Ph * S)``. Ranks with the same index ``i`` in their head group form sequence
group ``i``: ``i, i + Ph, i + 2 Ph, ...``. A call

1. all-to-alls inside the head group (DeepSpeed-Ulysses, ``head_parallel._Shuffle``): rank ``i`` of the group
   gets kv heads ``[i * Hkv / Ph, (i + 1) * Hkv / Ph)`` (and their query heads) over the group's whole
   sub-sequence;
2. runs the sequence-parallel op (``sequence_parallel_forward``: ring or sparse exchange, ``mode``) across its
   sequence group, on those heads (their global indices: head-dependent rules keep their meaning) with the
   sub-sequence as its shard; key padding is gathered over the head group first and then travels as in the op;
3. all-to-alls the output (and, for the rewrite, the log-sum-exp) back to sequence shards.

Without a sequence group (``sequence_group=None``: ``Ps = 1``, the head group is the whole group of the call) this
is head-parallel attention that takes key padding and gives the log-sum-exp; ``dc.SequenceParallel(mode=
"head_parallel")`` runs masked sites so (step 2 is then the op as a ring of one on the rank's heads: the kernels where
they take those heads, as in the sequence stage, else the exact path).

Bytes per rank, forward, with ``q, k, v, o`` this rank's shards (``S`` rows): the all-to-alls move
``(Ph - 1) / Ph`` of ``q + k + v`` out and of ``o`` back; the ring moves ``Ps - 1`` hops of ``Hkv / Ph`` kv heads
over ``Ph * S`` rows, i.e. ``(Ps - 1) x (k + v)``, against ``(P - 1) x (k + v)`` for a ring over all ``P`` ranks;
the sparse exchange moves the rows the pattern links across the ``Ps`` sub-sequences only. The backward moves
the same again (the all-to-alls reversed; the ring's K/V again and dK/dV home).

Groups: ``hybrid_groups(Ph)`` builds both with ``dist.new_group`` (a collective: every rank calls it, and
builds every group, in the same order). Explicit groups must tile the world as above. Each call first checks, over
the world, that every rank makes the same call (``agreement.py``: its fingerprint holds the group sizes, so a rank
calling another distributed op, or with other sizes, is named), then that the groups tile the world (one
all_gather of every rank's group members); every rank raises the same ``ValueError`` where either fails.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .agreement import check_call, raise_on_every_rank
from .head_parallel import _Shuffle
from .links import check_strategy
from .sequence_parallel import Config, check_inputs, check_shard_key_keep, register, resolve_mode

WHAT = "hybrid attention"


@dataclass(frozen=True, eq=False)
class HybridConfig:
    """One hybrid call site: the call's ``Config`` over the world (what every rank agrees on), the two groups
    (``sequence_group`` None: head-parallel only) and the sequence stage's mode."""

    world: Config
    head_group: Any
    sequence_group: Any
    sequence_mode: str


_HYBRID: dict = {}
_HYBRID_KEYS: dict = {}
_LOCK = threading.Lock()


def register_hybrid(cfg: HybridConfig) -> str:
    """A string key for ``cfg`` (as ``sequence_parallel.register``: equal configs share one; groups by identity)."""
    ident = (register(cfg.world), id(cfg.head_group), id(cfg.sequence_group), cfg.sequence_mode)
    with _LOCK:
        key = _HYBRID_KEYS.get(ident)
        if key is None:
            key = _HYBRID_KEYS[ident] = f"hy{len(_HYBRID)}"
            _HYBRID[key] = cfg
    return key


def hybrid_groups(head_size: int):
    """``(head_group, sequence_group)`` of this rank for ``Ph = head_size``: head groups are runs of ``Ph``
    consecutive ranks, sequence groups the ranks ``Ph`` apart. Collective: every rank of the world calls it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size < 1 or world % head_size:
        raise ValueError(f"head_size must be a positive int dividing the world size {world}, got {head_size!r}")
    heads = [dist.new_group(list(range(g * head_size, (g + 1) * head_size))) for g in range(world // head_size)]
    sequences = [dist.new_group(list(range(i, world, head_size))) for i in range(head_size)]
    return heads[rank // head_size], sequences[rank % head_size]


def groups_text(head_group, sequence_group) -> str:
    """The hybrid's groups as the agreement check compares them: their sizes (members differ by rank)."""
    sizes = []
    for group in (head_group, sequence_group):
        if group is None:
            sizes.append("1")
            continue
        try:
            sizes.append(str(comm.resolve_group(group)[2]))
        except (RuntimeError, ValueError, TypeError, AttributeError):
            sizes.append("not a group this rank is in")
    return f"head groups of {sizes[0]}, sequence groups of {sizes[1]}"


def _members(group) -> list:
    """Global ranks of ``group`` in group-rank order, or [] where this process is not a member."""
    try:
        return list(dist.get_process_group_ranks(group)) if dist.get_rank(group) >= 0 else []
    except (RuntimeError, ValueError):
        return []


def _check_groups(head_group, sequence_group, device) -> tuple:
    """``(Ph, Ps)``, once every rank's groups tile the world (module docstring); else every rank raises the same
    ``ValueError`` naming each rank's groups (one all_gather over the world, so the answer is the same on all)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    heads, seqs = _members(head_group), _members(sequence_group)
    row = torch.full((2, world), -1, dtype=torch.int64, device=device)
    row[0, :len(heads)] = torch.tensor(heads, dtype=torch.int64)
    row[1, :len(seqs)] = torch.tensor(seqs, dtype=torch.int64)
    everyone = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(everyone, row)
    n = row.numel() * row.element_size()
    comm._record("meta", n * (world - 1), n * (world - 1), world - 1)
    table = [[[x for x in t[i].tolist() if x >= 0] for i in range(2)] for t in everyone]
    ph = len(table[0][0]) or 1
    bad = []
    for r, (hg, sg) in enumerate(table):
        want_h = list(range(r // ph * ph, r // ph * ph + ph))
        want_s = list(range(r % ph, world, ph))
        if world % ph or hg != want_h or sg != want_s:
            bad.append(f"rank {r}: head group {hg or 'none (not a member)'}, sequence group "
                       f"{sg or 'none (not a member)'}")
    if bad:
        raise ValueError(f"{WHAT}: head_group and sequence_group must tile the world's {world} ranks: head groups "
                         f"runs of Ph consecutive ranks (r // Ph * Ph ..), sequence groups the ranks Ph apart "
                         f"(r % Ph, r % Ph + Ph, ..), with Ph x Ps = {world} (build them with "
                         f"dc.distributed.hybrid_groups(Ph)); got " + "; ".join(bad))
    return ph, world // ph


@torch.library.custom_op("dilate_compiler::hybrid_pack", mutates_args=())
def hybrid_pack(q: Tensor, k: Tensor, v: Tensor, config: str, key_keep: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Checks the groups and that every rank makes the same call (an op, so the checks run eagerly in compiled
    graphs too), then packs what the head group's all-to-alls send, heads first: q ``[H, B, S, D]``, k and v
    ``[Hkv, 2, B, S, D]``, and the head group's key padding ``[B', Ph * S]`` (uint8; ``[0]`` without)."""
    cfg = _HYBRID[config]
    check_call(q, k, v, cfg.world, key_keep, groups_text(cfg.head_group, cfg.sequence_group))
    if cfg.sequence_group is not None:    # else the head group is the call's group: nothing to tile
        _check_groups(cfg.head_group, cfg.sequence_group, q.device)
    keep = torch.zeros(0, dtype=torch.uint8, device=q.device)
    if key_keep is not None:
        group, _, ph = comm.resolve_group(cfg.head_group)
        parts = [torch.empty(key_keep.shape, dtype=torch.uint8, device=q.device) for _ in range(ph)]
        dist.all_gather(parts, key_keep.to(torch.uint8).contiguous(), group=group)
        n = key_keep.numel()
        comm._record("keep", n * (ph - 1), n * (ph - 1), ph - 1)
        keep = torch.cat(parts, dim=1)
    return (q.transpose(0, 1).clone(memory_format=torch.contiguous_format),
            torch.stack((k.transpose(0, 1), v.transpose(0, 1)), dim=1), keep)


@hybrid_pack.register_fake
def _(q, k, v, config, key_keep=None):
    B, H, S, D = q.shape
    if key_keep is None:
        keep = q.new_empty(0, dtype=torch.uint8)
    else:
        ph = comm.resolve_group(_HYBRID[config].head_group)[2]
        keep = q.new_empty(key_keep.shape[0], ph * S, dtype=torch.uint8)
    return q.new_empty(H, B, S, D), k.new_empty(k.shape[1], 2, B, S, D), keep


def _pack_backward(ctx, dq, dkv, dkeep):
    return (None if dq is None else dq.transpose(0, 1), None if dkv is None else dkv[:, 0].transpose(0, 1),
            None if dkv is None else dkv[:, 1].transpose(0, 1), None, None)


hybrid_pack.register_autograd(_pack_backward)


def check_hybrid_arguments(q, k, v, strategy, sequence_mode: str, key_keep, head_group) -> str:
    """The call's own argument checks; returns the sequence stage's mode."""
    check_inputs(q, k, v)
    check_strategy(strategy)
    mode = resolve_mode(strategy, sequence_mode)
    check_shard_key_keep(key_keep, q)
    ph = comm.resolve_group(head_group)[2]
    if k.shape[1] % ph:
        raise ValueError(f"hybrid attention splits the kv heads evenly over the head group: {k.shape[1]} kv head(s) "
                         f"on a head group of {ph} ranks; pass a head group whose size divides the kv heads")
    return mode


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, strategy=None, *, head_group, sequence_group,
                     is_causal: bool = False, scale: Optional[float] = None, sequence_mode: str = "auto",
                     key_keep: Optional[Tensor] = None, return_lse: bool = False):
    """Attention over a sequence sharded across the world, head-parallel inside ``head_group`` and
    sequence-parallel across ``sequence_group`` (module docstring); exact, forward and backward.

    Args:
        q, k, v: this rank's shards ``[B, Hq, S, D]``, ``[B, Hkv, S, D]`` (rank r holds positions
            ``[r * S, (r + 1) * S)``: ``shard_sequence`` over the world); ``Hkv`` a multiple of the head group size.
        strategy: None (dense), ``dc.Dilated`` or ``dc.BlockSparse`` with a fixed pattern.
        head_group, sequence_group: this rank's process groups (``hybrid_groups``).
        sequence_mode: the sequence stage's mode, ``"auto"``, ``"ring"`` or ``"sparse"`` (as ``ring_attention``).
        key_keep: optional bool ``[B or 1, S]``: which keys of this shard attend (key padding).
        return_lse: also return the log-sum-exp ``[B, Hq, S]`` (not differentiable; ``-inf`` on rows that keep no
            key).

    Returns this rank's output shard ``[B, Hq, S, D]`` (and the LSE). Every rank of the world must make the same
    call; where ranks differ, or the groups don't tile the world, every rank raises the same ``ValueError``.
    """
    world_group = comm.resolve_group(None)[0]
    mode = sequence_mode
    try:
        mode = check_hybrid_arguments(q, k, v, strategy, sequence_mode, key_keep, head_group)
    except (TypeError, ValueError) as e:
        raise_on_every_rank(e, world_group, q, k, v, strategy, f"hybrid/{mode}", "contiguous", is_causal, scale,
                            key_keep, groups_text(head_group, sequence_group))
    cfg = HybridConfig(Config(strategy, world_group, f"hybrid/{mode}", "contiguous", bool(is_causal), scale),
                       head_group, sequence_group, mode)
    return hybrid_by_key(q, k, v, register_hybrid(cfg), key_keep, return_lse)


def hybrid_by_key(q: Tensor, k: Tensor, v: Tensor, config: str, key_keep: Optional[Tensor] = None,
                  return_lse: bool = False):
    """``hybrid_attention`` with the arguments registered under ``config`` (what rewritten graphs call)."""
    cfg = _HYBRID[config]
    q_sent, kv_sent, keep = torch.ops.dilate_compiler.hybrid_pack(q, k, v, config, key_keep)
    head_group, i, ph = comm.resolve_group(cfg.head_group)
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    kv_counts = [Hkv // ph] * ph
    q_counts = [c * g for c in kv_counts]
    q_shuffle = _Shuffle(head_group, i, ph, q_counts, S, "contiguous", q.device)
    kv_shuffle = _Shuffle(head_group, i, ph, kv_counts, S, "contiguous", q.device)
    qh = q_shuffle.to_heads(q_sent).transpose(0, 1)                                     # [B, h, Ph*S, D]
    kvh = kv_shuffle.to_heads(kv_sent.view(Hkv, 2 * B, S, D))
    kvh = kvh.view(kv_counts[i], 2, B, ph * S, D).permute(1, 2, 0, 3, 4)
    w = cfg.world
    if cfg.sequence_group is None:       # head-parallel only: the rank's heads over the whole sequence
        inner = register(Config(w.strategy, None, "local", "contiguous", w.is_causal, w.scale, (i * q_counts[i], H)))
    else:
        inner = register(Config(w.strategy, cfg.sequence_group, cfg.sequence_mode, "contiguous", w.is_causal,
                                w.scale, (i * q_counts[i], H)))
    out, lse = torch.ops.dilate_compiler.sequence_parallel_forward(qh, kvh[0], kvh[1], inner,
                                                                   None if key_keep is None else keep.bool())
    out = q_shuffle.to_shards(out.transpose(0, 1)).transpose(0, 1)
    if not return_lse:
        return out
    lse = q_shuffle.to_shards(lse.detach().transpose(0, 1).unsqueeze(-1))       # [H, B, S, 1]
    return out, lse.squeeze(-1).transpose(0, 1)


def world_key(config: str) -> str:
    """The key of a hybrid call's ``Config`` over the world (for ops that reduce over every rank)."""
    return register(_HYBRID[config].world)
