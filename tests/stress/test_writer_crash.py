"""Writer processes that die: SIGKILLed in a loop of puts (perhaps holding
the lock, perhaps halfway through a change), a lock holder that is stopped
(alive: never robbed) or dead (recovered, its change repaired).  A writer
that dies inside replace(): tests/stress/test_replace_crash.py.

The child-process code is in tests/_children.py, started through
tests/support/_children.py.  Loop sizes follow SHMCACHE_STRESS (``ci`` or ``soak``).
"""

from __future__ import annotations

import os
import random
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from shmcache import (
    Event,
    EventType,
    Item,
    LockTimeout,
    Reader,
    ResourceExpired,
    Writer,
)

from .._report import Report
from ..support import (
    LINE_TIMEOUT,
    Child,
    check_intact,
    check_value,
    lock_recoveries,
    make_value,
    replay,
    ring_events,
    scaled,
    small_writer,
    spawn,
    wait_status,
)

# ---- 1. writers SIGKILLed in a loop of puts ------------------------------------------


def _wait_for_ready(path: Path, child: Child) -> None:
    deadline = time.monotonic() + LINE_TIMEOUT
    while not path.read_bytes().startswith(b"ready\n"):
        assert child.proc.poll() is None, f"put_loop died: {child.proc.returncode}\n{child.stderr}"
        assert time.monotonic() < deadline, f"put_loop never got ready\n{child.stderr}"
        time.sleep(0.002)


def _acks(path: Path) -> dict[int, tuple[str, bytes]]:
    """The acknowledged puts in a killed put_loop's output (a line cut short
    by the kill is not an acknowledgement)."""
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # the last piece has no newline: not acknowledged
    assert lines[0] == b"ready"
    acks: dict[int, tuple[str, bytes]] = {}
    for line in lines[1:]:
        rv, key, value = line.split(b" ")
        acks[int(rv)] = (key.decode(), value)
    return acks


def _check_ring_and_store(r: Reader, acked: dict[int, tuple[str, bytes]],
                          added: dict[str, int]) -> tuple[int, int]:
    """The ring's events are intact, gapless, agree with every acknowledged
    put still held, and their last one per key is that key's item in the
    store.  Nothing is deleted, so each key is ADDED once, ever: ``added``
    remembers when across calls (0: before any event looked at).  Returns
    the (oldest, newest) rv of the window."""
    snap = r.list()
    check_intact(snap.items)
    items = {i.key: i for i in snap.items}
    oldest = r.oldest_resource_version
    events = ring_events(r, oldest - 1)
    assert [e.rv for e in events] == list(range(oldest, snap.rv + 1)), "the ring has a gap"
    last: dict[str, Event] = {}
    for e in events:
        check_value(e.key, e.value)
        assert e.type is not EventType.DELETED, e
        if e.rv in acked:
            assert (e.key, e.value) == acked[e.rv], f"{e} is not the acknowledged put {acked[e.rv]}"
        if e.type is EventType.ADDED:
            assert added.setdefault(e.key, e.rv) == e.rv, f"{e}: added before, at {added[e.key]}"
        else:  # 0: known to exist, added before any event looked at
            assert added.setdefault(e.key, 0) < e.rv, f"{e} modifies a key added later"
        last[e.key] = e
    for key, e in last.items():
        assert items.get(key) == Item(key, e.value, e.rv), f"store {items.get(key)} vs ring {e}"
    for key, item in items.items():
        assert key in last or item.rv < oldest, f"{item} changed inside the window but no event says so"
    return oldest, snap.rv


def _continue(w: Writer, n: int) -> float:
    """A put after a kill (recovering the lock if the child died holding
    it); the seconds it took."""
    start = time.monotonic()
    rv = w.put("cont", make_value("cont", n))
    assert rv == w.resource_version
    return time.monotonic() - start


