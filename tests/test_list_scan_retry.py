"""list() on a healthy cache never raises CacheCorrupted because its store
scan outlived the table it started on (review r7).

The defect: ``sc_store_scan`` judged each record it reached through the
index table it started on, and returned SC_CORRUPT for an insane one without
first checking ``index_gen``.  A scan of table A that is held up while the
writer switches to table B (a replace), then stages another replace into A
(A is cleared and refilled with staged pointers), abandons it (the heap head
moves back) and appends other records over the staged area, resumes reading
pointers into the middle of those records: insane headers, so list() raised
CacheCorrupted although nothing is wrong with the cache.  It must instead see
the moved generation, retry, and return the state a fresh Reader lists.

The reader is stopped inside its scan deterministically: the test hook
``sc_test_set_scan_pause_fd(0)`` makes its next ``sc_store_scan`` read a byte
from its stdin after the first live entry, and the test waits until the
reader process is blocked in that read(2) on fd 0 before changing the cache.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from shmcache import Reader, Writer
from shmcache._native import lib

from .support import REPO

#: a store whose list() is a real scan: a few hundred keys in a table of
#: 8192 slots, and room for the 2000 staged and 1700 appended records below
SIZES: dict[str, Any] = {"capacity": 64, "arena_bytes": 1 << 16, "max_keys": 4096, "store_bytes": 1 << 18}

#: syscall numbers of read(2) per machine, for /proc/<pid>/syscall
_READ_SYSCALL = {"x86_64": 0, "aarch64": 63}

_LISTER = textwrap.dedent("""
    import json, sys
    from shmcache import Reader
    from shmcache._native import lib
    r = Reader(sys.argv[1])
    lib.sc_test_set_scan_pause_fd(0)  # the next scan stops after its first live entry until stdin has a byte
    print("listing", flush=True)
    try:
        snap = r.list(sys.argv[2])
    except Exception as err:
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        sys.exit(3)
    print(json.dumps({"rv": snap.rv, "items": [[i.key, i.value.hex(), i.rv] for i in snap.items]}), flush=True)
""")


def wait_blocked_reading_stdin(pid: int, timeout: float = 30) -> None:
    """Return once process ``pid`` (single-threaded) is blocked in read(2) on fd 0."""
    number = _READ_SYSCALL[platform.machine()]
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        if len(fields) > 1 and fields[0] == str(number) and int(fields[1], 16) == 0:
            return
        assert time.monotonic() < deadline, f"pid {pid} never blocked reading its stdin: {fields}"
        time.sleep(0.005)


def abandoned_replace_over_the_scanned_table(w: Writer) -> None:
    """Switch the store to the other table, stage a replace into the table
    a stopped scan is still walking and abandon it, then append records of
    another size over the staged area (as r7_scan_corrupt.py does)."""
    w.replace([("r", b"x")], rv=w.resource_version + 1)  # switch A -> B
    with w._thread_lock:  # a replace that raises while staging into A
        try:
            w._begin()
            assert lib.sc_stage_begin(w._layout, w.resource_version + 1) == lib.SC_OK
            for i in range(2000):  # 32-byte staged records
                key = b"s%04d" % i
                assert lib.sc_stage_put(w._layout, key, len(key), b"abc", 3, 1) == lib.SC_OK
        finally:
            lib.sc_lock_release(w._layout, w._lock_state)
    assert int(w._h.op_state) == lib.SC_OP_REPLACING  # left for the next holder to abandon
    # the repair abandons the staging (the heap head moves back); then
    # 40-byte records overwrite the staged ones: A's pointers now land mid-record
    w.put_many([(f"n{i:04d}", b"\xff" * 11) for i in range(1700)])
    assert int(w._h.op_state) == lib.SC_OP_IDLE


@pytest.mark.skipif(platform.machine() not in _READ_SYSCALL, reason="read(2)'s number on this machine is not known")
@pytest.mark.parametrize("prefix", ["", "k"])
def test_a_scan_that_outlived_its_table_retries_instead_of_calling_it_corrupt(name: str, prefix: str) -> None:
    with Writer(name, lock_timeout=5, **SIZES) as w:
        w.put_many([(f"k{i:03d}", b"value-%d" % i) for i in range(300)])
        p = subprocess.Popen([sys.executable, "-c", _LISTER, name, prefix], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert p.stdout is not None and p.stdin is not None
            assert p.stdout.readline().strip() == "listing"
            wait_blocked_reading_stdin(p.pid)  # inside list()'s scan of table A, at its first live entry
            gen_before = int(w._h.index_gen)
            abandoned_replace_over_the_scanned_table(w)
            assert int(w._h.index_gen) != gen_before  # the stopped scan's table is stale
            out, err = p.communicate("x", timeout=60)  # resume the scan
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
        assert p.returncode == 0, (p.returncode, out, err[-2000:])
        got = json.loads(out)
        with Reader(name) as fresh:
            snap = fresh.list(prefix)
        assert snap.rv == w.resource_version
        assert got["rv"] == snap.rv
        assert [tuple(i) for i in got["items"]] == [(i.key, i.value.hex(), i.rv) for i in snap.items]
        if prefix:
            assert got["items"] == []  # the replace removed every k key
        else:
            assert len(got["items"]) == 1701 and got["items"][0][0] == "n0000" and got["items"][-1][0] == "r"
