"""What the passes record about each attention site, and the report users read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def static_int(x) -> Optional[int]:
    """``x`` as an int when it is one at compile time; None for a symbolic size. Never guards on (specialises) a
    symbolic size, as ``int(x)`` would."""
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    if isinstance(x, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        return int(x) if is_concrete_int(x) else None
    return None


@dataclass
class AttentionSite:
    """One attention found in a graph.

    ``kind``: ``"sdpa"`` (``scaled_dot_product_attention``) or ``"matmul-softmax"`` (written out by hand, with
    ``matmul``/``bmm``/``baddbmm``/``einsum``). ``mask_kind``: ``"none"``, ``"bool"`` or ``"additive"``.
    ``status``: ``"found"`` -> ``"rewritten"`` or ``"skipped"`` (with ``reason``).
    """

    name: str
    kind: str
    location: str = ""
    q_shape: tuple = ()
    k_shape: tuple = ()
    v_shape: tuple = ()
    dtype: Any = None
    mask_kind: str = "none"
    is_causal: bool = False
    scale: Optional[float] = None
    # Soft-capping of the scaled scores before the mask (Gemma2): ``c`` of ``c * tanh(s / c)``, None without it.
    softcap: Optional[float] = None
    dropout_p: float = 0.0
    gqa_ratio: int = 1
    status: str = "found"
    reason: str = ""
    # What the strategy made of a rewritten site (e.g. the block-sparse layout it chose).
    detail: str = ""
    # The mask as read by ``read_masks``: a static predicate (a ``dc.patterns`` pattern, causal folded in) AND
    # per-key data terms (key padding), and the model's value for a row that sees no key ("zero", "nan",
    # "mean"); ``mask_reason`` says why a mask is not read so (the site then carries its mask).
    pattern: Any = None
    key_keep: tuple = ()
    empty_rows: str = "zero"
    mask_reason: str = ""
    # ``predicate``: "all" or "causal" when the pattern is one of those, else ""; ``predicate_name`` names it.
    predicate: str = ""
    predicate_name: str = ""
    # A decode step: k and v are a KV cache this step's keys extend, so the queries are the last Nq of the Nk key
    # positions (the ops' convention for Nq < Nk).
    decode: bool = False
    # How the strategy will run the site, for the report: "kernels", or "exact path: <why>".
    runs: str = ""
    # Graph handles, filled by find_attention for rewrite_attention (not part of the printed report).
    nodes: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def mask_desc(self) -> str:
        """The site's mask as the report names it: ``causal + key padding``, ``sliding_window(4096)``, or its kind
        (``bool``, ``additive``) when it is not read as a predicate."""
        if not self.nodes.get("terms"):
            return "causal" if self.is_causal else "none"
        if self.pattern is None:
            return self.mask_kind
        return self.predicate_name + (" + key padding" if self.key_keep else "")

    @property
    def seq_len(self) -> int:
        return int(self.q_shape[-2]) if self.q_shape else 0

    def skip(self, reason: str) -> "AttentionSite":
        self.status, self.reason = "skipped", reason
        return self


class AttentionSkipped(RuntimeError):
    """Raised under ``strict=True`` when a site can't be rewritten."""


@dataclass
class Report:
    sites: list = field(default_factory=list)

    @property
    def found(self) -> list:
        return list(self.sites)

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list:
        return [s for s in self.sites if s.status == "skipped"]

    def extend(self, other: "Report") -> None:
        self.sites.extend(other.sites)

    def __str__(self) -> str:
        head = ("site", "kind", "location", "q shape", "dtype", "mask", "scale", "gqa", "status")
        rows = [head]
        for s in self.sites:
            status = s.status
            if s.reason:
                status += f": {s.reason}"
            elif s.status == "rewritten":
                status += f" ({s.runs})" if s.runs else ""
                status += f" [{s.detail}]" if s.detail else ""
            rows.append((
                s.name, s.kind + (" decode" if s.decode else ""), s.location or "-",
                "x".join(str(d) for d in s.q_shape) + (f" ({s.k_shape[2]} keys)" if s.decode else ""),
                str(s.dtype).replace("torch.", ""),
                s.mask_desc + ("" if s.softcap is None else f", softcap {s.softcap:g}"),
                "-" if s.scale is None else f"{s.scale:.4g}",
                str(s.gqa_ratio), status,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        summary = f"{len(self.sites)} attention site(s): {len(self.rewritten)} rewritten, {len(self.skipped)} skipped"
        return "\n".join(lines[:1] + lines[1:] + [summary])

    __repr__ = __str__
