"""Communication for the distributed ops: torch.distributed point-to-point and all-to-all, and a byte count.

Every byte the distributed ops move goes through ``exchange``, ``RingShift`` or ``all_to_all``, which add it
to the active ``count_bytes()`` counters, so tests and benchmarks read the real volume, not an estimate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

_COUNTERS: list = []
# message tags by kind (gloo matches on them; NCCL orders by posting)
TAGS = {"kv": 1, "grad": 2, "heads": 3, "meta": 4, "keep": 5}


@dataclass
class CommCounter:
    """Bytes this rank sent and received, and messages sent, while the counter was active, by kind
    (``"kv"``: keys/values forward, ``"grad"``: their gradients backward, ``"keep"``: key padding flags,
    ``"heads"``: head-parallel all-to-alls, ``"reduce"``: all-reduces (counted as a ring all-reduce moves them),
    ``"meta"``: agreement checks)."""

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    messages: int = 0

    def sent_bytes(self, kind: Optional[str] = None) -> int:
        return sum(v for k, v in self.sent.items() if kind is None or k == kind)

    def received_bytes(self, kind: Optional[str] = None) -> int:
        return sum(v for k, v in self.received.items() if kind is None or k == kind)


@contextlib.contextmanager
def count_bytes():
    """``with count_bytes() as c: ...``: ``c`` holds what this rank's distributed attention calls moved."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(kind: str, sent: int, received: int, messages: int) -> None:
    for c in _COUNTERS:
        c.sent[kind] = c.sent.get(kind, 0) + sent
        c.received[kind] = c.received.get(kind, 0) + received
        c.messages += messages


def resolve_group(group):
    """``group`` (None: the default group) as ``(group, rank, world_size)``; a clear error without one, or where
    this process is not a member of it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed attention needs an initialised process group "
                           "(torch.distributed.init_process_group); none is initialised")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the process group "
                         f"it passed (global ranks {dist.get_process_group_ranks(group)}); pass a group it is in")
    return group, rank, dist.get_world_size(group)


def _peer(group, rank: int) -> int:
    return dist.get_global_rank(group, rank)


def exchange(group, sends: dict, recv_shapes: dict, dtype, device, kind: str) -> dict:
    """Point-to-point: send ``sends[peer]`` to each peer and receive a tensor of ``recv_shapes[peer]`` from each;
    all at once (``batch_isend_irecv``). Empty messages are skipped on both sides (both know the sizes)."""
    ops, received = [], {}
    sent_bytes = recv_bytes = messages = 0
    for peer, t in sends.items():
        if t.numel():
            t = t.contiguous()
            ops.append(dist.P2POp(dist.isend, t, _peer(group, peer), group, TAGS[kind]))
            sent_bytes += t.numel() * t.element_size()
            messages += 1
    for peer, shape in recv_shapes.items():
        buf = torch.empty(shape, dtype=dtype, device=device)
        received[peer] = buf
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, _peer(group, peer), group, TAGS[kind]))
            recv_bytes += buf.numel() * buf.element_size()
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    _record(kind, sent_bytes, recv_bytes, messages)
    return received


class RingShift:
    """Send a tensor to the next rank and receive the previous rank's, asynchronously: ``start`` returns at once,
    ``wait`` returns the received tensor, so compute can run in between (overlap)."""

    def __init__(self, group, rank: int, world_size: int, kind: str):
        self.group, self.kind = group, kind
        self.next, self.prev = _peer(group, (rank + 1) % world_size), _peer(group, (rank - 1) % world_size)
        self.works, self.buf = [], None

    def start(self, t: Tensor) -> "RingShift":
        t = t.contiguous()
        self.buf = torch.empty_like(t)
        self._keep = t
        tag = TAGS[self.kind]
        self.works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self.next, self.group, tag),
                                             dist.P2POp(dist.irecv, self.buf, self.prev, self.group, tag)])
        n = t.numel() * t.element_size()
        _record(self.kind, n, n, 1)
        return self

    def wait(self) -> Tensor:
        for work in self.works:
            work.wait()
        self.works, self._keep = [], None
        return self.buf


def all_to_all(t: Tensor, out_splits: list, in_splits: list, group, kind: str) -> Tensor:
    """Differentiable all-to-all along dim 0 (functional collectives: traceable by torch.compile). Eager calls
    count their bytes forward, and backward the reverse all-to-all of the gradient (a hook on the output)."""
    import torch.distributed._functional_collectives as funcol

    from torch._subclasses.fake_tensor import FakeTensor

    rank = dist.get_rank(group)
    item = t[0].numel() * t.element_size() if t.shape[0] else 0
    counted = not isinstance(t, FakeTensor) and not torch.compiler.is_compiling()   # count runs, not traces
    sent, received = (sum(in_splits) - in_splits[rank]) * item, (sum(out_splits) - out_splits[rank]) * item
    if counted:
        _record(kind, sent, received, sum(1 for r, n in enumerate(in_splits) if n and r != rank))
    out = funcol.all_to_all_single_autograd(t.contiguous(), out_splits, in_splits, group)
    out = funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out
    if counted and out.requires_grad:
        messages = sum(1 for r, n in enumerate(out_splits) if n and r != rank)
        out.register_hook(lambda g: _record(kind, received, sent, messages))
    return out


@dataclass(frozen=True)
class Field:
    """One thing every rank of a collective call must pass equal: ``values`` (ints; as many on every rank) and
    ``text``, how this rank's value reads in an error."""

    name: str
    values: tuple
    text: str


