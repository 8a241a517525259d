"""The writers' lock under the schedules the review found: a claimer stopped
(SIGSTOP) between passing the semaphore and claiming the lock word while
other writers hammer the lock, one of them in a private time namespace (its
clocks offset by a day); and a live holder judged by processes whose view of
the wall clock was stepped.  Exclusion is checked directly: every writer
counts itself into a shared word while it holds the lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shmcache import Writer

from .._report import Report
from ..support import REPO, scaled

#: ``HAMMER name counter seconds``: checked lock holds for ``seconds``: each
#: takes the lock, adds 1 to the shared counter (it must have been 0), puts,
#: subtracts 1, releases.  ``CLAIM=1``: one hold only, stopped in the claim
#: window (the test hook) until a byte arrives on stdin.
HAMMER = textwrap.dedent("""
    import json, mmap, os, sys, time
    from shmcache import LockTimeout, Writer
    from shmcache._native import ffi, lib
    name, counter, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with open(counter, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8)
    word = ffi.cast("uint64_t *", ffi.from_buffer(mm))
    w = Writer(name, create=False, lock_timeout=0.2)
    stats = {"holds": 0, "overlaps": 0, "lock_timeouts": 0}
    claim = os.environ.get("CLAIM") == "1"
    if claim:
        lib.sc_test_set_claim_pause_fd(0)
        print("claiming", flush=True)
    deadline = time.monotonic() + seconds
    while claim or time.monotonic() < deadline:
        with w._thread_lock:
            try:
                w._begin()
                if lib.sc_fetch_add(word, 1) != 0:
                    stats["overlaps"] += 1
                key = b"k%d" % os.getpid()
                lib.sc_put(w._layout, key, len(key), b"v", 1, 0, w.geometry.max_keys, w.geometry.store_bytes)
                lib.sc_fetch_add(word, (1 << 64) - 1)
                stats["holds"] += 1
            except LockTimeout:
                stats["lock_timeouts"] += 1
            finally:
                lib.sc_lock_release(w._layout, w._lock_state)
        if claim:
            break
    w.close()
    print(json.dumps(stats), flush=True)
