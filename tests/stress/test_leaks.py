"""Leaks: file descriptors, mappings and memory stay flat however long a
reader follows a writer and however many readers, writers and producer
connections come and go; and the tests leave nothing in /dev/shm.

Every figure is sampled at a quiet point (no copy in progress) with psutil
and /proc/PID/maps, after a warm-up that lets the allocators, cffi and
psutil reach their steady state.  File descriptors and mappings are counted
exactly; memory, which allocators legitimately hold on to, gets a bound
(see FOLLOW_RSS_BOUND).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import posix_ipc
import psutil
import pytest

from shmcache import Producer, Reader, Writer

from .._report import Report
from ..support import STOP_TIMEOUT, child, running, scaled, wait_for

#: the long-running reader follows this many events (ci: ~3 s of writing here)
FOLLOW_EVENTS = scaled(10**6, 10**7)
FOLLOW_CAPACITY = 16384
FOLLOW_KEYS = 1000  # one put_many batch touches every key once
CHECKPOINTS = 20  # samples, one per FOLLOW_EVENTS // CHECKPOINTS events followed
WARMUP = 1  # samples taken during the warm-up (the first 5 % of the events); not compared
#: RSS may grow this much between the first post-warm-up sample and the last.
#: Why 2 MiB: the follower's segment pages are all touched before the first
#: sample (so shared pages cannot grow), and everything a reader allocates per
#: event or per call is freed; what remains is allocator slack — CPython's
#: obmalloc keeps whole 1 MiB arenas while any object in them lives, and
#: glibc keeps freed heap — which is a couple of arenas at most.  A leak of
#: just 3 bytes per event over the >= 900,000 events compared (ci) already
#: exceeds it; a leaked Event or tuple (>= 56 bytes) exceeds it 25 times.
FOLLOW_RSS_BOUND = 2 << 20
#: lines /proc/self/maps may gain after the warm-up: the allocators map and
#: unmap whole arenas (obmalloc's are separate mmaps), which moves the count
#: by one now and then; the segment itself must stay mapped exactly once,
#: and a mapping leaked per event or per interval would add thousands
FOLLOW_MAPS_SLACK = 4
FOLLOW_TIMEOUT = float(scaled(300, 3000))  # the follower gives up, and the test fails, after this

MANY = 1000  # readers opened and closed, readers dropped, producer connections
WRITER_REOPENS = 200


def segment(name: str) -> str:
    return f"/dev/shm/shmcache.{name}"


def semaphore(name: str) -> str:
    return f"/dev/shm/sem.shmcache.{name}.lock"


def maps_lines(pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return f.read().splitlines()


def mappings_of(path: str, pid: int | str = "self") -> int:
    return sum(1 for line in maps_lines(pid) if line.split()[-1] == path)


def sem_value(name: str) -> int:
    sem = posix_ipc.Semaphore(f"/shmcache.{name}.lock")
    try:
        value: int = sem.value
        return value
    finally:
        sem.close()


@pytest.fixture(scope="module", autouse=True)
def _nothing_left_in_dev_shm() -> Iterator[None]:
    """No /dev/shm entry created by this module's tests (in this worker:
    unique_name() embeds its pid) outlives them, whatever the test."""
    mine = f".t-{os.getpid()}-"
    before = {e for e in os.listdir("/dev/shm") if mine in e}
    yield
    left = sorted(e for e in os.listdir("/dev/shm") if mine in e and e not in before)
    assert not left, f"left in /dev/shm by tests/stress/test_leaks.py: {left}"


# ---- a long-running reader ---------------------------------------------------------

#: ``FOLLOWER name events capacity every timeout``: follows the writer until it
#: has seen resource version ``events``, cycling through five kinds of call:
#: a forced expiry (interval() from ``capacity + 1`` events back, which the ring
#: cannot hold: ResourceExpired, then a relist), watch() with a small buffer
#: left after 5,000 events (the generator abandoned mid-way), interval()
#: drained, watch() with a big buffer left after 50,000 events, and get() of
#: ten keys plus a list() every 20th cycle; a natural ResourceExpired (the writer outran it) relists
#: too.  Events must come with consecutive RVs.  Before anything it touches
#: every page of its mapping, so RSS cannot grow by shared pages first
#: touched later.  Each time its RV passes a multiple of ``every`` it prints
#: {"rv", "fds", "rss", "anon", "maps", "segment_maps"}; at the end {"end": rv, figures}.
FOLLOWER = """
    import json, sys, time
    import psutil
    from shmcache import Reader, ResourceExpired
    name, target, capacity, every, timeout = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
    me = psutil.Process()

    def sample(last):
        mem = me.memory_info()
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
        segment = sum(1 for line in lines if line.endswith("/shmcache." + name))
        print(json.dumps({"rv": last, "fds": me.num_fds(), "rss": mem.rss, "anon": mem.rss - mem.shared,
                          "maps": len(lines), "segment_maps": segment}), flush=True)

    r = Reader(name)
    mm = r._map._mm
    touched = sum(mm[i] for i in range(0, len(mm), 4096))
    last = r.list().rv
    f = dict(events=0, natural_expiries=0, forced_expiries=0, unexpired=0, gaps=0, gets=0, lists=1,
             watches=0, intervals=0, cycles=0)
    print(json.dumps({"ready": last, "segment_bytes": len(mm)}), flush=True)
    next_sample = every
    deadline = time.monotonic() + timeout

    def follow(events):
        global last
        for ev in events:
            if ev.rv != last + 1:
                f["gaps"] += 1
            last = ev.rv
            f["events"] += 1
            yield ev

    while last < target and time.monotonic() < deadline:
        f["cycles"] += 1
        mode = f["cycles"] % 5
        try:
            if mode == 0 and last > capacity + 1:
                try:
                    r.interval(last - capacity - 1)
                    f["unexpired"] += 1
                except ResourceExpired:
                    f["forced_expiries"] += 1
                    last = r.list().rv
                    f["lists"] += 1
            elif mode in (1, 3):
                f["watches"] += 1
                chunk = 5000 if mode == 1 else 50000
                for n, _ in enumerate(follow(r.watch(last, timeout=0.2, buffer_size=64 if mode == 1 else 1000))):
                    if n + 1 >= chunk or last >= target:
                        break
            elif mode == 2:
                f["intervals"] += 1
                for _ in follow(r.interval(last, buffer_size=256)):
                    pass
            else:
                for i in range(10):
                    r.get(f"k{(f['cycles'] + i) % 1000}")
                f["gets"] += 10
                if f["cycles"] % 20 == 4:
                    r.list()
                    f["lists"] += 1
        except ResourceExpired:
            f["natural_expiries"] += 1
            last = r.list().rv
            f["lists"] += 1
        while last >= next_sample:
            sample(last)
            next_sample += every
    r.close()
    print(json.dumps({"end": last, **f}), flush=True)