def _all_gather(t: Tensor, group, world_size: int) -> list:
    everyone = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(everyone, t, group=group)
    n = t.numel() * t.element_size()
    _record("meta", n * (world_size - 1), n * (world_size - 1), world_size - 1)
    return everyone


def check_agreement(group, world_size: int, what: str, fields: list, device, cause=None) -> None:
    """Every rank passes equal ``fields`` (``Field``, the same names in the same order) to ``what`` (a call, for
    the message), or every rank raises the same ``ValueError`` naming each field that differs and every rank's
    value (chained to ``cause``: this rank's own error, if any).

    One all_gather of an int64 tensor: the fields' values, then the byte length of each field's text. Only when
    the values differ (every rank sees the same gathered rows, so all take this path together) a second
    all_gather brings every rank's texts of the differing fields, for the error.
    """
    if world_size == 1:
        return
    texts = [f.text.encode() for f in fields]
    mine = torch.tensor([v for f in fields for v in f.values] + [len(t) for t in texts], dtype=torch.int64,
                        device=device)
    rows = [row.tolist() for row in _all_gather(mine, group, world_size)]
    spans, start = [], 0
    for f in fields:
        spans.append((start, start + len(f.values)))
        start += len(f.values)
    differ = [i for i, (a, b) in enumerate(spans) if any(row[a:b] != rows[0][a:b] for row in rows)]
    if not differ:
        return
    lengths = [[row[start + i] for i in differ] for row in rows]
    width = max(sum(n) for n in lengths)
    buf = torch.tensor(list(b"".join(texts[i] for i in differ).ljust(width, b"\0")), dtype=torch.uint8,
                       device=device)
    shown = []
    for r, got in enumerate(_all_gather(buf, group, world_size)):
        data, at, parts = bytes(got.cpu().tolist()), 0, []
        for n in lengths[r]:
            parts.append(data[at:at + n].decode())
            at += n
        shown.append(parts)
    lines = []
    for j, i in enumerate(differ):
        a, b = spans[i]
        same_text = len({s[j] for s in shown}) == 1   # equal texts of unequal values: show the values too
        lines.append(f"{fields[i].name} (" + ", ".join(
            f"rank {r}: {shown[r][j]}" + (f" {tuple(rows[r][a:b])}" if same_text else "") for r in range(world_size))
            + ")")
    raise ValueError(f"{what}: the {world_size} ranks of the process group differ in " + "; ".join(lines)
                     + f". Every rank must pass the same {', '.join(f.name for f in fields)}.") from cause
