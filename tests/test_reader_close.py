"""A Reader closed while in use (review r9, r10): every later call raises
CacheClosed instead of reading the unmapped segment (SIGSEGV), and close()
from one thread ends the watches of every other thread with CacheClosed and
unmaps only when none is inside the mapping."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from shmcache import Writer

from .support import REPO

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
        "socket": lambda: r.socket_path, "watch": lambda: next(r.watch(1)), "figures": r.figures,
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
        p = subprocess.run([sys.executable, "-c", AFTER_CLOSE, name], check=False, capture_output=True, text=True,
                           timeout=60, cwd=REPO)
        assert p.returncode == 0, (p.returncode, p.stderr)
        lines = p.stdout.splitlines()
        assert len(lines) == 11 and all(line.endswith(" closed") for line in lines), lines


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
        p = subprocess.run([sys.executable, "-c", CLOSE_WHILE_WATCHING, name, "50"], check=False, capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
        assert p.stdout.split() == ["closed", "150"]


# ---- close() while another thread is inside list() or get() -----------------------

#: syscall number of read(2) per machine, for /proc/self/task/<tid>/syscall
_READ_SYSCALL = {"x86_64": 0, "aarch64": 63}

CLOSE_INSIDE_A_SCAN = textwrap.dedent("""
    import os, sys, threading, time
    from shmcache import CacheClosed, Reader
    from shmcache._native import lib
    READ = int(sys.argv[2])
    r = Reader(sys.argv[1])
    rfd, wfd = os.pipe()
    lib.sc_test_set_scan_pause_fd(rfd)  # the next scan stops after its first live entry until rfd has a byte
    tid = []
    lister_ended = []
    def lister():
        tid.append(threading.get_native_id())
        lists = 0
        try:
            while True:
                r.list()
                lists += 1
        except CacheClosed as err:
            lister_ended.append(f"{lists} CacheClosed {err}")
    t = threading.Thread(target=lister)
    t.start()
    deadline = time.monotonic() + 30
    while True:  # until the lister is blocked in read(rfd): inside the scan, in the mapping
        try:
            with open(f"/proc/self/task/{tid[0]}/syscall") as f:
                fields = f.read().split()
        except IndexError:
            fields = []
        if len(fields) > 1 and fields[0] == str(READ) and int(fields[1], 16) == rfd:
            break
        assert time.monotonic() < deadline, fields
        time.sleep(0.005)
    closer = threading.Thread(target=r.close)
    closer.start()
    closer.join(0.3)
    print("close waiting for the scan:", closer.is_alive(), flush=True)
    os.write(wfd, b"x")  # the scan goes on, inside the still-mapped segment
    closer.join(5)
    t.join(5)
    print("close returned:", not closer.is_alive(), flush=True)
    print("lister:", *lister_ended, flush=True)
""")


@pytest.mark.skipif(platform.machine() not in _READ_SYSCALL, reason="read(2)'s number on this machine is not known")
def test_close_waits_for_a_thread_inside_a_list_scan(name: str) -> None:
    """A thread is stopped inside list()'s store scan (the scan hook); another
    closes the Reader.  close() must wait for it to leave the mapping (the
    old code unmapped at once: the resumed scan read unmapped memory,
    SIGSEGV); the lister then gets CacheClosed at its next call."""
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=512, store_bytes=1 << 16) as w:
        w.put_many([(f"k{i:03d}", b"v%d" % i) for i in range(300)])
        p = subprocess.run([sys.executable, "-c", CLOSE_INSIDE_A_SCAN, name, str(_READ_SYSCALL[platform.machine()])],
                           check=False, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-2000:])
        lines = p.stdout.splitlines()
        assert lines[:2] == ["close waiting for the scan: True", "close returned: True"], lines
        assert lines[2] == f"lister: 0 CacheClosed reader of {name!r} is closed", lines


CLOSE_WHILE_LOOPING = textwrap.dedent("""
    import random, sys, threading, time
    from shmcache import CacheClosed, Reader
    rounds = int(sys.argv[2])
    calls = []
    for n in range(rounds):
        r = Reader(sys.argv[1])  # one thread uses it; another closes it (the one exception)
        ended = []
        running = threading.Event()
        def loop():
            done = 0
            try:
                while True:
                    assert r.get("k007") == ("k007", b"v7", 8)
                    assert len(r.list().items) == 300
                    done += 1
                    running.set()
            except CacheClosed as err:
                ended.append((done, "closed" if "reader" in str(err) else str(err)))
        t = threading.Thread(target=loop)
        t.start()
        assert running.wait(10)
        time.sleep(random.random() * 0.005)  # somewhere inside a get() or a list()
        r.close()
        t.join(5)
        assert not t.is_alive(), "the loop outlived close()"
        assert len(ended) == 1 and ended[0][1] == "closed", ended
        calls.append(ended[0][0])
    print("rounds", len(calls), "looped", min(calls) > 0, flush=True)
""")


def test_close_from_another_thread_ends_a_get_and_list_loop(name: str) -> None:
    """A thread calls get() and list() in a loop while another closes the
    Reader, at varying moments: no crash, the loop ends with CacheClosed
    (the old code unmapped under the looping thread: SIGSEGV)."""
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=512, store_bytes=1 << 16) as w:
        w.put_many([(f"k{i:03d}", b"v%d" % i) for i in range(300)])
        p = subprocess.run([sys.executable, "-c", CLOSE_WHILE_LOOPING, name, "100"], check=False, capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-2000:])
        assert p.stdout.split() == ["rounds", "100", "looped", "True"]
