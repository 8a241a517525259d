"""Readers SIGKILLed mid-copy (draining a big ring through a tiny buffer) and
mid-wait (blocked on the futex in ``watch()``) change nothing for the writer
or the other readers: readers never touch the lock, so a writer process keeps
writing across every kill, a surviving reader verifies every event it gets
(intact values, consecutive RVs or ResourceExpired), and the lock token is 0
whenever the writer is idle."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import psutil

from shmcache import Reader, Writer

from .._report import Report
from ..support import child, scaled, wait_for

CAPACITY = scaled(16384, 65536)
KEYS = 500

#: ``WRITER name pause_file stop_file``: one put after another (value
#: key|seq|pad|crc, seq == the event's rv), checking for the pause file every
#: 64 puts: while it exists, prints {"paused": puts} once and idles; on the
#: stop file prints {"end": puts}.  A LockTimeout (or anything) kills it.
WRITER = """
    import json, os, sys, time
    from shmcache import Writer
    from tests.support import make_value
    name, pause, stop = sys.argv[1:4]
    w = Writer(name, create=False, lock_timeout=2.0)
    puts = 0
    print(json.dumps({"ready": puts}), flush=True)
    while True:
        for _ in range(64):
            puts += 1
            key = f"k{puts % %(keys)d}"
            rv = w.put(key, make_value(key, puts, "x" * (puts % 50)))
            assert rv == puts, (rv, puts)
        if os.path.exists(stop):
            break
        if os.path.exists(pause):
            print(json.dumps({"paused": puts}), flush=True)
            while os.path.exists(pause) and not os.path.exists(stop):
                time.sleep(0.005)
            print(json.dumps({"resumed": puts}), flush=True)
    w.close()
    print(json.dumps({"end": puts}), flush=True)
""".replace("%(keys)d", str(KEYS))

#: ``DRAINER name buffer_size``: drains the whole ring again and again
#: through a tiny buffer, forever; prints {"ready": epoch} once it copies.
DRAINER = """
    import json, sys
    from shmcache import Reader, ResourceExpired
    r = Reader(sys.argv[1])
    size = int(sys.argv[2])
    said = False
    while True:
        try:
            since = max(r.oldest_resource_version - 1, 1)
            for n, ev in enumerate(r.interval(since, buffer_size=size)):
                if not said and n > 10:
                    print(json.dumps({"ready": r.epoch}), flush=True)
                    said = True
        except ResourceExpired:
            pass
"""

#: ``WAITER name``: prints {"ready": rv}, then blocks in watch() on the futex.
WAITER = """
    import json, sys
    from shmcache import Reader
    r = Reader(sys.argv[1])
    rv = r.resource_version
    print(json.dumps({"ready": rv}), flush=True)
    for ev in r.watch(rv, timeout=60):
        print(json.dumps({"event": ev.rv}), flush=True)
"""

#: ``VERIFIER name done_file``: lists (checking every item), then watches
#: from the snapshot with a small buffer and checks every event: intact value
#: of its key, seq == rv, and rv == previous + 1; on ResourceExpired it
#: relists and resumes from the new snapshot.  Once the done file exists and a wait of
#: 1 s brings nothing, prints {"end": ..., figures}.
VERIFIER = """
    import json, os, sys
    from shmcache import Reader, ResourceExpired
    from tests.support import check_value
    name, done = sys.argv[1:3]
    r = Reader(name)
    events, expired = 0, 0

    def relist():
        snap = r.list()
        for item in snap.items:
            assert check_value(item.key, item.value) == item.rv, item
        return snap.rv

    last = relist()
    print(json.dumps({"ready": r.epoch}), flush=True)
    while True:
        try:
            for ev in r.watch(last, timeout=1.0, buffer_size=7):
                assert ev.rv == last + 1, f"gap without ResourceExpired: {last} -> {ev.rv}"
                assert check_value(ev.key, ev.value) == ev.rv, ev
                last = ev.rv
                events += 1
        except ResourceExpired:
            expired += 1
            newer = relist()
            assert newer > last, (newer, last)
            last = newer
            continue
        if os.path.exists(done):
            break
    print(json.dumps({"end": last, "events": events, "expired": expired}), flush=True)
"""


def in_futex_wait(pid: int) -> bool:
    """Is the (single-threaded) process ``pid`` asleep in a futex wait?"""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "futex" in f.read() and psutil.Process(pid).status() == psutil.STATUS_SLEEPING
    except (OSError, psutil.Error):
        return False


def lock_token(r: Reader) -> int:
    return int(r.header_copy().lock_token)


def test_reader_kills_change_nothing_for_writer_and_other_readers(name: str, tmp_path: Path,
                                                                   report: Report) -> None:
    rounds = scaled(15, 300)  # each round kills one drainer mid-copy and one waiter mid-wait
    rng = random.Random(os.getpid())
    pause, stop, done = (str(tmp_path / f) for f in ("pause", "stop", "done"))
    owner = Writer(name, capacity=CAPACITY, arena_bytes=CAPACITY * 128, max_keys=2 * KEYS,
                   store_bytes=KEYS * 1024)
    kills = {"mid-copy": 0, "mid-wait": 0}
    paused_at: list[int] = []
    try:
        with Reader(name) as r, child(VERIFIER, name, done) as verifier:
            verifier.next()
            with child(WRITER, name, pause, stop) as writer:
                writer.next()
                for _ in range(rounds):
                    # mid-copy: a drainer killed at a random moment of its loop
                    with child(DRAINER, name, str(rng.choice((1, 2, 5, 16)))) as drainer:
                        drainer.next()
                        time.sleep(rng.uniform(0.0, 0.15))
                        drainer.kill()
                        assert drainer.proc.returncode == -9
                        kills["mid-copy"] += 1
                    # idle writer: the token is 0; a waiter blocks on the futex and is killed there
                    Path(pause).touch()
                    paused_at.append(writer.next()["paused"])
                    assert lock_token(r) == 0, f"lock token {lock_token(r):#x} while the writer is idle"
                    assert r.resource_version == paused_at[-1]
                    with child(WAITER, name) as waiter:
                        assert waiter.next()["ready"] == paused_at[-1]
                        wait_for(lambda: in_futex_wait(waiter.proc.pid), "the waiter never blocked on the futex")
                        time.sleep(rng.uniform(0.0, 0.05))
                        waiter.kill()
                        assert waiter.proc.returncode == -9
                        kills["mid-wait"] += 1
                    assert lock_token(r) == 0
                    os.unlink(pause)
                    assert writer.next() == {"resumed": paused_at[-1]}
                Path(stop).touch()
                final = writer.until_end()[1]["end"]
                assert writer.close() == 0, writer.stderr
            assert lock_token(r) == 0 and r.figures().lock_recoveries == 0
            assert r.resource_version == final
            Path(done).touch()
            _, end = verifier.until_end(timeout=60)
            assert verifier.close() == 0, verifier.stderr
    finally:
        owner.close()
    growth = [b - a for a, b in zip([0, *paused_at], paused_at)]
    assert all(g > 0 for g in growth), f"the writer stalled across a kill: puts at pauses {paused_at}"
    assert end["end"] == final, f"the surviving reader stopped at rv {end['end']}, the writer at {final}"
    report(checked="reader SIGKILLs mid-copy and mid-wait: writer keeps writing, lock token 0 when idle, "
                   "survivor sees every event intact and consecutive",
           events=end["events"], faults=sum(kills.values()), failures=0, puts=final,
           kills_mid_copy=kills["mid-copy"], kills_mid_wait=kills["mid-wait"],
           survivor_relists=end["expired"], min_puts_between_kills=min(growth))
