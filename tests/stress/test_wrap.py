"""Torn-freedom and gap-freedom of watchers while a small ring wraps
continuously under W = 1 or 3 writer processes and R = 8 reader processes.

The writers write a stateless workload (tests/stress/_wrap_child.py): every
event is a function of (writer, sequence number), so a reader checks each
event on its own (intact value, exactly the put or delete that writer's
sequence number prescribes, ADDED vs MODIFIED right) and against the previous
one (RVs increase, by exactly 1 without a prefix; each writer's sequence
numbers continue with exactly the next one the prefix lets through).  A gap
may only appear as ResourceExpired, after which the reader relists and
resumes from the snapshot.  Since with several writers nobody knows an
event's RV in advance, each writer logs the RV it got for each sequence
number, and the test recomputes from those logs, for every run of every
reader (a snapshot at RV a, then the events up to RV b), the number and
digest of the events in (a, b] and of the items of the state at a that match
the reader's prefix: a missing, repeated, foreign or stale event or item in
any run fails, even one the per-event checks cannot see.
"""

from __future__ import annotations

import array
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from shmcache import Reader, Writer

from .._report import Report
from ..support import LineChild, child, scaled
from ._wrap_child import (
    KEYS,
    MASK,
    SEED_WRITER,
    event_hash,
    group,
    is_added,
    is_delete,
    key_index,
    key_of,
    put_of,
    read_runs,
    read_rvs,
    value_of,
)

#: ring slots and payload bytes: an event is ~20..300 bytes, so the arena
#: (~400 big events) bounds the ring in the big-value phases, the slots in
#: the small-value ones; either way it wraps every few milliseconds
CAPACITY = 1024
ARENA_BYTES = 64 << 10
MAX_KEYS = 512
STORE_BYTES = 1 << 18
#: events written in total by all writers of a case
EVENTS = scaled(60_000, 10_000_000)
READY_TIMEOUT = 60.0
WRITE_TIMEOUT = float(scaled(600, 6 * 3600))
DRAIN_TIMEOUT = float(scaled(120, 3600))

CODE = """
    import sys
    from tests.stress._wrap_child import main
    main(sys.argv[1:])
"""


class Spec(NamedTuple):
    mode: str  # "watch" or "interval"
    prefix: str
    buffer_size: int

    @property
    def label(self) -> str:
        return f"{self.mode}({self.prefix!r},{self.buffer_size})"


#: the same eight readers in every case: watch() and interval(), unfiltered
#: and filtered, with buffers from 1 event (a refill per event) to 100
READERS = (
    Spec("watch", "", 100), Spec("watch", "", 7), Spec("watch", "p1/", 3), Spec("watch", "p2/w1/", 1),
    Spec("interval", "", 1), Spec("interval", "", 5), Spec("interval", "p0/", 16), Spec("interval", "p2/", 2),
)


def classes(prefix: str, writers: int) -> list[int]:
    """The (group, writer) classes, numbered g * (writers + 1) + w, whose
    keys ``p{g}/w{w}/k{i}`` the prefix lets through (writer 0: the seed)."""
    assert prefix == "" or prefix.endswith("/"), prefix
    return [g * (writers + 1) + w for g in range(3) for w in range(writers + 1)
            if f"p{g}/w{w}/k".startswith(prefix)]


class Sums(NamedTuple):
    """Running figures after some RV, per class: events so far (count and
    digest) and the state's items (count and digest)."""

    events: tuple[int, ...]
    events_digest: tuple[int, ...]
    items: tuple[int, ...]
    items_digest: tuple[int, ...]


def owners(logs: list[array.array[int]], written: int) -> array.array[int]:
    """RV -> (writer << 40) | seq, checking that the writers' RVs are
    exactly 2..written (1 is the seed's), each once, increasing with each
    writer's seq."""
    owner = array.array("Q", bytes(8 * (written + 1)))
    owner[1] = (SEED_WRITER << 40) | 1
    for w, rvs in enumerate(logs, 1):
        prev = 0
        for s, rv in enumerate(rvs, 1):
            assert prev < rv <= written and owner[rv] == 0, f"writer {w} seq {s} got rv {rv}"
            owner[rv] = (w << 40) | s
            prev = rv
    assert all(owner[1:]), "some RV belongs to no writer's event"
    return owner


def last_rvs(owner: array.array[int], writers: int) -> dict[int, int]:
    """Class -> RV of its last event (scanning back from the end)."""
    last = {group(SEED_WRITER, key_index(1)) * (writers + 1) + SEED_WRITER: 1}
    rv = len(owner) - 1
    while rv > 1 and len(last) < 3 * writers + 1:
        w, s = owner[rv] >> 40, owner[rv] & ((1 << 40) - 1)
        last.setdefault(group(w, key_index(put_of(s))) * (writers + 1) + w, rv)
        rv -= 1
    return last


