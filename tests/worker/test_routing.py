"""The held share that routes a run (worker.routing): record counts bound it."""

from __future__ import annotations

from worker.routing import held_share


def test_a_held_attempt_at_fewer_records_predicts_a_held_larger_run() -> None:
    # Newest first: a 69-record run was held after a 3-record request was released.
    attempts = [(0.75, True, 69), (0.15, False, 3)]
    assert held_share(attempts, 999) == 1.0
    assert held_share(attempts, 69) == 1.0
    # A smaller run has only the plain share to go by.
    assert held_share(attempts, 10) == 0.5


def test_a_later_release_of_as_many_records_lifts_the_bound() -> None:
    attempts = [(0.8, False, 1000), (0.75, True, 69)]
    assert held_share(attempts, 999) == 0.5
    # An older release does not: the newest evidence about runs this large is the hold.
    assert held_share([(0.75, True, 69), (0.8, False, 1000)], 999) == 1.0


def test_without_record_counts_it_is_the_share_of_held_attempts() -> None:
    attempts = [(0.5, True, None), (0.4, False, None), (0.3, False, None)]
    assert held_share(attempts, 50) == 1 / 3
    assert held_share(attempts, None) == 1 / 3