def test_writer_sigkilled_in_put_loop(name: str, tmp_path: Path, report: Report) -> None:
    """Round after round, a writer process doing put / put_many as fast as it
    can is SIGKILLed at a random moment, perhaps holding the lock or halfway
    through a change.  The next writer always gets in (the lock is
    recovered, the change repaired), and nothing acknowledged is lost or
    torn."""
    rounds = scaled(50, 1000)
    keys = 16
    rng = random.Random(4)
    acked: dict[int, tuple[str, bytes]] = {}
    added: dict[str, int] = {}
    longest = 0.0
    with ExitStack() as stack:
        w = stack.enter_context(small_writer(name, capacity=64, arena_bytes=8192, lock_timeout=0.5))
        r = stack.enter_context(Reader(name))
        w.put("cont", make_value("cont", 0))
        for n in range(1, rounds + 1):
            out = tmp_path / f"round{n}.out"
            with out.open("w") as f, spawn("put_loop", {"name": name, "round_no": n,
                                                         "seed": rng.randrange(1 << 30), "keys": keys},
                                           stdout=f) as child:
                _wait_for_ready(out, child)
                time.sleep(rng.uniform(0, 0.05))
                os.kill(child.pid, signal.SIGKILL)
                zombie = n % 2 == 0
                if zombie:  # a dead holder that is not reaped yet must count as dead
                    wait_status(child.pid, psutil.STATUS_ZOMBIE)
                else:
                    assert child.wait() == -signal.SIGKILL
                got = _acks(out)  # may be empty: killed before its first put returned
                assert not got.keys() & acked.keys(), "an rv acknowledged to two writers"
                acked.update(got)
                if n % 3:  # else the next child's first put finds the lock as this one left it
                    longest = max(longest, _continue(w, n))
                    assert w.resource_version > max(acked, default=0)
                if zombie:
                    assert child.wait() == -signal.SIGKILL
            _check_ring_and_store(r, acked, added)
        longest = max(longest, _continue(w, rounds + 1))
        # the last writer of the test process sees all of it
        assert w.resource_version >= max(acked)
        oldest, newest = _check_ring_and_store(r, acked, added)
        items = {i.key: i for i in r.list().items}
        latest: dict[str, tuple[int, bytes]] = {}
        for rv, (key, value) in sorted(acked.items()):
            latest[key] = (rv, value)
        for key, (rv, value) in latest.items():
            item = items[key]  # no deletes: every key ever put is there
            assert item.rv >= rv, f"{item} is older than its acknowledged put at rv {rv}"
            if item.rv == rv:
                assert item.value == value
            else:  # overwritten by a put its writer made after this one
                assert check_value(key, item.value) > check_value(key, value), (item, value)
        recovered = lock_recoveries(r)
    report(checked="writers SIGKILLed at random in a put/put_many loop: the next writer always gets in, "
                   "no acknowledged put lost or torn, ring gapless and agreeing with the store",
           events=len(acked), faults=rounds, failures=0, writers_killed=rounds,
           acknowledged_puts=len(acked), window=f"{oldest}..{newest}", lock_recoveries=recovered,
           slowest_put_after_kill_ms=round(longest * 1000))
    # liveness, not speed: recovery takes at most about two lock timeouts
    assert longest < 30, f"a put after a kill took {longest:.1f} s"


# ---- 2. a lock holder that is stopped, or dies ---------------------------------------


