"""The up-front resource check: "can never fit" is refused, "not yet scaled" waits for the autoscaler."""

from __future__ import annotations

import pytest

from components.cluster import Need, check_fits
from components.errors import ClusterTooSmallError

STAGE = Need("stage 1", {"CPU": 3.5}, "2 training workers x 1 CPU + their data preprocessing 2 x 0.75 CPU")


def test_a_step_that_fits_now_goes_ahead() -> None:
    check_fits([STAGE], {"CPU": 4.0}, False)


def test_a_fixed_cluster_too_small_is_refused_naming_what_it_has() -> None:
    with pytest.raises(ClusterTooSmallError, match=r"stage 1 needs 3\.5 CPU at once \(2 training workers .*\), "
                                                  r"but the Ray cluster has 2 CPU: it would wait forever"):
        check_fits([STAGE], {"CPU": 2.0}, False)


def test_an_autoscaler_that_can_grow_to_it_is_waited_for_and_one_that_cannot_is_refused() -> None:
    check_fits([STAGE], {"CPU": 4.0}, True)  # its limits: 2 nodes x 2 CPU, none launched yet
    with pytest.raises(ClusterTooSmallError, match=r"the Ray cluster can grow to at most 3 CPU"):
        check_fits([STAGE], {"CPU": 3.0}, True)


def test_an_autoscaler_of_unknown_limits_is_waited_for_saying_so(capsys: pytest.CaptureFixture[str]) -> None:
    check_fits([STAGE, Need("evaluation", {"CPU": 1.5}, "")], {"CPU": 0.0}, None)
    assert capsys.readouterr().out == (
        "[duet] stage 1 needs 3.5 CPU; evaluation needs 1.5 CPU at once, more than the cluster has now (no CPUs): "
        "each waits for the autoscaler to add nodes (it does not report how far it can grow)\n")
