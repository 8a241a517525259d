"""shmcached across real processes: the daemon, producers (``Producer`` and
raw sockets speaking docs/protocol.md), readers in this and other processes,
signals, configuration, peer credentials, systemd's notify protocol, logs.

Every daemon is started with ``--socket`` under the test's tmp directory and
small sizes, waited for with deadlines, and stopped (SIGTERM, else SIGKILL)
on the way out; a clean stop must leave nothing in /dev/shm and no socket.
Helpers (the daemon process, raw frames, the fake NOTIFY_SOCKET, children
printing JSON lines) are in tests/support/, the ``served`` fixture in tests/conftest.py.
Hostile producers (stalled, pipelining, bursts, malformed and fuzzed frames)
are in tests/stress/test_hostile_producers.py.
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
    Reader,
    Snapshot,
    ValueTooLarge,
)
from shmcache._native import ffi

from .support import (
    CACHE_FULL,
    FORBIDDEN,
    FRAME_TOO_LARGE,
    INVALID_KEY,
    INVALID_RV,
    IO_TIMEOUT,
    KEY_NOT_FOUND,
    MAX_FRAME,
    MAX_KEY_BYTES,
    MAX_RV,
    OK,
    REPO,
    UNKNOWN_OP,
    VALUE_TOO_LARGE,
    WATCHER,
    Daemon,
    NotifyListener,
    Served,
    as_dict,
    at_eof,
    batch,
    child,
    connect,
    delete,
    frame,
    leftovers,
    ping,
    producer_when_admitted,
    put,
    read_reply,
    record_size,
    remove_cache,
    running,
    scaled,
    seg_path,
    sock_in,
    stats,
    unique_name,
    wait_for,
)
from .support import (
    request as call,
)


def sem_path(name: str) -> str:
    return f"/dev/shm/sem.shmcache.{name}.lock"


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
                assert figures["store_bytes"] == sum(record_size(k.encode(), v) for k, v in
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
                         timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--name", "--capacity", "--arena-bytes", "--max-keys", "--store-bytes",
                   "--mode", "--group", "--socket", "--socket-mode", "--allow-uid", "--allow-gid",
                   "--allow-rv-uid", "--max-rv-jump", "--max-frame-bytes", "--max-buffered-bytes",
                   "--max-clients", "--max-clients-per-uid", "--client-timeout", "--lock-timeout",
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


def test_next_daemon_adopts_after_sigkill(name: str, tmp_path: Path) -> None:
    """The daemon is SIGKILLed; the next one on the same name adopts its
    segment: same epoch, every acknowledged write, RVs going on; a Reader
    and a watcher process opened before the kill go on without reopening."""
    sock = sock_in(tmp_path)
    d1 = Daemon.start(name, sock, tmp_path / "d1.log")
    try:
        d1.wait_ready()
        with Reader(name) as old, Producer(name) as p, child(WATCHER, name, "1", "60") as watcher:
            assert p.put("a", b"1") == 1
            assert watcher.next()["ready"] == old.epoch
            assert d1.stop(signal.SIGKILL) == -signal.SIGKILL
            assert stat.S_ISSOCK(os.stat(sock).st_mode), "the stale socket is gone"
            assert sorted(leftovers(name)) == sorted([f"shmcache.{name}", f"sem.shmcache.{name}.lock",
                                                      f"shmcache-lock.{name}"])
            assert old.get("a") == Item("a", b"1", 1)  # a dead owner's cache stays readable
            with pytest.raises(DaemonUnavailable):
                p.put("b", b"2")
            with pytest.raises(DaemonUnavailable):
                Producer(sock)
            with running(name, sock, tmp_path / "d2.log") as d2:
                assert f"adopted cache {name!r} at rv 1 (epoch {old.epoch:016x}, left by pid {d1.pid}, dead)" \
                    in d2.output, d2.output
                with Producer(name) as p2:
                    assert p2.put("b", b"2") == 2
                    assert p2.stats()["pid"] == d2.pid
                assert old.epoch == old.figures().epoch and old.figures().owner.pid == d2.pid
                assert old.list() == Snapshot(2, [Item("a", b"1", 1), Item("b", b"2", 2)])
                # the watcher, from rv 1, sees the adopter's first event
                assert watcher.next() == {"type": "ADDED", "key": "b", "value": b"2".hex(), "rv": 2}
    finally:
        d1.kill()


def test_restart_with_another_geometry_starts_a_new_cache(name: str, tmp_path: Path) -> None:
    """A restart after SIGKILL with another --capacity does not adopt: a new
    epoch, and the old segment's readers get CacheClosed."""
    sock = sock_in(tmp_path)
    d1 = Daemon.start(name, sock, tmp_path / "d1.log")
    try:
        d1.wait_ready()
        with Reader(name) as old, Producer(name) as p:
            assert p.put("a", b"1") == 1
            assert d1.stop(signal.SIGKILL) == -signal.SIGKILL
            with running(name, sock, tmp_path / "d2.log", "--capacity", "128") as d2, Reader(name) as new:
                assert "adopted" not in d2.output
                assert new.epoch != old.epoch and new.list() == Snapshot(0, [])
                with pytest.raises(CacheClosed):
                    old.get("a")
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
    # (id, extra argv, extra env, TOML text, how the message starts: the option or variable it names)
    ("capacity-0", ["--capacity", "0"], {}, None, "--capacity"),
    ("mode-999", ["--mode", "999"], {}, None, "--mode"),
    ("socket-mode-x", ["--socket-mode", "rw"], {}, None, "--socket-mode"),
    ("unknown-toml-key", [], {}, "capacity = 64\nno_such_option = 1\n", "--config"),
    ("toml-syntax", [], {}, "capacity = = 64\n", "--config"),
    ("toml-wrong-type", [], {}, "capacity = 1.5\n", "--capacity"),
    ("toml-bool", [], {}, "max_keys = true\n", "--max-keys"),
    # set in the environment: the message names the variable
    ("env-max-keys-x", [], {"SHMCACHED_MAX_KEYS": "x"}, None, "SHMCACHED_MAX_KEYS: 'x' must be"),
    ("env-heartbeat-0", [], {"SHMCACHED_HEARTBEAT": "0"}, None, "SHMCACHED_HEARTBEAT"),
    ("env-unknown-variable", [], {"SHMCACHED_BOGUS": "1"}, None, "SHMCACHED_BOGUS: unknown variable"),
    ("env-flag-word", [], {"SHMCACHED_ALLOW_LOCAL_WRITES": "maybe"}, None, "SHMCACHED_ALLOW_LOCAL_WRITES"),
    ("toml-flag-word", [], {}, 'etcd_keep_prefix = "perhaps"\n', "--etcd-keep-prefix"),
    ("group-unknown", ["--group", "nosuchgroup"], {}, None, "--group"),
    ("allow-uid-negative", ["--allow-uid", "0,-1"], {}, None, "--allow-uid"),
    ("allow-gid-word", ["--allow-gid", "wheel"], {}, None, "--allow-gid"),
    ("log-level", ["--log-level", "loud"], {}, None, "--log-level"),
    ("client-timeout-inf", ["--client-timeout", "inf"], {}, None, "--client-timeout"),
    ("max-frame-bytes-neg", ["--max-frame-bytes", "-5"], {}, None, "--max-frame-bytes"),
    ("max-frame-bytes-under-64k", ["--max-frame-bytes", "65535"], {}, None, "--max-frame-bytes"),
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
# (more of it, and clients that stall, flood or fuzz: tests/stress/test_hostile_producers.py)


