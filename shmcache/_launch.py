"""Starting a ``shmcached`` and knowing when it serves: the one launcher of
the demo, the benchmarks and the tests.

A daemon is ready when its socket accepts a connection and answers a PING
(OK, or FORBIDDEN for a peer it refuses: either way its loop runs, so its
signal handlers are installed and its heartbeat written) and a Reader opens
its cache.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

from ._protocol import FRAME_HEADER, REPLY, Op, Status, encode_simple
from ._reader import Reader
from .exceptions import CacheClosed, CacheCorrupted, CacheNotFound

__all__ = ["DaemonNotReady", "daemon_env", "daemon_output", "start_daemon", "stop_daemon", "wait_ready"]

START_TIMEOUT = 20.0  # from Popen to serving
STOP_TIMEOUT = 20.0  # from SIGTERM to exit
_IO_TIMEOUT = 10.0  # a PING is answered at once by a daemon that serves

#: What configures a shmcached besides its SHMCACHED_* variables: a launched
#: daemon must take its settings from its arguments alone.
_SCRUB = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "INVOCATION_ID",
          "RUNTIME_DIRECTORY", "SHMCACHE_NAME", "LISTEN_FDS", "LISTEN_PID")


class DaemonNotReady(RuntimeError):
    """The daemon exited, or did not serve in time: ``why``, and its
    ``output`` (which the message ends with)."""

    def __init__(self, pid: int, why: str, output: str) -> None:
        super().__init__(f"shmcached pid {pid}: {why}; its output:\n{output}")
        self.why = why
        self.output = output


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without anything that configures
    shmcached, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHED_") and k not in _SCRUB}
    env.update(extra or {})
    return env


def start_daemon(argv: Sequence[str], log: str | os.PathLike[str], *,
                 env: Mapping[str, str] | None = None,
                 command: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
    """``shmcached ARGV...`` (``command``, default ``python -m shmcached``),
    stdout and stderr to the file ``log``, in ``env`` (default
    :func:`daemon_env`)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*(command or (sys.executable, "-m", "shmcached")), *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env=dict(daemon_env() if env is None else env),
        )


def daemon_output(log: str | os.PathLike[str]) -> str:
    return Path(log).read_text(errors="replace")


def wait_ready(proc: subprocess.Popen[bytes], name: str, socket_path: str,
               log: str | os.PathLike[str], timeout: float = START_TIMEOUT) -> None:
    """Until the daemon serves cache ``name`` on ``socket_path``;
    DaemonNotReady if it exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise _not_ready(proc, log, f"exited with {proc.returncode} while starting")
        if os.path.exists(socket_path) and answers(name, socket_path):
            return
        if time.monotonic() > deadline:
            raise _not_ready(proc, log, f"not serving after {timeout} s")
        time.sleep(0.02)


def _not_ready(proc: subprocess.Popen[bytes], log: str | os.PathLike[str], why: str) -> DaemonNotReady:
    return DaemonNotReady(proc.pid, why, daemon_output(log))


def answers(name: str, socket_path: str) -> bool:
    """Whether a Reader opens cache ``name`` and the daemon on
    ``socket_path`` answers a PING with OK or FORBIDDEN."""
    try:
        Reader(name).close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_IO_TIMEOUT)
            sock.connect(socket_path)
            with suppress(BrokenPipeError, ConnectionResetError):  # refused at once: the reply is still there
                sock.sendall(encode_simple(Op.PING))
            header = _recv_exact(sock, FRAME_HEADER.size)
            if header is None:
                return False
            (size,) = FRAME_HEADER.unpack(header)
            payload = _recv_exact(sock, size) if REPLY.size <= size <= 1 << 20 else None
    except (CacheNotFound, CacheClosed, CacheCorrupted, OSError):
        return False
    return payload is not None and payload[0] in (Status.OK, Status.FORBIDDEN)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = sock.recv(n - got)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM (a clean shutdown), SIGKILL if it takes longer than
    ``timeout``; the exit status (``-SIGKILL`` after a kill)."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)
