from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmcache import Producer, Reader

from ._etcd import etcd
from ._report import pytest_terminal_summary, report
from .support import MAX_FRAME, SESSION_VARIABLE, Served, leftovers, remove_cache, running, sock_in, unique_name

__all__ = ["etcd", "name", "pytest_configure", "pytest_sessionfinish", "pytest_terminal_summary", "report", "served"]


@pytest.fixture
def name() -> Iterator[str]:
    """A unique cache name; whatever the test leaves under it is removed."""
    n = unique_name()
    yield n
    remove_cache(n)
    assert not leftovers(n), f"left in /dev/shm: {leftovers(n)}"


@pytest.fixture
def served(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A daemon (--client-timeout 0.5, --heartbeat 0.1, --max-frame-bytes
    MAX_FRAME, then any options given as the indirect parameter) holding a
    little state, a Producer and a Reader."""
    sock = sock_in(tmp_path)
    extra: list[str] = getattr(request, "param", [])
    with running(name, sock, tmp_path / "d.log", "--client-timeout", "0.5", "--heartbeat", "0.1",
                 "--max-frame-bytes", str(MAX_FRAME), *extra) as d:
        with Reader(name) as reader, Producer(sock) as producer:
            producer.put_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
            producer.delete("c")
            snapshot = reader.list()
            assert snapshot.rv == 4
            yield Served(d, sock, producer, reader, snapshot)


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