""")


def _in_claim_window(pid: int) -> bool:
    """The claimer blocks in read(0, ...) between sem_wait and its CAS."""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and int(fields[1], 16) == 0  # read on fd 0


def _time_namespace_prefix() -> list[str]:
    exe = shutil.which("unshare")
    if exe is None or os.geteuid() != 0:
        pytest.skip("a private time namespace needs unshare and root")
    cmd = [exe, "--time", "--boottime", "86400", "--monotonic", "86400", "--fork", "--kill-child"]
    probe = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare --time is not permitted here: {probe.stderr.strip()}")
    return cmd


def test_claimers_stopped_in_the_claim_window_never_break_exclusion(name: str, tmp_path: Path,
                                                                     report: Report) -> None:
    tns = _time_namespace_prefix()
    rounds = scaled(3, 60)
    counter = tmp_path / "inside"
    counter.write_bytes(bytes(8))
    hammer_seconds = rounds * 1.3 + 2
    totals = {"holds": 0, "overlaps": 0, "lock_timeouts": 0}
    with Writer(name, capacity=256, arena_bytes=1 << 16, max_keys=64, store_bytes=1 << 16,
                lock_timeout=0.2) as w:
        args = [name, str(counter), str(hammer_seconds)]
        hammers = [
            subprocess.Popen([sys.executable, "-c", HAMMER, *args], stdout=subprocess.PIPE, text=True, cwd=REPO),
            subprocess.Popen([*tns, sys.executable, "-c", HAMMER, *args], stdout=subprocess.PIPE, text=True,
                             cwd=REPO),
        ]
        try:
            for _ in range(rounds):
                claimer = subprocess.Popen([sys.executable, "-c", HAMMER, name, str(counter), "0"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                           env={**os.environ, "CLAIM": "1"})
                try:
                    assert claimer.stdout is not None and claimer.stdin is not None
                    assert claimer.stdout.readline().strip() == "claiming"
                    deadline = time.monotonic() + 30
                    while not _in_claim_window(claimer.pid):
                        assert time.monotonic() < deadline, "the claimer never reached the claim window"
                        time.sleep(0.002)
                    os.kill(claimer.pid, signal.SIGSTOP)
                    time.sleep(0.2 * 3)  # two lock timeouts and more: the others recover its count
                    claimer.stdin.write("x")
                    claimer.stdin.flush()
                    os.kill(claimer.pid, signal.SIGCONT)
                    out, _ = claimer.communicate(timeout=60)
                    stats = json.loads(out.splitlines()[-1])
                    # its one attempt: a hold, or (the semaphore is not fair: the
                    # hammers may keep winning it) a LockTimeout on a live holder
                    assert stats["holds"] + stats["lock_timeouts"] == 1
                    for k in totals:
                        totals[k] += stats[k]
                finally:
                    if claimer.poll() is None:
                        os.kill(claimer.pid, signal.SIGCONT)
                        claimer.kill()
                        claimer.communicate(timeout=30)
            for h in hammers:
                out, _ = h.communicate(timeout=hammer_seconds + 60)
                assert h.returncode == 0
                stats = json.loads(out.splitlines()[-1])
                for k in totals:
                    totals[k] += stats[k]
        finally:
            for h in hammers:
                if h.poll() is None:
                    h.kill()
                    h.communicate(timeout=30)
        recoveries = w.figures().lock_recoveries
    assert totals["overlaps"] == 0, totals
    assert recoveries >= rounds  # each stopped claimer's count was posted for it
    with open(counter, "rb") as f:
        assert f.read() == bytes(8)
    report(checked="claimers SIGSTOPped between the semaphore and the lock word for 3 lock timeouts while "
                   "two writers (one in a time namespace a day ahead) hammer the lock: never two holders",
           events=totals["holds"], faults=rounds, failures=totals["overlaps"],
           stopped_claimers=rounds, lock_recoveries=recoveries, lock_timeouts=totals["lock_timeouts"])


#: ``HOLDER name``: takes the lock, prints its pid, then stops itself (a
#: live holder that must never be robbed).
HOLDER = textwrap.dedent("""
    import os, signal, sys
    from shmcache import Writer
    from shmcache._native import lib
    w = Writer(sys.argv[1], create=False, lock_timeout=5)
    with w._thread_lock:
        try:
            w._begin()
            print(os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            lib.sc_lock_release(w._layout, w._lock_state)
""")

#: ``JUDGE name shift``: a writer whose clocks seem stepped by ``shift``
#: seconds (psutil's boot time and the wall clock, as after an NTP step)
#: tries to put: it must time out on the live holder.
JUDGE = textwrap.dedent("""
    import sys, time
    import psutil, psutil._pslinux
    shift = float(sys.argv[2])
    real_boot, real_time, real_time_ns = psutil.boot_time, time.time, time.time_ns
    psutil.boot_time = psutil._pslinux.boot_time = lambda: real_boot() + shift
    time.time = lambda: real_time() + shift
    time.time_ns = lambda: real_time_ns() + int(shift * 1e9)
    from shmcache import LockTimeout, Writer
    w = Writer(sys.argv[1], create=False, lock_timeout=0.2)
    try:
        w.put("judge", b"x")
        print("robbed")
    except LockTimeout:
        print("timeout")
    w.close()
""")


def test_a_stepped_wall_clock_never_robs_a_live_holder(name: str, report: Report) -> None:
    tns = _time_namespace_prefix()
    shifts = [1.0, -1.0, 3600.0, -86400.0, 0.5][: scaled(3, 5)] * scaled(1, 10)
    with Writer(name, capacity=16, arena_bytes=4096, max_keys=16, store_bytes=4096, lock_timeout=0.2) as w:
        holder = subprocess.Popen([*tns, sys.executable, "-c", HOLDER, name], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO)
        try:
            assert holder.stdout is not None
            holder.stdout.readline()  # holding, about to stop
            verdicts: list[str] = []
            for shift in shifts:
                out = subprocess.run([sys.executable, "-c", JUDGE, name, str(shift)], capture_output=True,
                                     text=True, timeout=60, cwd=REPO, check=True).stdout.strip()
                verdicts.append(out)
            assert verdicts == ["timeout"] * len(shifts), verdicts
            assert w.figures().lock_recoveries == 0
        finally:
            holder.kill()
            holder.communicate(timeout=30)
        assert w.put("after", b"1") > 0  # its death is seen: recovered
        assert w.figures().lock_recoveries == 1
    report(checked="a holder (in a time namespace a day ahead) judged by writers whose wall clock and boot "
                   "time were stepped by -1 day .. +1 h: LockTimeout every time, recovered once it died",
           events=len(shifts), faults=len(shifts), failures=0, judgements=len(shifts))
