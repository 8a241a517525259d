"""A real etcd for the tests of daemon/_etcd.py: ``EtcdServer`` (one
single-member cluster on 127.0.0.1, in the test's ``tmp_path``) and the
``etcd`` fixture that gives each test its own.

The writes the tests need (put, delete, txn, compact) are raw JSON gateway
calls written here from etcd's API, not through daemon/_etcd.py: the client
under test is never its own oracle.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

ETCD_BINARY = "/usr/bin/etcd"
#: --experimental-watch-progress-notify-interval of every test etcd, in seconds
PROGRESS_INTERVAL = 0.5
START_TIMEOUT = 20.0  # from Popen to a healthy member
STOP_TIMEOUT = 10.0  # from SIGTERM to exit, before SIGKILL
IO_TIMEOUT = 10.0  # any one raw request
START_ATTEMPTS = 5  # fresh ports when another process took one between probe and bind


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the kernel's pick for
    port 0); another process may still take it before it is used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def dead_endpoint() -> Iterator[str]:
    """An http:// endpoint that refuses connections: its port is bound (so no
    other test's etcd can take it) but nobody listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _etcd_env() -> dict[str, str]:
    """This environment without ETCD_* variables: etcd reads every flag from
    them too, and a developer's settings must not reach a test."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}


class EtcdServer:
    """``/usr/bin/etcd`` on two free ports of 127.0.0.1 (client, peer), with
    its data directory and log in ``directory``.  ``start()`` again after
    ``stop()`` or ``kill()`` reuses both: the same member, the same data."""

    def __init__(self, directory: Path) -> None:
        self.data_dir = directory / "etcd.data"
        self.log_path = directory / "etcd.log"
        self.client_port = self.peer_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-40:])

    def fail(self, why: str) -> AssertionError:
        return AssertionError(f"etcd on {self.url}: {why}; the end of {self.log_path}:\n{self.log_tail}")

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start etcd and wait until it is healthy.  The first start picks
        the ports, and picks again if one was taken in the meantime."""
        assert self.proc is None or self.proc.poll() is not None, "etcd is already running"
        first = not self.client_port
        for attempt in range(START_ATTEMPTS if first else 1):
            if first:
                self.client_port, self.peer_port = free_port(), free_port()
                if self.client_port == self.peer_port:
                    continue
            self._spawn()
            try:
                self.wait_ready()
                return
            except AssertionError:
                self.kill()
                taken = "address already in use" in self.log_tail
                if not (first and taken and attempt + 1 < START_ATTEMPTS):
                    raise
                shutil.rmtree(self.data_dir, ignore_errors=True)
        raise self.fail("no pair of free ports")

    def _spawn(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD_BINARY,
            "--name", "test",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--initial-cluster-state", "new",
            f"--experimental-watch-progress-notify-interval={int(PROGRESS_INTERVAL * 1000)}ms",
            "--auto-compaction-retention=0",  # only the tests compact
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"---- {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=_etcd_env())

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until ``/health`` says true: a leader is elected, requests are served."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with {self.proc.returncode} while starting")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise self.fail(f"not healthy after {timeout} s")
            time.sleep(0.05)

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            with conn.getresponse() as response:
                body = response.read()
                return response.status == 200 and json.loads(body).get("health") == "true"
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM; SIGKILL if still running after STOP_TIMEOUT seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL at once (a crash, for the fault tests), and reap."""
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Stop etcd and remove its data (its WAL alone preallocates 64 MB);
        the log stays in the test's tmp_path."""
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # ---- raw requests ----------------------------------------------------

    def request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON to the gateway; the answer, which must be a 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=IO_TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            with conn.getresponse() as response:
                status, data = response.status, response.read()
        finally:
            conn.close()
        assert status == 200, f"{path} {body}: HTTP {status}: {data[:500]!r}"
        answer: dict[str, Any] = json.loads(data)
        return answer

    @staticmethod
    def _revision(answer: dict[str, Any]) -> int:
        return int(answer["header"]["revision"])

    def put(self, key: bytes, value: bytes) -> int:
        """The revision of the write."""
        return self._revision(self.request("/v3/kv/put", {"key": b64(key), "value": b64(value)}))

    def delete(self, key: bytes) -> int:
        """Delete one key (it must exist); the revision of the deletion."""
        answer = self.request("/v3/kv/deleterange", {"key": b64(key)})
        assert answer.get("deleted") == "1", f"delete {key!r}: {answer}"
        return self._revision(answer)

    def txn(self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes] = ()) -> int:
        """All of ``puts`` and ``deletes`` (keys that exist) in one
        transaction, in that order: one revision, which is returned."""
        ops: list[dict[str, Any]] = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in puts]
        ops += [{"request_delete_range": {"key": b64(k)}} for k in deletes]
        answer = self.request("/v3/kv/txn", {"success": ops})
        assert answer.get("succeeded") is True, f"txn: {answer}"
        return self._revision(answer)

    def compact(self, revision: int) -> None:
        """Compact away every revision before ``revision``, and wait until
        it is done on disk."""
        self.request("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def revision(self) -> int:
        """The current revision."""
        return self._revision(self.request("/v3/maintenance/status", {}))

    def get(self, key: bytes) -> dict[str, Any] | None:
        """The key's raw kv object now (base64 and string fields), or None."""
        kvs = self.request("/v3/kv/range", {"key": b64(key)}).get("kvs", [])
        return kvs[0] if kvs else None


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A running etcd of this test's own, stopped and its data removed
    afterwards whatever happened."""
    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.skip(f"{ETCD_BINARY} is not installed (Debian package etcd-server)")
    server = EtcdServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.close()
    assert not server.running
