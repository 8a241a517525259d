"""Helpers of tests/test_daemon.py and of the daemon's stress tests
(tests/stress/test_hostile_producers.py, test_daemon_crash.py...): a
``shmcached`` process, raw protocol clients written from docs/protocol.md (not
from shmcache/_protocol.py), a fake systemd ``NOTIFY_SOCKET``, child processes
that print JSON lines, and the ``served`` fixture (tests/conftest.py provides
it to every test module)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from shmcache import (
    CacheClosed,
    CacheCorrupted,
    CacheNotFound,
    DaemonUnavailable,
    Producer,
    Reader,
    Snapshot,
)

from . import helpers

#: sizes small enough for /dev/shm on a CI machine
SMALL = ("--capacity", "64", "--arena-bytes", "65536", "--max-keys", "256", "--store-bytes", "1048576")
MAX_FRAME = 100_000  # --max-frame-bytes of the ``served`` daemon: above its 64 KiB arena
START_TIMEOUT = 20.0  # from Popen to "serving"
STOP_TIMEOUT = 20.0  # from SIGTERM to exit
IO_TIMEOUT = 10.0  # any single socket read or write the daemon should answer at once

# ---- the wire format, from docs/protocol.md --------------------------------

PING, PUT, DELETE, BATCH, STATS = 1, 2, 3, 4, 5
OK, BAD_FRAME, FRAME_TOO_LARGE, UNKNOWN_OP, INVALID_KEY = 0, 1, 2, 3, 4
VALUE_TOO_LARGE, CACHE_FULL, KEY_NOT_FOUND, INVALID_RV, LOCK_TIMEOUT = 5, 6, 7, 8, 9
SHUTTING_DOWN, FORBIDDEN, READ_ONLY, INTERNAL = 10, 11, 12, 13
#: statuses after which the daemon closes the connection
CLOSING = frozenset({BAD_FRAME, FRAME_TOO_LARGE, FORBIDDEN})
MAX_RV = (1 << 63) - 1
MAX_KEY_BYTES = 1024


def record_size(key: bytes, value: bytes) -> int:
    """Bytes a store record takes (docs/design.md): 24-byte header, key,
    value, padded to 8."""
    return (24 + len(key) + len(value) + 7) & ~7


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def ping() -> bytes:
    return bytes([PING])


def stats() -> bytes:
    return bytes([STATS])


def put(key: bytes, value: bytes, rv: int = 0) -> bytes:
    return struct.pack("!BQH", PUT, rv, len(key)) + key + value


def delete(key: bytes, rv: int = 0) -> bytes:
    return struct.pack("!BQH", DELETE, rv, len(key)) + key


def batch(items: Sequence[tuple[bytes, bytes | None]], count: int | None = None) -> bytes:
    """A BATCH payload; ``count`` overrides the item count in the header."""
    parts = [struct.pack("!BI", BATCH, len(items) if count is None else count)]
    for key, value in items:
        if value is None:
            parts += [struct.pack("!BHI", DELETE, len(key), 0), key]
        else:
            parts += [struct.pack("!BHI", PUT, len(key), len(value)), key, value]
    return b"".join(parts)


def connect(path: str, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at end of stream (EOF or a reset) before any byte."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = sock.recv(n - got)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if got:
                raise AssertionError(f"stream ended inside a frame ({got} of {n} bytes)")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_reply(sock: socket.socket) -> tuple[int, int, bytes] | None:
    """The next reply (status, rv, body), or None at end of stream."""
    header = recv_exact(sock, 4)
    if header is None:
        return None
    (size,) = struct.unpack("!I", header)
    assert 9 <= size <= 1 << 20, f"reply frame of {size} bytes"
    payload = recv_exact(sock, size)
    assert payload is not None, "stream ended after a reply's length prefix"
    status, rv = struct.unpack_from("!BQ", payload)
    return status, rv, payload[9:]


def request(sock: socket.socket, payload: bytes) -> tuple[int, int, bytes]:
    sock.sendall(frame(payload))
    reply = read_reply(sock)
    assert reply is not None, "the daemon closed the connection instead of replying"
    return reply


def at_eof(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bool:
    """True if the peer closed the connection (after any pending replies were
    read) within ``timeout``; False if it stays open."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert not data, f"unexpected bytes {data!r} from the daemon"
    return True


# ---- the daemon -------------------------------------------------------------


def sock_in(tmp_path: Path, label: str = "d") -> str:
    path = str(tmp_path / f"{label}.sock")
    assert len(path.encode()) < 100, f"{path} is too long for a Unix socket"
    return path


def seg_path(name: str) -> str:
    return f"/dev/shm/shmcache.{name}"


def as_dict(snap: Snapshot) -> dict[str, tuple[bytes, int]]:
    return {item.key: (item.value, item.rv) for item in snap.items}


