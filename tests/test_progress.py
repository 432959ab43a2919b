"""input_pipeline/progress.py: one display for a multi-phase run, with its time left."""

from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm

from input_pipeline import progress


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    return c


def test_time_left_scales_the_expected_phases_by_this_machines_speed(clock):
    expected = {"render": 10, "train": 20, "eval": 30}
    with progress.run_display("demo", list(expected), expected) as display:
        assert display.left() == 60
        with display.phase("render"):
            clock.now += 4  # 6 s of the expected 10 are left
            assert display.left() == pytest.approx(6 + 50)
            clock.now += 16
        # render took 20 s, twice as long as expected: the rest is expected to as well.
        assert display.speed() == pytest.approx(2.0)
        assert display.left() == pytest.approx((20 + 30) * 2)
        with display.phase("train"):
            b = progress.bar(total=100, desc="stage 0", file=io.StringIO(), smoothing=0)
            assert isinstance(b, progress._PhaseBar)
            assert b.desc.startswith("[demo 2/3 train] stage 0")
            b._time, b.start_t = clock, clock.now  # tqdm's own clock
            clock.now += 10
            b.update(50)  # 50 of 100 in 10 s: 10 s left on the bar, then eval's 30 x 2
            assert display.left() == pytest.approx(10 + 60, rel=1e-3)
            assert "demo ~1:10 left" in str(b)
            b.close()
    assert progress._active is None


def test_a_bar_outside_a_display_is_plain_tqdm():
    b = progress.bar(total=3, desc="x", file=io.StringIO())
    assert type(b) is tqdm
    b.close()


def test_format_seconds():
    assert progress.format_seconds(75) == "1:15"
    assert progress.format_seconds(3725) == "1:02:05"
    assert progress.format_seconds(-3) == "0:00"
