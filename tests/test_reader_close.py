"""A Reader closed while in use (review r9, r10): every later call raises
CacheClosed instead of reading the unmapped segment (SIGSEGV), and close()
from one thread ends the watches of every other thread with CacheClosed and
unmaps only when none is inside the mapping."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from shmcache import Writer

from .helpers import REPO

AFTER_CLOSE = textwrap.dedent("""
    import sys
    from shmcache import CacheClosed, Reader
    r = Reader(sys.argv[1])
    drained = r.interval(1)
    list(drained)
    pending = r.interval(1, buffer_size=1)
    assert pending.next() is not None  # events 3.. not copied yet
    r.close()
    calls = {
        "continuation": drained.continuation, "next": pending.next, "get": lambda: r.get("a"),
        "list": r.list, "interval": lambda: r.interval(1), "resource_version": lambda: r.resource_version,
        "oldest": lambda: r.oldest_resource_version, "heartbeat": lambda: r.heartbeat_age,
        "socket": lambda: r.socket_path, "watch": lambda: next(r.watch(1)),
    }
    for what, call in calls.items():
        try:
            call()
            print(what, "answered")
        except CacheClosed as err:
            print(what, "closed" if "reader" in str(err) else err)
""")


def test_calls_after_close_raise_cache_closed(name: str) -> None:
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=8, store_bytes=4096) as w:
        for i in range(4):
            w.put("a", b"%d" % i)
        p = subprocess.run([sys.executable, "-c", AFTER_CLOSE, name], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
        assert p.returncode == 0, (p.returncode, p.stderr)
        lines = p.stdout.splitlines()
        assert len(lines) == 10 and all(line.endswith(" closed") for line in lines), lines


CLOSE_WHILE_WATCHING = textwrap.dedent("""
    import sys, threading
    from shmcache import CacheClosed, Reader
    rounds = int(sys.argv[2])
    ended = 0
    for _ in range(rounds):
        r = Reader(sys.argv[1])
        rv = r.resource_version
        results = []
        started = threading.Barrier(4)
        def follow(kind):
            started.wait()
            try:
                if kind == "watch":
                    for _ in r.watch(rv, timeout=None):
                        pass
                elif kind == "batches":
                    for _ in r.watch_batches(rv, timeout=None):
                        pass
                else:
                    for _ in r.watch(rv + 1000, timeout=None):  # an RV not reached yet
                        pass
                results.append("ended")
            except CacheClosed:
                results.append("closed")
        threads = [threading.Thread(target=follow, args=(k,)) for k in ("watch", "batches", "future")]
        for t in threads:
            t.start()
        started.wait()
        r.close()
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), "a watch outlived close()"
        assert results == ["closed"] * 3, results
        ended += 3
    print("closed", ended, flush=True)
""")


def test_close_ends_the_watches_of_every_thread(name: str) -> None:
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=8, store_bytes=4096) as w:
        w.put("a", b"1")
        p = subprocess.run([sys.executable, "-c", CLOSE_WHILE_WATCHING, name, "50"], capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
        assert p.stdout.split() == ["closed", "150"]
