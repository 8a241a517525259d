"""The writers' lock: a named POSIX semaphore plus a lock word in the header.

The semaphore is the wait queue; the lock word (header ``lock_token`` and
``lock_start``, one 16-byte word) is the truth about who holds the lock: it
*is* the holder's identity — pid, PID namespace, start ticks, boot tag —
claimed from zero and given back to zero by single 16-byte compare-and-swap
operations.  docs/design.md ("The writers' lock") gives the argument; in
short:

* acquire (one C call, so no Python exception can separate taking the lock
  from knowing it is held): ``sem_wait``, then CAS the word from 0 to ours.
  A CAS that fails means the semaphore had a surplus count (left by a
  recovery that raced with a slow process) while somebody holds the word:
  the acquisition is void, absorbs that count, and waits again.
* release (one C call): wake the watchers if anything was published or
  repaired, mark op_state idle, bump ``lock_seq``, CAS the word back to 0,
  ``sem_post``.
* a waiter that times out judges the holder named by the word: alive (or
  unknowable) → LockTimeout; dead → exactly one waiter wins the CAS of that
  word back to 0 and posts on its behalf.  No word at all while the
  semaphore stays taken (a process between ``sem_wait`` and its CAS, or
  between its release CAS and ``sem_post``): if ``lock_seq`` is unchanged
  after another whole timeout, one waiter wins a CAS of ``lock_seq`` and
  posts.  A slow process's count is then surplus, which the next void
  acquisition absorbs; exclusion rests on the word alone.  Whoever then
  acquires finds ``op_state`` not idle and repairs first.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ._layout import Mapping
from ._native import ffi, lib
from ._owner import BOOT_BITS, START_TICKS_BITS, Liveness, ProcessIdentity, judge, me
from .exceptions import LockTimeout

__all__ = ["WriterLock", "identity_of_word", "word_of_identity"]

# getpid() is a system call, too dear for every acquisition: cache it, and
# refresh it in a forked child (whose lock word must name the child).
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)

_TICKS_MASK = (1 << START_TICKS_BITS) - 1
_BOOT_MASK = (1 << BOOT_BITS) - 1
_U32 = 0xFFFFFFFF


def word_of_identity(ident: ProcessIdentity) -> tuple[int, int]:
    """The lock word (two 64-bit halves) that names ``ident``."""
    return ((ident.pid & _U32) | (ident.pidns & _U32) << 32,
            (ident.start_ticks & _TICKS_MASK) | (ident.boot & _BOOT_MASK) << START_TICKS_BITS)


def identity_of_word(word0: int, word1: int) -> ProcessIdentity:
    return ProcessIdentity(word0 & _U32, word1 & _TICKS_MASK, word0 >> 32,
                           (word1 >> START_TICKS_BITS) & _BOOT_MASK)


class WriterLock:
    """Cross-process lock of one cache's writers.  Not reentrant, not
    thread-safe: the Writer serialises its threads before calling it.

    ``held`` lives in C memory that only the acquiring and releasing C calls
    change, so an exception anywhere in Python (a KeyboardInterrupt between
    two bytecodes) never loses track of a held lock: ``release()`` in a
    ``finally`` always knows whether there is anything to release."""

    def __init__(self, mapping: Mapping, sem: Any, timeout: float) -> None:
        """``sem``: the cache's semaphore as _entries.py maps it; this lock
        owns it from now on (``close`` unmaps it)."""
        self._map = mapping
        self._layout: Any = mapping.layout
        self._timeout = timeout
        self._state: Any = ffi.new("struct sc_lock_state *")
        #: for ``lib.sc_lock_release(layout, state)`` in a ``finally``
        self.state: Any = self._state
        self._state.sem = sem
        self._word = ffi.new("uint64_t[3]")
        self._pid = 0

    @property
    def held(self) -> bool:
        return bool(self._state.held)

    def acquire(self) -> bool:
        """Take the lock, recovering it from a dead holder; LockTimeout if a
        live holder keeps it for ``timeout`` seconds.  Returns True if the
        segment needs repair first (the previous holder died mid-change:
        call ``repaired()`` once done); otherwise op_state is now
        SC_OP_MUTATING."""
        state = self._state
        pid = _pid
        if pid != self._pid:  # first use, or a forked child
            state.word[0], state.word[1] = word_of_identity(me())
            self._pid = pid
        deadline = time.monotonic() + self._timeout
        suspect: int | None = None
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            rc: int = lib.sc_lock_acquire(self._layout, state, int(remaining * 1e9))
            if rc == lib.SC_LOCK_ACQUIRED or rc == lib.SC_LOCK_REPAIR:
                return bool(rc == lib.SC_LOCK_REPAIR)
            if rc == lib.SC_LOCK_VOID or rc == lib.SC_LOCK_INTERRUPTED:
                continue  # absorbed a surplus count; or a signal handler ran: wait on
            if rc != lib.SC_LOCK_TIMEOUT:
                err = ffi.errno
                raise OSError(err, f"waiting for the writers' semaphore: {os.strerror(err)}")
            verdict = self._judge_holder(suspect)
            if verdict == "alive":
                raise LockTimeout(self._describe_holder())
            # None: recovered, or the holder changed: wait afresh; a lock_seq:
            # compare it with the holder after one more whole wait
            suspect = None if isinstance(verdict, str) else verdict
            deadline = time.monotonic() + self._timeout

    def repaired(self) -> None:
        """The holder finished repairing: op_state MUTATING, nothing pending."""
        lib.sc_lock_repaired(self._layout, self._state)

    def release(self) -> None:
        """Release if held (a no-op otherwise): wakes the watchers if the
        resource version moved or a repair happened during the hold, and
        marks op_state idle unless a replace or repair was cut short."""
        lib.sc_lock_release(self._layout, self._state)

    def close(self) -> None:
        """Release if held, and unmap the semaphore."""
        self.release()
        lib.sc_sem_close(self._state.sem)
        self._state.sem = ffi.NULL

    def _judge_holder(self, suspect: int | None) -> str | int | None:
        """After a timed-out wait: "alive", None (recovered or changed: wait
        again), or the lock_seq to compare after another wait."""
        word = self._word
        lib.sc_lock_word(self._layout, word)
        word0, word1, seq = int(word[0]), int(word[1]), int(word[2])
        if word0 or word1:
            if judge(identity_of_word(word0, word1)) is not Liveness.DEAD:
                return "alive"
            lib.sc_lock_take_back(self._layout, self._state.sem, word0, word1)
            return None
        if seq != suspect:
            return seq
        # no word, the semaphore taken, nothing changed for a whole timeout:
        # abandoned between sem_wait and the word (or the word and sem_post)
        lib.sc_lock_abandon(self._layout, self._state.sem, seq)
        return None

    def _describe_holder(self) -> str:
        word = self._word
        lib.sc_lock_word(self._layout, word)
        holder = identity_of_word(int(word[0]), int(word[1]))
        where = "" if holder.pidns == me().pidns else " in another PID namespace"
        return (
            f"the writers' lock is held by live pid {holder.pid}{where} "
            f"for more than {self._timeout:g} s"
        )
