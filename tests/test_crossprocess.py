"""Cross-process behaviour: real writer and reader processes sharing a cache.

The child-process code is in tests/_children.py, started through
tests/support/_children.py.  Loop sizes follow the SHMCACHE_STRESS environment variable:
``ci`` (default, the whole file in well under a minute on two cores) or
``soak`` (10-100x more iterations).  Writers that die, and one writer wrapping
the ring under readers, are in tests/stress/ (test_writer_crash.py,
test_wrap_single.py).
"""

from __future__ import annotations

import os
import signal
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from shmcache import (
    CacheClosed,
    CacheExists,
    EventType,
    Item,
    Reader,
    Writer,
)

from ._report import Report
from .support import (
    check_intact,
    check_value,
    make_value,
    replay,
    ring_events,
    scaled,
    small_writer,
    spawn,
    wait_status,
)

# ---- 1. readers cannot write -------------------------------------------------------


def _fill(w: Writer, n: int = 10) -> None:
    for i in range(n):
        w.put(f"k{i}", make_value(f"k{i}", i))


@pytest.mark.parametrize("how", ["ctypes", "from_address", "native_store", "native_notify"])
def test_reader_cannot_write(name: str, how: str) -> None:
    """A reader's mapping is read-only: the mmap object refuses writes, and a
    raw store at its address (ctypes, or the library's own atomics) kills the
    process with SIGSEGV.  The segment is unchanged."""
    with small_writer(name) as w:
        _fill(w)
        segment = Path(f"/dev/shm/shmcache.{name}")
        before = segment.read_bytes()
        with spawn("poke", {"name": name, "how": how}) as child:
            assert child.line() == "TypeError"  # mm[0] = 1
            assert child.line() == "TypeError"  # mm.write()
            child.expect("poking")
            rc = child.wait()
            assert rc == -signal.SIGSEGV, f"rc {rc}; stderr:\n{child.stderr}"
            assert child.rest() == [], "the write through a read-only mapping went through"
        assert segment.read_bytes() == before
        with Reader(name) as r:
            check_intact(r.list().items)


def test_reading_changes_no_byte(name: str) -> None:
    """get, list, interval and watch in another process leave every byte of
    the segment as it was."""
    with small_writer(name) as w:
        _fill(w, 30)
        segment = Path(f"/dev/shm/shmcache.{name}")
        before = segment.read_bytes()
        with spawn("read_everything", {"name": name}) as child:
            assert child.expect("read").split()[1:] == ["30", str(w.geometry.capacity)]
            child.finish()
        assert segment.read_bytes() == before



# ---- 2. watch wakes across processes ---------------------------------------------------


def test_watch_wakes_across_processes(name: str, report: Report) -> None:
    """Reader processes blocked in watch() without a timeout (so only a
    futex wake-up can deliver anything) get each event as it is published,
    filtered by prefix, and CacheClosed when the writer closes."""
    n = scaled(30, 1000)
    with ExitStack() as stack:
        w = small_writer(name)
        stack.callback(w.close)
        w.put("seed", make_value("seed", 0))
        everything = stack.enter_context(spawn("watcher", {"name": name, "prefix": ""}))
        only_b = stack.enter_context(spawn("watcher", {"name": name, "prefix": "b/"}))
        assert everything.expect("ready") == only_b.expect("ready") == "ready 1"
        live: dict[str, bytes] = {}
        prefix_events = 0
        for i in range(n):
            key = f"{'ab'[i % 2]}/{i % 5}"
            if key in live and i % 3 == 0:
                rv = w.delete(key)
                line = f"DELETED {key} {live.pop(key).decode()} {rv}"
            else:
                value = make_value(key, i)
                kind = "MODIFIED" if key in live else "ADDED"
                rv = w.put(key, value)
                line = f"{kind} {key} {value.decode()} {rv}"
                live[key] = value
            assert everything.line() == line
            if key.startswith("b/"):
                assert only_b.line() == line
                prefix_events += 1
        w.close()
        assert everything.line() == "CacheClosed" and only_b.line() == "CacheClosed"
        assert everything.finish() == [] and only_b.finish() == []
    report(checked="2 reader processes blocked in watch() without a timeout get each event as it is "
                   "published, filtered by prefix, then CacheClosed",
           events=n, faults=0, failures=0, watchers=2, delivered_to_prefix_watcher=prefix_events)


# ---- 3. several writers at once ---------------------------------------------------------


