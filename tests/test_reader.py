"""Reader semantics in one process: the Kubernetes interval cases, get/list,
oldest_resource_version, prefixes, big values, closing."""

from __future__ import annotations

import threading
import time

import pytest

from shmcache import (
    CacheClosed,
    EventType,
    InvalidKey,
    InvalidSize,
    Item,
    Reader,
    ResourceExpired,
    ResourceVersionTooLarge,
    Writer,
)
from shmcache._native import lib


def test_oldest_resource_version_cases(name: str) -> None:
    with Writer(name, capacity=3, arena_bytes=4096, max_keys=8, store_bytes=4096) as w, \
            Reader(name) as r:
        assert r.oldest_resource_version == 0  # never held an event
        with pytest.raises(ResourceVersionTooLarge, match=r"too large resource version: 5 \(current 0\)"):
            r.interval(5)  # not reached yet
        w.put("a", b"1", rv=10)
        assert r.oldest_resource_version == 10
        w.put("b", b"2", rv=20)
        w.put("c", b"3", rv=30)
        w.put("d", b"4", rv=40)  # evicts rv 10
        assert r.oldest_resource_version == 20
        assert [e.rv for e in r.interval(19)] == [20, 30, 40]  # since 19 == oldest-1
        assert [e.rv for e in r.interval(25)] == [30, 40]  # between events
        with pytest.raises(ResourceExpired) as info:
            r.interval(18)
        assert str(info.value) == "too old resource version: 18 (19)"
        assert (info.value.requested_rv, info.value.oldest_rv) == (18, 20)
        w.replace([("x", b"X")], rv=50)
        assert r.oldest_resource_version == 51
        w.put("y", b"Y")
        assert r.oldest_resource_version == 51  # no eviction since the replace
        for i in range(3):
            w.put(f"z{i}", b"")
        assert r.oldest_resource_version == 52  # the replace's window is gone


def test_interval_fixed_end_and_resource_version(name: str) -> None:
    with Writer(name, capacity=64, arena_bytes=1 << 14, max_keys=64, store_bytes=1 << 14) as w, \
            Reader(name) as r:
        for i in range(10):
            w.put(f"k{i}", b"v")
        iv = r.interval(4, buffer_size=2)
        assert iv.resource_version == 4
        w.put("late", b"v")  # after creation: not part of this interval
        got = []
        while (e := iv.next()) is not None:
            got.append(e.rv)
        assert got == [5, 6, 7, 8, 9, 10]
        assert iv.next() is None
        snap = r.interval(0)
        assert snap.resource_version == 11
        evs = list(snap)
        assert all(e.type is EventType.ADDED and e.rv == 11 for e in evs)
        assert sorted(e.key for e in evs) == [e.key for e in evs]
        assert {e.key for e in evs} == {f"k{i}" for i in range(10)} | {"late"}


def test_invalidation_raises_at_the_next_refill_not_before(name: str) -> None:
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=64, store_bytes=4096) as w, \
            Reader(name) as r:
        for i in range(8):
            w.put(f"k{i}", b"v")
        iv = r.interval(1, buffer_size=3)  # events rv 2..8
        assert iv.next() is not None  # first refill copies rv 2, 3, 4
        for i in range(8):  # overwrite the whole ring
            w.put(f"n{i}", b"v")
        assert [iv.next().rv, iv.next().rv] == [3, 4]  # type: ignore[union-attr]
        with pytest.raises(ResourceExpired) as info:
            iv.next()
        assert info.value.requested_rv == 4


def test_refills_are_buffer_sized(name: str) -> None:
    """Each refill copies at most buffer_size events: eviction right after a
    refill spares exactly the events already buffered."""
    with Writer(name, capacity=16, arena_bytes=4096, max_keys=64, store_bytes=4096) as w, \
            Reader(name) as r:
        for i in range(17):  # the ring holds rv 2..17: oldest - 1 is not 0
            w.put(f"k{i}", b"v")
        for size in (1, 4, 5):
            iv = r.interval(r.oldest_resource_version - 1, buffer_size=size)
            first = iv.next()
            assert first is not None
            w.put_many([(f"e{i}", b"v") for i in range(16)])  # evict everything
            served = 1
            with pytest.raises(ResourceExpired):
                while iv.next() is not None:
                    served += 1
            assert served == size


