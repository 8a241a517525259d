"""The daemon SIGSTOPped (a debugger, a frozen cgroup, a stuck host): it is
alive, so nothing is reclaimed from it; producers get DaemonUnavailable when
their timeout runs out instead of hanging; readers go on reading without it;
`shmcache status` shows the owner stopped and its heartbeat ageing; after
SIGCONT it serves again and its heartbeat is fresh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from shmcache import CacheExists, DaemonUnavailable, Item, Producer, Reader, Writer

from .._report import Report
from ..support import Daemon, daemon_env, sock_in, wait_for

HEARTBEAT = 0.2


def status(name: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "shmcache", "status", "--name", name, "-o", "json"],
                          capture_output=True, text=True, timeout=60, env=daemon_env(None), check=False)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def test_stopped_daemon_is_alive_producers_time_out_readers_go_on(name: str, tmp_path: Path,
                                                                  report: Report) -> None:
    sock = sock_in(tmp_path)
    d = Daemon.start(name, sock, tmp_path / "d.log", "--heartbeat", str(HEARTBEAT))
    timeouts = 0
    try:
        d.wait_ready()
        with Producer(sock, timeout=0.5) as p:
            before = p.put("k", b"v1")
        r = Reader(name)
        os.kill(d.pid, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(d.pid).status() == psutil.STATUS_STOPPED, "the daemon stops")

        # producers: an error, not a hang — on a connection made before, and on a new one
        with Producer(sock, timeout=0.5) as p:
            with pytest.raises(DaemonUnavailable):
                p.put("timed-out", b"x")
            timeouts += 1
        with pytest.raises(DaemonUnavailable):
            with Producer(sock, timeout=0.5) as p2:
                p2.ping()
        timeouts += 1
        # it is alive: nobody may take the cache from it
        with pytest.raises(CacheExists):
            Writer(name, capacity=16, arena_bytes=4096, max_keys=64, store_bytes=1 << 16)
        # readers need no daemon
        assert r.get("k") == Item("k", b"v1", before)
        assert r.list().rv == before
        wait_for(lambda: (r.heartbeat_age or 0) > 5 * HEARTBEAT, "the heartbeat ages")
        stopped = status(name)
        assert stopped["owner"]["liveness"] == "alive" and stopped["owner"]["state"] == "stopped", stopped
        assert stopped["heartbeat_age"] > 5 * HEARTBEAT, stopped

        os.kill(d.pid, signal.SIGCONT)
        with Producer(sock, timeout=10) as p:
            after = p.put("k", b"v2")
        # the timed-out put was never acknowledged: applied late or not at all, whole either way
        late = r.get("timed-out")
        assert late is None or late.value == b"x"
        assert after > before and r.get("k") == Item("k", b"v2", after)
        wait_for(lambda: (r.heartbeat_age or 99) < 5 * HEARTBEAT, "the heartbeat is fresh again")
        resumed = status(name)
        assert resumed["owner"]["state"] != "stopped" and resumed["heartbeat_age"] < 5 * HEARTBEAT, resumed
        r.close()
        assert d.stop() == 0, d.fail("bad exit status after SIGTERM")
    finally:
        d.kill()
    report(checked="a SIGSTOPped daemon: producers get DaemonUnavailable (not a hang), the cache is not taken "
                   "from it, readers go on, status shows it stopped with an ageing heartbeat; served after SIGCONT",
           events=3, faults=1, failures=0, producer_timeouts=timeouts,
           heartbeat_age_stopped=stopped["heartbeat_age"], late_put_applied=late is not None)