def test_a_frame_over_the_limit_gets_frame_too_large_and_the_connection_closed(served: Served) -> None:
    """The daemon answers FRAME_TOO_LARGE at the length prefix, without
    reading the payload, and closes the connection."""
    with connect(served.sock) as s:
        s.sendall(struct.pack("!I", MAX_FRAME + 1) + bytes([2]))
        reply = read_reply(s)
        assert reply is not None and reply[:2] == (FRAME_TOO_LARGE, 0), reply
        assert at_eof(s)
    served.assert_unchanged()


def test_stats_carries_the_limits_a_producer_checks(served: Served) -> None:
    figures = served.producer.stats()  # its keys against docs/protocol.md: tests/test_docs.py
    assert (figures["max_frame_bytes"], figures["arena_bytes"], figures["max_record_bytes"]) == (
        MAX_FRAME, 65536, 1048576 // 2)


def _rejected(served: Served) -> int:
    n: int = served.producer.stats()["rejected"]
    return n


@pytest.mark.parametrize("served", [["--arena-bytes", str(1 << 20), "--max-frame-bytes", "65536"]],
                         indirect=True)
@pytest.mark.parametrize("by", ["name", "path"])
def test_producer_refuses_a_request_over_the_frame_limit_and_stays_usable(served: Served, by: str) -> None:
    """A 100 KB value fits this cache (1 MiB arena, 512 KiB records) but not
    a 64 KiB frame: ValueTooLarge, nothing sent, and the next request works."""
    rejected = _rejected(served)
    assert served.daemon.name is not None
    with Producer(served.daemon.name if by == "name" else served.sock) as p:
        for _ in range(2):
            with pytest.raises(ValueTooLarge, match=r"request of 100012 bytes; the daemon at .* takes requests "
                                                    r"of at most 65536 bytes \(its --max-frame-bytes\)"):
                p.put("k", b"v" * 100_000)
        with pytest.raises(ValueTooLarge, match=r"^a batch of 100 items makes a request of \d+ bytes; .*"
                                                r"65536 bytes .*: split it$"):
            p.put_many([(f"k{i}", b"v" * 1000) for i in range(100)])
        assert _rejected(served) == rejected, "a refused request was sent"
        served.assert_unchanged()
        rv = served.snapshot.rv
        assert p.put("k", b"v" * 60_000) == rv + 1  # a frame under the limit, on the same connection
        assert p.put_many([(f"k{i}", b"v" * 1000) for i in range(50)]) == rv + 51


def test_producer_asks_the_daemon_for_its_limits_once(served: Served) -> None:
    before = served.producer.stats()["requests"]
    with Producer(served.sock) as p:
        for _ in range(3):
            with pytest.raises(ValueTooLarge):
                p.put("k", b"v" * 200_000)
        p.put("small", b"v")  # under 64 KiB: sent without asking
    # one STATS from p, one PUT, and the STATS of this line
    assert served.producer.stats()["requests"] == before + 3


@pytest.mark.parametrize("served", [["--arena-bytes", str(1 << 20), "--store-bytes", "65536"]], indirect=True)
def test_producer_refuses_what_the_cache_can_never_hold_as_a_writer_does(served: Served) -> None:
    """Records of at most 32 KiB (half of --store-bytes 64 KiB).  Opened by
    name, a Producer knows that from the segment's header and sends nothing;
    by socket path, a small request goes out and the daemon's Writer refuses
    it, with the same exception and message, the connection kept; a large
    one is checked against the limits the daemon reported."""
    assert served.daemon.name is not None
    rejected = _rejected(served)
    value = b"v" * 40_000
    with Producer(served.daemon.name) as by_name, Producer(served.sock) as by_path:
        with pytest.raises(ValueTooLarge) as local:
            by_name.put("k", value)
        with pytest.raises(ValueTooLarge) as batched:
            by_name.put_many([("new", b"v"), ("k", value), ("", b"v")])  # the first bad item, as a Writer
        assert _rejected(served) == rejected, "sent although the header told the limit"
        with pytest.raises(ValueTooLarge) as remote:
            by_path.put("k", value)
        assert _rejected(served) == rejected + 1
        assert str(local.value) == str(batched.value) == str(remote.value)
        assert "store record of 40032 bytes exceeds the largest one this cache takes (32768 bytes" in str(local.value)
        with pytest.raises(ValueTooLarge, match="store record of 200032 bytes"):
            by_path.put("k", b"v" * 200_000)  # over 64 KiB: the daemon's limits, then nothing sent
        assert _rejected(served) == rejected + 1
        served.assert_unchanged()
        assert by_name.put("k", b"v" * 30_000) == served.snapshot.rv + 1
        assert by_path.put("k2", b"v") == served.snapshot.rv + 2


def test_producer_by_name_refuses_a_value_over_the_arena_without_sending(served: Served) -> None:
    assert served.daemon.name is not None
    rejected = _rejected(served)
    with Producer(served.daemon.name) as p:
        for size in (65_536, 70_000, 4 << 20):
            with pytest.raises(ValueTooLarge, match=f"^key \\+ value are {size + 1} bytes; the ring arena "
                                                    f"holds 65536$"):
                p.put("k", b"v" * size)
        assert _rejected(served) == rejected
        assert p.put("k", b"v" * 60_000) == served.snapshot.rv + 1


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


@pytest.mark.parametrize("served", [["--max-rv-jump", str(MAX_RV)]], indirect=True)
def test_batch_running_past_the_last_resource_version_changes_nothing(served: Served) -> None:
    """RVs are at most 2**63 - 1: a batch needing more is refused whole
    (reaching the end takes a jump that --max-rv-jump's default refuses)."""
    p = served.producer
    assert p.put("near", b"end", rv=MAX_RV - 1) == MAX_RV - 1
    before = served.reader.list()
    with connect(served.sock) as s:
        status, rv, body = call(s, batch([(b"x", b"1"), (b"y", b"2"), (b"z", b"3")]))
        assert (status, rv) == (INVALID_RV, 0), (status, body)
    assert served.reader.list() == before
    assert p.ping() == MAX_RV - 1


# ==== 7. SO_PEERCRED ============================================================

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
    # --group 65534: the socket (0660) lets the peer connect; the allow lists refuse it
    with running(name, sock, tmp_path / "d.log", "--group", "65534") as d:
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
    with running(name, sock, tmp_path / "d.log", "--group", "65534"):
        got = _as_nobody(sock, [], delay)
        assert got.get("error") == "ProtocolError" and got.get("status") == FORBIDDEN, got


@needs_root
def test_peer_allowed_by_a_supplementary_group(name: str, tmp_path: Path, open_dir: Path) -> None:
    sock = str(open_dir / "d.sock")
    # the child keeps group 0 as a supplementary one: it may connect to the
    # socket (root:root 0660) and --allow-gid 0 lets it produce
    with running(name, sock, tmp_path / "d.log", "--allow-gid", "0"):
        assert _as_nobody(sock, [0], 0.0) == {"rv": 1}


@needs_root
@pytest.mark.parametrize("allow", [["--allow-uid", "65534"], ["--allow-uid", "1", "--allow-gid", "65534"]],
                         ids=["allow-uid", "allow-gid"])
def test_allowed_peer_is_served_and_others_refused(name: str, tmp_path: Path, open_dir: Path,
                                                   allow: list[str]) -> None:
    sock = str(open_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--group", "65534", *allow), Reader(name) as reader:
        assert _as_nobody(sock, [], 0.0) == {"rv": 1}
        assert reader.get("from-nobody") == Item("from-nobody", b"x", 1)
        with connect(sock) as s:  # root is in neither list, and always allowed
            assert call(s, ping())[:2] == (OK, 1)


# ==== 8. systemd's notify protocol ==============================================


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


# ==== 9. logs ==================================================================

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


@pytest.mark.parametrize("journal", [{"JOURNAL_STREAM": "1:2"}, {"INVOCATION_ID": "0123abcd"}, {}],
                         ids=["JOURNAL_STREAM", "INVOCATION_ID", "terminal"])
def test_log_lines(name: str, tmp_path: Path, journal: dict[str, str]) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--max-clients", "1", env=journal) as d:
        first = producer_when_admitted(sock)
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