def test_stopped_lock_holder_is_not_robbed(name: str, report: Report) -> None:
    """A SIGSTOPped holder is alive: others get LockTimeout, readers go on,
    and after SIGCONT it releases and writers proceed."""
    with ExitStack() as stack:
        w = stack.enter_context(small_writer(name))
        w.put("k", make_value("k", 1))
        r = stack.enter_context(Reader(name))
        child = stack.enter_context(spawn("hold_lock", {"name": name, "then": "stop"}))
        child.expect("held")
        wait_status(child.pid, psutil.STATUS_STOPPED)
        other = stack.enter_context(Writer(name, create=False, lock_timeout=0.5))
        timeouts = 0
        for _ in range(2):
            with pytest.raises(LockTimeout, match=f"live pid {child.pid}"):
                other.put("blocked", b"x")
            timeouts += 1
        assert r.list().items == [Item("k", make_value("k", 1), 1)]  # readers take no lock
        assert r.get("blocked") is None and lock_recoveries(r) == 0
        os.kill(child.pid, signal.SIGCONT)
        child.expect("released")
        child.finish()
        assert other.put("after", make_value("after", 2)) == 2
        recovered = lock_recoveries(r)
        keys = [i.key for i in r.list().items]
        report(checked="a SIGSTOPped lock holder is alive: others get LockTimeout naming it, readers go on, "
                       "after SIGCONT it releases and writers proceed; its lock is never taken",
               events=timeouts + 1, faults=1, failures=0, lock_timeouts=timeouts, lock_recoveries=recovered)
        assert recovered == 0, "the lock of a live holder was taken from it"
        assert keys == ["after", "k"]


HALF = {  # what a holder that dies leaves behind: the event at rv 3, if any
    "sleep": None,
    "exit": None,
    "ring_put": Event(EventType.ADDED, "half", make_value("half", 3), 3),
    "ring_modify": Event(EventType.MODIFIED, "k", make_value("k", 3), 3),
    "ring_delete": Event(EventType.DELETED, "victim", make_value("victim", 1), 3),
    "store_behind": Event(EventType.ADDED, "half", make_value("half", 3), 3),
}


def _items(state: dict[str, tuple[bytes, int]]) -> list[Item]:
    return sorted(Item(k, v, rv) for k, (v, rv) in state.items())


@pytest.mark.parametrize("then", HALF)
def test_dead_lock_holder_is_recovered(name: str, then: str, report: Report) -> None:
    """A holder SIGKILLed (``sleep``), exited and not yet reaped (``exit``:
    a zombie), or dead halfway through a change (the event is in the ring
    but not in the store, or in the store but store_rv lags): readers see
    the published event at once (list() replays the ring), and the next
    writer recovers the lock, repairs the store from the ring, and goes on."""
    half = HALF[then]
    with ExitStack() as stack:
        w = stack.enter_context(small_writer(name))
        w.put("victim", make_value("victim", 1))
        w.put("k", make_value("k", 2))
        r = stack.enter_context(Reader(name))
        before = {i.key: (i.value, i.rv) for i in r.list().items}
        child = stack.enter_context(spawn("hold_lock", {"name": name, "then": then}))
        assert child.expect("held") == "held 3"
        if then == "sleep":
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait() == -signal.SIGKILL
        elif then == "exit":
            wait_status(child.pid, psutil.STATUS_ZOMBIE)
        else:
            assert child.wait() == 3

        published = [] if half is None else [half]
        expect = replay(published, before)
        newest = 2 if half is None else 3
        assert r.resource_version == newest
        assert r.list() == (newest, _items(expect))
        assert list(r.watch(2, timeout=0)) == published

        other = stack.enter_context(Writer(name, create=False, lock_timeout=0.5))
        after = make_value("after", 4)
        assert other.put("after", after) == newest + 1
        if then == "exit":
            assert child.wait() == 3
        recovered = lock_recoveries(r)
        ring = ring_events(r, 2)
        keys = ("victim", "k", "half", "after")
        report(checked="a lock holder dead (killed, zombie, or halfway through a change): readers see the "
                       "published event at once, the next writer recovers the lock and repairs the store",
               events=len(ring), faults=1, failures=0, holder=then, published_by_the_dead=len(published),
               keys_checked=len(keys), lock_recoveries=recovered)
        assert recovered == 1

        expect = replay(published + [Event(EventType.ADDED, "after", after, newest + 1)], before)
        assert ring == published + [Event(EventType.ADDED, "after", after, newest + 1)]
        assert r.list() == (newest + 1, _items(expect))
        for key in keys:  # get() reads the repaired store
            assert r.get(key) == (Item(key, *expect[key]) if key in expect else None), key
        assert other.put("k", make_value("k", 9)) == newest + 2


