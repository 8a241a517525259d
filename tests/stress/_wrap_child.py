"""Child processes of tests/stress/test_wrap.py, and the stateless workload
both they and the test recompute.

Writer ``w`` (1..W) writes events with its own sequence numbers ``s`` = 1, 2,
3, ...; what event ``s`` is depends on ``(w, s)`` alone, so a reader can
attribute and check any event it receives without knowing the past, and a
prefix reader can compute which of a writer's sequence numbers it must see
next:

* ``s % DELETE_EVERY == DELETE_EVERY - 1`` is a delete, of the key of the put
  at ``target(s)`` (a few sequence numbers earlier); every other ``s`` is a
  put of key index ``key_index(s)``.  Keys are ``p{group}/w{w}/k{index}``:
  each writer owns its keys (so its deletes never miss), and the group (the
  prefix readers filter on) is a function of ``(w, index)``.
* A put's value is ``KEY|S|PAD|CRC32`` (shmcache/_checked.py's scheme; the
  key names the writer) with a pad whose length varies with
  ``s`` (phases of small and of big values, so the ring is bounded by its
  slots at times and by its arena at others, and wraps at odd offsets).  A
  delete carries the key's last value, i.e. that of the put at ``target(s)``,
  and ``target`` is chosen so that the delete's own ``s`` follows from it.

Writer 0 is the test process: it writes the seed, key_of(0, 1) =
value_of(0, 1), at rv 1 before any reader starts.

Children print JSON lines on stdout: ``{"ready": ...}``, then a last line
carrying ``"end"``.  A writer also writes the RV of each of its sequence
numbers to a file (``array('Q')``, index ``s - 1``); a reader writes its runs
(see ``Follower``) to a file.
"""

from __future__ import annotations

import array
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from shmcache import Event, EventType, Item, Reader, ResourceExpired, Writer
from shmcache._checked import make_value, value_seq

DELETE_EVERY = 8
KEYS = 61  # per writer; > DELETE_EVERY, so no put of a key falls between a put and its delete
GROUPS = 3
MASK = (1 << 64) - 1
#: how many numbers a reader's run record has: start, end, events, digest, items, items digest
RUN_FIELDS = 6
#: a writer's ``put_many`` batches take 2..MAX_BATCH of its sequence numbers
MAX_BATCH = 6
#: values are small for PHASE sequence numbers, then big for PHASE: longer
#: than the ring's capacity, so each bound takes over in turn
PHASE = 2500
#: writer 0 is the test itself: it writes one event, seq 1 (rv 1), before the
#: readers start, so that they never ask for ``since_rv=0`` (which means "a
#: snapshot", not "everything")
SEED_WRITER = 0


# ---- the stateless workload ------------------------------------------------------


def is_delete(s: int) -> bool:
    return s % DELETE_EVERY == DELETE_EVERY - 1


