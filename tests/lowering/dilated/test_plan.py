"""The compile-time plan of a dilated pattern (``lowering/dilated/plan.py``)."""

from dilate_compiler.lowering.dilated.plan import clip_segment


def test_clip_segment_keeps_a_multiple_of_the_rate():
    assert clip_segment(64, 4, 10) == 12
    assert clip_segment(64, 4, 100) == 64
    assert clip_segment(8, 1, 3) == 3