def test_prefix_filters(name: str) -> None:
    with Writer(name, capacity=64, arena_bytes=1 << 14, max_keys=64, store_bytes=1 << 14) as w, \
            Reader(name) as r:
        w.put_many([("a/1", b"1"), ("b/1", b"2"), ("a/2", b"3"), ("ab", b"4"), ("a", b"5")])
        w.delete("a/1")
        assert [(e.type, e.key) for e in r.interval(0, prefix="a/")] == [
            (EventType.ADDED, "a/2")]
        assert [(e.type, e.key, e.rv) for e in r.interval(1, prefix="a/", buffer_size=1)] == [
            (EventType.ADDED, "a/2", 3), (EventType.DELETED, "a/1", 6)]
        assert [i.key for i in r.list("a").items] == ["a", "a/2", "ab"]
        assert r.list("zzz").items == []
        assert [i.key for i in r.list().items] == ["a", "a/2", "ab", "b/1"]
        assert [e.key for e in r.watch(1, prefix="b", timeout=0)] == ["b/1"]
        with pytest.raises(InvalidKey):
            r.list("x" * 1025)


def test_big_values_grow_the_buffers(name: str) -> None:
    big = bytes(range(256)) * 300  # 76,800 bytes
    with Writer(name, capacity=8, arena_bytes=1 << 18, max_keys=8, store_bytes=1 << 18) as w, \
            Reader(name) as r:
        w.put("small", b"s")
        w.put("big", big)
        assert r.get("big") == Item("big", big, 2)
        assert r.get("small") == Item("small", b"s", 1)
        assert [e.value for e in r.interval(0)] == [big, b"s"]
        assert [e.value for e in r.interval(1, buffer_size=4)] == [big]
        assert r.list().items[0].value == big


def test_watch_continues_across_intervals(name: str) -> None:
    with Writer(name, capacity=4, arena_bytes=4096, max_keys=64, store_bytes=4096) as w, \
            Reader(name) as r:
        w.put("a", b"1")
        it = r.watch(0, timeout=0)
        assert next(it) == (EventType.ADDED, "a", b"1", 1)
        w.put("b", b"2")
        w.put("a", b"3")
        assert [tuple(e) for e in it] == [(EventType.ADDED, "b", b"2", 2), (EventType.MODIFIED, "a", b"3", 3)]
        it = r.watch(3, timeout=0.01)
        assert list(it) == []
        it = r.watch(3, timeout=0)
        for i in range(6):
            w.put(f"x{i}", b"")  # laps the 4-slot ring before the watch reads
        with pytest.raises(ResourceExpired):
            list(it)


def test_argument_checks(name: str) -> None:
    with Writer(name, capacity=4, arena_bytes=4096, max_keys=8, store_bytes=4096), Reader(name) as r:
        with pytest.raises(InvalidSize):
            r.interval(-1)
        with pytest.raises(TypeError):
            r.interval("1")  # type: ignore[arg-type]
        with pytest.raises(InvalidSize):
            r.interval(1, buffer_size=0)
        with pytest.raises(InvalidSize):
            r.watch(1, timeout=-1)
        with pytest.raises(TypeError):
            r.get(1)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            r.get("")


def test_closed_cache_serves_buffered_events_then_raises(name: str) -> None:
    w = Writer(name, capacity=16, arena_bytes=4096, max_keys=8, store_bytes=4096)
    r = Reader(name)
    for i in range(4):
        w.put(f"k{i}", b"v")
    iv = r.interval(0)
    iv2 = r.interval(1, buffer_size=2)
    assert iv2.next() is not None
    w.close()
    assert iv2.next() is not None  # buffered before the close
    with pytest.raises(CacheClosed):
        iv2.next()
    assert len(list(iv)) == 4  # a snapshot interval holds its events
    for call in (lambda: r.get("k0"), r.list, lambda: r.interval(1), lambda: list(r.watch(1, timeout=0))):
        with pytest.raises(CacheClosed):
            call()
    r.close()
    r.close()