"""


def _batch(number: int) -> list[tuple[str, bytes | None]]:
    """Batch ``number``: every key once; from batch 2 on, every tenth key is
    deleted in even batches (it was put back by the odd batch before), so the
    stream has ADDED, MODIFIED and DELETED events of varying sizes."""
    out: list[tuple[str, bytes | None]] = []
    for j in range(FOLLOW_KEYS):
        if number >= 2 and number % 2 == 0 and j % 10 == 0:
            out.append((f"k{j}", None))
        else:
            out.append((f"k{j}", b"v" * ((number + j) % 61)))
    return out


def test_long_running_reader_keeps_fds_maps_and_rss_flat(name: str, report: Report) -> None:
    """A reader process follows FOLLOW_EVENTS events (put_many batches from
    this process) with watch(), interval(), get(), list() and relists on
    ResourceExpired (forced every fifth cycle, and natural when outrun).
    After the warm-up its fd count and its number of mappings are exactly
    the same at every checkpoint, and its RSS grows by less than
    FOLLOW_RSS_BOUND; every event it got had the next RV, and every forced
    expiry raised."""
    assert FOLLOW_EVENTS % FOLLOW_KEYS == 0
    batches = [_batch(0), _batch(1), _batch(2), _batch(3)]  # the pattern repeats with period 2 after batch 2
    w = Writer(name, capacity=FOLLOW_CAPACITY, arena_bytes=2 << 20, max_keys=2 * FOLLOW_KEYS,
               store_bytes=1 << 20)
    try:
        # the first batch before the follower starts: it lists at a non-zero RV
        # and so never calls watch(0)/interval(0), which mean "snapshot first"
        rv = w.put_many(batches[0])
        with child(FOLLOWER, name, str(FOLLOW_EVENTS), str(FOLLOW_CAPACITY),
                   str(FOLLOW_EVENTS // CHECKPOINTS), str(FOLLOW_TIMEOUT)) as c:
            ready = c.next()
            assert ready["ready"] == rv, ready
            for number in range(1, FOLLOW_EVENTS // FOLLOW_KEYS):
                rv = w.put_many(batches[number if number < 2 else 2 + number % 2])
            samples, end = c.until_end(timeout=FOLLOW_TIMEOUT + STOP_TIMEOUT)
            rc = c.close()
            assert rc == 0, f"follower exited {rc}: {c.stderr}"
    finally:
        w.close()
    steady = samples[WARMUP:]
    fds = [s["fds"] for s in steady]
    maps = [s["maps"] for s in steady]
    segment_maps = [s["segment_maps"] for s in steady]
    rss_growth = steady[-1]["rss"] - steady[0]["rss"] if steady else 0
    maps_growth = max(maps) - min(maps) if maps else 0
    leaks = (len(set(fds)) > 1) + (set(segment_maps) != {1}) + (maps_growth > FOLLOW_MAPS_SLACK) \
        + (rss_growth >= FOLLOW_RSS_BOUND)
    report(checked=f"a reader following {FOLLOW_EVENTS} events (watch, interval, get, list, relists): fds flat, "
                   "the segment mapped once, maps within a few lines, RSS growth bounded after warm-up",
           events=end["events"], faults=end["forced_expiries"] + end["natural_expiries"], failures=leaks,
           written=rv, samples=len(samples), segment_bytes=ready["segment_bytes"],
           fds_first=fds[0] if fds else None, fds_last=fds[-1] if fds else None,
           maps_first=maps[0] if maps else None, maps_last=maps[-1] if maps else None,
           maps_min=min(maps) if maps else None, maps_max=max(maps) if maps else None,
           segment_maps=sorted(set(segment_maps)),
           rss_first_kib=steady[0]["rss"] // 1024 if steady else None, rss_growth_kib=rss_growth // 1024,
           anon_growth_kib=(steady[-1]["anon"] - steady[0]["anon"]) // 1024 if steady else None,
           rss_growth_in_warmup_kib=(samples[WARMUP]["rss"] - samples[0]["rss"]) // 1024 if steady else None,
           forced_expiries=end["forced_expiries"], natural_expiries=end["natural_expiries"],
           lists=end["lists"], gets=end["gets"], watches=end["watches"], intervals=end["intervals"])
    assert rv == FOLLOW_EVENTS
    assert end["end"] == rv, f"the follower stopped at rv {end['end']} of {rv} (timed out after {FOLLOW_TIMEOUT} s)"
    assert len(samples) == CHECKPOINTS, samples
    assert end["gaps"] == 0, f"{end['gaps']} events did not follow their predecessor: {end}"
    assert end["unexpired"] == 0, f"interval() from {FOLLOW_CAPACITY + 1} events back did not expire: {end}"
    assert end["forced_expiries"] > 0 and end["watches"] > 0 and end["intervals"] > 0 and end["gets"] > 0, end
    assert len(set(fds)) == 1, f"the follower's fd count changed after the warm-up: {fds}"
    assert set(segment_maps) == {1}, f"the follower maps the segment {segment_maps} times"
    assert maps_growth <= FOLLOW_MAPS_SLACK, f"the follower's mappings grew after the warm-up: {maps}"
    assert rss_growth < FOLLOW_RSS_BOUND, \
        f"RSS grew {rss_growth / 1024:.0f} KiB after the warm-up: {[s['rss'] // 1024 for s in steady]} KiB"


# ---- many readers in one process -----------------------------------------------------


def _figures() -> tuple[int, int]:
    return psutil.Process().num_fds(), len(maps_lines())


def test_many_readers_closed_or_dropped_leave_fds_and_maps_flat(name: str, report: Report) -> None:
    """MANY Readers opened, used (get, list, interval) and closed; then MANY
    kept open at once — the segment is mapped MANY more times, which shows
    they were really open, and each holds at most one fd (CPython's mmap
    keeps a duplicate of the descriptor it mapped) — and dropped without
    close; then MANY dropped one by one without close.  After each round (and
    a gc.collect() for the dropped ones) this process has exactly the fds and
    mappings (every line of /proc/self/maps) it had after the warm-up, and
    the segment is mapped only by the Writer."""
    seg = segment(name)
    w = Writer(name, capacity=64, arena_bytes=65536, max_keys=256, store_bytes=65536)
    try:
        w.put_many([(f"k{i}", b"x" * i) for i in range(50)])
        # warm-up: cffi types, psutil, and the allocators' high-water mark of
        # MANY live Readers (obmalloc keeps an arena and glibc its heap top
        # after the first such round; later rounds reuse them)
        for _ in range(10):
            with Reader(name) as r:
                r.list()
                list(r.interval(1))
        warm = [Reader(name) for _ in range(MANY)]
        del warm
        gc.collect()
        first = _figures()
        seg_maps_first = mappings_of(seg)

        for i in range(MANY):
            r = Reader(name)
            r.get(f"k{i % 50}")
            if i % 10 == 0:
                r.list()
                list(r.interval(max(r.oldest_resource_version - 1, 1), buffer_size=7))
            r.close()
        after_close = _figures()

        held = [Reader(name) for _ in range(MANY)]
        for r in held[::100]:
            r.get("k1")
        fds_held = psutil.Process().num_fds()
        seg_maps_held = mappings_of(seg)
        del held, r
        gc.collect()
        after_drop_all = _figures()

        for i in range(MANY):
            Reader(name).get(f"k{i % 50}")
        gc.collect()
        after_drop_each = _figures()
        seg_maps_last = mappings_of(seg)
    finally:
        w.close()
    rounds = {"closed": after_close, "held then dropped": after_drop_all, "dropped each": after_drop_each}
    leaks = sum(figures != first for figures in rounds.values()) + (seg_maps_last != seg_maps_first)
    report(checked=f"{MANY} Readers closed, {MANY} held then dropped, {MANY} dropped unclosed: fds and maps flat",
           events=3 * MANY, faults=0, failures=leaks, fds_first=first[0], fds_last=after_drop_each[0],
           maps_first=first[1], maps_last=after_drop_each[1], fds_with_1000_open=fds_held,
           segment_mappings_with_1000_open=seg_maps_held, segment_mappings_last=seg_maps_last)
    assert seg_maps_held == seg_maps_first + MANY, f"{MANY} open Readers map the segment {seg_maps_held} times"
    assert fds_held <= first[0] + MANY, f"{MANY} open Readers hold {fds_held - first[0]} fds"
    for label, figures in rounds.items():
        assert figures == first, f"after {MANY} Readers {label}: (fds, maps) {first} -> {figures}"
    assert seg_maps_last == seg_maps_first == 1, f"the segment is mapped {seg_maps_last} times at the end"


# ---- producer connections against a daemon ------------------------------------------------


def test_producer_connections_leave_the_daemon_fds_flat(name: str, tmp_path: Path, report: Report) -> None:
    """MANY Producer connections to a daemon, opened and closed — most after a
    ping, every fifth after a put, every seventh without any request — leave
    the daemon with exactly the fds it had (psutil on its pid, measured when
    its STATS say only the measuring connection is open), and this process
    with its own fd count."""
    sock = str(tmp_path / "d.sock")
    with running(name, sock, tmp_path / "d.log") as d, Producer(sock) as probe:
        daemon = psutil.Process(d.pid)
        for _ in range(10):  # warm-up
            with Producer(sock) as p:
                p.ping()

        def alone() -> bool:
            return bool(probe.stats()["producers"] == 1)

        wait_for(alone, "the warm-up connections were never dropped")
        first = daemon.num_fds()
        own_first = psutil.Process().num_fds()
        daemon_maps_first = len(maps_lines(d.pid))
        daemon_rss_first = daemon.memory_info().rss
        puts = 0
        for i in range(MANY):
            with Producer(sock) as p:
                if i % 7 == 0:
                    continue
                if i % 5 == 0:
                    p.put(f"k{i % 50}", b"v")
                    puts += 1
                else:
                    p.ping()
        wait_for(alone, f"the daemon still counts connections after {MANY} were closed")
        last = daemon.num_fds()
        own_last = psutil.Process().num_fds()
        figures = probe.stats()
        daemon_maps_last = len(maps_lines(d.pid))
        daemon_rss_growth = daemon.memory_info().rss - daemon_rss_first
    leaks = (last != first) + (own_last != own_first)
    report(checked=f"{MANY} producer connections opened and closed: the daemon's fds flat",
           events=puts, faults=0, failures=leaks, fds_first=first, fds_last=last,
           client_fds_first=own_first, client_fds_last=own_last, daemon_maps_first=daemon_maps_first,
           daemon_maps_last=daemon_maps_last, daemon_rss_growth_kib=daemon_rss_growth // 1024,
           requests=figures["requests"])
    assert last == first, f"the daemon's fds went from {first} to {last} over {MANY} connections"
    assert own_last == own_first, f"this process's fds went from {own_first} to {own_last}"
    assert figures["rv"] == puts


# ---- a writer reopened ----------------------------------------------------------------


def test_writer_reopened_leaves_fds_flat_and_semaphore_usable(name: str, report: Report) -> None:
    """Writer(create=False) opened and closed WRITER_REOPENS times — after a
    put, a put_many, a delete, or nothing — leaves this process's fds and
    mappings exactly as they were, the entries in /dev/shm (same inodes: a
    non-creator never unlinks), and the semaphore at exactly 1 (no count
    lost or added): the creator and a fresh writer still take the lock at
    once (a lost count would make them wait for a whole lock_timeout and
    recover it, which lock_recoveries would show)."""
    w = Writer(name, capacity=64, arena_bytes=65536, max_keys=256, store_bytes=65536)
    try:
        inodes = os.stat(segment(name)).st_ino, os.stat(semaphore(name)).st_ino
        for _ in range(5):  # warm-up
            Writer(name, create=False).close()
        gc.collect()
        first = _figures()
        events = 0
        for i in range(WRITER_REOPENS):
            x = Writer(name, create=False, lock_timeout=5.0)
            if i % 4 == 0:
                x.put(f"k{i % 10}", b"v")
                events += 1
            elif i % 4 == 1:
                x.put_many([("a", b"1"), ("b", b"2")])
                events += 2
            elif i % 4 == 2:
                x.delete("a")
                events += 1
            x.close()
        gc.collect()
        last = _figures()
        value = sem_value(name)
        after_inodes = os.stat(segment(name)).st_ino, os.stat(semaphore(name)).st_ino
        creator_rv = w.put("after", b"creator")
        with Writer(name, create=False, lock_timeout=1.0) as fresh:
            fresh_rv = fresh.put("after", b"fresh")
        with Reader(name) as r:
            recoveries = r.figures().lock_recoveries
            final_rv = r.resource_version
        final_value = sem_value(name)
    finally:
        w.close()
    leaks = (last != first) + (value != 1) + (final_value != 1) + (recoveries != 0)
    report(checked=f"Writer(create=False) reopened {WRITER_REOPENS} times: fds and maps flat, semaphore at 1",
           events=events + 2, faults=0, failures=leaks, fds_first=first[0], fds_last=last[0],
           maps_first=first[1], maps_last=last[1], semaphore_value=value, lock_recoveries=recoveries)
    assert last == first, f"(fds, maps) {first} -> {last} after {WRITER_REOPENS} writers"
    assert after_inodes == inodes, "a non-creator writer's close() replaced or removed an entry"
    assert value == 1 and final_value == 1, f"semaphore count {value}, then {final_value}"
    assert (creator_rv, fresh_rv, final_rv) == (events + 1, events + 2, events + 2)
    assert recoveries == 0, f"the lock had to be recovered {recoveries} times"


# ---- a reader out of address space ------------------------------------------------------

#: ``SHORT_OF_MEMORY name headroom``: opens a Reader (the cache is fine), then
#: limits its address space (RLIMIT_AS) to what it uses plus ``headroom``
#: bytes — enough for Python, not for the segment — and opens another;
#: prints what that raised, then opens one more with the limit lifted.
SHORT_OF_MEMORY = """
    import json, resource, sys
    import psutil
    from shmcache import CacheCorrupted, Reader
    name, headroom = sys.argv[1], int(sys.argv[2])
    Reader(name).close()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + headroom, hard))
    try:
        Reader(name).close()
        out = {"error": None}
    except Exception as err:
        out = {"error": type(err).__name__, "message": str(err), "errno": getattr(err, "errno", None),
               "corrupted": isinstance(err, CacheCorrupted), "os_or_memory": isinstance(err, (OSError, MemoryError))}
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    Reader(name).close()
    print(json.dumps(out), flush=True)
    print(json.dumps({"end": 1}), flush=True)