def test_concurrent_writers(name: str, report: Report) -> None:
    """Three writer processes put, delete and put_many on the same keys at
    once.  The ring then holds exactly the acknowledged changes, at
    consecutive rvs, each writer's in its own order, and replaying it gives
    list()."""
    ops = scaled(1500, 15_000)
    writers = 3
    most = writers * ops * 4 + 1
    capacity = 1 << most.bit_length()
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, capacity=capacity, arena_bytes=capacity * 48,
                                       max_keys=64, store_bytes=1 << 16))
        seed = make_value("seed", 0)
        assert w.put("seed", seed) == 1
        kids = [stack.enter_context(spawn("mixed_writer", {"name": name, "wid": i, "ops": ops,
                                                           "keys": 12}, stdin=True))
                for i in range(1, writers + 1)]
        for kid in kids:
            kid.expect("ready")
        for kid in kids:
            kid.send("go\n")
        results = [kid.result() for kid in kids]

        acks: dict[int, tuple[int, str, bytes | None]] = {}
        for wid, res in enumerate(results, 1):
            rvs = [rv for rv, _, _ in res["acks"]]
            assert rvs == sorted(set(rvs)), f"writer {wid}'s rvs are not increasing"
            for rv, key, value in res["acks"]:
                assert rv not in acks, f"rv {rv} acknowledged twice"
                acks[rv] = (wid, key, None if value is None else value.encode())
        r = stack.enter_context(Reader(name))
        newest = r.resource_version
        assert r.oldest_resource_version == 1, "the ring was meant to hold everything"
        events = ring_events(r, 1)
        assert [e.rv for e in events] == list(range(2, newest + 1)) == sorted(acks)
        for e in events:
            wid, key, value = acks[e.rv]
            assert e.key == key, (e, acks[e.rv])
            if value is None:
                assert e.type is EventType.DELETED, e
            else:
                assert e.type is not EventType.DELETED and e.value == value, (e, acks[e.rv])
            check_value(e.key, e.value)
        state = replay(events, {"seed": (seed, 1)})
        assert r.list() == (newest, sorted(Item(k, v, rv) for k, (v, rv) in state.items()))
    switches = sum(acks[a.rv][0] != acks[b.rv][0] for a, b in zip(events, events[1:]))
    misses = sum(res["misses"] for res in results)
    report(checked=f"{writers} writer processes at once: the ring holds exactly the acknowledged changes at "
                   "consecutive rvs, each writer's in its order, and replaying it gives list()",
           events=len(events), faults=0, failures=0, writers=writers, writer_switches=switches,
           deletes_of_deleted_keys=misses)


# ---- 4. stale creator --------------------------------------------------------------------


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_stale_creator_is_replaced(name: str, reaped: bool) -> None:
    """While its creator process lives (even stopped) the name is taken;
    once it is dead (reaped or a zombie) a new creator replaces the
    segment, and whoever still has the old one open gets CacheClosed."""
    with ExitStack() as stack:
        creator = stack.enter_context(spawn("creator", {"name": name}, stdin=True))
        epoch = int(creator.expect("ready").split()[1])
        old_reader = stack.enter_context(Reader(name))
        assert old_reader.epoch == epoch and old_reader.get("x") == Item("x", make_value("x", 1), 1)
        old_writer = stack.enter_context(Writer(name, create=False))
        watch = stack.enter_context(spawn("watcher", {"name": name, "prefix": ""}))
        watch.expect("ready")

        with pytest.raises(CacheExists):
            small_writer(name)
        os.kill(creator.pid, signal.SIGSTOP)
        wait_status(creator.pid, psutil.STATUS_STOPPED)
        with pytest.raises(CacheExists):
            small_writer(name)
        assert old_reader.get("x") is not None and watch.proc.poll() is None

        os.kill(creator.pid, signal.SIGKILL)
        if reaped:
            assert creator.wait() == -signal.SIGKILL
        else:
            wait_status(creator.pid, psutil.STATUS_ZOMBIE)
        new = stack.enter_context(small_writer(name))
        assert new.put("y", make_value("y", 1)) == 1
        if not reaped:
            assert creator.wait() == -signal.SIGKILL

        assert watch.line() == "CacheClosed"
        watch.finish()
        for call in (lambda: old_reader.get("x"), old_reader.list, lambda: old_reader.resource_version,
                     lambda: old_writer.put("z", b"z")):
            with pytest.raises(CacheClosed):
                call()
        old_writer.close()  # a non-creator only detaches: the new cache stays
        with Reader(name) as r:
            assert r.epoch != epoch
            assert r.list() == (1, [Item("y", make_value("y", 1), 1)])