def sweep(owner: array.array[int], writers: int, wanted: set[int]) -> dict[int, Sums]:
    """Replay every event in RV order, keeping per class the running count
    and digest of events and of the state's items; the figures after each RV
    in ``wanted``.  Also checks the workload's own model (every delete hits a
    live key; ADDED is predicted exactly when the key is absent), so a test
    bug cannot pass for a library bug."""
    n = 3 * (writers + 1)
    ev_count, ev_digest, it_count, it_digest = [0] * n, [0] * n, [0] * n, [0] * n
    current: list[int | None] = [None] * ((writers + 1) * KEYS)
    out = {0: Sums(tuple(ev_count), tuple(ev_digest), tuple(it_count), tuple(it_digest))}
    for rv in range(1, len(owner)):
        w, s = owner[rv] >> 40, owner[rv] & ((1 << 40) - 1)
        index = key_index(put_of(s))
        c = group(w, index) * (writers + 1) + w
        h = event_hash(rv, w, s)
        ev_count[c] += 1
        ev_digest[c] = (ev_digest[c] + h) & MASK
        slot = w * KEYS + index
        old = current[slot]
        if is_delete(s):
            assert old is not None, f"writer {w} seq {s} (rv {rv}) deletes an absent key"
            it_count[c] -= 1
            it_digest[c] = (it_digest[c] - old) & MASK
            current[slot] = None
        else:
            assert (old is None) == is_added(w, s), f"the model mispredicts ADDED for writer {w} seq {s}"
            if old is None:
                it_count[c] += 1
            it_digest[c] = (it_digest[c] - (old or 0) + h) & MASK
            current[slot] = h
        if rv in wanted:
            out[rv] = Sums(tuple(ev_count), tuple(ev_digest), tuple(it_count), tuple(it_digest))
    return out


def check_runs(spec: Spec, runs: list[tuple[int, ...]], sums: dict[int, Sums], writers: int,
               goal: int) -> tuple[int, list[str]]:
    """(events verified, problems) of one reader's runs against the sums."""
    cls = classes(spec.prefix, writers)
    problems: list[str] = []
    verified = 0
    prev_end = 0
    for start, end, count, digest, items, items_digest in runs:
        a, b = sums[start], sums[end]
        want = (sum(b.events[c] - a.events[c] for c in cls),
                sum(b.events_digest[c] - a.events_digest[c] for c in cls) & MASK,
                sum(a.items[c] for c in cls), sum(a.items_digest[c] for c in cls) & MASK)
        if not prev_end <= start <= end or (count, digest, items, items_digest) != want:
            problems.append(f"{spec.label} run ({start}, {end}] after {prev_end}: events, digest, "
                            f"snapshot items, digest {(count, digest, items, items_digest)} != {want}")
        verified += count
        prev_end = end
    if prev_end < goal:
        problems.append(f"{spec.label} stopped at rv {prev_end} before its last event at rv {goal}")
    return verified, problems


#: events/s of all writers together in the paced case, with a ring holding
#: about a second of them: what 8 verifying readers keep up with on 2 cores,
#: so that most events are verified by every reader rather than skipped
#: through ResourceExpired (it still wraps every second)
PACED_RATE = 15_000.0
PACED_CAPACITY = 16384
PACED_ARENA_BYTES = 2 << 20


@pytest.mark.parametrize(("writers", "rate"), [(1, 0.0), (3, 0.0), (3, PACED_RATE)],
                         ids=["w1", "w3", "w3-paced"])
