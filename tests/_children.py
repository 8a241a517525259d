"""Child-process side of tests/test_crossprocess.py and of
tests/stress/test_writer_crash.py and test_wrap_single.py.

A child runs ``python -c "...main(sys.argv[1:])" FUNCTION JSON_KWARGS``
(see ``tests.support.spawn``).  Children report on stdout, one line per
fact; a child that finds the cache wrong raises, so it exits non-zero with
the traceback on stderr, which the test shows.

Values are ``KEY|SEQ|PAD|CRC32`` (``check_value`` verifies one), so every
event and item can be checked on its own, whatever the resource version the
writer gave it.  The workloads and their model are in tests/support/.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from shmcache import (
    CacheClosed,
    Event,
    EventType,
    Item,
    Reader,
    ResourceExpired,
    Writer,
)
from shmcache._native import ffi, lib

from .support import Batch, Cursor, Model, Workload, check_value, make_value


def emit(*parts: object) -> None:
    """One line on stdout, written with a single write(2)."""
    os.write(1, (" ".join(str(p) for p in parts) + "\n").encode())


# ---- test 1: drain while the writer wraps the ring ---------------------------


def write_workload(name: str, workload: dict[str, Any], pace_seed: int, burst: int,
                   max_sleep: float) -> None:
    """Apply batches 1.. of the workload as its only writer, checking each
    returned rv; now and then pause so readers can catch up.  Reports how
    often the window was bounded by the slots and by the arena."""
    wl = Workload(**workload)
    batches = wl.batches()
    pace = random.Random(pace_seed)
    w = Writer(name, create=False)
    h: Any = w._map.header
    cap = w.geometry.capacity
    assert w.resource_version == 1, "the test writes the seed event, and nothing else, first"
    rv = 1
    slot_bound = arena_bound = 0
    emit("ready")
    for batch in batches[1:]:
        if len(batch) == 1:
            key, value = batch[0]
            got = w.delete(key) if value is None else w.put(key, value)
        else:
            got = w.put_many(batch)
        rv += len(batch)
        assert got == rv, f"writer got rv {got}, expected {rv}"
        held = int(h.end_index) - int(h.start_index)
        if held == cap:
            slot_bound += 1
        elif int(h.start_index) > 0:
            arena_bound += 1
        if pace.random() < 1 / burst:
            time.sleep(pace.uniform(0, max_sleep))
    assert w.resource_version == wl.events
    emit(json.dumps({"rv": rv, "slot_bound": slot_bound, "arena_bound": arena_bound,
                     "evicted": int(h.events_evicted)}))
    w.close()


class _Drain:
    def __init__(self, reader: Reader, model: Model, prefix: str, buffer_size: int) -> None:
        self.r = reader
        self.model = model
        self.cursor = Cursor(model)
        self.prefix = prefix
        self.buffer_size = buffer_size
        self.pos = 1  # the seed event's rv: readers start after it
        self.stats = {"events": 0, "expired": 0, "relists": 0, "list_expired": 0,
                      "snapshot_items": 0}

    @property
    def done(self) -> bool:
        return self.model.next_rv(self.prefix, self.pos) is None

    def check(self, ev: Event) -> None:
        assert ev.key.startswith(self.prefix), f"{ev} passed the filter {self.prefix!r}"
        want = self.model.next_rv(self.prefix, self.pos)
        assert ev.rv == want, (
            f"after rv {self.pos} (prefix {self.prefix!r}) got {ev}, expected rv {want}"
            + (" (silent gap)" if want is not None and ev.rv > want else "")
        )
        assert ev == self.model.event(ev.rv), f"got {ev}, written {self.model.event(ev.rv)}"
        check_value(ev.key, ev.value)
        self.pos = ev.rv
        self.stats["events"] += 1

    def expired(self, exc: ResourceExpired) -> None:
        assert exc.requested_rv == self.pos, (exc.requested_rv, self.pos)
        assert exc.oldest_rv > self.pos + 1, f"spurious ResourceExpired: {exc} at {self.pos}"
        self.stats["expired"] += 1
        self.relist()

    def relist(self) -> None:
        """Start over from a snapshot, checked against the model."""
        while True:
            try:
                if self.stats["relists"] % 2:
                    snap = self.r.list(self.prefix)
                    rv, items = snap.rv, snap.items
                    want = self.cursor.items(rv, self.prefix)
                else:
                    iv = self.r.interval(0, prefix=self.prefix, buffer_size=self.buffer_size)
                    got = list(iv)
                    rv = iv.resource_version
                    assert all(e.type is EventType.ADDED and e.rv == rv for e in got), got[:3]
                    items = [Item(e.key, e.value, 0) for e in got]
                    want = [i._replace(rv=0) for i in self.cursor.items(rv, self.prefix)]
                break
            except ResourceExpired:
                self.stats["list_expired"] += 1
        assert rv >= self.pos, f"snapshot at rv {rv} is older than rv {self.pos} already seen"
        assert items == want, f"snapshot at rv {rv} differs from the model"
        for item in items:
            check_value(item.key, item.value)
        self.stats["relists"] += 1
        self.stats["snapshot_items"] += len(items)
        self.pos = rv


def drain(name: str, workload: dict[str, Any], mode: str, prefix: str, buffer_size: int) -> None:
    """Follow every event (of ``prefix``) to the workload's end with
    interval() refills (``mode="interval"``) or watch() (``"watch"``),
    relisting after each ResourceExpired."""
    model = Model(Workload(**workload).batches())
    r = Reader(name)
    assert r.resource_version >= 1
    d = _Drain(r, model, prefix, buffer_size)
    emit("ready")
    idle = 0
    while not d.done:
        try:
            if mode == "watch":
                for ev in r.watch(d.pos, prefix=prefix, timeout=0.5, buffer_size=buffer_size):
                    d.check(ev)
                    if d.done:
                        break
            else:
                iv = r.interval(d.pos, prefix=prefix, buffer_size=buffer_size)
                before = d.pos
                while (nxt := iv.next()) is not None:
                    d.check(nxt)
                if d.pos == before:
                    idle += 1
                    time.sleep(0.0002)
        except ResourceExpired as exc:
            d.expired(exc)
    emit(json.dumps({**d.stats, "idle": idle, "pos": d.pos}))
    r.close()


# ---- test 2: list() while the writer runs ------------------------------------


def lister(name: str, workload: dict[str, Any]) -> None:
    """list(), list(prefix), interval(0) and get() while the writer runs,
    each answer checked against the model at its rv."""
    wl = Workload(**workload)
    model = Model(wl.batches())
    cursor = Cursor(model)
    r = Reader(name)
    rng = random.Random(wl.seed + 1)
    stats = {"lists_ok": 0, "lists_expired": 0, "interval0_ok": 0, "gets": 0, "while_writing": 0}
    emit("ready")
    last_rv = 0
    final = False
    i = 0
    while True:
        writing = r.resource_version < model.last_rv
        final = final or not writing
        i += 1
        prefix = "" if i % 3 == 0 else rng.choice(wl.prefixes)
        try:
            if i % 4 == 3:
                iv = r.interval(0, prefix=prefix, buffer_size=64)
                got = list(iv)
                rv = iv.resource_version
                assert all(e.type is EventType.ADDED and e.rv == rv for e in got)
                assert [(e.key, e.value) for e in got] == \
                    [(it.key, it.value) for it in cursor.items(rv, prefix)], f"interval(0) at rv {rv}"
                stats["interval0_ok"] += 1
            else:
                snap = r.list(prefix)
                rv = snap.rv
                assert snap.items == cursor.items(rv, prefix), f"list({prefix!r}) at rv {rv}"
                stats["lists_ok"] += 1
            assert rv >= last_rv, f"snapshot rv went back from {last_rv} to {rv}"
            last_rv = rv
            stats["while_writing"] += writing
        except ResourceExpired:
            stats["lists_expired"] += 1
        for _ in range(3):
            check_get(r, model, f"{rng.choice(wl.prefixes)}{rng.randrange(wl.keys)}")
            stats["gets"] += 1
        if final:
            break
    assert last_rv == model.last_rv
    emit(json.dumps(stats))
    r.close()


def check_get(r: Reader, model: Model, key: str) -> None:
    """get() returns the key's state at some rv between just before the call
    (the store lags the ring by at most the event being applied) and just
    after it."""
    before = r.resource_version
    item = r.get(key)
    after = r.resource_version
    floor = model.key_event_at(key, max(before - 1, 0))
    if item is not None:
        check_value(key, item.value)
        assert item.rv <= after, f"get({key!r}) returned rv {item.rv} > current {after}"
        e = model.event(item.rv)
        assert e.key == key and e.type is not EventType.DELETED and e.value == item.value, \
            f"get({key!r}) = {item}, but the event at its rv is {e}"
        assert floor is None or floor.rv <= item.rv, f"get({key!r}) = {item} is older than {floor}"
    else:
        rvs = model.key_rvs.get(key, [])
        lo, hi = bisect_right(rvs, max(before - 1, 0)), bisect_right(rvs, after)
        moments = [floor] + [model.event(rv) for rv in rvs[lo:hi]]
        assert any(m is None or m.type is EventType.DELETED for m in moments), \
            f"get({key!r}) = None, but the key exists at every rv in [{before - 1}, {after}]"


# ---- test 4: writers SIGKILLed in a loop of puts -----------------------------


def put_loop(name: str, round_no: int, seed: int, keys: int) -> None:
    """put / put_many forever, acknowledging ``RV KEY VALUE`` on stdout after
    each call returns (one write(2) per call)."""
    w = Writer(name, create=False, lock_timeout=0.5)
    rng = random.Random(seed)
    seq = round_no * 10_000_000
    emit("ready")
    while True:
        n = 1 if rng.random() < 0.6 else rng.randint(2, 4)
        batch: list[tuple[str, bytes]] = []
        for _ in range(n):
            seq += 1
            key = f"k{rng.randrange(keys)}"
            batch.append((key, make_value(key, seq, "p" * rng.randint(0, 40))))
        if n == 1:
            rvs = [w.put(*batch[0])]
        else:
            last = w.put_many(batch)
            rvs = list(range(last - n + 1, last + 1))
        os.write(1, b"".join(b"%d %s %s\n" % (rv, k.encode(), v) for rv, (k, v) in zip(rvs, batch)))


# ---- test 5: a lock holder that stops or dies ---------------------------------


def hold_lock(name: str, then: str) -> None:
    """Take the writers' lock as a put would, maybe leave a change half done
    (``ring_*``: the event at rv 3 is published in the ring but the store
    does not have it; ``store_behind``: the store has it too but store_rv
    was not advanced; ``bookmark_half``: a bookmark at rv 3 whose holder
    died before it advanced store_rv; ``evict_all``: every event evicted to make room for
    one never published), then stop (and release after SIGCONT), sleep, or exit
    holding the lock."""
    w = Writer(name, create=False)
    with Reader(name) as r:
        old = {i.key: i for i in r.list().items}
    w._thread_lock.acquire()
    w._begin()
    rv = int(w._map.header.rv) + 1
    lay = w._layout

    def apply(kind: int, key: str, value: bytes, at_rv: int, flags: int) -> None:
        raw = key.encode()
        assert lib.sc_apply(lay, kind, raw, len(raw), value, len(value), at_rv, flags) > 0

    if then == "ring_put":
        apply(lib.SC_ADDED, "half", make_value("half", rv), rv, lib.SC_APPLY_RING)
        apply(lib.SC_DELETED, "half", b"", rv, 0)  # undo the store half
    elif then == "ring_modify":
        apply(lib.SC_ADDED, "k", make_value("k", rv), rv, lib.SC_APPLY_RING)
        apply(lib.SC_ADDED, "k", old["k"].value, old["k"].rv, 0)
    elif then == "ring_delete":
        apply(lib.SC_DELETED, "victim", b"", rv, lib.SC_APPLY_RING)
        apply(lib.SC_ADDED, "victim", old["victim"].value, old["victim"].rv, 0)
    elif then == "store_behind":
        apply(lib.SC_ADDED, "half", make_value("half", rv), rv, lib.SC_APPLY_RING)
    elif then == "bookmark_half":
        # sc_bookmark's first store only: the header's rv moved, store_rv not
        lib.sc_store_release(w._map.field("rv"), rv)
    elif then == "evict_all":
        # ring_append's eviction for an event that needs the whole arena,
        # and the holder dies before it writes and publishes that event
        h = w._map.header
        end = int(h.end_index)
        h.events_evicted += end - int(h.start_index)
        lib.sc_store_release(w._map.field("start_index"), end)
        lib.sc_fence_release()
    emit("held", rv)
    if then == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        lib.sc_lock_release(w._layout, w._lock_state)
        w._thread_lock.release()
        w.close()
        emit("released")
    elif then == "sleep":
        time.sleep(3600)
    else:
        os._exit(3)


# ---- tests 6 and 8: watchers --------------------------------------------------


def watcher(name: str, prefix: str, since_rv: int = -1) -> None:
    """Print every event of ``prefix`` from ``since_rv`` (default: now) until
    the cache is closed; the wait is unbounded, so only a futex wake-up
    delivers anything."""
    r = Reader(name)
    rv = r.resource_version if since_rv < 0 else since_rv
    emit("ready", rv)
    try:
        for ev in r.watch(rv, prefix=prefix, timeout=None):
            emit(ev.type.name, ev.key, ev.value.decode(), ev.rv)
    except CacheClosed as exc:
        emit(type(exc).__name__)
        r.close()
        return
    emit("watch ended")


def creator(name: str) -> None:
    """Create the cache, put one key, and keep it until killed."""
    w = Writer(name, capacity=16, arena_bytes=4096, max_keys=64, store_bytes=1 << 16)
    w.put("x", make_value("x", 1))
    emit("ready", w.figures().epoch)
    sys.stdin.read()
    w.close()


# ---- test 7: several writers at once -----------------------------------------


def mixed_writer(name: str, wid: int, ops: int, keys: int) -> None:
    """``ops`` put / delete / put_many calls on shared keys once told to go;
    prints the acknowledged changes as one JSON line: [rv, key, value|None]."""
    w = Writer(name, create=False, lock_timeout=30)
    rng = random.Random(wid)
    seq = wid * 1_000_000
    acks: list[tuple[int, str, str | None]] = []
    misses = 0
    emit("ready")
    assert sys.stdin.readline().strip() == "go"
    for _ in range(ops):
        x = rng.random()
        n = 1 if x < 0.65 else rng.randint(2, 4)
        batch: Batch = []
        for _ in range(n):
            seq += 1
            key = f"k{rng.randrange(keys)}"
            delete = rng.random() < (0.25 if n == 1 else 0.2)
            batch.append((key, None if delete else make_value(key, seq, "w" * rng.randint(0, 16))))
        try:
            if n == 1:
                key, value = batch[0]
                rvs = [w.delete(key) if value is None else w.put(key, value)]
            else:
                last = w.put_many(batch)
                rvs = list(range(last - n + 1, last + 1))
        except KeyError:
            misses += 1  # a delete of a key another writer removed: nothing changed
            continue
        for rv, (k, v) in zip(rvs, batch):
            acks.append((rv, k, None if v is None else v.decode()))
    emit(json.dumps({"acks": acks, "misses": misses}))
    w.close()


# ---- test 3: readers cannot write --------------------------------------------


def poke(name: str, how: str) -> None:
    """Read normally, then try to write through the reader's mapping."""
    r = Reader(name)
    snap = r.list()
    assert snap.items, "the test put items first"
    for item in snap.items:
        check_value(item.key, item.value)
    for attempt in (lambda: r._map._mm.__setitem__(0, 1), lambda: r._map._mm.write(b"x")):
        try:
            attempt()
        except TypeError:
            emit("TypeError")
        else:
            emit("wrote through the mmap object")
    addr = int(ffi.cast("uintptr_t", r._map._buf))
    pokes: dict[str, Callable[[], object]] = {
        "ctypes": lambda: ctypes.memset(addr + 4096, 0xFF, 32),  # the first ring slot
        "from_address": lambda: setattr(ctypes.c_uint64.from_address(addr + 8), "value", 0),
        "native_store": lambda: lib.sc_store_release(r._map.field("rv"), 1 << 40),
        "native_notify": lambda: lib.sc_notify(r._layout),
    }
    emit("poking")
    pokes[how]()
    emit("survived the write")


def read_everything(name: str) -> None:
    """Every read operation once, for the test to check nothing changed."""
    r = Reader(name)
    rv = r.resource_version
    assert r.oldest_resource_version >= 1
    items = r.list().items
    assert items and r.list("k1").items is not None
    for item in items:
        assert r.get(item.key) == item
    assert r.get("absent") is None
    events = list(r.interval(max(r.oldest_resource_version - 1, 1), buffer_size=3))
    assert events and events[-1].rv == rv
    assert list(r.interval(0)) != []
    assert list(r.watch(rv - 1, timeout=0.05)) == events[-1:]
    emit("read", len(items), len(events))
    r.close()


# ---- entry point -------------------------------------------------------------

CHILDREN: dict[str, Callable[..., None]] = {
    f.__name__: f
    for f in (write_workload, drain, lister, put_loop, hold_lock, watcher, creator,
              mixed_writer, poke, read_everything)
}


def main(argv: list[str]) -> None:
    func, kwargs = argv
    CHILDREN[func](**json.loads(kwargs))


__all__ = ["CHILDREN", "main"]
