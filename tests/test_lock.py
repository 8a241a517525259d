"""The writers' lock in the windows a kill cannot target on demand: a claimer
suspended between the semaphore and its claim, no lock word at all, a
surplus semaphore count, a dead recorded holder, an asynchronous exception at
any bytecode of an operation.  (Dead and stopped holders in real processes
under load: tests/stress/test_writer_crash.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import posix_ipc
import pytest

from shmcache import LockTimeout, Reader, Writer
from shmcache._lock import identity_of_word, word_of_identity
from shmcache._native import ffi, lib
from shmcache._owner import ProcessIdentity, me

from .support import REPO

SIZES: dict[str, Any] = {"capacity": 8, "arena_bytes": 4096, "max_keys": 8, "store_bytes": 4096}


def sem_value(w: Writer) -> int:
    return int(posix_ipc.Semaphore(f"/shmcache.{w.name}.lock").value)


def lock_word(w: Writer) -> tuple[int, int]:
    out = ffi.new("uint64_t[3]")
    lib.sc_lock_word(w._layout, out)
    return int(out[0]), int(out[1])


def dead_identity() -> ProcessIdentity:
    """The identity of a process that has exited and been reaped."""
    child = subprocess.run([sys.executable, "-c", "from shmcache._owner import me; print(*vars(me()).values())"],
                           capture_output=True, text=True, check=True, timeout=60)
    pid, ticks, pidns, boot = map(int, child.stdout.split())
    return ProcessIdentity(pid, ticks, pidns, boot)


def hold_as(w: Writer, ident: ProcessIdentity) -> Any:
    """Take w's lock in C with ``ident`` as the holder (as that process
    would have); returns the lock state."""
    state = ffi.new("struct sc_lock_state *")
    state.word[0], state.word[1] = word_of_identity(ident)
    state.sem = w._lock._state.sem
    assert lib.sc_lock_acquire(w._layout, state, 1_000_000_000) == lib.SC_LOCK_ACQUIRED
    return state


def test_the_lock_word_round_trips_an_identity() -> None:
    ident = me()
    assert identity_of_word(*word_of_identity(ident)) == ident


def test_held_semaphore_without_word_is_abandoned(name: str) -> None:
    with Writer(name, lock_timeout=0.2, **SIZES) as w:
        sem = posix_ipc.Semaphore(f"/shmcache.{name}.lock")
        sem.acquire()  # between sem_wait and the word: then killed
        sem.close()
        assert w.put("k", b"v") == 1
        assert w.figures().lock_recoveries == 1
        assert sem_value(w) == 1


def test_dead_recorded_holder_is_recovered_within_one_timeout(name: str) -> None:
    with Writer(name, lock_timeout=0.3, **SIZES) as w, Reader(name) as r:
        w.put("k", b"before")
        hold_as(w, dead_identity())  # died holding the lock, mid-change (op_state MUTATING)
        t0 = time.monotonic()
        assert w.put("k", b"after") == 2
        assert time.monotonic() - t0 < 0.3 * 1.9  # one timeout, then the judgement
        assert w.figures().lock_recoveries == 1
        assert r.get("k") == ("k", b"after", 2)
        assert lock_word(w) == (0, 0)
        assert sem_value(w) == 1


def test_recorded_live_holder_is_not_robbed_and_surplus_counts_heal(name: str) -> None:
    with Writer(name, lock_timeout=0.2, **SIZES) as w:
        other = Writer(name, create=False, lock_timeout=0.2)
        assert lib.sc_sem_post(w._lock._state.sem) == 0  # a surplus count, as a racing recovery can leave
        with w._thread_lock:
            try:
                w._begin()  # holds the lock (this live process)
                with pytest.raises(LockTimeout, match="live pid"):
                    other.put("k", b"v")  # passes sem_wait, cannot take the word
            finally:
                w._lock.release()
        assert w.figures().lock_recoveries == 0
        assert other.put("k", b"v") == 1  # the surplus was absorbed: all is normal
        assert sem_value(w) == 1
        other.close()


# ---- a claimer suspended for two lock timeouts (review r4) -------------------

_SUSPENDED_CLAIMER = textwrap.dedent("""
    import sys
    from shmcache import Writer
    from shmcache._native import lib
    w = Writer(sys.argv[1], create=False, lock_timeout=30)
    lib.sc_test_set_claim_pause_fd(0)   # stop between sem_wait and the CAS, until stdin has a byte
    print("claiming", flush=True)
    print("put", w.put("h", b"from-the-suspended-claimer"), flush=True)
    w.close()