def test_writer_dead_halfway_through_a_bookmark(name: str, report: Report) -> None:
    """A holder dies after a bookmark moved the header's rv but before it
    moved store_rv: readers see rv 3, list() refuses a snapshot it cannot
    prove (no event explains 2 -> 3) rather than serving one, and the next
    writer's repair completes the bookmark: list() at 3, its own event at 4."""
    with ExitStack() as stack:
        w = stack.enter_context(small_writer(name))
        w.put("victim", make_value("victim", 1))
        w.put("k", make_value("k", 2))
        r = stack.enter_context(Reader(name))
        before = r.list().items
        child = stack.enter_context(spawn("hold_lock", {"name": name, "then": "bookmark_half"}))
        assert child.expect("held") == "held 3"
        assert child.wait() == 3
        assert r.resource_version == 3
        with pytest.raises(ResourceExpired, match="did not hold the events up to resource version 3"):
            r.list()
        assert list(r.watch(2, timeout=0)) == []  # nothing happened after 2
        other = stack.enter_context(Writer(name, create=False, lock_timeout=0.5))
        assert other.put("after", make_value("after", 4)) == 4
        snap = r.list()
        assert snap.rv == 4
        assert snap.items == sorted([*before, Item("after", make_value("after", 4), 4)])
        assert [e.rv for e in r.watch(2, timeout=0)] == [4]
        recovered = lock_recoveries(r)
        report(checked="a holder dead halfway through a bookmark: list() refuses until the next writer's "
                       "repair completes it, then a snapshot at the bookmark and the next event after it",
               events=3, faults=1, failures=0, lock_recoveries=recovered)
        assert recovered == 1


def test_writer_dead_after_evicting_the_whole_window(name: str, report: Report) -> None:
    """A writer makes room for an event that needs the whole arena — it
    evicts every event (start_index = end_index) — and dies before it
    publishes that event: the window is empty although rv > 0.  Readers must
    take everything up to rv as gone (ResourceExpired for an older since_rv,
    never an empty interval that would skip those events silently), the
    store still answers, and the next writer's event follows rv."""
    with ExitStack() as stack:
        w = stack.enter_context(small_writer(name, capacity=16, arena_bytes=4096))
        for i in range(5):
            w.put(f"k{i}", make_value(f"k{i}", i + 1))
        r = stack.enter_context(Reader(name))
        old = r.interval(2, buffer_size=1)
        first = old.next()
        assert first is not None and first.rv == 3
        before = r.list()
        child = stack.enter_context(spawn("hold_lock", {"name": name, "then": "evict_all"}))
        assert child.expect("held") == "held 6"
        assert child.wait() == 3
        assert r.oldest_resource_version == 6 and r.resource_version == 5
        with pytest.raises(ResourceExpired, match=r"too old resource version: 2 \(5\)"):
            r.interval(2)
        with pytest.raises(ResourceExpired):
            list(old)  # its next refill finds its events evicted
        assert r.list() == before  # the store does not depend on the ring
        assert list(r.interval(5)) == []  # nothing after rv 5 yet: nothing skipped
        follow = r.interval(5)
        other = stack.enter_context(Writer(name, create=False, lock_timeout=0.5))
        assert other.put("after", b"a") == 6
        assert lock_recoveries(r) == 1
        assert [e.rv for e in follow.continuation()] == [6]
        assert r.oldest_resource_version == 6
        with pytest.raises(ResourceExpired):
            r.interval(4)
    report(checked="a writer dead after evicting the whole window: everything up to rv is expired for readers, "
                   "never an empty interval; the next writer's event follows", events=6, faults=1, failures=0)
