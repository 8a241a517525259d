"""Cross-process behaviour: real writer and reader processes sharing a cache.

The child-process code is in tests/_children.py.  Loop sizes follow the
SHMCACHE_STRESS environment variable: ``ci`` (default, the whole file in
well under a minute on two cores) or ``soak`` (10-100x more iterations).
Run with ``-s`` to see the one-line summary each heavy test prints.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from shmcache import (
    CacheClosed,
    CacheExists,
    Event,
    EventType,
    Item,
    LockTimeout,
    Reader,
    ResourceExpired,
    Writer,
)

from . import helpers
from ._children import (
    Cursor,
    Model,
    Workload,
    check_value,
    make_value,
    replay,
    ring_events,
)

STRESS, scaled = helpers.STRESS, helpers.scaled

CHILD_CODE = "import sys; from tests._children import main; main(sys.argv[1:])"
LINE_TIMEOUT = 60.0  # the longest any expected line may take: a hang, not a slow machine
EXIT_TIMEOUT = 300.0 if STRESS == "soak" else 120.0


# ---- child processes -----------------------------------------------------------


class Child:
    """A ``tests._children`` function running in its own process.  Its stdout
    lines arrive on a queue (read by a thread), its stderr is collected."""

    def __init__(self, func: str, kwargs: dict[str, Any], *, stdin: bool,
                 stdout: IO[str] | None) -> None:
        self.func = func
        self.proc = helpers.python(
            CHILD_CODE, func, json.dumps(kwargs),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []
        if self.proc.stdout is not None:
            self._pump(self.proc.stdout, self._lines.put, end=True)
        assert self.proc.stderr is not None
        self._pump(self.proc.stderr, self._stderr.append, end=False)

    def _pump(self, stream: IO[str], sink: Callable[[str | None], None] | Callable[[str], None],
              end: bool) -> None:
        def run() -> None:
            try:
                for line in stream:
                    sink(line.rstrip("\n"))
            except (OSError, ValueError):
                pass
            if end:
                sink(None)  # type: ignore[arg-type]

        thread = threading.Thread(target=run, name=f"pump-{self.func}-{self.pid}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)

    def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next stdout line (AssertionError if none comes in time)."""
        try:
            got = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.func} child {self.pid} printed nothing for {timeout} s; stderr:\n{self.stderr}"
            ) from None
        if got is None:
            self._lines.put(None)
            self.proc.wait(timeout=LINE_TIMEOUT)
            self._join()
            raise AssertionError(
                f"{self.func} child {self.pid} ended (rc {self.proc.returncode}); stderr:\n{self.stderr}"
            )
        return got

    def expect(self, first_word: str) -> str:
        got = self.line()
        assert got.split(" ", 1)[0] == first_word, f"{self.func} child said {got!r}, not {first_word!r}"
        return got

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Reap the child; its return code."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.func} child {self.pid} still runs after {timeout} s; stderr:\n{self.stderr}"
            ) from None
        self._join()
        return rc

    def finish(self, timeout: float = EXIT_TIMEOUT) -> list[str]:
        """Wait for a successful exit; the stdout lines not read yet."""
        rc = self.wait(timeout)
        assert rc == 0, f"{self.func} child {self.pid} exited with {rc}; stderr:\n{self.stderr}"
        return self.rest()

    def rest(self) -> list[str]:
        """The stdout lines not read yet, once the child has exited."""
        assert self.proc.returncode is not None, "rest() is for a child that exited"
        self._join()
        lines = []
        while not self._lines.empty():
            got = self._lines.get_nowait()
            if got is not None:
                lines.append(got)
        return lines

    def result(self, timeout: float = EXIT_TIMEOUT) -> dict[str, Any]:
        """The JSON summary a successful child prints last."""
        rest = self.finish(timeout)
        assert rest, f"{self.func} child printed no summary; stderr:\n{self.stderr}"
        out: dict[str, Any] = json.loads(rest[-1])
        return out

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)

    def close(self) -> None:
        """Kill the child if it still runs, reap it and close its pipes."""
        if self.proc.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=LINE_TIMEOUT)
        self._join()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def spawn(func: str, kwargs: dict[str, Any], *, stdin: bool = False,
          stdout: IO[str] | None = None) -> Iterator[Child]:
    """Run ``tests._children.<func>(**kwargs)`` in a child; it is killed and
    reaped on the way out, whatever happened."""
    child = Child(func, kwargs, stdin=stdin, stdout=stdout)
    try:
        yield child
    finally:
        child.close()


def wait_status(pid: int, status: str, timeout: float = LINE_TIMEOUT) -> None:
    """Wait until process ``pid`` is in ``status`` (psutil.STATUS_*)."""
    deadline = time.monotonic() + timeout
    seen: str | None = None
    while time.monotonic() < deadline:
        try:
            seen = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            seen = "gone"
        if seen == status:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} is {seen!r}, not {status!r}, after {timeout} s")