"""


def test_reader_out_of_address_space_is_not_told_the_cache_is_corrupted(name: str, report: Report) -> None:
    """What a leak ends in: a process that cannot map one more segment (its
    address space or its mappings exhausted — e.g. ~65,000 Readers left open
    reach vm.max_map_count) must get an OSError/MemoryError saying so, not
    CacheCorrupted, which says the *segment* holds values no correct writer
    produces and so invites an operator to remove a healthy cache.  The
    same process opens the cache fine before and after."""
    w = Writer(name, capacity=16384, arena_bytes=8 << 20, max_keys=1024, store_bytes=1 << 20)
    try:
        size = os.stat(segment(name)).st_size
        with child(SHORT_OF_MEMORY, name, str(size // 3)) as c:
            out, _ = c.until_end()
            rc = c.close()
    finally:
        w.close()
    assert rc == 0, f"the child failed: {c.stderr}"
    got = out[0]
    report(checked="a Reader that cannot map the segment (RLIMIT_AS) gets OSError/MemoryError, not CacheCorrupted",
           events=0, faults=1, failures=int(bool(got.get("corrupted"))), segment_bytes=size,
           error=got.get("error"), message=got.get("message"))
    assert got["error"] is not None, "the Reader opened although the segment cannot fit the address space"
    assert got["os_or_memory"] and not got["corrupted"], f"out of address space, the Reader raised {got}"