def test_no_torn_event_no_silent_gap_under_wrap(name: str, tmp_path: Path, report: Report,
                                                writers: int, rate: float) -> None:
    """W writer processes wrap a small ring (bounded by its slots and by its
    arena in turn) with put, put_many and delete while 8 reader processes
    follow it with watch() and interval(), with and without prefix: no event
    or snapshot item is torn, foreign or out of order, and every event a
    reader did not receive lies in a gap announced by ResourceExpired (the
    runs' counts and digests equal the writers' logs)."""
    per_writer = -(-EVENTS // writers)
    written = writers * per_writer + 1  # and the seed
    done = str(tmp_path / "done.json")
    capacity, arena_bytes = (PACED_CAPACITY, PACED_ARENA_BYTES) if rate else (CAPACITY, ARENA_BYTES)
    owner = Writer(name, capacity=capacity, arena_bytes=arena_bytes, max_keys=MAX_KEYS,
                   store_bytes=STORE_BYTES)
    try:
        assert owner.put(key_of(SEED_WRITER, 1), value_of(SEED_WRITER, 1)) == 1
        with ExitStack() as stack:
            readers: list[LineChild] = []
            for i, spec in enumerate(READERS):
                readers.append(stack.enter_context(child(CODE, "reader", json.dumps({
                    "name": name, "mode": spec.mode, "prefix": spec.prefix, "buffer_size": spec.buffer_size,
                    "writers": writers, "max_seq": per_writer, "done": done,
                    "out": str(tmp_path / f"r{i}.runs")}))))
            for r in readers:
                assert r.next(READY_TIMEOUT) == {"ready": 1}
            started = time.monotonic()
            wkids = [stack.enter_context(child(CODE, "writer", json.dumps({
                "name": name, "wid": w, "events": per_writer, "seed": 1000 * writers + w,
                "log": str(tmp_path / f"w{w}.rvs"), "rate": rate / writers}))) for w in range(1, writers + 1)]
            wends = []
            for wk in wkids:
                assert wk.next(READY_TIMEOUT)["ready"] > 0
            for wk in wkids:
                wends.append(wk.until_end(WRITE_TIMEOUT)[1])
                assert wk.close() == 0, wk.stderr
            write_seconds = time.monotonic() - started
            assert owner.resource_version == written
            logs = [read_rvs(str(tmp_path / f"w{w}.rvs")) for w in range(1, writers + 1)]
            assert [len(log) for log in logs] == [per_writer] * writers
            owner_of = owners(logs, written)
            last = last_rvs(owner_of, writers)
            goals = {spec.prefix: max(last.get(c, 0) for c in classes(spec.prefix, writers))
                     for spec in READERS}
            with open(done + ".tmp", "w") as f:
                json.dump(goals, f)
            os.replace(done + ".tmp", done)
            rends: list[dict[str, Any]] = []
            for r in readers:
                rends.append(r.until_end(DRAIN_TIMEOUT)[1])
                assert r.close() == 0, r.stderr
        with Reader(name) as check:
            assert check.resource_version == written
            oldest = check.oldest_resource_version
    finally:
        owner.close()

    runs = [list(read_runs(str(tmp_path / f"r{i}.runs"))) for i in range(len(READERS))]
    sums = sweep(owner_of, writers, {written} | {rv for rs in runs for run in rs for rv in run[:2]})
    final = sums[written]

    problems: list[str] = []  # what the readers saw wrong, then what the runs' figures show
    run_failures = 0
    figures: list[str] = []
    by_mode = {"watch": 0, "interval": 0, "prefix": 0}
    verified_total = expired = relists = list_expired = skipped_total = 0
    for spec, end, rs in zip(READERS, rends, runs):
        problems += [f"{spec.label}: {p}" for p in end["failure_list"]]
        problems += [f"{spec.label}: {end['failures'] - len(end['failure_list'])} more"] \
            if end["failures"] > len(end["failure_list"]) else []
        verified, run_problems = check_runs(spec, rs, sums, writers, goals[spec.prefix])
        if verified != end["events"]:
            run_problems.append(f"{spec.label} counted {end['events']} events, its runs {verified}")
        problems += run_problems
        run_failures += len(run_problems)
        matching = sum(final.events[c] for c in classes(spec.prefix, writers))
        skipped = matching - verified
        verified_total += verified
        skipped_total += skipped
        expired += end["expired"]
        relists += end["relists"]
        list_expired += end["list_expired"]
        by_mode["prefix" if spec.prefix else spec.mode] += verified
        figures.append(f"{spec.label}:verified={verified},skipped={skipped},expired={end['expired']},"
                       f"list_expired={end['list_expired']},items={end['items']}")
    failures = sum(end["failures"] for end in rends) + run_failures
    pace = f" at {rate:,.0f} events/s" if rate else ""
    report(checked=f"{writers} writer(s){pace} wrapping a {capacity}-slot/{arena_bytes}-byte ring, "
                   "8 readers (watch/interval, prefix filters): every event and relisted item intact, "
                   "per-writer seqs and RVs in order, each run's events and snapshot equal to the writers' logs",
           events=verified_total, faults=expired, failures=failures, writers=writers, readers=len(READERS),
           paced_events_per_second=rate or None,
           written=written, expired=expired, relists=relists, list_expired=list_expired,
           skipped=skipped_total, verified_watch=by_mode["watch"], verified_interval=by_mode["interval"],
           verified_prefix=by_mode["prefix"], oldest_rv_left=oldest,
           evicted=max(e["evicted"] for e in wends),
           slot_bound=sum(e["slot_bound"] for e in wends), arena_bound=sum(e["arena_bound"] for e in wends),
           calls={k: sum(e["calls"][k] for e in wends) for k in ("put", "delete", "put_many")},
           write_seconds=round(write_seconds, 1), per_reader=figures)
    assert not problems, "\n".join(problems[:40])
    # the ring really wrapped — unpaced, bounded by each of its limits in turn (the paced
    # case's bigger arena may never be the bound) — and no reader did little but relist
    slot_bound, arena_bound = sum(e["slot_bound"] for e in wends), sum(e["arena_bound"] for e in wends)
    assert slot_bound > 0 and arena_bound > 0 if not rate else slot_bound + arena_bound > 0, wends
    for spec, end in zip(READERS, rends):
        assert end["events"] > end["expired"], f"{spec.label} got fewer events than ResourceExpired: {end}"