""")

_STOPPED_HOLDER = textwrap.dedent("""
    import os, signal, sys
    from shmcache import Writer
    from shmcache._native import ffi, lib
    w = Writer(sys.argv[1], create=False, lock_timeout=30)
    with w._thread_lock:
        try:
            w._begin()
            out = ffi.new("uint64_t[3]")
            lib.sc_lock_word(w._layout, out)
            print("holding", int(out[0]), int(out[1]), flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)   # a live holder, stopped inside its critical section
            lib.sc_lock_word(w._layout, out)
            print("resumed", int(out[0]), int(out[1]), flush=True)
        finally:
            w._lock.release()
    w.close()
""")


def _spawn(code: str, name: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, **kw)


def test_claimer_suspended_in_its_claim_cannot_break_exclusion(name: str) -> None:
    """A claimer stopped between passing the semaphore and claiming the word
    for two lock timeouts has its count posted by a recoverer; a second
    writer Z takes the lock and is stopped inside its critical section.
    When the claimer resumes, its claim is void: Z's record is intact, and
    nobody judges the stopped Z dead."""
    with Writer(name, lock_timeout=0.3, **SIZES) as w:
        claimer = _spawn(_SUSPENDED_CLAIMER, name, stdin=subprocess.PIPE)
        holder: subprocess.Popen[str] | None = None
        try:
            assert claimer.stdout is not None and claimer.stdin is not None
            assert claimer.stdout.readline().strip() == "claiming"
            deadline = time.monotonic() + 10
            while sem_value(w) != 0:  # the claimer has passed sem_wait
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert w.put("a", b"1") == 1  # two timeouts without a word: abandoned, posted
            assert w.figures().lock_recoveries == 1
            holder = _spawn(_STOPPED_HOLDER, name)
            assert holder.stdout is not None
            tag, word0, word1 = holder.stdout.readline().split()
            assert tag == "holding" and identity_of_word(int(word0), int(word1)).pid == holder.pid
            claimer.stdin.write("x")  # the claimer resumes: its CAS must fail
            claimer.stdin.flush()
            time.sleep(0.3)
            assert lock_word(w) == (int(word0), int(word1)), "the stopped holder's word was overwritten"
            with pytest.raises(LockTimeout, match=f"live pid {holder.pid}"):
                w.put("b", b"2")  # the stopped holder is alive: never robbed
            assert w.figures().lock_recoveries == 1
            os.kill(holder.pid, signal.SIGCONT)
            assert holder.stdout.readline().split() == ["resumed", word0, word1]
            assert holder.wait(timeout=30) == 0
            assert claimer.stdout.readline().split()[0] == "put"  # then the claimer gets its turn
            assert claimer.wait(timeout=30) == 0
            assert w.put("c", b"3") > 0
            assert sem_value(w) == 1
        finally:
            for p in (claimer, holder):
                if p is None:
                    continue
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                p.communicate(timeout=30)  # reaps, and closes its pipes


# ---- an asynchronous exception at any call or return (review r8) -----------------


class _InterruptAt:
    """A profile function that raises KeyboardInterrupt at the n-th entry
    into a Python function or return from any function, Python or C (a cffi
    call included).  CPython runs signal handlers — and so raises their
    exceptions — on entering Python functions and right after calls: the
    points where a Ctrl-C can land."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.fired = False

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call":
            return  # between a C function's arguments and its call: no check there
        self.left -= 1
        if self.left == 0:
            self.fired = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("operation", ["put", "delete", "put_many", "has", "replace", "bookmark"])
def test_an_interrupt_anywhere_never_leaks_the_lock(name: str, operation: str) -> None:
    with Writer(name, lock_timeout=0.2, **SIZES) as w, Writer(name, create=False, lock_timeout=0.2) as other:
        w.put("k", b"v")
        calls = {
            "put": lambda: w.put("k", b"v2"),
            "delete": lambda: (w.put("k", b"v"), w.delete("k")),
            "put_many": lambda: w.put_many([("k", b"v3"), ("j", b"x")]),
            "has": lambda: w.has("k"),
            "replace": lambda: w.replace([("k", b"v")], rv=w.resource_version + 1),
            "bookmark": lambda: w.bookmark(w.resource_version + 1),
        }
        call: Callable[[], object] = calls[operation]
        n = 0
        while True:
            n += 1
            tracer = _InterruptAt(n)
            sys.setprofile(tracer)
            try:
                call()
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            assert not w._lock.held, f"interrupt at event {n}: the lock is still marked held"
            assert not w._thread_lock.locked(), f"interrupt at event {n}: the thread lock leaked"
            assert lock_word(w) == (0, 0), f"interrupt at event {n}: the lock word leaked"
            assert sem_value(w) == 1, f"interrupt at event {n}: the semaphore count leaked"
            other.put("other", b"ok")  # within its 0.2 s timeout: nothing is held
            if not tracer.fired:
                break
        assert n > 10  # the operation really went through many calls
        assert w.figures().lock_recoveries == 0
