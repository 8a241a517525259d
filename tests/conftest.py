from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from ._daemon_helpers import served
from ._etcd import etcd
from ._report import pytest_terminal_summary, report
from .helpers import SESSION_VARIABLE, leftovers, remove_cache, unique_name

__all__ = ["etcd", "name", "pytest_configure", "pytest_sessionfinish", "pytest_terminal_summary", "report", "served"]


@pytest.fixture
def name() -> Iterator[str]:
    """A unique cache name; whatever the test leaves under it is removed."""
    n = unique_name()
    yield n
    remove_cache(n)
    assert not leftovers(n), f"left in /dev/shm: {leftovers(n)}"


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _controller(config):  # before the xdist workers start: they inherit it
        os.environ[SESSION_VARIABLE] = secrets.token_hex(4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite, nothing any test named is left in /dev/shm;
    leftovers fail the run (and are removed, so one failure does not leak
    into the next run)."""
    if not _controller(session.config):
        return
    left = leftovers(os.environ[SESSION_VARIABLE])
    if left:
        for entry in left:
            os.unlink(os.path.join("/dev/shm", entry))
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"FAILED: the tests left {len(left)} entries in /dev/shm (now removed): "
                                + ", ".join(left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
