"""The peers: which can run here, and a real redis-server for the ones that
need it.  Nothing here fakes a peer: if it cannot run, the reason is said."""

from __future__ import annotations

import contextlib
import importlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._common import Recorder

__all__ = ["PeerUnavailable", "missing", "redis_server", "start_peers"]

# module to import for each peer that is a Python package of the [bench] extra
_MODULES = {
    "faster-fifo": "faster_fifo",
    "pyzmq": "zmq",
    "redis": "redis",
    "UltraDict": "UltraDict",
    "matplotlib": "matplotlib",
}


class PeerUnavailable(Exception):
    """A peer cannot run on this machine; str() says why."""


def missing(peer: str) -> str | None:
    """None if ``peer``'s Python package imports, else the reason it does not."""
    try:
        importlib.import_module(_MODULES[peer])
    except Exception as err:  # noqa: BLE001 (an ImportError, or a broken build raising anything)
        return f"{_MODULES[peer]} does not import ({type(err).__name__}: {err}); pip install -e '.[bench]'"
    return None


@contextlib.contextmanager
def redis_server(timeout: float = 10.0) -> Iterator[str]:
    """A private redis-server listening on a Unix socket only (no TCP port,
    no persistence) in a temporary directory; yields the socket path and
    stops the server afterwards.  PeerUnavailable if it cannot be had."""
    reason = missing("redis")
    if reason:
        raise PeerUnavailable(reason)
    exe = shutil.which("redis-server")
    if exe is None:
        raise PeerUnavailable("redis-server is not installed (Debian: apt-get install redis-server)")
    import redis

    with tempfile.TemporaryDirectory(prefix="shmcache-bench-redis-") as tmp:
        sock = str(Path(tmp) / "redis.sock")
        proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", tmp, "--daemonize", "no",
             "--loglevel", "warning", "--maxclients", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                    raise PeerUnavailable(f"redis-server exited with {proc.returncode}: {err[-300:]}")
                try:
                    redis.Redis(unix_socket_path=sock).ping()
                    break
                except (redis.ConnectionError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        raise PeerUnavailable(f"redis-server did not answer within {timeout} s") from None
                    time.sleep(0.02)
            yield sock
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def start_peers(rec: Recorder, stack: contextlib.ExitStack, packages: Mapping[str, str]) -> tuple[set[str], str]:
    """For a scenario whose peers are ``packages`` (system -> peer package):
    the systems to skip (each recorded with its reason) and, unless "redis"
    is skipped, the socket of a redis-server that ``stack`` stops."""
    skipped: set[str] = set()
    for system, package in packages.items():
        reason = missing(package)
        if reason:
            rec.skip(system, reason)
            skipped.add(system)
    sock = ""
    if "redis" in packages and "redis" not in skipped:
        try:
            sock = stack.enter_context(redis_server())
        except PeerUnavailable as err:
            rec.skip("redis", str(err))
            skipped.add("redis")
    return skipped, sock
