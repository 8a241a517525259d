"""The writers' lock: a named POSIX semaphore plus an owner token in the header.

The semaphore is the wait queue; the token (header.lock_token, claimed by
compare-and-swap from 0) is the truth about who holds the lock.  docs/design.md
("The writers' lock") gives the full argument; in short:

* acquire: ``sem_wait``, then CAS the token from 0 to ``(generation << 32) |
  UNRECORDED | pid``, record the owner's identity, then CAS the UNRECORDED
  bit away.  A first CAS that fails means the semaphore had a surplus count
  (left by a recovery) while somebody holds the token: the acquisition is
  void, absorbs that count, and waits again.  A second CAS that fails means a
  recoverer took the token back (we were suspended for a whole timeout before
  recording): void too.
* release: bump ``lock_seq``, clear the token, ``sem_post``.
* a waiter that times out judges the holder.  Recorded and alive (or in a
  PID namespace we cannot see into, where its pid means nothing) →
  LockTimeout.
  Recorded and dead → exactly one waiter wins the CAS of the token back to 0
  and posts the semaphore on the dead holder's behalf.  Not recorded (no
  token, or the UNRECORDED bit: the holder sits between ``sem_wait`` and its
  record, or between clearing the token and ``sem_post``) → if nothing
  changes for another whole ``lock_timeout``, the lock is abandoned: one
  waiter wins a CAS (of the unrecorded token to 0, or of ``lock_seq``) and
  posts.  Whoever then acquires finds ``op_state`` not idle
  and repairs the segment before doing anything else.
"""

from __future__ import annotations

import os
import time
from typing import Any

import posix_ipc

from ._layout import Mapping
from ._native import ffi, lib
from ._owner import Liveness, ProcessIdentity, judge, me
from .exceptions import LockTimeout

__all__ = ["WriterLock"]

# getpid() is a system call, too dear for every acquisition: cache it, and
# refresh it in a forked child.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)

PID_MASK = 0x7FFFFFFF  # pids are < 2**22 on Linux; bit 31 is SC_UNRECORDED


class WriterLock:
    """Cross-process lock of one cache's writers.  Not reentrant, not
    thread-safe: the Writer serialises its threads before calling it."""

    def __init__(self, mapping: Mapping, sem: posix_ipc.Semaphore, timeout: float) -> None:
        self._map = mapping
        self._sem = sem
        self._timeout = timeout
        self._token_p: Any = mapping.field("lock_token")
        self._seq_p: Any = mapping.field("lock_seq")
        self._token = 0
        self._owner: Any = ffi.new("struct sc_owner *")
        self._owner_pid = 0

    @property
    def held(self) -> bool:
        return self._token != 0

    def acquire(self) -> bool:
        """Take the lock, recovering it from a dead holder; LockTimeout if a
        live holder keeps it for ``timeout`` seconds.  Returns True if the
        segment needs repair first (the previous holder died mid-change);
        otherwise op_state is now SC_OP_MUTATING."""
        deadline = time.monotonic() + self._timeout
        suspect: tuple[int, int] | None = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                self._sem.acquire(max(remaining, 0.0))
            except posix_ipc.BusyError:
                pass
            else:
                claimed = self._claim()
                if claimed:
                    return claimed == 2
                continue  # void acquisition: absorbed a surplus count
            verdict = self._judge_holder(suspect)
            if verdict == "alive":
                raise LockTimeout(self._describe_holder())
            # None: recovered, or the holder changed: wait afresh; a snapshot:
            # compare it with the holder after one more whole wait
            suspect = None if isinstance(verdict, str) else verdict
            deadline = time.monotonic() + self._timeout

    def release(self, notify: bool) -> None:
        """Release; marks the segment's op_state idle and, with ``notify``,
        wakes the readers waiting on the futex."""
        if not self._token:
            raise RuntimeError("release of a lock this writer does not hold")
        lib.sc_lock_release(self._map.layout, notify)
        self._token = 0
        self._sem.release()

    def _claim(self) -> int:
        owner = self._owner
        pid = _pid
        if pid != self._owner_pid:  # first use, or a forked child
            ident = me()
            owner.pid, owner.start_ms, owner.pidns, owner.boot = (
                ident.pid, ident.start_ms, ident.pidns, ident.boot)
            self._owner_pid = pid
        seq = lib.sc_load_acquire(self._seq_p)
        token = (((seq + 1) & 0xFFFFFFFF) << 32) | (pid & PID_MASK)
        claimed: int = lib.sc_lock_claim(self._map.layout, token, owner)
        if claimed:
            self._token = token
        return claimed

    def _judge_holder(self, suspect: tuple[int, int] | None) -> str | tuple[int, int] | None:
        """After a timed-out wait: "alive", None (recovered or changed: wait
        again), or a (token, seq) snapshot to compare after another wait."""
        h = self._map.header
        token = lib.sc_load_acquire(self._token_p)
        seq = lib.sc_load_acquire(self._seq_p)
        if token and not token & lib.SC_UNRECORDED:
            owner = ProcessIdentity(int(h.owner_pid), int(h.owner_start_ms),
                                    int(h.owner_pidns), int(h.owner_boot))
            if lib.sc_load_acquire(self._token_p) != token:
                return None  # changed hands while we read the record
            if judge(owner) is not Liveness.DEAD:
                return "alive"
            if lib.sc_cas(self._token_p, token, 0):
                self._post_for_dead()
            return None
        snapshot = (token, seq)
        if snapshot != suspect:
            return snapshot
        # Held, unrecorded, unchanged for a whole timeout: abandoned.  One
        # CAS elects the single waiter that posts: of the unrecorded token
        # (which also voids its holder's claim), or of lock_seq when there is
        # no token at all.
        if lib.sc_cas(self._token_p, token, 0) if token else lib.sc_cas(self._seq_p, seq, seq + 1):
            self._post_for_dead()
        return None

    def _post_for_dead(self) -> None:
        lib.sc_fetch_add(self._map.field("lock_recoveries"), 1)
        self._sem.release()

    def _describe_holder(self) -> str:
        h = self._map.header
        token = lib.sc_load_acquire(self._token_p)
        where = "" if h.owner_pidns == me().pidns else " in another PID namespace"
        return (
            f"the writers' lock is held by live pid {token & PID_MASK}{where} "
            f"for more than {self._timeout:g} s"
        )
