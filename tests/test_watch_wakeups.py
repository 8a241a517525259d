"""What wakes a watcher (review r1, r2, r11): a replace() while it sleeps at
the end of the ring (it must get ResourceExpired, not end or sleep on with a
state the cache no longer has); a writer that died between publishing and
its futex wake (the recovery and repair must wake it); and the continuation
of a snapshot interval (the events after the snapshot, not ResourceExpired)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from shmcache import CacheClosed, Event, EventType, Reader, ResourceExpired, Writer

from .support import REPO

SIZES: dict[str, Any] = {"capacity": 8, "arena_bytes": 4096, "max_keys": 8, "store_bytes": 4096}


def _watch_in_thread(r: Reader, since: int, timeout: float | None) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []

    def follow() -> None:
        try:
            got.extend(r.watch(since, timeout=timeout))
            got.append("ended")
        except (ResourceExpired, CacheClosed) as err:
            got.append(err)

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    return t, got


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_replace_ends_a_sleeping_watch_with_resource_expired(name: str, timeout: float | None) -> None:
    with Writer(name, **SIZES) as w, Reader(name) as r:
        w.put("a", b"1")
        w.put("b", b"2")
        t, got = _watch_in_thread(r, 2, timeout)
        time.sleep(0.2)  # asleep at the end of the ring (a hint; the outcome does not depend on it)
        w.replace([("c", b"3")], rv=10)
        t.join(5)
        assert not t.is_alive(), "the watch slept on through the replace"
        assert len(got) == 1 and isinstance(got[0], ResourceExpired), got


_CHILD_WATCHER = textwrap.dedent("""
    import sys
    from shmcache import Reader, ResourceExpired
    r = Reader(sys.argv[1])
    print("watching", flush=True)
    try:
        for e in r.watch(int(sys.argv[2]), timeout=None):
            print("event", e.key, flush=True)
    except ResourceExpired as err:
        print("expired", err, flush=True)
""")


def test_replace_ends_another_process_watch(name: str) -> None:
    with Writer(name, **SIZES) as w:
        w.put("a", b"1")
        p = subprocess.Popen([sys.executable, "-c", _CHILD_WATCHER, name, "1"], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "watching"
            time.sleep(0.2)
            w.replace([("z", b"9")], rv=20)
            out, _ = p.communicate(timeout=10)
            assert out.startswith("expired too old resource version: 1"), out
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)


_DIES_BEFORE_WAKE = textwrap.dedent("""
    import os, sys
    import shmcache._writer as writer_module
    from shmcache import Writer

    class DiesAtRelease:
        # forwards to the native library, but dies instead of releasing:
        # published, lock held, no futex wake (a SIGKILL landing there)
        def __init__(self, lib):
            self._lib = lib
        def __getattr__(self, attr):
            if attr == "sc_lock_release":
                return lambda *args: os._exit(0)
            return getattr(self._lib, attr)

    w = Writer(sys.argv[1], create=False, lock_timeout=0.3)
    writer_module.lib = DiesAtRelease(writer_module.lib)
    w.put("k", b"published-by-a-dead-writer")
""")


@pytest.mark.parametrize("recovery", ["has", "failing delete"])
def test_recovery_wakes_watchers_a_dead_writer_left_asleep(name: str, recovery: str) -> None:
    with Writer(name, lock_timeout=0.3, **SIZES) as w, Reader(name) as r:
        w.put("a", b"1")
        _, got = _watch_in_thread(r, 1, None)
        time.sleep(0.2)
        subprocess.run([sys.executable, "-c", _DIES_BEFORE_WAKE, name], check=True, timeout=60, cwd=REPO)
        if recovery == "has":
            assert w.has("k")
        else:
            with pytest.raises(KeyError):
                w.delete("absent")
        assert w.figures().lock_recoveries == 1
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got and isinstance(got[0], Event) and got[0].key == "k" and got[0].rv == 2, got
        assert w.resource_version == 2  # nothing else was published to wake it


_SNAPSHOT_CONTINUES = textwrap.dedent("""
    import sys
    from shmcache import Reader
    r = Reader(sys.argv[1])
    snap = r.interval(0)
    print("snapshot", *sorted(e.key for e in snap), flush=True)
    sys.stdin.readline()            # the parent publishes now
    nxt = snap.continuation()
    print("events", *[f"{e.key}@{e.rv}" for e in nxt], flush=True)
    raw = r.interval(0).continuation().raw_batches()
    print("raw", sum(b.count for b in raw), flush=True)
