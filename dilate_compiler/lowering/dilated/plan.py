"""The compile-time plan of a dilated pattern: which rows of which heads each branch reads, fixed before any
kernel runs. The strategy (``strategies.dilated.Dilated``), the exact path and the kernels read it from here.

A pattern is ``(segment_lengths, dilation_rates, mixing, head_offsets)``: branch ``i`` has segment length ``w_i``
and rate ``r_i`` (``w_i % r_i == 0``). Under ``mixing="lse"`` query head ``h`` of ``H`` reads the rows
``p % r_i == offset_i(h)`` of every branch, where ``offset_i(h)`` is ``h % r_i`` (``head_offsets="interleaved"``)
or ``h // ceil(H / r_i)`` (``"grouped"``: contiguous head groups, torchscale's LongNet); under ``"head_groups"``
heads split into one contiguous group per branch (the first ``H % n`` get one extra head) and group ``i`` reads the
rows ``p % r_i == i % r_i`` of branch ``i`` only, the output divided by the number of branches.
"""

from __future__ import annotations

from dataclasses import dataclass

MIXINGS = ("lse", "head_groups")
HEAD_OFFSETS = ("interleaved", "grouped")
MAX_INT64 = 2**63 - 1


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if not items:
        raise ValueError(f"{name} must be non-empty, got {value!r}")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ValueError(f"{name} must hold positive ints, got {value!r} (bad entry {x!r})")
        if x > MAX_INT64:
            raise ValueError(f"{name} must hold ints of at most 2**63 - 1 (int64), got {value!r} (bad entry {x!r}); "
                             f"a segment longer than the sequence holds the whole sequence")
    return items


