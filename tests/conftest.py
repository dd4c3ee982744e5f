"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Shepherd


@pytest.fixture
def shepherds() -> Iterator[list[Shepherd]]:
    """Shepherds a test starts; each is stopped, with its whole process tree, when the test ends."""
    started: list[Shepherd] = []
    yield started
    for s in started:
        s.close()
