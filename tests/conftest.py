from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._daemon_helpers import served
from ._report import pytest_terminal_summary, report
from .helpers import leftovers, remove_cache, unique_name

__all__ = ["name", "pytest_terminal_summary", "report", "served"]


@pytest.fixture
def name() -> Iterator[str]:
    """A unique cache name; whatever the test leaves under it is removed."""
    n = unique_name()
    yield n
    remove_cache(n)
    assert not leftovers(n), f"left in /dev/shm: {leftovers(n)}"
