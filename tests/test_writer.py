"""Writer semantics in one process: events, validation, capacity, lifecycle."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest

import shmcache
from shmcache import (
    CacheClosed,
    CacheExists,
    CacheFull,
    CacheNotFound,
    EventType,
    InvalidKey,
    InvalidName,
    InvalidResourceVersion,
    InvalidSize,
    Item,
    Reader,
    ResourceVersionTooLarge,
    ShmCacheError,
    ValueTooLarge,
    Writer,
)

from .support import leftovers

SMALL: dict[str, Any] = dict(capacity=16, arena_bytes=4096, max_keys=8, store_bytes=4096)


def events(reader: Reader, since: int = 0) -> list[tuple[EventType, str, bytes, int]]:
    return [(e.type, e.key, e.value, e.rv) for e in reader.interval(since)]


def test_put_delete_events_and_rvs(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        assert w.resource_version == 0 and r.resource_version == 0
        assert w.put("a", b"1") == 1
        assert w.put("a", b"2") == 2
        assert w.put("b", bytearray(b"3")) == 3
        assert w.put("c", memoryview(b"xx4")[2:]) == 4
        assert w.delete("a") == 5
        assert events(r, 1) == [
            (EventType.MODIFIED, "a", b"2", 2),
            (EventType.ADDED, "b", b"3", 3),
            (EventType.ADDED, "c", b"4", 4),
            (EventType.DELETED, "a", b"2", 5),
        ]
        assert r.get("a") is None
        assert r.get("b") == shmcache.Item("b", b"3", 3)
        assert r.resource_version == w.resource_version == 5


def test_explicit_rvs_must_increase(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        assert w.put("a", b"1", rv=10) == 10
        assert w.put("b", b"2") == 11
        for bad in (11, 5):
            with pytest.raises(InvalidResourceVersion) as info:
                w.put("c", b"3", rv=bad)
            assert isinstance(info.value, ValueError)
        with pytest.raises(InvalidResourceVersion):
            w.delete("a", rv=11)
        with pytest.raises(TypeError):
            w.put("c", b"3", rv=True)
        assert w.delete("a", rv=20) == 20
        assert [e.rv for e in r.interval(9)] == [10, 11, 20]
        assert r.get("c") is None


def test_bad_input_changes_nothing(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("k", b"v")
        before = (r.list(), r.resource_version)
        with pytest.raises(TypeError):
            w.put(b"k", b"v")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            w.put("k", "text")  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            w.put("", b"v")
        with pytest.raises(InvalidKey):
            w.put("x" * 1025, b"v")
        with pytest.raises(InvalidKey):
            w.put("\udc80", b"v")
        with pytest.raises(ValueTooLarge) as big:
            w.put("k", b"x" * 5000)
        assert isinstance(big.value, ValueError)
        with pytest.raises(KeyError):
            w.delete("absent")
        assert (r.list(), r.resource_version) == before
        w.put("é" * 512, b"ok")  # 1,024 UTF-8 bytes: the longest key
        assert r.get("é" * 512) is not None


def test_put_many_is_validated_whole(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        assert w.put_many([]) == 0
        assert w.put_many([("a", b"1"), ("b", b"2"), ("a", None), ("c", b"3")]) == 4
        before = (r.list(), r.resource_version)
        with pytest.raises(KeyError):
            w.put_many([("d", b"4"), ("a", None)])  # a is gone
        with pytest.raises(KeyError):
            w.put_many([("b", None), ("b", None)])
        with pytest.raises(TypeError):
            w.put_many([("d", b"4"), ("e",)])  # type: ignore[list-item]
        with pytest.raises(InvalidKey):
            w.put_many([("d", b"4"), ("", b"5")])
        assert (r.list(), r.resource_version) == before
        assert [(e.type, e.key) for e in r.interval(0)] == [
            (EventType.ADDED, "b"), (EventType.ADDED, "c")]
        assert [(e.type, e.key, e.rv) for e in r.interval(1)] == [
            (EventType.ADDED, "b", 2), (EventType.DELETED, "a", 3), (EventType.ADDED, "c", 4)]


def test_cache_full_by_keys_and_by_bytes(name: str) -> None:
    with Writer(name, capacity=64, arena_bytes=1 << 16, max_keys=4, store_bytes=1024) as w, \
            Reader(name) as r:
        for i in range(4):
            w.put(f"k{i}", b"v")
        with pytest.raises(CacheFull):
            w.put("k4", b"v")
        with pytest.raises(CacheFull):
            w.put_many([("k0", None), ("k4", b"v"), ("k5", b"v")])
        w.put("k0", b"replaced")  # an existing key still fits
        before = (r.list(), r.resource_version)
        # records: k0 40, k1 480, k2 32, k3 32 bytes (24-byte header + key +
        # value, padded to 8); k2 growing to 496 would make 1,048 > 1,024
        w.put("k1", b"x" * 450)
        with pytest.raises(CacheFull):
            w.put("k2", b"x" * 470)
        assert r.get("k2") == shmcache.Item("k2", b"v", 3)
        assert r.resource_version == before[1] + 1
        w.delete("k1")
        w.put("k2", b"x" * 470)  # room again


def test_store_heap_is_reused_forever(name: str) -> None:
    """The heap is a log cleaned as it fills: many rewrites never run out."""
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=16, store_bytes=2048) as w, \
            Reader(name) as r:
        for i in range(5000):
            w.put(f"k{i % 10}", bytes([i % 251]) * (i % 90))
            if i % 7 == 0:
                w.delete(f"k{i % 10}")
        expect = {}
        for i in range(5000):
            expect[f"k{i % 10}"] = bytes([i % 251]) * (i % 90)
            if i % 7 == 0:
                del expect[f"k{i % 10}"]
        assert {it.key: it.value for it in r.list().items} == expect


def test_replace_empties_the_window(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("old", b"1")
        w.put("gone", b"2")
        old_interval = r.interval(1, buffer_size=1)
        assert w.replace([("a", b"A"), ("b", b"B")], rv=7) == 7
        assert r.list() == shmcache.Snapshot(7, [shmcache.Item("a", b"A", 7), shmcache.Item("b", b"B", 7)])
        assert r.oldest_resource_version == 8
        assert list(r.interval(7)) == []
        with pytest.raises(shmcache.ResourceExpired, match=r"too old resource version: 6 \(7\)"):
            r.interval(6)
        with pytest.raises(shmcache.ResourceExpired):
            old_interval.next()
        with pytest.raises(InvalidResourceVersion):
            w.replace([], rv=7)
        with pytest.raises(InvalidKey):
            w.replace([("a", b"1"), ("a", b"2")], rv=9)
        with pytest.raises(CacheFull):
            w.replace([(f"k{i}", b"") for i in range(9)], rv=9)
        assert r.resource_version == 7
        w.put("c", b"C")
        assert [(e.key, e.rv) for e in r.interval(7)] == [("c", 8)]
        assert r.oldest_resource_version == 8


def test_names_and_sizes_are_checked(name: str) -> None:
    for bad in ("", "a/b", ".hidden", "x" * 201, "spa ce"):
        with pytest.raises(InvalidName):
            Writer(bad)
    with pytest.raises(TypeError):
        Writer(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidSize):
        Writer(name, capacity=0)
    with pytest.raises(InvalidSize):
        Writer(name, lock_timeout=0)
    with pytest.raises(TypeError):
        Writer(name, max_keys=2.5)  # type: ignore[arg-type]
    assert not leftovers(name)


def test_creator_owns_and_unlinks(name: str) -> None:
    w = Writer(name, mode=0o600, **SMALL)
    assert stat.S_IMODE(os.stat(f"/dev/shm/shmcache.{name}").st_mode) == 0o600
    with pytest.raises(CacheExists):
        Writer(name, **SMALL)  # the creator (this process) is alive
    other = Writer(name, create=False)
    other.put("k", b"v")
    other.close()  # detaches only
    assert leftovers(name)
    r = Reader(name)
    assert r.get("k") is not None
    w.close()
    assert not leftovers(name)
    with pytest.raises(CacheClosed):
        r.get("k")
    with pytest.raises(CacheClosed):
        w.put("k", b"v")
    r.close()
    with pytest.raises(CacheClosed):
        _ = r.resource_version
    with pytest.raises(CacheNotFound):
        Reader(name)
    with pytest.raises(CacheNotFound):
        Writer(name, create=False)


def test_exception_hierarchy() -> None:
    for exc in (shmcache.CacheNotFound, shmcache.CacheCorrupted, shmcache.CacheClosed,
                shmcache.ResourceExpired, shmcache.LockTimeout, shmcache.CacheFull,
                shmcache.CacheExists, InvalidKey, ValueTooLarge, InvalidResourceVersion,
                InvalidSize, InvalidName):
        assert issubclass(exc, ShmCacheError)
    for exc in (InvalidKey, ValueTooLarge, InvalidResourceVersion, InvalidSize, InvalidName):
        assert issubclass(exc, ValueError)
    assert issubclass(shmcache.LockTimeout, TimeoutError)
    assert set(shmcache.__all__) >= {
        "Writer", "Reader", "Event", "EventType", "Item", "Snapshot", "ShmCacheError",
        "CacheNotFound", "CacheCorrupted", "CacheClosed", "ResourceExpired", "LockTimeout",
        "CacheFull"}


def test_bookmark_advances_the_rv_without_an_event(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("a", b"1")
        w.put("b", b"2")
        for bad in (2, 1, 0, -5, True, None, "9"):
            with pytest.raises((InvalidResourceVersion, TypeError)):
                w.bookmark(bad)  # type: ignore[arg-type]
        assert (r.resource_version, r.list().rv) == (2, 2)
        assert w.bookmark(10) == 10
        assert r.resource_version == 10
        snap = r.list()
        assert snap.rv == 10 and [i.key for i in snap.items] == ["a", "b"]
        assert list(r.interval(10)) == []  # nothing after the bookmark yet
        assert [e.rv for e in r.interval(1)] == [2]  # and nothing between 2 and 10
        with pytest.raises(InvalidResourceVersion):
            w.put("c", b"3", rv=10)
        assert w.put("c", b"3") == 11
        assert [(e.key, e.rv) for e in r.interval(10)] == [("c", 11)]
        assert r.get("c") == Item("c", b"3", 11)
        assert w.bookmark(20) == 20
        assert [(e.key, e.rv) for e in r.interval(0)] == [("a", 20), ("b", 20), ("c", 20)]
        with pytest.raises(ResourceVersionTooLarge):
            r.interval(21)


def test_put_many_at_an_explicit_rv_and_has(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("a", b"1")
        assert w.has("a") and not w.has("b")
        before = (r.list(), r.resource_version)
        for bad in (1, 0, -1):
            with pytest.raises((InvalidResourceVersion,)):
                w.put_many([("b", b"2")], rv=bad)
        with pytest.raises(TypeError):
            w.put_many([("b", b"2")], rv="7")  # type: ignore[arg-type]
        assert (r.list(), r.resource_version) == before
        assert w.put_many([("b", b"2"), ("a", None)], rv=100) == 101
        assert [(e.key, e.rv) for e in r.interval(1)] == [("b", 100), ("a", 101)]
        assert w.has("b") and not w.has("a")
        assert w.put_many([], rv=200) == 101  # an empty batch changes nothing
        assert w.put("c", b"3") == 102


def test_replace_with_item_rvs(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("old", b"0")
        before = (r.list(), r.resource_version)
        for bad in ([("a", b"1", 0)], [("a", b"1", 11)], [("a", b"1", -1)]):
            with pytest.raises(InvalidResourceVersion):
                w.replace(bad, rv=10)
        for bad_type in ([("a", b"1", "3")], [("a", b"1", True)], [("a", b"1", 2, 3)]):
            with pytest.raises(TypeError):
                w.replace(bad_type, rv=10)  # type: ignore[arg-type]
        assert (r.list(), r.resource_version) == before
        assert w.replace([("a", b"1", 3), ("b", b"2"), ("c", b"3", 10)], rv=10) == 10
        assert r.list() == (10, [Item("a", b"1", 3), Item("b", b"2", 10), Item("c", b"3", 10)])
        assert r.get("a") == Item("a", b"1", 3)
        assert w.put("a", b"11") == 11
        assert r.get("a") == Item("a", b"11", 11)
