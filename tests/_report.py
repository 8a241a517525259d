"""The stress/fault suite's report: every test calls the ``report`` fixture
with what it checked and its figures; each call prints one line and is
appended to ONE JSON file per pytest session, whatever the number of xdist
workers, and the terminal summary names that file.  tests/conftest.py
imports the fixture and the hook, so any run that collects tests/ (a plain
``pytest -n auto`` included) prints the report's path.

The file is ``$SHMCACHE_STRESS_REPORT`` if set, else
``<tmpdir>/shmcache-stress-<session start>-<controller pid>.json``.  The
session is identified by the controlling pytest process (an xdist worker's
parent, else this process) and its start time, so the controller and its
workers agree on the file without any message between them, and a new session
never mixes with an old one.  Each record is added by a read-modify-write of
the whole file under an exclusive ``flock`` of it, so concurrent workers
never lose each other's records and the file is valid JSON after every call.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from typing import Any, Protocol

import psutil
import pytest

from .support import STRESS


class Report(Protocol):
    def __call__(self, *, checked: str, events: int, faults: int, failures: int, **more: Any) -> None: ...


def _controller_pid(config: pytest.Config) -> int:
    return os.getppid() if hasattr(config, "workerinput") else os.getpid()


def report_path(config: pytest.Config) -> str:
    explicit = os.environ.get("SHMCACHE_STRESS_REPORT")
    if explicit:
        return explicit
    pid = _controller_pid(config)
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    return os.path.join(tempfile.gettempdir(), f"shmcache-stress-{stamp}-{pid}.json")


def _append(path: str, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+", encoding="utf-8") as f:
            text = f.read()
            data: dict[str, Any] = json.loads(text) if text.strip() else {
                "stress": STRESS, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "records": []}
            data["records"].append(record)
            f.seek(0)
            f.truncate()
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)  # releases the flock


def _line(record: dict[str, Any]) -> str:
    more = {k: v for k, v in record.items()
            if k not in ("test", "checked", "events", "faults", "failures", "worker", "stress", "seconds")}
    extra = " ".join(f"{k}={v}" for k, v in sorted(more.items()))
    return (f"[stress:{record['stress']}] {record['test']}: {record['checked']} | events={record['events']} "
            f"faults={record['faults']} failures={record['failures']} {extra}").rstrip()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """``report(checked="...", events=N, faults=M, failures=K, **more)``:
    print a one-line summary and add it to the session's JSON report."""
    config = request.config
    path = report_path(config)
    started = time.monotonic()
    worker = getattr(config, "workerinput", {}).get("workerid", "main")

    def record(*, checked: str, events: int, faults: int, failures: int, **more: Any) -> None:
        rec: dict[str, Any] = {
            "test": request.node.nodeid, "checked": checked, "events": int(events),
            "faults": int(faults), "failures": int(failures), "worker": worker, "stress": STRESS,
            "seconds": round(time.monotonic() - started, 3), **more,
        }
        json.dumps(rec)  # anything not JSON fails here, in the test, not at the end
        print(_line(rec), flush=True)
        _append(path, rec)

    return record


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    path = report_path(config)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            records = json.load(f)["records"]
    except (OSError, ValueError, KeyError) as err:
        terminalreporter.write_line(f"shmcache stress report {path} is unreadable: {err}")
        return
    terminalreporter.section("shmcache stress report")
    for rec in records:
        terminalreporter.write_line(_line(rec))
    terminalreporter.write_line(f"{len(records)} records in {path}")
