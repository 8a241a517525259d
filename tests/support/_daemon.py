"""A ``shmcached`` process for a test: started and judged ready by the
library's one launcher (shmcache/_launch.py), stopped and checked for
leftovers here; and the state the ``served`` fixture (tests/conftest.py)
hands a test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from shmcache import DaemonUnavailable, Producer, Reader, Snapshot
from shmcache._launch import DaemonNotReady, daemon_output, start_daemon, wait_ready
from shmcache._launch import daemon_env as _scrubbed_env

from ._children import START_TIMEOUT, STOP_TIMEOUT, python_env, wait_for
from ._names import leftovers

#: sizes small enough for /dev/shm on a CI machine
SMALL = ("--capacity", "64", "--arena-bytes", "65536", "--max-keys", "256", "--store-bytes", "1048576")
MAX_FRAME = 100_000  # --max-frame-bytes of the ``served`` daemon: above its 64 KiB arena


def sock_in(tmp_path: Path, label: str = "d") -> str:
    path = str(tmp_path / f"{label}.sock")
    assert len(path.encode()) < 100, f"{path} is too long for a Unix socket"
    return path


def as_dict(snap: Snapshot) -> dict[str, tuple[bytes, int]]:
    return {item.key: (item.value, item.rv) for item in snap.items}


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that configures shmcached
    (so a developer's or systemd's settings cannot leak into a test), with
    the repository importable."""
    env = _scrubbed_env({"PYTHONPATH": python_env()["PYTHONPATH"]})
    env.update(extra or {})
    return env


class Daemon:
    """One ``shmcached`` process; its stdout and stderr go to a file."""

    def __init__(self, argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 name: str | None = None, socket_path: str | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.name = name
        self.socket = socket_path
        self.log_path = log
        self.proc = start_daemon(argv, log, env=daemon_env(env), command=command)
        self.pid = self.proc.pid

    @classmethod
    def start(cls, name: str, socket_path: str, log: Path, *args: str, small: bool = True,
              env: Mapping[str, str] | None = None, command: Sequence[str] | None = None) -> Daemon:
        argv = ["--name", name, "--socket", socket_path, *(SMALL if small else ()), *args]
        return cls(argv, log, env=env, name=name, socket_path=socket_path, command=command)

    @property
    def output(self) -> str:
        return daemon_output(self.log_path)

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"shmcached pid {self.pid}: {why}; its output:\n{self.output}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the daemon serves (shmcache._launch.wait_ready)."""
        assert self.name is not None and self.socket is not None
        try:
            wait_ready(self.proc, self.name, self.socket, self.log_path, timeout)
        except DaemonNotReady as err:
            raise AssertionError(str(err)) from None

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self.fail(f"still running {timeout} s after it should have exited") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` and reap; the exit status."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def assert_gone(self) -> None:
        """After a clean stop: exit status 0, no socket, nothing in /dev/shm."""
        assert self.proc.returncode == 0, self.fail(f"exit status {self.proc.returncode}")
        assert self.socket is not None and self.name is not None
        assert not os.path.exists(self.socket), self.fail(f"{self.socket} left behind")
        assert not leftovers(self.name), self.fail(f"left in /dev/shm: {leftovers(self.name)}")


@contextmanager
def running(name: str, socket_path: str, log: Path, *args: str, small: bool = True,
            env: Mapping[str, str] | None = None,
            command: Sequence[str] | None = None) -> Iterator[Daemon]:
    """A serving daemon.  On the way out: SIGTERM, and (unless the body
    failed, or stopped the daemon itself) a check that it exited 0 and left
    nothing behind.  It is killed whatever happens."""
    d = Daemon.start(name, socket_path, log, *args, small=small, env=env, command=command)
    try:
        d.wait_ready()
        yield d
    except BaseException:
        d.kill()
        raise
    stopped_by_body = d.proc.returncode is not None
    try:
        rc = d.stop()
    finally:
        d.kill()
    if not stopped_by_body:
        assert rc == 0, d.fail(f"exit status {rc} after SIGTERM")
        d.assert_gone()


def producer_when_admitted(sock: str) -> Producer:
    """A Producer the daemon has admitted (it may still count a client that
    just disconnected: retry until it has noticed)."""
    deadline = time.monotonic() + 20
    while True:
        p = Producer(sock)
        try:
            p.ping()
            return p
        except DaemonUnavailable:
            p.close()
            assert time.monotonic() < deadline, "never admitted"
            time.sleep(0.05)


@dataclass
class Served:
    """What the ``served`` fixture hands a test: a daemon holding a little
    state, a Producer and a Reader."""

    daemon: Daemon
    sock: str
    producer: Producer
    reader: Reader
    snapshot: Snapshot

    def assert_unchanged(self) -> None:
        assert self.producer.ping() == self.snapshot.rv
        assert self.reader.list() == self.snapshot

    def connections(self) -> int:
        n: int = self.producer.stats()["producers"]
        return n

    def wait_only_producer(self) -> None:
        """Until the daemon has dropped every connection but the producer's."""
        wait_for(lambda: self.connections() == 1, "the daemon keeps connections the clients closed")