def target(s: int) -> int:
    """The put whose key the delete ``s`` removes: one of the DELETE_EVERY - 1
    puts just before it, a different distance each time."""
    return s - 1 - (s // DELETE_EVERY) % (DELETE_EVERY - 1)


def delete_after(t: int) -> int:
    """The only delete that may remove the key put at ``t``: the first one
    after it, since a delete targets one of the puts since the previous one."""
    return t - t % DELETE_EVERY + DELETE_EVERY - 1


def key_index(t: int) -> int:
    """The key index of the put ``t``: equal for ``t ≡ t' (mod KEYS)`` only."""
    return (t * 37) % KEYS


def group(w: int, index: int) -> int:
    return (index + w) % GROUPS


def put_of(s: int) -> int:
    """The put whose key event ``s`` changes (``s`` itself unless a delete)."""
    return target(s) if is_delete(s) else s


def key_of(w: int, s: int) -> str:
    index = key_index(put_of(s))
    return f"p{group(w, index)}/w{w}/k{index}"


def pad_of(w: int, t: int) -> str:
    big = (t // PHASE) % 2
    n = (t * 7919 + w * 104729) % (241 if big else 9)
    return chr(97 + (t + w) % 26) * n


def value_of(w: int, t: int) -> bytes:
    return make_value(key_of(w, t), t, pad_of(w, t))


def is_added(w: int, t: int) -> bool:
    """Whether the put ``t`` finds its key absent (an ADDED event, else
    MODIFIED): the key's previous put, if any, is ``t - m * KEYS`` for the
    smallest m that is not a delete, and was deleted iff its only candidate
    delete targets it."""
    prev = t - KEYS
    while prev >= 1 and is_delete(prev):
        prev -= KEYS
    return prev < 1 or target(delete_after(prev)) == prev


def event_hash(rv: int, w: int, s: int) -> int:
    """A 64-bit hash of an event's identity (splitmix64's finaliser);
    digests are sums of these mod 2**64, so the test can compute them with
    running sums."""
    x = (rv * 0x9E3779B97F4A7C15 + (w << 40) + s) & MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def emit(**fields: Any) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode())


# ---- writer -----------------------------------------------------------------------


def writer(name: str, wid: int, events: int, seed: int, log: str, rate: float = 0.0) -> None:
    """Write sequence numbers 1..events with a seeded mix of put, delete and
    put_many (2..MAX_BATCH items, deletes included); record each one's RV.
    ``rate``: at most that many events per second (0: as fast as it can)."""
    w = Writer(name, create=False, lock_timeout=60.0)
    h: Any = w._map.header
    cap = w.geometry.capacity
    rng = random.Random(seed)
    rvs = array.array("Q")
    calls = {"put": 0, "delete": 0, "put_many": 0}
    slot_bound = arena_bound = 0
    emit(ready=wid)
    started = time.monotonic()
    s = 1
    while s <= events:
        n = 1 if rng.random() < 0.5 else min(rng.randint(2, MAX_BATCH), events - s + 1)
        if n == 1:
            if is_delete(s):
                rvs.append(w.delete(key_of(wid, s)))
                calls["delete"] += 1
            else:
                rvs.append(w.put(key_of(wid, s), value_of(wid, s)))
                calls["put"] += 1
        else:
            last = w.put_many([(key_of(wid, q), None if is_delete(q) else value_of(wid, q))
                               for q in range(s, s + n)])
            rvs.extend(range(last - n + 1, last + 1))
            calls["put_many"] += 1
        s += n
        if rate:
            ahead = started + (s - 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        # unlocked reads: only a statistic of which bound evicted
        held = int(h.end_index) - int(h.start_index)
        if held >= cap:
            slot_bound += 1
        elif int(h.start_index) > 0:
            arena_bound += 1
    evicted = int(h.events_evicted)
    w.close()
    with open(log, "wb") as f:
        rvs.tofile(f)
    emit(end=wid, calls=calls, slot_bound=slot_bound, arena_bound=arena_bound, evicted=evicted)


# ---- reader -----------------------------------------------------------------------


class Follower:
    """Follows the cache from a snapshot, verifying everything it gets.

    A *run* starts at a snapshot (``list(prefix)``) at RV ``start`` and ends
    at the RV ``end`` of the last event received before the next
    ResourceExpired (or the end).  Per run it records the number and digest
    (sum of ``event_hash``) of the events received and of the snapshot's
    items; the test recomputes all four from the writers' RV logs, so a
    missing, duplicated or foreign event or item anywhere fails there.
    Here, each event is checked on its own (intact and exactly the event its
    writer's sequence number prescribes) and against the previous one of its
    run: RVs increase (by exactly 1 without a prefix), and each writer's
    sequence numbers continue with exactly the next one that matches the
    prefix.  A violation is counted and described, not raised, so that the
    test can report the figures first.
    """

    def __init__(self, r: Reader, prefix: str, writers: int, max_seq: int) -> None:
        self.r = r
        self.prefix = prefix
        self.writers = writers
        self.max_seq = max_seq
        self.runs = array.array("Q")
        self.pos = 0
        self.failures: list[str] = []
        self.failure_count = 0
        self.stats = {"events": 0, "expired": 0, "relists": 0, "list_expired": 0, "items": 0}
        self._start = 0
        self._count = 0
        self._digest = 0
        self._items = 0
        self._items_digest = 0
        self._last_seq = [0] * (writers + 1)  # indexed by writer; 0: none seen in this run

    def fail(self, what: str) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(what)

    def decode(self, key: str, value: bytes) -> tuple[int, int] | None:
        """(writer, seq) of an intact value of a put of ``key``; None (and a
        failure) if it is torn, foreign or not the value that put wrote."""
        try:
            parts = key.split("/")
            w = int(parts[1][1:])
            seq = value_seq(key, value)
            t = -1 if seq is None else seq
            ok = (seq is not None and len(parts) == 3 and 0 <= w <= self.writers
                  and 1 <= t <= (self.max_seq if w != SEED_WRITER else 1)
                  and key.startswith(self.prefix)
                  and key_of(w, t) == key and value == value_of(w, t))
        except (IndexError, ValueError):
            ok = False
        if not ok:
            self.fail(f"not intact: {key!r} = {value[:100]!r}")
            return None
        return w, t

    def event(self, ev: Event) -> None:
        rv = ev.rv
        if rv <= self.pos or (not self.prefix and rv != self.pos + 1):
            self.fail(f"rv {rv} after rv {self.pos}" + (" (gap)" if rv > self.pos else ""))
        decoded = self.decode(ev.key, ev.value)
        self.pos = max(self.pos, rv)
        if decoded is None:
            return
        w, s = decoded
        if ev.type is EventType.DELETED:
            s = delete_after(s)
            if target(s) != decoded[1]:
                self.fail(f"a delete of {ev.key!r} at rv {rv} carries the value of put {decoded[1]}, "
                          "which no delete removes")
                return
        elif is_delete(s) or ev.type is not (EventType.ADDED if is_added(w, s) else EventType.MODIFIED):
            self.fail(f"{ev.type.name} event of writer {w}'s seq {s} at rv {rv}")
        last = self._last_seq[w]
        if last:
            want = last + 1
            while not key_of(w, want).startswith(self.prefix):
                want += 1
            if s != want:
                self.fail(f"writer {w}: seq {s} at rv {rv} after seq {last}, expected {want}")
        self._last_seq[w] = s
        self._count += 1
        self._digest = (self._digest + event_hash(rv, w, s)) & MASK

    def relist(self) -> None:
        """Close the current run (if any) and start one from a snapshot,
        checking every item: intact, the value of a put, matching the prefix,
        and not newer than the snapshot."""
        if self.stats["relists"]:
            self._close_run()
        while True:
            try:
                snap = self.r.list(self.prefix)
                break
            except ResourceExpired:
                self.stats["list_expired"] += 1
        if snap.rv < self.pos:
            self.fail(f"snapshot at rv {snap.rv} is older than rv {self.pos} already seen")
        self._items = self._items_digest = 0
        for item in snap.items:
            self._item(item, snap.rv)
        self.stats["relists"] += 1
        self.stats["items"] += self._items
        self.pos = self._start = snap.rv
        self._count = self._digest = 0
        self._last_seq = [0] * (self.writers + 1)

    def _item(self, item: Item, rv: int) -> None:
        decoded = self.decode(item.key, item.value)
        if decoded is None:
            return
        if is_delete(decoded[1]) or not 1 <= item.rv <= rv:
            self.fail(f"item {item.key!r} of seq {decoded[1]} at rv {item.rv} in a snapshot at rv {rv}")
        self._items += 1
        self._items_digest = (self._items_digest + event_hash(item.rv, *decoded)) & MASK

    def expired(self, exc: ResourceExpired) -> None:
        """A ResourceExpired must be a real one, about the position reached."""
        self.stats["expired"] += 1
        if exc.requested_rv != self.pos or exc.oldest_rv <= self.pos + 1:
            self.fail(f"ResourceExpired(requested {exc.requested_rv}, oldest {exc.oldest_rv}) "
                      f"at rv {self.pos}")
        self.relist()

    def _close_run(self) -> None:
        self.runs.extend((self._start, self.pos, self._count, self._digest, self._items,
                          self._items_digest))
        self.stats["events"] += self._count

    def finish(self) -> None:
        self._close_run()


def _target_rv(done: str, prefix: str) -> int | None:
    if not os.path.exists(done):
        return None
    with open(done) as f:
        targets: dict[str, int] = json.load(f)
    return targets[prefix]


def reader(name: str, mode: str, prefix: str, buffer_size: int, writers: int, max_seq: int,
           done: str, out: str) -> None:
    """Follow the cache with ``watch()`` (blocking on the futex when idle) or
    with ``interval()`` refills, relisting after each ResourceExpired, until
    the done file exists and the position reached its RV for ``prefix``."""
    r = Reader(name)
    f = Follower(r, prefix, writers, max_seq)
    f.relist()
    emit(ready=f.pos)
    goal: int | None = None
    idle = 0
    while goal is None or f.pos < goal:
        try:
            if mode == "watch":
                for ev in r.watch(f.pos, prefix=prefix, timeout=0.2, buffer_size=buffer_size):
                    f.event(ev)
                got = False  # the watch ended on its timeout: idle (the writers may be done)
            else:
                iv = r.interval(f.pos, prefix=prefix, buffer_size=buffer_size)
                got = False
                while (nxt := iv.next()) is not None:
                    f.event(nxt)
                    got = True
        except ResourceExpired as exc:
            f.expired(exc)
            continue
        if not got:
            idle += 1
            goal = _target_rv(done, prefix)
            if goal is None and mode != "watch":
                time.sleep(0.0005)  # back off; the loop re-reads anyway: only throughput depends on it
    f.finish()
    r.close()
    with open(out, "wb") as fh:
        f.runs.tofile(fh)
    emit(end=f.pos, **f.stats, idle=idle, failures=f.failure_count, failure_list=f.failures)


def read_runs(path: str) -> Iterator[tuple[int, ...]]:
    runs = array.array("Q")
    with open(path, "rb") as f:
        runs.frombytes(f.read())
    for i in range(0, len(runs), RUN_FIELDS):
        yield tuple(runs[i:i + RUN_FIELDS])


def read_rvs(path: str) -> array.array[int]:
    rvs = array.array("Q")
    with open(path, "rb") as f:
        rvs.frombytes(f.read())
    return rvs


CHILDREN: dict[str, Callable[..., None]] = {"writer": writer, "reader": reader}


def main(argv: list[str]) -> None:
    func, kwargs = argv
    CHILDREN[func](**json.loads(kwargs))


if __name__ == "__main__":
    main(sys.argv[1:])
