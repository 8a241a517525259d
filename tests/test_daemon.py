"""shmcached across real processes: the daemon, producers (``Producer`` and
raw sockets speaking docs/protocol.md), readers in this and other processes,
signals, configuration, peer credentials, systemd's notify protocol, logs.

Every daemon is started with ``--socket`` under the test's tmp directory and
small sizes, waited for with deadlines, and stopped (SIGTERM, else SIGKILL)
on the way out; a clean stop must leave nothing in /dev/shm and no socket.
Helpers (the daemon process, raw frames, the fake NOTIFY_SOCKET, children
printing JSON lines) are in tests/_daemon_helpers.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from shmcache._native import ffi

from shmcache import (
    CacheClosed,
    CacheFull,
    DaemonUnavailable,
    Event,
    EventType,
    InvalidKey,
    InvalidResourceVersion,
    Item,
    Producer,
    ProtocolError,
    Reader,
    Snapshot,
    ValueTooLarge,
)

from . import helpers
from ._daemon_helpers import (
    BAD_FRAME,
    BATCH,
    CACHE_FULL,
    CLOSING,
    DELETE,
    FORBIDDEN,
    FRAME_TOO_LARGE,
    INVALID_KEY,
    INVALID_RV,
    IO_TIMEOUT,
    KEY_NOT_FOUND,
    MAX_KEY_BYTES,
    MAX_RV,
    OK,
    PING,
    PUT,
    STATS,
    UNKNOWN_OP,
    VALUE_TOO_LARGE,
    WATCHER,
    Daemon,
    NotifyListener,
    at_eof,
    batch,
    child,
    connect,
    delete,
    frame,
    ping,
    put,
    read_reply,
    recv_exact,
    running,
    stats,
    wait_for,
)
from ._daemon_helpers import (
    request as call,
)
from .helpers import leftovers, remove_cache, scaled, unique_name

MAX_FRAME = 100_000  # --max-frame-bytes of the ``served`` daemon: above its 64 KiB arena


def sock_in(tmp_path: Path, label: str = "d") -> str:
    path = str(tmp_path / f"{label}.sock")
    assert len(path.encode()) < 100, f"{path} is too long for a Unix socket"
    return path


def seg_path(name: str) -> str:
    return f"/dev/shm/shmcache.{name}"


def sem_path(name: str) -> str:
    return f"/dev/shm/sem.shmcache.{name}.lock"


def as_dict(snap: Snapshot) -> dict[str, tuple[bytes, int]]:
    return {item.key: (item.value, item.rv) for item in snap.items}


# ==== 1. producers write, readers everywhere see it ===========================


def test_producer_writes_reach_readers_here_and_in_another_process(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--heartbeat", "0.1") as d, Reader(name) as reader:
        assert reader.socket_path == sock  # advertised in the header
        with Producer(name) as p:  # found through the header
            assert p.path == sock
            assert p.ping() == 0
            assert p.put("pods/a", b"1") == 1
            with child(WATCHER, name, "1", "60") as watcher:
                assert watcher.next()["ready"] == reader.epoch
                assert p.put("pods/b", b"2") == 2
                assert p.put("pods/a", b"3") == 3
                assert p.delete("pods/b") == 4
                assert p.put("pods/c", b"", rv=100) == 100
                assert p.put_many([("pods/d", b"4"), ("pods/a", None), ("pods/e", b"\x00\xff")]) == 103
                assert p.put_many([]) == 103
                assert p.ping() == 103
                figures = p.stats()
                expected = [
                    Event(EventType.ADDED, "pods/b", b"2", 2),
                    Event(EventType.MODIFIED, "pods/a", b"3", 3),
                    Event(EventType.DELETED, "pods/b", b"2", 4),
                    Event(EventType.ADDED, "pods/c", b"", 100),
                    Event(EventType.ADDED, "pods/d", b"4", 101),
                    Event(EventType.DELETED, "pods/a", b"3", 102),
                    Event(EventType.ADDED, "pods/e", b"\x00\xff", 103),
                ]
                # this process: the exact state and the events
                assert reader.list() == Snapshot(103, [Item("pods/c", b"", 100), Item("pods/d", b"4", 101),
                                                       Item("pods/e", b"\x00\xff", 103)])
                assert reader.get("pods/d") == Item("pods/d", b"4", 101)
                assert reader.get("pods/a") is None
                assert list(reader.interval(1)) == expected
                assert list(reader.watch(1, timeout=0.05)) == expected
                # another process, blocked in watch() before the writes
                seen = [watcher.next() for _ in expected]
                assert [Event(EventType[m["type"]], m["key"], bytes.fromhex(m["value"]), m["rv"])
                        for m in seen] == expected
                # the daemon's figures
                assert figures["name"] == name
                assert figures["pid"] == d.pid
                assert figures["epoch"] == f"{reader.epoch:016x}"
                assert figures["rv"] == 103
                assert figures["events_written"] == 8
                assert figures["events_evicted"] == 0
                assert figures["keys"] == 3
                assert figures["store_bytes"] == sum(_record(k.encode(), v) for k, v in
                                                     (("pods/c", b""), ("pods/d", b"4"), ("pods/e", b"\x00\xff")))
                assert figures["producers"] >= 1
                assert figures["requests"] >= 10
                assert figures["rejected"] == 0
                assert isinstance(figures["events_per_s"], (int, float))
                assert figures["uptime_s"] >= 0
                # the watcher sees the end of the cache too
                assert d.stop() == 0
                rest, end = watcher.until_end()
                assert rest == [] and end == {"end": "CacheClosed"}
                assert watcher.close() == 0
        d.assert_gone()
        with pytest.raises(CacheClosed):
            reader.list()


def test_heartbeat_is_kept_in_the_header(name: str, tmp_path: Path) -> None:
    with running(name, sock_in(tmp_path), tmp_path / "d.log", "--heartbeat", "0.1"), Reader(name) as reader:
        def beat() -> float:  # when the daemon last beat, in this clock
            age = reader.heartbeat_age
            assert age is not None, "no heartbeat in the header"
            return time.time() - age

        first = beat()
        wait_for(lambda: beat() > first + 0.05, "the heartbeat never advanced")


def test_console_script_and_python_m_both_run_the_daemon(name: str, tmp_path: Path) -> None:
    script = Path(sysconfig.get_path("scripts")) / "shmcached"
    assert script.exists(), f"no console script {script}: is the package installed?"
    with running(name, sock_in(tmp_path), tmp_path / "d.log", command=[str(script)]) as d:
        with Producer(name) as p:
            assert p.put("k", b"v") == 1
        assert str(script) in psutil.Process(d.pid).cmdline()
    out = subprocess.run([sys.executable, "-m", "shmcached", "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(helpers.REPO)})
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--name", "--capacity", "--arena-bytes", "--max-keys", "--store-bytes",
                   "--mode", "--group", "--socket", "--socket-mode", "--allow-uid", "--allow-gid",
                   "--max-frame-bytes", "--max-clients", "--client-timeout", "--lock-timeout",
                   "--heartbeat", "--log-level"):
        assert option in out.stdout, f"{option} missing from --help"


def test_modes_and_group_of_segment_semaphore_and_socket(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--mode", "0600", "--socket-mode", "0620",
                 "--group", "65534"):
        seg, sem, so = os.stat(seg_path(name)), os.stat(sem_path(name)), os.stat(sock)
        assert stat.S_ISSOCK(so.st_mode)
        assert (stat.S_IMODE(seg.st_mode), stat.S_IMODE(sem.st_mode), stat.S_IMODE(so.st_mode)) == \
            (0o600, 0o600, 0o620)
        assert (seg.st_gid, sem.st_gid, so.st_gid) == (65534, 65534, 65534)


# ==== 2. SIGTERM: readers get CacheClosed, everything is removed ===============


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_closes_the_cache_and_removes_everything(name: str, tmp_path: Path, signum: int) -> None:
    sock = sock_in(tmp_path)
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        with running(name, sock, tmp_path / "d.log", env={"NOTIFY_SOCKET": listener.address}) as d, \
                Reader(name) as reader:
            with Producer(sock) as p, child(WATCHER, name, "0", "60") as watcher:
                assert watcher.next()["ready"] == reader.epoch
                p.put("k", b"v")
                assert watcher.next() == {"type": "ADDED", "key": "k", "value": b"v".hex(), "rv": 1}
                assert d.stop(signum) == 0
                rest, end = watcher.until_end()
                assert rest == [] and end == {"end": "CacheClosed"}
                assert watcher.close() == 0
                with pytest.raises(DaemonUnavailable):  # its connection was closed
                    p.ping()
            d.assert_gone()
            with pytest.raises(CacheClosed):
                reader.get("k")
            with pytest.raises(DaemonUnavailable):
                Producer(sock)
        listener.until("STOPPING", "1")
        assert listener.seen[0].get("READY") == "1"
    finally:
        listener.close()


def test_sigterm_while_starting_still_cleans_up(name: str, tmp_path: Path) -> None:
    """A stop request during startup (systemd may send one at any time) must
    not leave the segment, the semaphore or the socket behind."""
    sock = sock_in(tmp_path)
    for attempt in range(3):
        d = Daemon.start(name, sock, tmp_path / f"d{attempt}.log")
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(seg_path(name)):  # as soon as the segment exists
                assert d.proc.poll() is None, d.fail("exited while starting")
                assert time.monotonic() < deadline, d.fail("never created its segment")
            rc = d.stop()
        finally:
            d.kill()
        left = leftovers(name) + ([sock] if os.path.exists(sock) else [])
        remove_cache(name)
        if os.path.exists(sock):
            os.unlink(sock)
        assert rc == 0 and not left, d.fail(f"SIGTERM during startup: exit status {rc}, left {left}")


def _copy_segment(fd: int, copy: str) -> None:
    """Copy the segment open at ``fd`` (unlinked meanwhile) to cache name
    ``copy`` with its ``closed`` flag cleared, so a Reader can list the state
    the daemon left."""
    size = os.fstat(fd).st_size
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), len(data))
        assert chunk, "short read of the segment"
        data += chunk
    closed = ffi.offsetof("struct sc_header", "closed")
    data[closed:closed + 4] = bytes(4)
    out = os.open(seg_path(copy), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out, view):]
    finally:
        os.close(out)


@dataclass
class Hammer:
    """A thread putting unique keys until the daemon goes away."""

    path: str
    tag: str
    limit: int
    raw: bool = False  # pipeline raw frames in bursts instead of using Producer
    acks: list[tuple[str, bytes, int]] = field(default_factory=list)
    attempted: set[str] = field(default_factory=set)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _item(self, i: int) -> tuple[str, bytes]:
        key = f"{self.tag}/{i}"
        self.attempted.add(key)
        return key, f"{self.tag}-{i}".encode()

    def _run(self) -> None:
        try:
            if self.raw:
                self._run_raw()
            else:
                with Producer(self.path, timeout=IO_TIMEOUT) as p:
                    for i in range(self.limit):
                        key, value = self._item(i)
                        self.acks.append((key, value, p.put(key, value)))
        except BaseException as err:  # noqa: BLE001 - recorded and judged by the test
            self.error = err

    def _run_raw(self) -> None:
        burst = 32
        with connect(self.path) as sock:
            for start in range(0, self.limit, burst):
                items = [self._item(i) for i in range(start, min(start + burst, self.limit))]
                try:
                    sock.sendall(b"".join(frame(put(k.encode(), v)) for k, v in items))
                except (BrokenPipeError, ConnectionResetError) as err:
                    self.error = err
                for key, value in items:
                    reply = read_reply(sock)
                    if reply is None:
                        self.error = self.error or ConnectionResetError("closed by the daemon")
                        return
                    status, rv, body = reply
                    assert status == OK, f"status {status}: {body!r}"
                    self.acks.append((key, value, rv))
                if self.error:
                    return


def test_acknowledged_writes_survive_sigterm(name: str, tmp_path: Path) -> None:
    """Producers hammer puts while SIGTERM arrives: every put that returned an
    RV is in the segment the daemon leaves (read through a descriptor opened
    before the stop), a watcher saw a gap-free prefix of those events and
    then CacheClosed, and no producer hangs."""
    total = scaled(3000, 30000)
    capacity = scaled(4096, 32768)  # the ring keeps every event: the watcher cannot fall behind
    sock = sock_in(tmp_path)
    copy = unique_name("copy")
    with running(name, sock, tmp_path / "d.log", "--capacity", str(capacity), "--arena-bytes", str(4 << 20),
                 "--max-keys", str(capacity), "--store-bytes", str(4 << 20), small=False) as d:
        with Producer(sock) as p:
            assert p.put("start", b"") == 1
        fd = os.open(seg_path(name), os.O_RDONLY)
        try:
            with child(WATCHER, name, "1", "120") as watcher:
                watcher.next()
                hammers = [Hammer(sock, "p0", total // 3), Hammer(sock, "p1", total // 3),
                           Hammer(sock, "raw", total // 3, raw=True)]
                for h in hammers:
                    h.start()
                wait_for(lambda: sum(len(h.acks) for h in hammers) >= total // 6
                         or any(h.error for h in hammers), "the producers never got going", timeout=60)
                assert not any(h.error for h in hammers), [h.error for h in hammers]
                d.proc.send_signal(signal.SIGTERM)
                assert d.wait() == 0, d.fail("bad exit status")
                for h in hammers:
                    assert h.thread is not None
                    h.thread.join(timeout=60)
                    assert not h.thread.is_alive(), f"producer {h.tag} hangs after the daemon stopped"
                    # the connection closed (DaemonUnavailable; raw: EOF, EPIPE, ECONNRESET),
                    # or SHUTTING_DOWN; never a timeout
                    assert h.error is None or isinstance(h.error, (DaemonUnavailable, CacheClosed, OSError)), \
                        f"producer {h.tag}: {h.error!r}"
                    cause = h.error.__cause__ if h.error is not None else None
                    assert not isinstance(h.error, TimeoutError) and not isinstance(cause, TimeoutError), \
                        f"producer {h.tag}: {h.error!r}"
                events, end = watcher.until_end()
                assert end == {"end": "CacheClosed"}, end
                assert watcher.close() == 0
            d.assert_gone()
            _copy_segment(fd, copy)
        finally:
            os.close(fd)
        try:
            with Reader(copy) as left:
                snap = left.list()
        finally:
            remove_cache(copy)
    state = as_dict(snap)
    acked = [a for h in hammers for a in h.acks]
    assert len(acked) >= total // 6
    for key, value, rv in acked:
        assert state.get(key) == (value, rv), f"acknowledged put {key}={value!r} at rv {rv} is missing"
    attempted = set().union(*(h.attempted for h in hammers))
    assert set(state) - {"start"} <= attempted
    assert snap.rv == len(state)  # one put per key, RVs from 1
    # the watcher: a gap-free prefix of those events
    assert [m["rv"] for m in events] == list(range(2, 2 + len(events)))
    for m in events:
        assert m["type"] == "ADDED" and state[m["key"]] == (bytes.fromhex(m["value"]), m["rv"])
    print(f"{len(acked)} acknowledged puts, {snap.rv - 1 - len(acked)} applied unacknowledged, "
          f"watcher saw {len(events)}")
    with pytest.raises(DaemonUnavailable):
        Producer(sock)


# ==== 3. SIGKILL: the next daemon reclaims name and socket =====================


def test_next_daemon_reclaims_after_sigkill(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    d1 = Daemon.start(name, sock, tmp_path / "d1.log")
    try:
        d1.wait_ready()
        with Reader(name) as old, Producer(name) as p, child(WATCHER, name, "1", "60") as watcher:
            assert p.put("a", b"1") == 1
            assert watcher.next()["ready"] == old.epoch
            assert d1.stop(signal.SIGKILL) == -signal.SIGKILL
            assert stat.S_ISSOCK(os.stat(sock).st_mode), "the stale socket is gone"
            assert sorted(leftovers(name)) == sorted([f"shmcache.{name}", f"sem.shmcache.{name}.lock"])
            assert old.get("a") == Item("a", b"1", 1)  # a dead owner's cache stays readable
            with pytest.raises(DaemonUnavailable):
                p.put("b", b"2")
            with pytest.raises(DaemonUnavailable):
                Producer(sock)
            with running(name, sock, tmp_path / "d2.log") as d2, Reader(name) as new:
                assert new.epoch != old.epoch
                rest, end = watcher.until_end()
                assert rest == [] and end == {"end": "CacheClosed"}
                with pytest.raises(CacheClosed):
                    old.get("a")
                assert new.list() == Snapshot(0, [])
                with Producer(name) as p2:
                    assert p2.put("b", b"2") == 1
                    assert p2.stats()["pid"] == d2.pid
                assert new.list() == Snapshot(1, [Item("b", b"2", 1)])
    finally:
        d1.kill()


# ==== 4. one daemon per name and per socket ===================================


def test_second_daemon_on_a_live_name_exits_1(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d1.log") as d1, Producer(sock) as p:
        assert p.put("a", b"1") == 1
        inode = os.stat(sock).st_ino
        for label, other_sock in (("other", sock_in(tmp_path, "other")), ("same", sock)):
            d2 = Daemon.start(name, other_sock, tmp_path / f"d2-{label}.log")
            try:
                assert d2.wait() == 1, d2.fail("a second daemon on a live name did not exit 1")
            finally:
                d2.kill()
            assert f"pid {d1.pid}" in d2.output and name in d2.output, d2.fail("no clear message")
            assert "Traceback" not in d2.output
        assert not os.path.exists(sock_in(tmp_path, "other"))
        assert os.stat(sock).st_ino == inode
        assert p.put("b", b"2") == 2  # the first keeps serving
        with Reader(name) as reader:
            assert [i.key for i in reader.list().items] == ["a", "b"]


def test_second_daemon_on_a_live_socket_exits_1(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    other = unique_name()
    try:
        with running(name, sock, tmp_path / "d1.log"), Producer(sock) as p:
            inode = os.stat(sock).st_ino
            d2 = Daemon.start(other, sock, tmp_path / "d2.log")
            try:
                assert d2.wait() == 1, d2.fail("a second daemon on a live socket did not exit 1")
            finally:
                d2.kill()
            assert sock in d2.output, d2.fail("the message does not name the socket")
            assert "Traceback" not in d2.output
            assert not leftovers(other), d2.fail(f"left {leftovers(other)}")
            assert os.stat(sock).st_ino == inode
            assert p.put("a", b"1") == 1
    finally:
        remove_cache(other)


def test_a_file_that_is_not_a_socket_is_not_removed(name: str, tmp_path: Path) -> None:
    """--socket naming an existing regular file (a typo, a wrong directory):
    the daemon must refuse, not delete the file as if it were a stale socket."""
    path = sock_in(tmp_path, "precious")
    Path(path).write_text("precious data\n")
    d = Daemon.start(name, path, tmp_path / "d.log")
    try:
        deadline = time.monotonic() + 20
        while d.proc.poll() is None and time.monotonic() < deadline and os.path.isfile(path):
            time.sleep(0.02)
        still_there = os.path.isfile(path) and Path(path).read_text() == "precious data\n"
        if not still_there and d.proc.poll() is None:
            d.wait_ready()  # serving on it: stop it cleanly
        d.stop()
    finally:
        d.kill()
    assert still_there, d.fail(f"{path}, a regular file, was deleted")
    assert d.proc.returncode != 0
    assert not leftovers(name)


# ==== 5. configuration ========================================================

CONFIG_ERRORS = [
    # (id, extra argv, extra env, TOML text, the option the message names)
    ("capacity-0", ["--capacity", "0"], {}, None, "--capacity"),
    ("mode-999", ["--mode", "999"], {}, None, "--mode"),
    ("socket-mode-x", ["--socket-mode", "rw"], {}, None, "--socket-mode"),
    ("unknown-toml-key", [], {}, "capacity = 64\nno_such_option = 1\n", "--config"),
    ("toml-syntax", [], {}, "capacity = = 64\n", "--config"),
    ("toml-wrong-type", [], {}, "capacity = 1.5\n", "--capacity"),
    ("toml-bool", [], {}, "max_keys = true\n", "--max-keys"),
    ("env-max-keys-x", [], {"SHMCACHED_MAX_KEYS": "x"}, None, "--max-keys"),
    ("env-heartbeat-0", [], {"SHMCACHED_HEARTBEAT": "0"}, None, "--heartbeat"),
    ("group-unknown", ["--group", "nosuchgroup"], {}, None, "--group"),
    ("allow-uid-negative", ["--allow-uid", "0,-1"], {}, None, "--allow-uid"),
    ("allow-gid-word", ["--allow-gid", "wheel"], {}, None, "--allow-gid"),
    ("log-level", ["--log-level", "loud"], {}, None, "--log-level"),
    ("client-timeout-inf", ["--client-timeout", "inf"], {}, None, "--client-timeout"),
    ("max-frame-bytes-neg", ["--max-frame-bytes", "-5"], {}, None, "--max-frame-bytes"),
    ("bad-name", ["--name", "no/slashes"], {}, None, "--name"),
    ("socket-too-long", ["--socket", "/tmp/" + "s" * 120], {}, None, "--socket"),
    ("config-missing", ["--config", "/nonexistent/shmcached.toml"], {}, None, "--config"),
    # sizes the cache's geometry refuses are bad configuration too
    ("capacity-huge", ["--capacity", "99999999999"], {}, None, "--capacity"),
    ("arena-bytes-tiny", ["--arena-bytes", "1"], {}, None, "--arena-bytes"),
    ("store-bytes-tiny", ["--store-bytes", "8"], {}, None, "--store-bytes"),
]


@pytest.mark.parametrize(("argv", "env", "toml", "option"), [c[1:] for c in CONFIG_ERRORS],
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_configuration_exits_2_with_one_line(name: str, tmp_path: Path, argv: list[str],
                                                 env: dict[str, str], toml: str | None, option: str) -> None:
    sock = sock_in(tmp_path)
    args = ["--name", name, "--socket", sock]
    if toml is not None:
        (tmp_path / "shmcached.toml").write_text(toml)
        args += ["--config", str(tmp_path / "shmcached.toml")]
    elsewhere = {a[2:].replace("-", "_") for a in argv if a.startswith("--")}
    elsewhere |= {k[len("SHMCACHED_"):].lower() for k in env}
    elsewhere |= set(re.findall(r"^(\w+)\s*=", toml or "", re.M))
    for key, value in (("capacity", "64"), ("arena_bytes", "65536"), ("max_keys", "256"),
                       ("store_bytes", "1048576")):
        if key not in elsewhere:  # the command line would win over the file or the environment
            args += ["--" + key.replace("_", "-"), value]
    d = Daemon([*args, *argv], tmp_path / "d.log", env=env, name=name, socket_path=sock)
    try:
        rc = d.wait()
    finally:
        d.kill()
    lines = d.output.splitlines()
    assert rc == 2, d.fail(f"exit status {rc}")
    assert len(lines) == 1, d.fail("not one line")
    assert lines[0].startswith(f"shmcached: error: {option}"), d.fail(f"the message does not start with {option}")
    assert not leftovers(name) and not os.path.exists(sock)


def test_precedence_command_line_then_environment_then_file(name: str, tmp_path: Path) -> None:
    config = tmp_path / "shmcached.toml"
    config.write_text(f'name = "{name}"\ncapacity = 100\nmax_keys = 100\narena_bytes = 70000\n'
                      f'store_bytes = 1048576\nheartbeat = 0.5\n')
    env = {"SHMCACHED_CONFIG": str(config), "SHMCACHED_MAX_KEYS": "200", "SHMCACHED_ARENA_BYTES": "80000"}
    sock = sock_in(tmp_path)
    d = Daemon(["--socket", sock, "--arena-bytes", "90000"], tmp_path / "d.log", env=env, name=name,
               socket_path=sock)
    try:
        d.wait_ready()  # the name came from the file
        with Reader(name) as reader:
            g = reader.geometry
            assert (g.capacity, g.max_keys, g.arena_bytes, g.store_bytes) == (100, 200, 90000, 1048576)
        with Producer(name) as p:
            assert p.stats()["name"] == name
        assert d.stop() == 0
        d.assert_gone()
    finally:
        d.kill()


def test_cache_name_from_the_environment(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    d = Daemon(["--socket", sock, "--capacity", "64", "--arena-bytes", "65536", "--max-keys", "256",
                "--store-bytes", "1048576"], tmp_path / "d.log", env={"SHMCACHE_NAME": name},
               name=name, socket_path=sock)
    try:
        d.wait_ready()
        assert d.stop() == 0
        d.assert_gone()
    finally:
        d.kill()


def test_socket_in_a_missing_directory_fails_cleanly(name: str, tmp_path: Path) -> None:
    sock = str(tmp_path / "missing" / "d.sock")
    d = Daemon.start(name, sock, tmp_path / "d.log")
    try:
        rc = d.wait()
    finally:
        d.kill()
    assert rc in (1, 2), d.fail(f"exit status {rc}")
    assert sock in d.output and "Traceback" not in d.output, d.fail("no clear message")
    assert not leftovers(name)


# ==== 6. bad input from raw clients, while a Producer keeps working =============


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


def test_truncated_frame_then_close(served: Served) -> None:
    for cut in (1, 3, 4, 10, 20):
        with connect(served.sock) as s:
            s.sendall(frame(put(b"x", b"y" * 100))[:cut])
    served.wait_only_producer()
    served.assert_unchanged()


def test_frame_over_the_limit_is_refused_and_closed(served: Served) -> None:
    for size in (MAX_FRAME + 1, 1 << 31, (1 << 32) - 1):
        with connect(served.sock) as s:
            s.sendall(struct.pack("!I", size) + put(b"x", b"y"))
            reply = read_reply(s)
            assert reply is not None and reply[:2] == (FRAME_TOO_LARGE, 0), reply
            assert str(MAX_FRAME).encode() in reply[2]
            assert at_eof(s), "still open after FRAME_TOO_LARGE"
    # exactly the limit is read and parsed (here: a value too large for the arena)
    with connect(served.sock) as s:
        payload = put(b"big", b"v" * (MAX_FRAME - 14))
        assert len(payload) == MAX_FRAME
        assert call(s, payload)[:2] == (VALUE_TOO_LARGE, 0)
        assert call(s, ping())[:2] == (OK, served.snapshot.rv)
    served.assert_unchanged()


def test_producer_sending_a_frame_over_the_limit_gets_frame_too_large(served: Served) -> None:
    """The daemon answers FRAME_TOO_LARGE without reading the payload; a
    Producer must report that reply, whatever the size of what it sent."""
    for size in (MAX_FRAME, 4 << 20):
        with Producer(served.sock) as p:
            with pytest.raises(ProtocolError) as err:
                p.put("big", b"v" * size)
            assert err.value.status == FRAME_TOO_LARGE, f"{size}-byte value: {err.value!r}"
    served.assert_unchanged()


def test_unknown_opcode_keeps_the_connection(served: Served) -> None:
    with connect(served.sock) as s:
        for op in (0, 6, 12, 99, 255):
            status, rv, body = call(s, bytes([op]) + b"payload")
            assert (status, rv) == (UNKNOWN_OP, 0) and body
            assert call(s, ping())[:2] == (OK, served.snapshot.rv)
    served.assert_unchanged()


def test_invalid_utf8_keys_are_refused_and_the_connection_kept(served: Served) -> None:
    with connect(served.sock) as s:
        for payload in (put(b"\xff\xfe", b"v"), put(b"a\xc3", b"v"), delete(b"\xed\xa0\x80"),
                        delete(b"a\x80"), batch([(b"new", b"v"), (b"\xc0\xaf", b"v")]),
                        batch([(b"a", None), (b"\xff", None)])):
            assert call(s, payload)[:2] == (INVALID_KEY, 0), payload
            assert call(s, ping())[:2] == (OK, served.snapshot.rv)
    with pytest.raises(InvalidKey):
        served.producer.put("\ud800", b"v")
    served.assert_unchanged()


def test_refused_requests_change_nothing_and_keep_the_connection(served: Served) -> None:
    rv = served.snapshot.rv
    many = [(f"k{i}".encode(), b"v") for i in range(300)]  # past --max-keys 256
    cases = [
        (put(b"", b"v"), INVALID_KEY),
        (put(b"k" * (MAX_KEY_BYTES + 1), b"v"), INVALID_KEY),
        (delete(b""), INVALID_KEY),
        (put(b"k", b"v" * 70000), VALUE_TOO_LARGE),  # the arena is 64 KiB
        (delete(b"absent"), KEY_NOT_FOUND),
        (delete(b"c"), KEY_NOT_FOUND),  # deleted before
        (put(b"k", b"v", rv=rv), INVALID_RV),
        (put(b"k", b"v", rv=1), INVALID_RV),
        (delete(b"a", rv=rv), INVALID_RV),
        (put(b"k", b"v", rv=MAX_RV + 1), INVALID_RV),
        (put(b"k", b"v", rv=(1 << 64) - 1), INVALID_RV),
        (batch(many), CACHE_FULL),
        (batch([(b"new", b"v"), (b"absent", None)]), KEY_NOT_FOUND),
        (batch([(b"new", b"v"), (b"new", None), (b"new", None)]), KEY_NOT_FOUND),
        (batch([(b"new", b"v"), (b"", b"v")]), INVALID_KEY),
        (batch([(b"new", b"v"), (b"k", b"v" * 70000)]), VALUE_TOO_LARGE),
    ]
    with connect(served.sock) as s:
        for payload, expected in cases:
            status, got_rv, body = call(s, payload)
            assert (status, got_rv) == (expected, 0), (payload[:40], status, body)
            assert body, "an error reply carries a message"
            assert call(s, ping())[:2] == (OK, rv)
        assert call(s, batch([]))[:2] == (OK, rv)  # an empty batch: nothing to do
        status, got_rv, body = call(s, stats())
        assert (status, got_rv) == (OK, rv)
        figures = json.loads(body)
        assert figures["rv"] == rv and figures["keys"] == 2 and figures["rejected"] >= len(cases)
    served.assert_unchanged()


def test_producer_raises_what_a_writer_raises(served: Served) -> None:
    p = served.producer
    with pytest.raises(KeyError):
        p.delete("absent")
    with pytest.raises(InvalidResourceVersion):
        p.put("k", b"v", rv=served.snapshot.rv)
    with pytest.raises(ValueTooLarge):
        p.put("k", b"v" * 70000)
    with pytest.raises(CacheFull):
        p.put_many([(f"k{i}", b"v") for i in range(300)])
    with pytest.raises(KeyError):
        p.put_many([("new", b"v"), ("absent", None)])
    with pytest.raises(InvalidKey):
        p.put("", b"v")
    served.assert_unchanged()
    assert p.put("k", b"v") == served.snapshot.rv + 1  # and it still works


def test_batch_running_past_the_last_resource_version_changes_nothing(served: Served) -> None:
    """RVs are at most 2**63 - 1: a batch needing more is refused whole."""
    p = served.producer
    assert p.put("near", b"end", rv=MAX_RV - 1) == MAX_RV - 1
    before = served.reader.list()
    with connect(served.sock) as s:
        status, rv, body = call(s, batch([(b"x", b"1"), (b"y", b"2"), (b"z", b"3")]))
        assert (status, rv) == (INVALID_RV, 0), (status, body)
    assert served.reader.list() == before
    assert p.ping() == MAX_RV - 1


BAD_FRAMES = [
    ("empty", b""),
    ("ping-with-body", b"\x01\x00"),
    ("stats-with-body", b"\x05xyz"),
    ("put-header-truncated", b"\x02\x00\x00\x00"),
    ("put-key-past-frame", struct.pack("!BQH", PUT, 0, 10) + b"abc"),
    ("delete-header-truncated", struct.pack("!BQ", DELETE, 0)),
    ("delete-trailing-bytes", delete(b"a") + b"x"),
    ("batch-header-truncated", b"\x04\x00\x00"),
    ("batch-count-huge", batch([(b"k", b"v")], count=1 << 31)),
    ("batch-count-past-payload", batch([(b"k", b"v")], count=1000)),
    ("batch-count-one-short", batch([(b"k", b"v"), (b"a", None)], count=3)),
    ("batch-bad-kind", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", 9, 1, 0) + b"k"),
    ("batch-ping-kind", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", PING, 1, 0) + b"k"),
    ("batch-delete-with-value", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", DELETE, 1, 1) + b"kv"),
    ("batch-item-past-frame", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", PUT, 1, 100) + b"kv"),
    ("batch-trailing-bytes", batch([(b"k", b"v")]) + b"zz"),
    ("batch-fewer-items", batch([(b"k", b"v")], count=0)),
]


def test_malformed_frames_get_bad_frame_and_are_closed(served: Served) -> None:
    for label, payload in BAD_FRAMES:
        with connect(served.sock) as s:
            s.sendall(frame(payload) + frame(put(b"after", b"v")) + frame(ping()))
            reply = read_reply(s)
            assert reply is not None and reply[:2] == (BAD_FRAME, 0), f"{label}: {reply}"
            assert at_eof(s), f"{label}: the connection stays open after BAD_FRAME"
        served.assert_unchanged()
    with connect(served.sock) as s:  # and a client that sends garbage then reads nothing
        s.sendall(b"\x00\x00\x00\x02\xff\xff" * 1000)
    served.wait_only_producer()
    served.assert_unchanged()


def test_stalled_client_is_dropped_while_others_are_served(served: Served) -> None:
    rejected = served.producer.stats()["rejected"]
    stalled = [connect(served.sock) for _ in range(3)]
    try:
        for s, cut in zip(stalled, (2, 4, 12), strict=True):
            s.sendall(frame(put(b"stall", b"v" * 50))[:cut])
        # meanwhile others are served
        assert served.producer.put("live", b"1") == served.snapshot.rv + 1
        with connect(served.sock) as other:
            assert call(other, ping())[:2] == (OK, served.snapshot.rv + 1)
        for s in stalled:
            assert at_eof(s, timeout=20), "a client stalled mid-frame was never dropped"
    finally:
        for s in stalled:
            s.close()
    assert served.producer.stats()["rejected"] >= rejected + 3
    assert served.reader.get("stall") is None


def test_client_that_keeps_completing_frames_is_not_dropped(name: str, tmp_path: Path) -> None:
    """--client-timeout is for a client *stalled* mid-frame: one whose every
    write completes a frame and starts the next is making progress."""
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--client-timeout", "1", "--heartbeat", "0.1"):
        one = frame(ping())
        with connect(sock) as s:
            s.sendall(one[:3])
            replies = 0
            started = time.monotonic()
            try:
                while time.monotonic() - started < 4:  # four client timeouts
                    s.sendall(one[3:] + one[:3])  # the end of one PING, the start of the next
                    reply = read_reply(s)
                    assert reply is not None and reply[0] == OK
                    replies += 1
                    time.sleep(0.05)
            except (OSError, AssertionError) as err:
                raise AssertionError(f"dropped after {replies} complete frames in "
                                     f"{time.monotonic() - started:.1f} s: {err!r}") from None


# a long --client-timeout: whether a client paused by the daemon while
# mid-frame counts as stalled is not what this test is about
@pytest.mark.parametrize("served", [["--client-timeout", "60"]], indirect=True)
def test_pipelining_client_that_reads_nothing_is_paused_not_buffered(served: Served) -> None:
    rv = served.snapshot.rv
    chunk = frame(ping()) * 5000
    limit = 64 << 20
    sent = 0
    with connect(served.sock) as s:
        s.setblocking(False)
        blocked_since: float | None = None
        while sent < limit:
            try:
                sent += s.send(chunk[sent % len(chunk):] if sent % len(chunk) else chunk)
                blocked_since = None
            except BlockingIOError:
                now = time.monotonic()
                blocked_since = blocked_since or now
                if now - blocked_since > 1.0:
                    break
                time.sleep(0.02)
        assert sent < limit, "the daemon kept reading from a client that reads nothing"
        # others are served meanwhile; the daemon's memory stays bounded
        assert served.producer.ping() == rv
        with connect(served.sock) as other:
            assert call(other, ping())[:2] == (OK, rv)
        assert psutil.Process(served.daemon.pid).memory_info().rss < 512 << 20
        # finish the last frame, read every reply
        s.settimeout(IO_TIMEOUT)
        rest = (-sent) % len(frame(ping()))
        got: list[bytes | BaseException] = []
        want = (sent + rest) // 5 * 13

        def read_all() -> None:
            try:
                got.append(recv_exact(s, want) or b"")
            except BaseException as err:  # noqa: BLE001 - reported below
                got.append(err)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        if rest:
            s.sendall(chunk[:5][-rest:])
        reader.join(timeout=60)
        assert not reader.is_alive(), "the replies never came"
    assert got[0] == struct.pack("!IBQ", 9, OK, rv) * (want // 13), repr(got[0])[:200]
    served.assert_unchanged()


def test_many_connections_at_once_are_all_served(served: Served) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.connect(served.sock)  # blocking: waits while the backlog is full
            s.settimeout(IO_TIMEOUT)
        for i, s in enumerate(socks):
            s.sendall(frame(ping() if i % 2 else stats()))
        for s in socks:
            reply = read_reply(s)
            assert reply is not None and reply[:2] == (OK, served.snapshot.rv)
        assert served.connections() == 201
    finally:
        for s in socks:
            s.close()
    served.wait_only_producer()
    served.assert_unchanged()


def test_burst_of_producers_while_the_daemon_is_busy(served: Served) -> None:
    """200 producers connect while the daemon cannot accept (stopped, as a
    daemon busy with a large batch would be): each waits up to its timeout
    and is then served, none fails at once because the listen backlog is full."""
    results: list[object] = []
    started = threading.Semaphore(0)

    def one() -> None:
        started.release()
        try:
            with Producer(served.sock, timeout=30) as p:
                results.append(p.ping())
        except Exception as err:  # noqa: BLE001 - reported below
            results.append(err)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(200)]
    os.kill(served.daemon.pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)
        time.sleep(0.5)  # let every connect() reach the daemon's socket
    finally:
        os.kill(served.daemon.pid, signal.SIGCONT)
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    errors = [r for r in results if not isinstance(r, int)]
    assert not errors, f"{len(errors)} of 200 producers failed, e.g. {errors[0]!r}"
    assert results == [served.snapshot.rv] * 200
    served.wait_only_producer()


def test_clients_disconnecting_mid_frame(served: Served) -> None:
    for whole in (frame(put(b"gone", b"v" * 300)), frame(batch([(b"gone2", b"v"), (b"a", None)]))):
        for cut in [*range(0, len(whole), 7), len(whole) - 1]:
            with connect(served.sock) as s:
                s.sendall(frame(ping()) + whole[:cut])  # one answered request, then half a frame
    served.wait_only_producer()
    served.assert_unchanged()


def test_max_clients(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--max-clients", "2"):
        first = _producer_when_admitted(sock)
        second = _producer_when_admitted(sock)
        try:
            with Producer(sock) as third, pytest.raises(DaemonUnavailable):
                third.ping()
            assert first.ping() == second.ping() == 0
            first.close()
            _producer_when_admitted(sock).close()  # a slot is free again
        finally:
            first.close()
            second.close()


def _producer_when_admitted(sock: str) -> Producer:
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


# ==== 7. fuzzing frames =========================================================

FUZZ_MAX_KEYS = 8
FUZZ_STORE = 4096
FUZZ_ARENA = 4096
FUZZ_FRAME = 100_000
GOOD_KEYS = [b"a", b"b", b"c", b"d", b"pods/x", b"pods/y", b"pods/z", "é".encode(), "日本".encode(),
             b"k\x00nul", b"k" * MAX_KEY_BYTES] + [f"key{i}".encode() for i in range(12)]
BAD_KEYS = [b"", b"k" * (MAX_KEY_BYTES + 1), b"\xff", b"\xc3", b"\xed\xa0\x80"]


_STATUS_NAMES = {OK: "OK", BAD_FRAME: "BAD_FRAME", FRAME_TOO_LARGE: "FRAME_TOO_LARGE",
                 UNKNOWN_OP: "UNKNOWN_OP", INVALID_KEY: "INVALID_KEY", VALUE_TOO_LARGE: "VALUE_TOO_LARGE",
                 CACHE_FULL: "CACHE_FULL", KEY_NOT_FOUND: "KEY_NOT_FOUND", INVALID_RV: "INVALID_RV"}


def _record(key: bytes, value: bytes) -> int:
    return (24 + len(key) + len(value) + 7) & ~7


@dataclass
class FuzzModel:
    """What the cache must hold: only requests answered OK changed it."""

    items: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    rv: int = 0

    def allowed(self, op: int, rv: int, items: list[tuple[bytes, bytes | None]]) -> set[int]:
        """{OK} if the request must succeed, else the errors it may get."""
        errors: set[int] = set()
        for key, value in items:
            if not key or len(key) > MAX_KEY_BYTES:
                errors.add(INVALID_KEY)
            elif value is not None and (len(key) + len(value) > FUZZ_ARENA
                                        or _record(key, value) > FUZZ_STORE // 2 // 8 * 8):
                errors.add(VALUE_TOO_LARGE)
        if op == BATCH and not items:
            return {OK}
        if rv and not self.rv < rv <= MAX_RV:
            errors.add(INVALID_RV)
        if not rv and self.rv + len(items) > MAX_RV:
            errors.add(INVALID_RV)
        state = {k: v for k, (v, _) in self.items.items()}
        for key, value in items:
            if value is None:
                if key not in state:
                    errors.add(KEY_NOT_FOUND)
                    break
                del state[key]
            else:
                state[key] = value
                if len(state) > FUZZ_MAX_KEYS or sum(_record(k, v) for k, v in state.items()) > FUZZ_STORE:
                    errors.add(CACHE_FULL)
                    break
        return errors or {OK}

    def apply(self, op: int, rv: int, items: list[tuple[bytes, bytes | None]], reply_rv: int) -> None:
        if op == BATCH and not items:
            assert reply_rv == self.rv
            return
        for key, value in items:
            self.rv = rv or self.rv + 1
            if value is None:
                del self.items[key]
            else:
                self.items[key] = (value, self.rv)
        assert reply_rv == self.rv, f"reply rv {reply_rv}, expected {self.rv}"


def classify(payload: bytes) -> tuple[set[int], tuple[int, int, list[tuple[bytes, bytes | None]]] | None]:
    """docs/protocol.md applied to one complete payload: the statuses a
    malformed one may get, or the request a well-formed one is."""
    def utf8(raw: bytes) -> bool:
        try:
            raw.decode()
            return True
        except UnicodeDecodeError:
            return False

    if not payload:
        return {BAD_FRAME}, None
    op = payload[0]
    if op in (PING, STATS):
        return ({BAD_FRAME}, None) if len(payload) != 1 else (set(), (op, 0, []))
    if op in (PUT, DELETE):
        if len(payload) < 11:
            return {BAD_FRAME}, None
        _, rv, key_len = struct.unpack_from("!BQH", payload)
        end = 11 + key_len
        if end > len(payload) or (op == DELETE and end != len(payload)):
            return {BAD_FRAME}, None
        key = payload[11:end]
        if not utf8(key):
            return {INVALID_KEY}, None
        return set(), (op, rv, [(key, payload[end:] if op == PUT else None)])
    if op == BATCH:
        if len(payload) < 5:
            return {BAD_FRAME}, None
        (count,) = struct.unpack_from("!I", payload, 1)
        pos, items, bad_key, broken = 5, [], False, False
        for _ in range(count):
            if pos + 7 > len(payload):
                broken = True
                break
            kind, key_len, value_len = struct.unpack_from("!BHI", payload, pos)
            pos += 7
            if kind not in (PUT, DELETE) or (kind == DELETE and value_len):
                broken = True
                break
            end = pos + key_len + value_len
            if end > len(payload):
                broken = True
                break
            key = payload[pos:pos + key_len]
            bad_key = bad_key or not utf8(key)
            items.append((key, payload[pos + key_len:end] if kind == PUT else None))
            pos = end
        else:
            broken = pos != len(payload)
        if broken:  # which is found first is the daemon's business
            return ({BAD_FRAME, INVALID_KEY} if bad_key else {BAD_FRAME}), None
        if bad_key:
            return {INVALID_KEY}, None
        return set(), (BATCH, 0, items)
    return {UNKNOWN_OP}, None


# What is drawn never depends on the model (Hypothesis replays draws): the
# model only interprets them (an index among its keys, an offset from its RV).


def _keys(data: st.DataObject, model: FuzzModel) -> bytes:
    pick = data.draw(st.integers(0, 9))
    index = data.draw(st.integers(0, 63))
    if pick < 6:
        return GOOD_KEYS[index % len(GOOD_KEYS)]
    if pick < 8:
        present = sorted(model.items) or GOOD_KEYS
        return present[index % len(present)]
    if pick < 9:
        return data.draw(st.binary(min_size=1, max_size=6))
    return BAD_KEYS[index % len(BAD_KEYS)]


def _value(data: st.DataObject) -> bytes:
    pick = data.draw(st.integers(0, 9))
    if pick < 7:
        return data.draw(st.binary(max_size=24))
    if pick < 9:
        return data.draw(st.binary(min_size=200, max_size=500))
    return data.draw(st.sampled_from([b"v" * 2100, b"v" * (FUZZ_ARENA + 1)]))


def _rv(data: st.DataObject, model: FuzzModel) -> int:
    pick = data.draw(st.integers(0, 9))
    if pick < 7:
        return 0
    if pick < 9:
        return max(1, model.rv + data.draw(st.integers(-2, 3)))
    # far ahead (valid), or past the last RV; never exactly the last one,
    # which would leave the rest of the run nothing but INVALID_RV
    return data.draw(st.sampled_from([model.rv + 1000, MAX_RV + 1, 1 << 63 | 12345, (1 << 64) - 1]))


def _payload(data: st.DataObject, model: FuzzModel) -> bytes:
    kind = data.draw(st.sampled_from(["ping", "stats", "put", "put", "put", "delete", "delete", "batch", "batch"]))
    if kind == "ping":
        return ping()
    if kind == "stats":
        return stats()
    if kind == "put":
        return put(_keys(data, model), _value(data), _rv(data, model))
    if kind == "delete":
        return delete(_keys(data, model), _rv(data, model))
    n = data.draw(st.integers(0, 5))
    return batch([(_keys(data, model), None if data.draw(st.booleans()) else _value(data)) for _ in range(n)])


def _position(data: st.DataObject, n: int) -> int:
    """A number in [0, n), drawn without depending on n."""
    return data.draw(st.integers(0, 1 << 20)) % n


def _chunk(data: st.DataObject, model: FuzzModel) -> bytes:
    """The bytes of one frame as sent: valid, damaged, or garbage."""
    how = data.draw(st.sampled_from(["valid"] * 5 + ["flip", "flip", "truncate", "extend", "relength",
                                                      "random", "random-length", "huge", "cut"]))
    if how == "random":
        return frame(data.draw(st.binary(max_size=40)))
    if how == "random-length":
        return data.draw(st.binary(min_size=4, max_size=4)) + data.draw(st.binary(max_size=20))
    if how == "huge":
        return struct.pack("!I", data.draw(st.integers(FUZZ_FRAME + 1, (1 << 32) - 1))) + b"\x01"
    payload = _payload(data, model)
    if how == "flip":
        damaged = bytearray(payload)
        for bit in data.draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3)):
            bit %= len(payload) * 8
            damaged[bit // 8] ^= 1 << (bit % 8)
        return frame(bytes(damaged))
    if how == "truncate":
        return frame(payload[:_position(data, len(payload))])
    if how == "extend":
        return frame(payload + data.draw(st.binary(min_size=1, max_size=8)))
    if how == "relength":
        return struct.pack("!I", _position(data, len(payload) + 9)) + payload
    if how == "cut":
        whole = frame(payload)
        return whole[:_position(data, len(whole))]
    return frame(payload)


def _exchange(path: str, stream: bytes, splits: list[int]) -> list[tuple[int, int, bytes]]:
    """Send ``stream`` (in pieces), half-close, and read every reply until
    the daemon closes the connection."""
    replies: list[tuple[int, int, bytes]] = []
    with connect(path) as s:
        last = 0
        try:
            for cut in [*sorted(splits), len(stream)]:
                s.sendall(stream[last:cut])
                last = max(last, cut)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed after a refusal: its replies are still readable
        while (reply := read_reply(s)) is not None:
            replies.append(reply)
    return replies


def _check_replies(stream: bytes, replies: list[tuple[int, int, bytes]], model: FuzzModel,
                   seen: dict[str, int]) -> None:
    """Walk ``stream`` as the daemon must: match each complete frame with its
    reply, update the model for every OK write."""
    pos, i = 0, 0
    while len(stream) - pos >= 4:
        (size,) = struct.unpack_from("!I", stream, pos)
        if size > FUZZ_FRAME:
            assert replies[i:i + 1] and replies[i][:2] == (FRAME_TOO_LARGE, 0), (replies[i:], size)
            seen["FRAME_TOO_LARGE"] = seen.get("FRAME_TOO_LARGE", 0) + 1
            i += 1
            break
        if len(stream) - pos - 4 < size:
            break  # incomplete: never answered
        payload = stream[pos + 4:pos + 4 + size]
        pos += 4 + size
        assert i < len(replies), f"no reply to frame {payload[:60]!r}"
        status, rv, body = replies[i]
        i += 1
        seen[_STATUS_NAMES.get(status, str(status))] = seen.get(_STATUS_NAMES.get(status, str(status)), 0) + 1
        malformed, req = classify(payload)
        note(f"frame {payload[:60]!r} -> status {status} rv {rv} {body[:80]!r}")
        if req is None:
            assert status in malformed and rv == 0, (payload[:60], status, body, malformed)
            if status in CLOSING:
                break
            continue
        op, req_rv, items = req
        if op in (PING, STATS):
            assert (status, rv) == (OK, model.rv), (status, rv, body)
            if op == STATS:
                figures = json.loads(body)
                assert figures["rv"] == model.rv and figures["keys"] == len(model.items)
            continue
        allowed = model.allowed(op, req_rv, items)
        assert status in allowed, f"{payload[:60]!r}: status {status} {body!r}, expected one of {allowed}"
        if status == OK:
            model.apply(op, req_rv, items, rv)
        else:
            assert rv == 0 and body
    assert i == len(replies), f"{len(replies) - i} replies too many: {replies[i:]}"


def test_fuzzed_frames_never_hurt_the_daemon(name: str, tmp_path: Path) -> None:
    sock = sock_in(tmp_path)
    model = FuzzModel()
    counts = {"frames": 0, "examples": 0}
    statuses: dict[str, int] = {}
    with running(name, sock, tmp_path / "d.log", "--capacity", "32", "--arena-bytes", str(FUZZ_ARENA),
                 "--max-keys", str(FUZZ_MAX_KEYS), "--store-bytes", str(FUZZ_STORE),
                 "--max-frame-bytes", str(FUZZ_FRAME), small=False) as d, Reader(name) as reader:

        @settings(max_examples=scaled(200, 25000), deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.data())
        def one_connection(data: st.DataObject) -> None:
            chunks = [_chunk(data, model) for _ in range(data.draw(st.integers(1, 7)))]
            stream = b"".join(chunks)
            splits = [_position(data, len(stream) + 1) for _ in range(data.draw(st.integers(0, 3)))]
            counts["examples"] += 1
            counts["frames"] += len(chunks)
            _check_replies(stream, _exchange(sock, stream, splits), model, statuses)
            assert d.proc.poll() is None, d.fail("died")
            with Producer(sock) as p:  # a fresh producer is served
                assert p.ping() == model.rv
            snap = reader.list()
            assert snap.rv == model.rv
            assert as_dict(snap) == {k.decode(): v for k, v in model.items.items()}

        one_connection()
        with Producer(sock) as p:
            wait_for(lambda: p.stats()["producers"] == 1, "connections left open")
    print(f"{counts['frames']} frames in {counts['examples']} connections; final rv {model.rv}, "
          f"{len(model.items)} keys; replies {sorted(statuses.items())}")


# ==== 8. SO_PEERCRED ============================================================

PEER = """
    import json, os, sys, time
    import shmcache
    path, groups, delay = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    os.setgroups(groups)
    os.setgid(65534)
    os.setuid(65534)
    try:
        with shmcache.Producer(path) as p:
            time.sleep(delay)
            out = {"rv": p.put("from-nobody", b"x")}
    except shmcache.ProtocolError as err:
        out = {"error": "ProtocolError", "status": err.status, "message": str(err)}
    except Exception as err:
        out = {"error": type(err).__name__, "message": str(err)}
    print(json.dumps(out), flush=True)
    print(json.dumps({"end": 1}), flush=True)