def small_writer(name: str, *, capacity: int = 16, arena_bytes: int = 4096, max_keys: int = 64,
                 store_bytes: int = 1 << 16, lock_timeout: float = 5.0) -> Writer:
    return Writer(name, capacity=capacity, arena_bytes=arena_bytes, max_keys=max_keys,
                  store_bytes=store_bytes, lock_timeout=lock_timeout)


def lock_recoveries(reader: Reader) -> int:
    return int(reader._h.lock_recoveries)


def check_intact(items: list[Item]) -> None:
    for item in items:
        check_value(item.key, item.value)


# ---- 1. drain while the writer wraps the ring ---------------------------------

# capacity, arena_bytes, readers as (mode, prefix, buffer_size), writer pace (burst, max sleep)
DRAIN_CASES: dict[str, tuple[int, int, list[tuple[str, str, int]], tuple[int, float]]] = {
    "cap8": (8, 1024, [("watch", "", 7), ("interval", "", 3)], (8, 0.002)),
    "cap64": (64, 4096, [("watch", "", 100), ("interval", "", 16)], (30, 0.002)),
    "prefixes-cap32": (32, 2048, [("watch", "a/", 5), ("interval", "b/", 50), ("watch", "c/1", 100)],
                       (15, 0.002)),
}


@pytest.mark.parametrize("case", DRAIN_CASES)
def test_drain_while_wrapping(name: str, case: str) -> None:
    """A writer process wraps a tiny ring (slots and arena) many times while
    reader processes follow it with interval() refills or watch(); every
    event is checked against the writer's deterministic sequence, so a gap
    without ResourceExpired, a torn or foreign event fails."""
    capacity, arena_bytes, readers, (burst, max_sleep) = DRAIN_CASES[case]
    wl = Workload(seed=len(case), events=scaled(20_000, 300_000))
    batches = wl.batches()
    model = Model(batches)
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, capacity=capacity, arena_bytes=arena_bytes,
                                       max_keys=256, store_bytes=1 << 18))
        (seed_key, seed_value), = batches[0]
        assert seed_value is not None and w.put(seed_key, seed_value) == 1
        kids = [stack.enter_context(spawn("drain", {
            "name": name, "workload": asdict(wl), "mode": mode, "prefix": prefix,
            "buffer_size": buffer_size})) for mode, prefix, buffer_size in readers]
        for kid in kids:
            kid.expect("ready")
        writer = stack.enter_context(spawn("write_workload", {
            "name": name, "workload": asdict(wl), "pace_seed": 7, "burst": burst,
            "max_sleep": max_sleep}))
        writer.expect("ready")
        wstats = writer.result()
        rstats = [kid.result() for kid in kids]

        # the writer really wrapped the ring, bounded by its slots and by its arena
        assert wstats["rv"] == model.last_rv
        assert wstats["slot_bound"] > 0 and wstats["arena_bound"] > 0, wstats
        assert wstats["evicted"] >= model.last_rv - capacity
        for (mode, prefix, _), stats in zip(readers, rstats):
            assert stats["events"] > 0, stats
            assert model.next_rv(prefix, stats["pos"]) is None

        # what is left: the store is the model's final state, the ring its tail
        with Reader(name) as r:
            assert r.list().items == Cursor(model).items(model.last_rv)
            oldest = r.oldest_resource_version
            assert ring_events(r, oldest - 1) == model.events[oldest - 1:]
    summary = ", ".join(
        f"{mode}{'(' + prefix + ')' if prefix else ''}: {s['events']} events, {s['expired']} expired, "
        f"{s['relists']} relists ({s['snapshot_items']} items), {s['list_expired']} list() expired"
        for (mode, prefix, _), s in zip(readers, rstats))
    print(f"\n[drain {case}] {model.last_rv} events written, {wstats['evicted']} evicted "
          f"(slot-bound {wstats['slot_bound']}x, arena-bound {wstats['arena_bound']}x); {summary}")


# ---- 2. list() consistency under writes -----------------------------------------


def test_list_consistent_under_writes(name: str) -> None:
    """While a writer process runs a seeded sequence of puts, deletes and
    put_many, a reader process's list(), list(prefix), interval(0) and get()
    each equal the model at the rv they report."""
    wl = Workload(seed=22, events=scaled(20_000, 300_000), keys=48)
    batches = wl.batches()
    model = Model(batches)
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, capacity=16, arena_bytes=4096, max_keys=256,
                                       store_bytes=1 << 18))
        (seed_key, seed_value), = batches[0]
        assert seed_value is not None and w.put(seed_key, seed_value) == 1
        lister = stack.enter_context(spawn("lister", {"name": name, "workload": asdict(wl)}))
        lister.expect("ready")
        writer = stack.enter_context(spawn("write_workload", {
            "name": name, "workload": asdict(wl), "pace_seed": 3, "burst": 40, "max_sleep": 0.002}))
        writer.expect("ready")
        assert writer.result()["rv"] == model.last_rv
        stats = lister.result()
        with Reader(name) as r:
            snap = r.list()
            assert snap.rv == model.last_rv and snap.items == Cursor(model).items(snap.rv)
    ok = stats["lists_ok"] + stats["interval0_ok"]
    assert ok >= 10 and stats["while_writing"] > 0, stats
    assert ok >= (ok + stats["lists_expired"]) // 4, f"most snapshots expired: {stats}"
    print(f"\n[list] {model.last_rv} events; {stats['lists_ok']} list() + {stats['interval0_ok']} "
          f"interval(0) verified ({stats['while_writing']} during writes), "
          f"{stats['lists_expired']} ResourceExpired, {stats['gets']} get() verified")