@pytest.mark.parametrize("prefix", ["", "k"])
def test_resource_version_not_reached_yet(name: str, prefix: str) -> None:
    """A since_rv the cache has not reached (another host's cache of the
    same source is ahead, or the client kept an RV of another epoch) is
    Kubernetes' "too large resource version": interval() refuses it at
    once; watch() waits for the cache to reach it (at most FRESH_WAIT and
    its timeout) and then serves exactly the events after it."""
    with Writer(name, capacity=64, arena_bytes=4096, max_keys=64, store_bytes=1 << 16) as w, \
            Reader(name) as r:
        for i in range(3):
            w.put(f"k{i}", b"old")
        with pytest.raises(ResourceVersionTooLarge) as info:
            r.interval(10, prefix=prefix)
        assert (info.value.requested_rv, info.value.current_rv) == (10, 3)
        with pytest.raises(ResourceVersionTooLarge):
            list(r.watch(10, prefix=prefix, timeout=0.05))

        def catch_up() -> None:
            time.sleep(0.1)
            for i in range(3, 15):
                w.put(f"k{i}", str(i).encode())

        writer = threading.Thread(target=catch_up)
        writer.start()
        try:
            got = [(e.rv, e.value) for e in r.watch(10, prefix=prefix, timeout=2.0, buffer_size=3)]
        finally:
            writer.join()
        assert got == [(rv, str(rv - 1).encode()) for rv in range(11, 16)]


def test_an_event_published_before_the_header_rv_is_not_too_large(name: str) -> None:
    """A writer publishes an event (end_index) just before it stores the
    header's rv: a reader that already got the event resumes from its RV in
    that instant, which must not be "too large"."""
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=8, store_bytes=4096) as w, \
            Reader(name) as r:
        for i in range(3):
            w.put(f"k{i}", b"v")
        rv_field = w._map.field("rv")
        lib.sc_store_release(rv_field, 2)  # the instant between the writer's two stores
        try:
            assert [e.rv for e in r.interval(2)] == [3]
            assert list(r.interval(3)) == []
            assert list(r.watch(3, timeout=0)) == []
            with pytest.raises(ResourceVersionTooLarge, match=r"\(current 3\)"):
                r.interval(4)
        finally:
            lib.sc_store_release(rv_field, 3)


def test_a_signal_during_watch_runs_its_handler_and_the_wait_goes_on(name: str) -> None:
    import signal

    fired: list[float] = []

    def handler(signum: int, frame: object) -> None:
        fired.append(time.monotonic())

    class Stop(Exception):
        pass

    def raising(signum: int, frame: object) -> None:
        raise Stop

    with Writer(name, capacity=8, arena_bytes=4096, max_keys=8, store_bytes=4096) as w, Reader(name) as r:
        w.put("a", b"1")
        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            start = time.monotonic()
            assert list(r.watch(r.resource_version, timeout=0.5)) == []
            waited = time.monotonic() - start
            assert len(fired) == 1 and fired[0] - start < 0.45  # ran while the wait was on
            assert waited >= 0.45  # and the wait went on for the rest of its timeout
            signal.signal(signal.SIGALRM, raising)
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(Stop):
                list(r.watch(r.resource_version))  # no timeout: only the signal ends it
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def test_a_watcher_drained_up_to_a_replace_is_told_it_expired(name: str) -> None:
    # the replace evicts nothing new (the ring was drained to its end) and
    # publishes no event: continuing after it would skip the state change
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=8, store_bytes=4096) as w, Reader(name) as r:
        w.put("a", b"1")
        w.put("b", b"2")
        interval = r.interval(1)
        assert [e.key for e in interval] == ["b"]
        w.replace([("c", b"3")], rv=10)
        with pytest.raises(ResourceExpired):
            interval.continuation()
        w.put("d", b"4")
        got = []
        with pytest.raises(ResourceExpired):
            for event in r.watch(2, timeout=0.2):  # the same through watch()
                got.append(event)
        assert got == []
        assert [e.key for e in r.watch(10, timeout=0)] == ["d"]  # after a relist: from the replace on