_SCRUB = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID",
          "RUNTIME_DIRECTORY", "SHMCACHE_NAME", "LISTEN_FDS", "LISTEN_PID")


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that configures shmcached
    (so a developer's or systemd's settings cannot leak into a test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHED_") and k not in _SCRUB}
    env["PYTHONPATH"] = str(helpers.REPO) + os.pathsep + env.get("PYTHONPATH", "")
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
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*(command or (sys.executable, "-m", "shmcached")), *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=daemon_env(env),
            )
        self.pid = self.proc.pid

    @classmethod
    def start(cls, name: str, socket_path: str, log: Path, *args: str, small: bool = True,
              env: Mapping[str, str] | None = None, command: Sequence[str] | None = None) -> Daemon:
        argv = ["--name", name, "--socket", socket_path, *(SMALL if small else ()), *args]
        return cls(argv, log, env=env, name=name, socket_path=socket_path, command=command)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"shmcached pid {self.pid}: {why}; its output:\n{self.output}")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the socket exists, a Reader opens the cache, and the daemon
        answers a PING (with OK, or FORBIDDEN for a refused peer): its loop
        runs, so its signal handlers are installed."""
        assert self.name is not None and self.socket is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with {self.proc.returncode} while starting")
            if os.path.exists(self.socket) and self._answers():
                return
            if time.monotonic() > deadline:
                raise self.fail(f"not serving after {timeout} s")
            time.sleep(0.02)

    def _answers(self) -> bool:
        assert self.name is not None and self.socket is not None
        try:
            Reader(self.name).close()
            with connect(self.socket) as sock:
                with suppress(BrokenPipeError, ConnectionResetError):  # refused at once
                    sock.sendall(frame(ping()))
                reply = read_reply(sock)
        except (CacheNotFound, CacheClosed, CacheCorrupted, OSError):
            return False
        return reply is not None and reply[0] in (OK, FORBIDDEN)

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
        assert not helpers.leftovers(self.name), self.fail(f"left in /dev/shm: {helpers.leftovers(self.name)}")


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


# ---- a fake systemd ---------------------------------------------------------


class NotifyListener:
    """The datagram socket systemd offers a Type=notify service.  ``address``
    is the NOTIFY_SOCKET value: a path, or "@name" for an abstract socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        except BaseException:
            self.sock.close()
            raise
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """The next message, as its KEY=VALUE assignments."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no notify message within {timeout} s; so far: {self.seen}") from None
        fields: dict[str, str] = {}
        for line in data.decode().split("\n"):
            key, sep, value = line.partition("=")
            assert sep and key, f"malformed notify line {line!r} in {data!r}"
            fields[key] = value
        self.seen.append(fields)
        return fields

    def until(self, key: str, value: str | None = None, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """Read messages until one carries ``key`` (with ``value``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; seen: {self.seen}")
            msg = self.next(left)
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            with suppress(FileNotFoundError):
                os.unlink(self.address)


# ---- child processes --------------------------------------------------------


class LineChild:
    """``python -c code args`` whose stdout lines (JSON) arrive on a queue."""

    def __init__(self, code: str, *args: str, env: Mapping[str, str] | None = None,
                 held: bool = False) -> None:
        """``held``: the child's stdin is a pipe that stays open until
        :meth:`release` (a child that waits for its EOF waits until then);
        otherwise /dev/null."""
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(helpers.REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args], env=full_env, text=True,
            stdin=subprocess.PIPE if held else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [self._pump(self.proc.stdout, self.lines.put, True),
                         self._pump(self.proc.stderr, self._err.append, False)]

    @staticmethod
    def _pump(stream: IO[str], sink: Any, end: bool) -> threading.Thread:
        def run() -> None:
            with suppress(OSError, ValueError):
                for line in stream:
                    sink(line.rstrip("\n"))
            if end:
                sink(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    @property
    def stderr(self) -> str:
        return "\n".join(self._err)

    def next(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child {self.proc.pid} printed nothing for {timeout} s; "
                                 f"stderr:\n{self.stderr}") from None
        if line is None:
            self.lines.put(None)
            raise AssertionError(f"child {self.proc.pid} ended (rc {self.proc.poll()}); stderr:\n{self.stderr}")
        out: dict[str, Any] = json.loads(line)
        return out

    def until_end(self, timeout: float = STOP_TIMEOUT) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages up to the last one, which carries "end"; and that one."""
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while True:
            msg = self.next(max(0.0, deadline - time.monotonic()))
            if "end" in msg:
                return got, msg
            got.append(msg)

    def release(self) -> None:
        """Close the held stdin: the child sees EOF."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def close(self, timeout: float = STOP_TIMEOUT) -> int:
        """Reap (killing it if it still runs after ``timeout``); the exit status."""
        self.release()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        for thread in self._threads:
            thread.join(timeout=STOP_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.close()


@contextmanager
def child(code: str, *args: str, env: Mapping[str, str] | None = None, held: bool = False) -> Iterator[LineChild]:
    c = LineChild(code, *args, env=env, held=held)
    try:
        yield c
    finally:
        c.kill()


#: ``WATCHER name since_rv timeout``: prints {"ready": epoch}, then one line
#: per event, then {"end": "CacheClosed" | "timeout" | "ResourceExpired"}.
WATCHER = """
    import json, sys
    from shmcache import CacheClosed, Reader, ResourceExpired
    name, since, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    reader = Reader(name)
    print(json.dumps({"ready": reader.epoch}), flush=True)
    try:
        for ev in reader.watch(since, timeout=timeout):
            print(json.dumps({"type": ev.type.name, "key": ev.key, "value": ev.value.hex(),
                              "rv": ev.rv}), flush=True)
        end = "timeout"
    except CacheClosed:
        end = "CacheClosed"
    except ResourceExpired:
        end = "ResourceExpired"
    print(json.dumps({"end": end}), flush=True)
"""


def wait_for(predicate: Any, what: str, timeout: float = START_TIMEOUT, step: float = 0.02) -> None:
    """Poll ``predicate()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)


# ---- a daemon holding a little state, with a Producer and a Reader -------------


@dataclass
class Served:
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