# ---- 3. readers cannot write -------------------------------------------------------


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


# ---- 4. writers SIGKILLed in a loop of puts ------------------------------------------


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


def test_writer_sigkilled_in_put_loop(name: str, tmp_path: Path) -> None:
    """Round after round, a writer process doing put / put_many as fast as it
    can is SIGKILLed at a random moment, perhaps holding the lock or halfway
    through a change.  The next writer always gets in (the lock is
    recovered, the change repaired), and nothing acknowledged is lost or
    torn."""
    rounds = scaled(20, 1000)
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
    # liveness, not speed: recovery takes at most about two lock timeouts
    assert longest < 30, f"a put after a kill took {longest:.1f} s"
    print(f"\n[sigkill] {rounds} writers killed, {len(acked)} acknowledged puts checked, "
          f"window rv {oldest}..{newest}, {recovered} lock recoveries, "
          f"slowest put after a kill {longest * 1000:.0f} ms")


# ---- 5. a lock holder that is stopped, or dies ---------------------------------------


def test_stopped_lock_holder_is_not_robbed(name: str) -> None:
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
        for _ in range(2):
            with pytest.raises(LockTimeout, match=f"live pid {child.pid}"):
                other.put("blocked", b"x")
        assert r.list().items == [Item("k", make_value("k", 1), 1)]  # readers take no lock
        assert r.get("blocked") is None and lock_recoveries(r) == 0
        os.kill(child.pid, signal.SIGCONT)
        child.expect("released")
        child.finish()
        assert other.put("after", make_value("after", 2)) == 2
        assert lock_recoveries(r) == 0, "the lock of a live holder was taken from it"
        assert [i.key for i in r.list().items] == ["after", "k"]


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
def test_dead_lock_holder_is_recovered(name: str, then: str) -> None:
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
        assert lock_recoveries(r) == 1

        expect = replay(published + [Event(EventType.ADDED, "after", after, newest + 1)], before)
        assert ring_events(r, 2) == published + [Event(EventType.ADDED, "after", after, newest + 1)]
        assert r.list() == (newest + 1, _items(expect))
        for key in ("victim", "k", "half", "after"):  # get() reads the repaired store
            assert r.get(key) == (Item(key, *expect[key]) if key in expect else None), key
        assert other.put("k", make_value("k", 9)) == newest + 2


def test_crash_inside_replace_leaves_an_empty_store_at_its_rv(name: str) -> None:
    """A writer that dies halfway through replace(): the next writer finishes
    the relist as an empty store at the replace's RV; every old window is
    expired, so readers relist; list() never shows the half-built store."""
    with ExitStack() as stack:
        w = stack.enter_context(small_writer(name))
        for i in range(3):
            w.put(f"old/{i}", make_value(f"old/{i}", i + 1))
        r = stack.enter_context(Reader(name))
        old_window = r.interval(1, buffer_size=1)
        child = stack.enter_context(spawn("half_replace", {"name": name}))
        assert child.expect("held") == "held 8"
        assert child.wait() == 3
        with pytest.raises(ResourceExpired, match="replace"):
            r.list()  # the store is half built: no snapshot exists
        with pytest.raises(ResourceExpired):
            old_window.next()
        other = stack.enter_context(Writer(name, create=False, lock_timeout=0.3))
        assert other.put("after", b"a") == 9
        assert lock_recoveries(r) == 1
        assert r.list() == (9, [Item("after", b"a", 9)])
        assert r.get("new/0") is None and r.get("old/0") is None
        assert r.oldest_resource_version == 9
        assert [e.rv for e in r.interval(8)] == [9]
        with pytest.raises(ResourceExpired, match=r"too old resource version: 7 \(8\)"):
            r.interval(7)


# ---- 6. watch wakes across processes ---------------------------------------------------


def test_watch_wakes_across_processes(name: str) -> None:
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
        w.close()
        assert everything.line() == "CacheClosed" and only_b.line() == "CacheClosed"
        assert everything.finish() == [] and only_b.finish() == []
    print(f"\n[watch] {n} events delivered one at a time to 2 blocked watchers, then CacheClosed")


# ---- 7. several writers at once ---------------------------------------------------------


def test_concurrent_writers(name: str) -> None:
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
    print(f"\n[writers] {writers} writers, {len(events)} events replayed, writer changed "
          f"{switches} times along the ring, {misses} deletes of already-deleted keys")


# ---- 8. stale creator --------------------------------------------------------------------


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
