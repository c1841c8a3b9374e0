"""The step-time breakdown: phases add up, communication is taken out of the phase it ran in."""

from __future__ import annotations

import time

import pytest

from components.train.step_time import (
    PHASES,
    StepClock,
    format_breakdown,
    mean_breakdown,
    metric_name,
    time_collectives,
)


class FakeBackend:
    """Stands in for deepspeed.comm's backend: one collective that takes a known time, one plain call."""

    def all_reduce(self, seconds: float) -> str:
        time.sleep(seconds)
        return "reduced"

    def get_rank(self) -> int:
        return 0


def test_communication_inside_a_phase_is_booked_as_comm_only() -> None:
    synced: list[int] = []
    clock = StepClock(synchronize=lambda: synced.append(1))
    backend = FakeBackend()
    time_collectives(clock, backend)
    started = time.perf_counter()
    with clock.phase("backward"):
        time.sleep(0.05)
        assert backend.all_reduce(0.1) == "reduced"
    with clock.phase("forward"):
        time.sleep(0.02)
    wall = time.perf_counter() - started
    taken = clock.take()
    assert set(taken) == {metric_name(p) for p in PHASES}
    assert taken["time/comm_s"] == pytest.approx(0.1, abs=0.03)
    assert taken["time/backward_s"] == pytest.approx(0.05, abs=0.03)
    assert taken["time/forward_s"] == pytest.approx(0.02, abs=0.02)
    assert sum(taken.values()) == pytest.approx(wall, abs=0.01)
    assert len(synced) == 3, "each phase and each collective ends with a device synchronize"
    assert backend.get_rank() == 0 and sum(clock.take().values()) == 0.0, "take() starts the next step afresh"


def test_an_unknown_phase_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown step phase 'compute'"), StepClock().phase("compute"):
        pass


def test_the_summary_gives_each_phases_share_of_the_mean_step() -> None:
    rows = [{metric_name(p): s for p, s in zip(PHASES, (0.1, 0.3, 0.4, 0.1, 0.05, 0.05), strict=True)}] * 3
    rows.append({"step": 4})  # a row without the breakdown (an older run's) is left out
    assert mean_breakdown(rows)["backward"] == pytest.approx(0.4)
    assert format_breakdown(rows) == ("1.00 s per step: data wait 10%, forward 30%, backward 40%, optimizer 10%, "
                                      "gradient communication 5%, report 5%")
    assert format_breakdown([{"step": 1}]) is None
