"""Writer(adopt=True): a dead creator's segment of the same geometry is taken
over as it is — same epoch, same RVs, every item — and readers that had it
open go on without reopening; anything else is replaced as before."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from shmcache import CacheClosed, CacheExists, Item, Reader, Writer

from .support import child

GEOMETRY: dict[str, Any] = {"capacity": 16, "arena_bytes": 4096, "max_keys": 64, "store_bytes": 1 << 16}

#: ``CREATOR name capacity hold``: creates the cache (capacity given, the rest
#: GEOMETRY), puts a, b, c, optionally takes the writers' lock and keeps it
#: ("hold"), prints {"pid", "rv"}, then waits to be killed.
CREATOR = """
    import json, os, sys, time
    from shmcache import Writer
    name, capacity, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hold"
    w = Writer(name, capacity=capacity, arena_bytes=4096, max_keys=64, store_bytes=1 << 16, lock_timeout=0.2)
    w.put("a", b"1")
    w.put("b", b"2")
    rv = w.put("c", b"3")
    if hold:
        w._begin()  # the lock taken as an operation takes it, and never given back
    print(json.dumps({"pid": os.getpid(), "rv": rv}), flush=True)
    time.sleep(600)
"""


def killed_creator(name: str, *, capacity: int = 16, hold: bool = False) -> int:
    """Run CREATOR and SIGKILL it once it has written; its pid."""
    with child(CREATOR, name, str(capacity), "hold" if hold else "-") as c:
        got = c.next()
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait()
    assert got["rv"] == 3
    return int(got["pid"])


def test_a_dead_creators_segment_is_adopted_and_its_readers_go_on(name: str) -> None:
    """The creator dies; a Reader opened before keeps its mapping; the
    adopting Writer has the same epoch and RV, every item, and names the dead
    creator; its next put is rv 4, which the old Reader sees without
    reopening, while the header now names the adopter as creator."""
    with child(CREATOR, name, "16", "-") as c:
        got = c.next()
        reader = Reader(name)
        epoch = reader.epoch
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait()
    try:
        with Writer(name, adopt=True, lock_timeout=0.2, **GEOMETRY) as w:
            assert w.adopted_from is not None and w.adopted_from.pid == got["pid"]
            assert w.figures().epoch == epoch and w.resource_version == 3
            assert w.figures().owner.pid == os.getpid()
            assert w.put("d", b"4") == 4
            event = next(iter(reader.watch(3, timeout=5.0)))
            assert (event.key, event.value, event.rv) == ("d", b"4", 4)
            assert reader.list().items == [Item("a", b"1", 1), Item("b", b"2", 2), Item("c", b"3", 3),
                                           Item("d", b"4", 4)]
        with pytest.raises(CacheClosed):  # the adopter is the creator now: its close closes the cache
            reader.get("a")
    finally:
        reader.close()


def test_a_lock_the_dead_creator_held_is_recovered_after_adoption(name: str) -> None:
    killed_creator(name, hold=True)
    with Writer(name, adopt=True, lock_timeout=0.2, **GEOMETRY) as w:
        assert w.resource_version == 3
        assert w.put("d", b"4") == 4  # waits one lock timeout, then takes the lock back
        assert w.figures().lock_recoveries == 1
        assert w.figures().store.keys == 4


def test_another_geometry_is_replaced_not_adopted(name: str) -> None:
    """capacity 16 left behind, 32 asked for: a new segment (new epoch,
    rv 0); a reader of the old one gets CacheClosed."""
    with child(CREATOR, name, "16", "-") as c:
        c.next()
        reader = Reader(name)
        epoch = reader.epoch
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait()
    try:
        with Writer(name, adopt=True, **{**GEOMETRY, "capacity": 32}) as w:
            assert w.adopted_from is None
            assert w.figures().epoch != epoch and w.resource_version == 0
            with pytest.raises(CacheClosed):
                reader.get("a")
    finally:
        reader.close()


def test_without_adopt_a_dead_creators_segment_is_replaced(name: str) -> None:
    killed_creator(name)
    with Writer(name, **GEOMETRY) as w:
        assert w.adopted_from is None and w.resource_version == 0


def test_a_live_creator_is_never_adopted(name: str) -> None:
    with Writer(name, **GEOMETRY) as owner:
        owner.put("a", b"1")
        with pytest.raises(CacheExists):
            Writer(name, adopt=True, **GEOMETRY)
        assert owner.resource_version == 1