""")


def test_a_snapshot_interval_continues_after_its_rv(name: str) -> None:
    with Writer(name, **SIZES) as w:
        w.put("a", b"1")
        w.put("b", b"2")
        p = subprocess.Popen([sys.executable, "-c", _SNAPSHOT_CONTINUES, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert p.stdout is not None and p.stdin is not None
            assert p.stdout.readline().split() == ["snapshot", "a", "b"]
            w.put("c", b"3")
            w.delete("a")
            p.stdin.write("\n")
            p.stdin.flush()
            out, _ = p.communicate(timeout=30)
            assert out.splitlines() == ["events c@3 a@4", "raw 0"], out
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)


def test_a_snapshot_whose_next_events_were_evicted_expires(name: str) -> None:
    with Writer(name, **SIZES) as w, Reader(name) as r:
        w.put("a", b"1")
        snap = r.interval(0)
        assert [e.key for e in snap] == ["a"]
        for i in range(3 * SIZES["capacity"]):
            w.put("a", b"%d" % i)
        with pytest.raises(ResourceExpired):
            snap.continuation()


# ---- the same, with the sleeper's state checked instead of hinted at ------------

#: syscall number of futex(2) per machine, for /proc/<pid>/syscall
_FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}


def wait_asleep_in_futex(pid: int, timeout: float = 30) -> None:
    """Return once the (single-threaded) process ``pid`` is blocked in
    futex(2): a watcher asleep at the end of the ring, which only a futex
    wake (or a signal) gets out of."""
    number = str(_FUTEX_SYSCALL[platform.machine()])
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        if fields and fields[0] == number:
            return
        assert time.monotonic() < deadline, f"pid {pid} never went to sleep in futex(2): {fields}"
        time.sleep(0.005)


_FIRST_EVENT = textwrap.dedent("""
    import sys
    from shmcache import Reader
    r = Reader(sys.argv[1])
    print("watching", flush=True)
    for e in r.watch(int(sys.argv[2]), timeout=None):
        print("event", e.key, e.value.decode(), e.rv, flush=True)
        break
""")


@pytest.mark.skipif(platform.machine() not in _FUTEX_SYSCALL, reason="futex(2)'s number on this machine is not known")
@pytest.mark.parametrize("recovery", ["has", "failing delete"])
def test_recovery_wakes_a_watcher_process_a_dead_writer_left_asleep(name: str, recovery: str) -> None:
    """A watcher in another process, certainly asleep in the futex before
    the writer dies between publishing and waking: the recovering writer's
    operation (a has(), or a delete() that raises KeyError) must wake it,
    with nothing else published."""
    with Writer(name, lock_timeout=0.3, **SIZES) as w:
        w.put("a", b"1")
        p = subprocess.Popen([sys.executable, "-c", _FIRST_EVENT, name, "1"], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "watching"
            wait_asleep_in_futex(p.pid)
            subprocess.run([sys.executable, "-c", _DIES_BEFORE_WAKE, name], check=True, timeout=60, cwd=REPO)
            with Reader(name) as r:
                assert r.resource_version == 2  # published, the lock still held by the dead writer
            if recovery == "has":
                assert w.has("k")
            else:
                with pytest.raises(KeyError):
                    w.delete("absent")
            assert w.figures().lock_recoveries == 1
            out, _ = p.communicate(timeout=5)  # woken by the recovery: no further put
            assert out.split() == ["event", "k", "published-by-a-dead-writer", "2"], out
            assert p.returncode == 0
            assert w.resource_version == 2
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)


_ANOTHER_WRITER = textwrap.dedent("""
    import sys
    from shmcache import Writer
    with Writer(sys.argv[1], create=False) as w:
        w.put("c", b"3")
        w.delete("a")
        w.put("b", b"22")
""")


def test_a_snapshot_continuation_serves_another_writers_events_as_raw_batches(name: str) -> None:
    """The continuation of a drained snapshot interval (one process) holds
    exactly the events another process published after the snapshot's RV,
    through raw_batches() too (one batch per refill of a 1-event buffer)."""
    with Writer(name, **SIZES) as w, Reader(name) as r:
        w.put("a", b"1")
        w.put("b", b"2")
        snap = r.interval(0, buffer_size=1)
        assert [tuple(e) for e in snap] == [(EventType.ADDED, "a", b"1", 2), (EventType.ADDED, "b", b"2", 2)]
        subprocess.run([sys.executable, "-c", _ANOTHER_WRITER, name], check=True, timeout=60, cwd=REPO)
        nxt = snap.continuation()
        assert nxt.resource_version == 2
        batches = [(batch.count, batch.last_rv, [tuple(e) for e in batch.events()]) for batch in nxt.raw_batches()]
        assert batches == [
            (1, 3, [(EventType.ADDED, "c", b"3", 3)]),
            (1, 4, [(EventType.DELETED, "a", b"1", 4)]),
            (1, 5, [(EventType.MODIFIED, "b", b"22", 5)]),
        ]
        assert nxt.last_rv == 5
        w.put("d", b"4")
        assert [tuple(e) for e in nxt.continuation()] == [(EventType.ADDED, "d", b"4", 6)]
