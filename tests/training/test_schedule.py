import math

import pytest

from training.schedule import WarmupCosine


def test_warmup_is_linear_and_reaches_peak_at_warmup_end():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1)
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)  # end of warmup: the peak


def test_cosine_midpoint_and_end():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert s(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(0.1)  # the end: the floor
    assert s(500) == pytest.approx(0.1)
