"""The optional reqnum replay window."""

from __future__ import annotations

import pytest

from proxy.replay import ReplayGuard


def test_the_same_signed_reqnum_passes_once() -> None:
    guard = ReplayGuard(100)
    assert guard.accept(5, "sig") is None
    assert guard.accept(5, "sig") == "reqnum 5 was already used"
    assert guard.accept(5, "other") is None  # another signature: another request


def test_reqnums_far_behind_the_newest_are_refused() -> None:
    guard = ReplayGuard(100)
    assert guard.accept(1000, "a") is None
    assert guard.accept(900, "b") is None  # exactly at the edge of the window
    assert guard.accept(899, "c") == "reqnum 899 is more than 100 behind the newest (1000)"


def test_memory_stays_bounded_by_the_window() -> None:
    guard = ReplayGuard(10)
    for n in range(1000):
        assert guard.accept(n, "s") is None
    assert len(guard._recent) == 10


def test_a_window_of_zero_is_not_a_guard() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(0)
