"""Wake latency: how long an event takes from the writer's publish call to a
reader blocked waiting for it.

A writer process publishes one event at a time at cfg.latency_rate events/s
(jittered gaps), each stamped with perf_counter_ns() just before the publish
call; one reader process, blocked in shmcache's watch() (pyzmq SUB recv(),
Redis XREAD BLOCK, mp.Queue.get(), faster-fifo get()), takes
perf_counter_ns() on receipt.  CLOCK_MONOTONIC is one clock for every
process of the host, so receipt minus stamp is the latency.  The reader
checks every sample arrives, in order; the first ~5 % are a warm-up and
dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from ._common import Config, Recorder, percentile, unique_name
from ._peers import start_peers
from ._procs import Job, Pools, drop_stream, spawn_context

__all__ = ["SYSTEMS", "VALUE_BYTES", "run"]

#: "pipe" is the floor, not a peer: a bare FIFO write and a blocked read(),
#: this machine's own cost of waking another process
SYSTEMS = ("shmcache", "pyzmq", "redis", "mp.Queue", "faster-fifo", "pipe")
_PEER_PACKAGE = {"faster-fifo": "faster-fifo", "pyzmq": "pyzmq", "redis": "redis"}
VALUE_BYTES = 100
RING_EVENTS = 16384
START_TIMEOUT = 60.0
CHILD_WAIT = 30.0


def run(cfg: Config, rec: Recorder) -> None:
    failures: list[str] = []
    warmup = max(10, cfg.latency_samples // 20)
    with contextlib.ExitStack() as stack:
        skipped, redis_sock = start_peers(rec, stack, _PEER_PACKAGE)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shmcache-bench-latency-")))
        pools = stack.enter_context(Pools(spawn_context(), 1, None if "faster-fifo" in skipped else 1 << 20))
        for k in range(cfg.rounds):
            for system in SYSTEMS:
                if system in skipped:
                    continue
                job = Job(system=system, events=cfg.latency_samples + warmup, value_bytes=VALUE_BYTES,
                          wait_s=CHILD_WAIT, rate=cfg.latency_rate, warmup=warmup)
                try:
                    lat = _run_once(pools, job, tmp, redis_sock)
                except Exception as err:  # noqa: BLE001 -- a peer's failure costs its figures only
                    skipped.add(system)
                    rec.skip(system, f"failed: {err}")
                    if system == "shmcache":
                        failures.append(str(err))
                        print(f"!!! LATENCY FAILURE of shmcache: {err}", file=sys.stderr, flush=True)
                    continue
                us = sorted(x / 1e3 for x in lat)
                rec.add("latency", system, {"rate": cfg.latency_rate, "value_bytes": VALUE_BYTES}, round=k,
                        p50_us=percentile(us, 0.5), p99_us=percentile(us, 0.99),
                        p999_us=percentile(us, 0.999), max_us=us[-1], samples=len(us))
    rec.note("latency", (
        f"One event of {VALUE_BYTES} B at a time at {cfg.latency_rate:,.0f} events/s (gaps jittered "
        f"±25 %), {cfg.latency_samples:,} samples after {warmup:,} warm-up ones; latency = the reader's "
        "perf_counter_ns() on receipt minus the writer's just before its publish call. shmcache: put() "
        "and a reader blocked in watch(); pyzmq PUB/SUB over ipc://; Redis XADD and XREAD BLOCK on a "
        "private redis-server over a Unix socket; mp.Queue and faster-fifo put()/get(); pipe (the floor: "
        "what waking another process costs on this machine): os.write() of the same bytes to a FIFO and "
        "a reader blocked in os.read()."))
    if failures:
        raise RuntimeError("shmcache failed the latency scenario: " + "; ".join(failures))


def _run_once(pools: Pools, job: Job, tmp: Path, redis_sock: str) -> list[int]:
    """The reader's latencies (ns) after the warm-up, in publishing order."""
    name = unique_name("latency")
    with contextlib.ExitStack() as stack:
        if job.system == "shmcache":
            from shmcache import Writer

            # a ring of several seconds of events: it wraps, as a real cache's
            # does, and a reader stalled by the noisy machine still keeps up
            stack.enter_context(Writer(name, capacity=RING_EVENTS,
                                       arena_bytes=RING_EVENTS * (VALUE_BYTES + 8),
                                       max_keys=16, store_bytes=64 << 10))
            job = dataclasses.replace(job, cache=name)
        elif job.system == "pyzmq":
            job = dataclasses.replace(job, address=f"ipc://{tmp}/{name}.sock")
        elif job.system == "pipe":
            os.mkfifo(tmp / f"{name}.fifo", 0o600)
            job = dataclasses.replace(job, address=str(tmp / f"{name}.fifo"))
        elif job.system == "redis":
            job = dataclasses.replace(job, address=redis_sock, stream=name)
            stack.callback(drop_stream, redis_sock, name)
        pool = pools.get()
        try:
            run_id = pool.start("latency", job, 1)
            pool.wait(run_id, "ready", START_TIMEOUT)
            pool.go(run_id)
            # the writer's pace sets the duration: twice it, and a margin, is a hang
            done = pool.wait(run_id, "done", 2 * job.events / job.rate + 60)
        except BaseException:
            pools.discard()  # before the cache goes: no worker is left inside it
            raise
    lat: list[int] = done["reader0"]
    return lat