"""

RAW_PEER = """
    import json, os, socket, struct, sys
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[1])
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    print(json.dumps({"reply": data.hex()}), flush=True)
    print(json.dumps({"end": 1}), flush=True)
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anybody may traverse (pytest's tmp_path is root's 0700),
    so that the kernel lets an unprivileged client reach the socket and the
    daemon's SO_PEERCRED check is what decides."""
    path = Path(tempfile.mkdtemp(prefix="shmcached-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(sock: str, groups: list[int], delay: float) -> dict[str, Any]:
    with child(PEER, sock, json.dumps(groups), str(delay)) as c:
        out, _ = c.until_end()
        assert c.close() == 0, c.stderr
    return out[0]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become uid 65534 in a child")


def _forbidden_on_the_wire(reply: bytes) -> None:
    """``reply``: everything the daemon sent before closing."""
    assert len(reply) >= 13, reply
    (size,) = struct.unpack_from("!I", reply)
    assert size == len(reply) - 4, f"not exactly one reply frame: {reply!r}"
    assert struct.unpack_from("!BQ", reply, 4) == (FORBIDDEN, 0), reply


@needs_root
def test_refused_peer_gets_forbidden_and_is_closed(name: str, tmp_path: Path, open_dir: Path) -> None:
    sock = str(open_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--socket-mode", "0666") as d:
        with child(RAW_PEER, sock) as c:  # uid and gid 65534, no supplementary groups
            out, _ = c.until_end()
            assert c.close() == 0, c.stderr
        _forbidden_on_the_wire(bytes.fromhex(out[0]["reply"]))
        with Producer(sock) as p:
            assert p.stats()["rejected"] >= 1
            assert p.ping() == 0  # nothing changed
        assert "refused producer" in d.output


@needs_root
@pytest.mark.parametrize("delay", [0.0, 0.5], ids=["at-once", "later"])
def test_refused_producer_raises_forbidden(name: str, tmp_path: Path, open_dir: Path, delay: float) -> None:
    """A Producer whose peer is refused gets ProtocolError(FORBIDDEN), whether
    its first request is sent at once or after the daemon has replied and
    closed (a Producer created at start-up, used later)."""
    sock = str(open_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--socket-mode", "0666"):
        got = _as_nobody(sock, [], delay)
        assert got.get("error") == "ProtocolError" and got.get("status") == FORBIDDEN, got


@needs_root
def test_peer_allowed_by_a_supplementary_group(name: str, tmp_path: Path, open_dir: Path) -> None:
    sock = str(open_dir / "d.sock")
    # the default --allow-gid is the daemon's gid, 0: the child keeps group 0 as a supplementary one
    with running(name, sock, tmp_path / "d.log", "--socket-mode", "0666"):
        assert _as_nobody(sock, [0], 0.0) == {"rv": 1}


@needs_root
@pytest.mark.parametrize("allow", [["--allow-uid", "65534"], ["--allow-uid", "1", "--allow-gid", "65534"]],
                         ids=["allow-uid", "allow-gid"])
def test_allowed_peer_is_served_and_others_refused(name: str, tmp_path: Path, open_dir: Path,
                                                   allow: list[str]) -> None:
    sock = str(open_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--socket-mode", "0666", *allow), Reader(name) as reader:
        assert _as_nobody(sock, [], 0.0) == {"rv": 1}
        assert reader.get("from-nobody") == Item("from-nobody", b"x", 1)
        if "--allow-gid" in allow:  # root (uid 0, gid 0) is in neither list now
            with connect(sock) as s:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            _forbidden_on_the_wire(data)


# ==== 9. systemd's notify protocol ==============================================


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_watchdog_status_stopping(name: str, tmp_path: Path, abstract: bool) -> None:
    address = "@" + unique_name("notify") if abstract else str(tmp_path / "notify.sock")
    listener = NotifyListener(address)
    sock = sock_in(tmp_path)
    try:
        d = Daemon.start(name, sock, tmp_path / "d.log", "--heartbeat", "0.1",
                         env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
        try:
            first = listener.next()
            # READY only once the socket exists and the segment opens
            assert os.path.exists(sock), "READY=1 before the socket exists"
            Reader(name).close()
            assert first.get("READY") == "1", first
            assert first.get("MAINPID") == str(d.pid), first
            assert first.get("STATUS", "").startswith("rv 0"), first
            watchdogs = statuses = 0
            deadline = time.monotonic() + 30
            while watchdogs < 3 or statuses < 3:
                assert time.monotonic() < deadline, listener.seen
                msg = listener.next()
                assert "READY" not in msg and "STOPPING" not in msg, msg
                watchdogs += msg.get("WATCHDOG") == "1"
                statuses += "STATUS" in msg
            with Producer(sock) as p:
                p.put("k", b"v")
            while not listener.next().get("STATUS", "").startswith("rv 1,"):
                assert time.monotonic() < deadline, listener.seen
            assert d.stop() == 0
            stopping = listener.until("STOPPING", "1")
            assert "READY" not in stopping
            d.assert_gone()
        finally:
            d.kill()
    finally:
        listener.close()


@pytest.mark.parametrize("watchdog_env", [{}, {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}],
                         ids=["no-watchdog", "watchdog-for-another-pid"])
def test_no_watchdog_messages_unless_asked(name: str, tmp_path: Path, watchdog_env: dict[str, str]) -> None:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        with running(name, sock_in(tmp_path), tmp_path / "d.log", "--heartbeat", "0.1",
                     env={"NOTIFY_SOCKET": listener.address, **watchdog_env}):
            assert listener.next().get("READY") == "1"
            for _ in range(5):
                assert "WATCHDOG" not in listener.until("STATUS")
        assert "WATCHDOG" not in listener.until("STOPPING", "1")
    finally:
        listener.close()


def test_without_notify_socket_nothing_is_sent(name: str, tmp_path: Path) -> None:
    with running(name, sock_in(tmp_path), tmp_path / "d.log", env={"WATCHDOG_USEC": "200000"}) as d:
        conns = psutil.Process(d.pid).net_connections(kind="unix")
        assert all(c.type != socket.SOCK_DGRAM for c in conns), conns


# ==== 10. logs ==================================================================

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


@pytest.mark.parametrize("journal", [{"JOURNAL_STREAM": "1:2"}, {"INVOCATION_ID": "0123abcd"}, {}],
                         ids=["JOURNAL_STREAM", "INVOCATION_ID", "terminal"])
def test_log_lines(name: str, tmp_path: Path, journal: dict[str, str]) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--max-clients", "1", env=journal) as d:
        first = _producer_when_admitted(sock)
        try:
            with Producer(sock) as refused, pytest.raises(DaemonUnavailable):
                refused.ping()  # a warning
        finally:
            first.close()
    lines = d.output.splitlines()
    assert len(lines) >= 3, d.output
    if journal:
        assert all(re.match(r"<[0-7]>", line) for line in lines), d.output
        assert not any(TIMESTAMP.search(line) for line in lines), d.output
        assert any(line.startswith("<6>") and "ready" in line for line in lines), d.output
        assert any(line.startswith("<4>") and "refused" in line for line in lines), d.output
    else:
        assert all(TIMESTAMP.match(line) for line in lines), d.output
        assert not any(line.startswith("<") for line in lines), d.output
        assert any(" INFO " in line and "ready" in line for line in lines), d.output
        assert any(" WARNING " in line and "refused" in line for line in lines), d.output
