"""Figures: the public read-only view of a cache's state, from a Reader and
from a Writer, through puts, deletes, evictions and a replace."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import pytest

import shmcache
from shmcache import CacheClosed, Figures, ProcessIdentity, Reader, RingFill, StoreFill, Writer

SIZES: dict[str, Any] = dict(capacity=4, arena_bytes=4096, max_keys=8, store_bytes=4096)


def record(key: str, value: bytes) -> int:
    """A store record's bytes: its 24-byte header, key and value, padded to 8."""
    return (24 + len(key) + len(value) + 7) // 8 * 8


def test_figures_of_a_new_cache(name: str) -> None:
    before = time.time()
    with Writer(name, **SIZES) as w, Reader(name) as r:
        f = r.figures()
        assert isinstance(f, Figures)
        assert (f.name, f.epoch) == (name, r.epoch)
        # created_ms is truncated to the millisecond
        assert before - 0.001 <= f.created <= time.time()
        assert isinstance(f.owner, ProcessIdentity) and f.owner.pid == os.getpid()
        assert (f.heartbeat_age, f.socket_path) == (None, "")
        assert (f.rv, f.oldest_rv) == (0, 0)
        assert f.ring == RingFill(events=0, capacity=4, bytes=0, arena_bytes=4096)
        assert f.store == StoreFill(keys=0, max_keys=8, bytes=0, store_bytes=4096)
        assert (f.events_written, f.events_evicted, f.lock_recoveries) == (0, 0, 0)
        assert w.figures() == f


def test_figures_follow_puts_deletes_evictions_and_a_replace(name: str) -> None:
    with Writer(name, **SIZES) as w, Reader(name) as r:
        w.put("a", b"12345")
        w.put("b", b"x")
        w.delete("a")  # the event carries the last value
        f = r.figures()
        assert (f.rv, f.oldest_rv) == (3, 1)
        assert (f.ring.events, f.ring.bytes) == (3, (1 + 5) + (1 + 1) + (1 + 5))
        assert (f.store.keys, f.store.bytes) == (1, record("b", b"x"))
        assert (f.events_written, f.events_evicted) == (3, 0)

        w.put_many([("c", b"cc"), ("d", b"ddd"), ("e", b"")])  # 6 events in 4 slots
        f = r.figures()
        assert (f.rv, f.oldest_rv) == (6, 3)
        assert (f.ring.events, f.ring.bytes) == (4, (1 + 5) + (1 + 2) + (1 + 3) + 1)
        assert (f.events_written, f.events_evicted) == (6, 2)
        assert (f.store.keys, f.store.bytes) == (4, sum(record(k, v) for k, v in
                                                        [("b", b"x"), ("c", b"cc"), ("d", b"ddd"), ("e", b"")]))

        w.replace([("p", b"1"), ("q", b"22", 7)], rv=10)
        f = r.figures()
        assert (f.rv, f.oldest_rv) == (10, 11)  # the window is empty after the replace
        assert (f.ring.events, f.ring.bytes) == (0, 0)
        assert (f.store.keys, f.store.bytes) == (2, record("p", b"1") + record("q", b"22"))
        assert (f.events_written, f.events_evicted) == (6, 2)  # a replace publishes and evicts no event
        assert w.figures() == f

        w.put("r", b"x")
        f = r.figures()
        assert (f.rv, f.oldest_rv, f.ring.events, f.events_written) == (11, 11, 1, 7)


def test_reader_and_writer_agree_on_the_daemons_figures(name: str) -> None:
    with Writer(name, **SIZES) as w, Reader(name) as r, Writer(name, create=False) as other:
        w.put("k", b"v")
        w.advertise_socket("/run/shmcache/k.sock")
        w.heartbeat()
        seen = [r.figures(), w.figures(), other.figures()]
        for f in seen:
            assert f.socket_path == "/run/shmcache/k.sock" and f.socket_path == r.socket_path
            assert f.heartbeat_age is not None and 0 <= f.heartbeat_age < 60
        # the heartbeat's age is measured when read: the rest is equal
        assert len({dataclasses.replace(f, heartbeat_age=0.0) for f in seen}) == 1


def test_figures_are_frozen_with_slots(name: str) -> None:
    with Writer(name, **SIZES) as w:
        f = w.figures()
    for obj, field in ((f, "rv"), (f.ring, "events"), (f.store, "keys"), (f.owner, "pid")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, 1)
    for obj in (f, f.ring, f.store):
        assert not hasattr(obj, "__dict__")
    assert hash(f) == hash(dataclasses.replace(f))


def test_figures_of_a_closed_reader_or_writer_raise_cache_closed(name: str) -> None:
    with Writer(name, **SIZES) as w:
        r = Reader(name)
        r.close()
        with pytest.raises(CacheClosed, match="reader"):
            r.figures()
        follower = Writer(name, create=False)
        r = Reader(name)
    with pytest.raises(CacheClosed, match="writer"):
        w.figures()
    try:  # the creator closed the cache under them
        with pytest.raises(CacheClosed, match="closed by its owner"):
            r.figures()
        with pytest.raises(CacheClosed, match="closed by its owner"):
            follower.figures()
    finally:
        r.close()
        follower.close()


def test_figures_are_exported() -> None:
    assert {"Figures", "RingFill", "StoreFill", "ProcessIdentity"} <= set(shmcache.__all__)