def check_pattern(segment_lengths, dilation_rates, mixing: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(segment_lengths, dilation_rates)`` as tuples of ints, once checked: positive ints, as many of each,
    every segment length a multiple of its rate, ``mixing`` one of ``MIXINGS``."""
    segs = _as_int_tuple("segment_lengths", segment_lengths)
    rates = _as_int_tuple("dilation_rates", dilation_rates)
    if len(segs) != len(rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have equal lengths, got {len(segs)} "
            f"({segs!r}) and {len(rates)} ({rates!r})"
        )
    for w, r in zip(segs, rates):
        if w % r:
            raise ValueError(
                f"each segment length must be a multiple of its dilation rate, got segment {w} with rate {r} "
                f"(segment_lengths={segs!r}, dilation_rates={rates!r})"
            )
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    return segs, rates


def check_head_offsets(head_offsets: str, mixing: str) -> str:
    """``head_offsets`` once checked: one of ``HEAD_OFFSETS``, and ``"grouped"`` only under ``mixing="lse"``."""
    if head_offsets not in HEAD_OFFSETS:
        raise ValueError(f"head_offsets must be one of {HEAD_OFFSETS}, got {head_offsets!r}")
    if head_offsets == "grouped" and mixing != "lse":
        raise ValueError(
            f"head_offsets='grouped' (torchscale's LongNet: head h reads the rows p % r == h // ceil(H / r) of every "
            f"branch) needs mixing='lse', got mixing={mixing!r}; mixing='head_groups' gives each branch's head group "
            f"the offset i % r_i of its branch index i, so it takes head_offsets='interleaved' only")
    return head_offsets


def grouped_offset_size(dilation_rate: int, num_heads: int) -> int:
    """How many consecutive heads share one offset under ``head_offsets="grouped"``: ``ceil(H / r)``."""
    return -(-num_heads // dilation_rate)


def head_offset(h, dilation_rate: int, num_heads: int, head_offsets: str):
    """The row offset of query head ``h`` (an int or an integer tensor) in a branch of rate ``dilation_rate`` under
    ``mixing="lse"``: ``h % r`` (interleaved) or ``h // ceil(H / r)`` (grouped)."""
    if head_offsets == "grouped":
        return h // grouped_offset_size(dilation_rate, num_heads)
    return h % dilation_rate


def offsets_coincide(dilation_rates, num_heads: int) -> bool:
    """True when grouped offsets equal interleaved ones for every head and branch (every rate 1 or at least H, or
    one head), so a grouped pattern runs as the interleaved one."""
    return all(r == 1 or r >= num_heads for r in dilation_rates)


@dataclass(frozen=True)
class HeadGroup:
    """Query heads ``range(start, stop, step)`` read the rows ``p`` with ``p % rate == offset`` of a branch."""

    start: int
    stop: int
    step: int
    offset: int

    def heads(self) -> range:
        return range(self.start, self.stop, self.step)


@dataclass(frozen=True)
class Branch:
    """One dilated branch as run on a sequence of a known length: ``segment_length`` is already clipped."""

    segment_length: int
    dilation_rate: int
    head_groups: tuple[HeadGroup, ...]


@dataclass(frozen=True)
class DilatedPlan:
    """Everything a kernel needs, fixed at compile time: branches, their head groups, the output scale."""

    branches: tuple[Branch, ...]
    output_scale: float


def clip_segment(segment_length: int, dilation_rate: int, seq_len: int) -> int:
    """Smallest multiple of ``dilation_rate`` that is >= ``seq_len``, if that is shorter than the segment.

    A segment longer than the sequence holds the whole sequence; keeping the clipped length a multiple of
    the rate keeps "position mod rate" the same inside the segment and globally.
    """
    return min(segment_length, -(-max(seq_len, 1) // dilation_rate) * dilation_rate)


def head_group_bounds(num_branches: int, num_heads: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each branch's heads under ``mixing="head_groups"``."""
    base, extra = divmod(num_heads, num_branches)
    bounds, start = [], 0
    for i in range(num_branches):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def dilated_plan(segment_lengths, dilation_rates, mixing: str, seq_len: int, num_heads: int,
                 head_offsets: str = "interleaved") -> DilatedPlan:
    """The compile-time plan of a pattern for ``num_heads`` query heads over ``seq_len`` tokens (the pattern is
    checked first: ``check_pattern``, ``check_head_offsets``)."""
    segs, rates = check_pattern(segment_lengths, dilation_rates, mixing)
    check_head_offsets(head_offsets, mixing)
    branches = []
    if head_offsets == "grouped":   # offset o: the contiguous heads [o * g, (o + 1) * g), g = ceil(H / r)
        for w, r in zip(segs, rates):
            g = grouped_offset_size(r, num_heads)
            groups = tuple(HeadGroup(o * g, min((o + 1) * g, num_heads), 1, o) for o in range(-(-num_heads // g)))
            branches.append(Branch(clip_segment(w, r, seq_len), r, groups))
        return DilatedPlan(tuple(branches), 1.0)
    if mixing == "lse":
        for w, r in zip(segs, rates):
            groups = tuple(HeadGroup(o, num_heads, r, o) for o in range(min(r, num_heads)))
            branches.append(Branch(clip_segment(w, r, seq_len), r, groups))
        return DilatedPlan(tuple(branches), 1.0)
    for i, ((w, r), (start, stop)) in enumerate(zip(zip(segs, rates), head_group_bounds(len(segs), num_heads))):
        groups = (HeadGroup(start, stop, 1, i % r),) if stop > start else ()
        branches.append(Branch(clip_segment(w, r, seq_len), r, groups))
    return DilatedPlan(tuple(branches), 1.0 / len(segs))


def nested_order(segment_lengths, dilation_rates, mixing: str, dropout_p: float = 0.0,
                 head_offsets: str = "interleaved"):
    """The branches ``(segments, rates)`` sorted by segment length (then rate) when they form a chain, each
    segment length and each rate dividing the next, under ``mixing="lse"`` with interleaved offsets and without
    dropout: the kernels then visit every linked pair once, weighted by its multiplicity (``triton.walks``). None
    otherwise (the kernels walk per branch). Sorting is free under LSE mixing: a branch's offset depends on its rate
    alone. The walks need the rows a branch selects to lie inside those of every shorter branch of the chain, which
    ``h % r`` gives (``r_1 | r_2`` makes ``h % r_2 == c % r_2`` imply ``h % r_1 == c % r_1``) and grouped offsets
    don't (H = 4, rates 2 and 4: head 1 has offsets 0 and 1, and 1 % 2 != 0); a grouped pattern whose offsets
    coincide with the interleaved ones (``offsets_coincide``) is passed here as interleaved."""
    if mixing != "lse" or dropout_p != 0.0 or head_offsets != "interleaved":
        return None
    pairs = sorted(zip(segment_lengths, dilation_rates))
    if any(w2 % w1 or r2 % r1 for (w1, r1), (w2, r2) in zip(pairs, pairs[1:])):
        return None
    return tuple(w for w, _ in pairs), tuple(r for _, r in pairs)
