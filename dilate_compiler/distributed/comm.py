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
TAGS = {"kv": 1, "grad": 2, "heads": 3, "meta": 4}   # message tags by kind (gloo matches on them; NCCL orders by posting)


@dataclass
class CommCounter:
    """Bytes this rank sent and received, and messages sent, while the counter was active, by kind
    (``"kv"``: keys/values forward, ``"grad"``: their gradients backward, ``"meta"``: shape checks)."""

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
    """``group`` (None: the default group) as ``(group, rank, world_size)``; a clear error without one."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed attention needs an initialised process group "
                           "(torch.distributed.init_process_group); none is initialised")
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


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


def check_shapes_agree(group, world_size: int, what: str, values: tuple, device) -> None:
    """Every rank passes the same ``values`` (e.g. shard shape), or all of them get a clear error."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    n = mine.numel() * mine.element_size()
    _record("meta", n * (world_size - 1), n * (world_size - 1), world_size - 1)
    rows = [tuple(x.tolist()) for x in everyone]
    if len(set(rows)) > 1:
        raise ValueError(f"{what} differ across ranks: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(rows)))
