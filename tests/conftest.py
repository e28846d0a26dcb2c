"""Shared fixtures. Tests use the installed amesh (run.sh installs the working tree first)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nginx import Nginx


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator:
    """Factory for private nginx instances; all are killed at teardown."""
    started: list[Nginx] = []

    def make(**kwargs) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        n = Nginx(prefix, **kwargs)
        started.append(n)
        return n

    yield make
    for n in started:
        n.stop()
