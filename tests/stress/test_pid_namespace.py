"""A writer in another PID namespace holding the lock is never judged by a
pid that means another process here: its pid there (1, the namespace's init)
names a live process here too (our init).  docs/design.md, "The writers'
lock": the holder is looked up in its own namespace — which, nested below
ours as a container's is below the host's, we can see into — by the last
NSpid field and its start time.  While it lives a waiter gets LockTimeout;
once it (and with it its namespace) is gone, the lock is recovered."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import suppress

import psutil
import pytest

from shmcache import LockTimeout, Reader, Writer

from .._report import Report
from ..support import LineChild, scaled

#: ``HOLDER name``: opens the cache, takes the writers' lock as a put would
#: (like tests/_children.py ``hold_lock``), prints {"held": pid in its
#: namespace, ...}, then sleeps.
HOLDER = """
    import json, os, sys, time
    from shmcache import Writer
    from shmcache._owner import me
    w = Writer(sys.argv[1], create=False)
    w._thread_lock.acquire()
    w._begin()
    print(json.dumps({"held": os.getpid(), "pidns": me().pidns}), flush=True)
    time.sleep(3600)
"""


EXEC = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"


def _unshare_or_skip() -> list[str]:
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("unshare (util-linux) is not installed")
    cmd = [exe, "--pid", "--fork", "--mount-proc"]
    probe = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        if "Operation not permitted" in probe.stderr or os.geteuid() != 0:
            pytest.skip(f"unshare --pid needs privilege here: {probe.stderr.strip()}")
        raise AssertionError(f"unshare failed: {probe.stderr}")
    return cmd


def lock_timeouts(name: str, tries: int) -> list[str]:
    """The messages of ``tries`` puts by a writer of this namespace, each of
    which must time out on the lock."""
    msgs = []
    with Writer(name, create=False, lock_timeout=0.5) as w:
        for i in range(tries):
            with pytest.raises(LockTimeout) as caught:
                w.put(f"blocked{i}", b"x")
            msgs.append(str(caught.value))
    return msgs


def test_holder_in_a_nested_pid_namespace_is_judged_by_its_pid_there(name: str, report: Report) -> None:
    cmd = _unshare_or_skip()
    tries = scaled(3, 20)
    owner = Writer(name, capacity=64, arena_bytes=65536, max_keys=64, store_bytes=1 << 16)
    holder: LineChild | None = None
    try:
        assert owner.put("before", b"1") == 1
        # LineChild runs python: it execs unshare, which forks python as pid 1 of a new namespace
        holder = LineChild(EXEC, *cmd, sys.executable, "-c", textwrap.dedent(HOLDER), name)
        held = holder.next()
        ns_pid = held["held"]
        assert held["pidns"] != os.stat("/proc/self/ns/pid").st_ino
        assert psutil.pid_exists(ns_pid), f"pid {ns_pid} exists in the holder's namespace only"
        with Reader(name) as r:
            assert int(r.header_copy().lock_token) & 0xFFFFFFFF == ns_pid and int(r.header_copy().lock_token) >> 32 == held["pidns"]
            alive_msgs = lock_timeouts(name, tries)
            for m in alive_msgs:
                assert f"live pid {ns_pid} in another PID namespace" in m, m
            assert r.figures().lock_recoveries == 0, "the lock of a holder in another namespace was recovered"
            assert r.get("blocked0") is None and r.resource_version == 1
            # the holder dies (SIGKILL of its namespace's init kills the namespace)
            host_pid = _namespaced_child(holder)
            os.kill(host_pid, signal.SIGKILL)
            assert holder.close() != 0
            assert not psutil.pid_exists(host_pid) or psutil.Process(host_pid).status() == psutil.STATUS_ZOMBIE
            # its namespace is nested below ours, so we see that it is gone:
            # the next writer recovers the lock, exactly once
            with Writer(name, create=False, lock_timeout=0.5) as w:
                assert w.put("after", b"2") == 2
            assert r.figures().lock_recoveries == 1
            assert r.get("before") is not None and r.get("after") is not None
    finally:
        if holder is not None:
            holder.kill()
        owner.close()
    report(checked=f"lock held from a nested PID namespace (pid {ns_pid} there; a live pid here): LockTimeout "
                   "while it lives, recovered once it died",
           events=2, faults=1, failures=0, lock_timeouts_alive=len(alive_msgs), lock_recoveries=1)


def _namespaced_child(holder: LineChild) -> int:
    """The host pid of the python process unshare forked into the namespace."""
    kids = psutil.Process(holder.proc.pid).children()
    assert len(kids) == 1, kids
    with suppress(psutil.Error):
        assert kids[0].name().startswith("python"), kids[0].name()
    return kids[0].pid
