"""The writers' lock in the windows a kill cannot target on demand: a holder
stuck before recording its identity, no token at all, a surplus semaphore
count.  (Dead and stopped holders in real processes: tests/stress/test_writer_crash.py.)"""

from __future__ import annotations

from typing import Any

import posix_ipc
import pytest
from shmcache._native import lib

from shmcache import LockTimeout, Reader, Writer

SIZES: dict[str, Any] = {"capacity": 8, "arena_bytes": 4096, "max_keys": 8, "store_bytes": 4096}
STUCK = (7 << 32) | lib.SC_UNRECORDED | 4_000_000  # no such pid: pids are < 2**22


def sem_value(w: Writer) -> int:
    return int(posix_ipc.Semaphore(f"/shmcache.{w.name}.lock").value)


def test_unrecorded_holder_is_abandoned_after_two_timeouts(name: str) -> None:
    with Writer(name, lock_timeout=0.2, **SIZES) as w, Reader(name) as r:
        w.put("k", b"before")
        stuck = Writer(name, create=False)
        stuck._sem.acquire()  # won the semaphore ...
        token_p = stuck._map.field("lock_token")
        assert lib.sc_cas(token_p, 0, STUCK)  # ... and the token, but never recorded itself
        assert w.put("k", b"after") == 2
        assert w._h.lock_recoveries == 1
        # the stuck claimant resumes: publishing its record fails, its claim is void
        assert not lib.sc_cas(token_p, STUCK, STUCK & ~lib.SC_UNRECORDED)
        assert r.get("k") == ("k", b"after", 2)
        stuck.close()
        assert sem_value(w) == 1


def test_held_semaphore_without_token_is_abandoned(name: str) -> None:
    with Writer(name, lock_timeout=0.2, **SIZES) as w:
        other = Writer(name, create=False)
        other._sem.acquire()  # between sem_wait and the token: then killed
        assert w.put("k", b"v") == 1
        assert w._h.lock_recoveries == 1
        other.close()
        assert sem_value(w) == 1


def test_recorded_live_holder_is_not_robbed_and_surplus_counts_heal(name: str) -> None:
    with Writer(name, lock_timeout=0.2, **SIZES) as w:
        other = Writer(name, create=False, lock_timeout=0.2)
        w._sem.release()  # a surplus count, as a racing recovery can leave
        with w._thread_lock:
            w._begin()  # holds the lock (recorded: this live process)
            try:
                with pytest.raises(LockTimeout, match="live pid"):
                    other.put("k", b"v")  # passes sem_wait, cannot take the token
            finally:
                w._end(published=False)
        assert w._h.lock_recoveries == 0
        assert other.put("k", b"v") == 1  # the surplus was absorbed: all is normal
        assert sem_value(w) == 1
        other.close()
