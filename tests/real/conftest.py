"""Fixtures for the tests against real model servers (`pytest -m real`).

Every test module here sets `pytestmark = pytest.mark.real`: the default run leaves them out, `.ci/run`
runs them after `tests/real/setup_servers.py`. A missing server is a failure that says how to install it, never a
skip: a skipped real test would hide exactly the drift these tests exist to catch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real.layout import Layout


@pytest.fixture(scope="session")
def layout() -> Layout:
    return Layout.from_env()


def need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} is not at {path}: run `python3 tests/real/setup_servers.py` first (the ComfyUI "
                    "source is ../shared/vendor/ComfyUI beside the checkout, or COMFYUI_SOURCE)")
    return path

