"""Fan-out: one writer process publishes N events, R reader processes each
receive every one of them, in order.

Per run: ``writer_eps`` (N over the writer's publishing time),
``delivered_eps`` (R·N over the time from the writer's start to the last
event of the slowest reader) and ``slowest_s``.  Every reader checks each
event's index (the first 8 bytes of its value): an event missed, duplicated
or reordered fails the run, it never becomes a figure.

shmcache: the writer's put_many() in batches of 100 ("shmcache") or one
put() per event ("shmcache put()"); readers in watch_batches(), looping over each list.  Peers: one
multiprocessing.Queue per reader, the writer putting every event into each
("mp.Queue"); likewise one faster_fifo.Queue per reader, with put_many /
get_many batches ("faster-fifo"); a zmq PUB socket over ipc:// with SUB
readers, no high-water mark, one send per event ("pyzmq"); one Redis
stream, XADD in pipelines of 100, each reader XREAD BLOCK COUNT 1000 from
the start ("redis").
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from pathlib import Path

from ._common import Config, Recorder, unique_name
from ._peers import start_peers
from ._procs import (
    BATCH,
    KEYS,
    READ_COUNT,
    Job,
    Pools,
    drop_stream,
    spawn_context,
)

__all__ = ["SYSTEMS", "run"]

SYSTEMS = ("shmcache", "shmcache put()", "mp.Queue", "faster-fifo", "pyzmq", "redis")
_PEER_PACKAGE = {"faster-fifo": "faster-fifo", "pyzmq": "pyzmq", "redis": "redis"}
#: one run moves at most this many value bytes to each reader
MAX_BYTES_PER_READER = 256 << 20
#: per-queue buffer of faster-fifo (its default, 1 MB, would stall the writer)
FASTER_FIFO_BYTES = 64 << 20
#: bounds of the parent's waits: the workers getting ready (spawning and
#: importing in a new pool, prebuilding the events), one run
START_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0
#: a worker's single wait (an event that never comes)
CHILD_WAIT = 60.0
#: full mode: the most events (readers × N) one run of these peers
#: delivers; at their rates the full N would take most of the time budget
SLOW_PEER_DELIVERED: dict[str, int] = {"mp.Queue": 200_000, "redis": 200_000, "faster-fifo": 400_000}


def events_for(cfg: Config, system: str, value_bytes: int, readers: int) -> int:
    """N for one run: cfg.fanout_events, scaled down for big values and, in
    full mode, for the slow peers of SLOW_PEER_DELIVERED."""
    n = min(cfg.fanout_events, MAX_BYTES_PER_READER // value_bytes)
    cap = SLOW_PEER_DELIVERED.get(system)
    if cap is not None and not cfg.quick:
        n = min(n, cap // readers)
    return n


def run(cfg: Config, rec: Recorder) -> None:
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        skipped, redis_sock = start_peers(rec, stack, _PEER_PACKAGE)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shmcache-bench-fanout-")))
        pools = stack.enter_context(Pools(spawn_context(), max(cfg.fanout_readers),
                                          None if "faster-fifo" in skipped else FASTER_FIFO_BYTES))
        for k in range(cfg.rounds):
            for value_bytes in cfg.value_sizes:
                for readers in cfg.fanout_readers:
                    for system in SYSTEMS:
                        if system in skipped:
                            continue
                        n = events_for(cfg, system, value_bytes, readers)
                        try:
                            metrics = _run_once(pools, system, n, value_bytes, readers, tmp, redis_sock)
                        except Exception as err:  # noqa: BLE001 -- a peer's failure costs its figures only
                            skipped.add(system)
                            _failed(rec, system, err, failures)
                            continue
                        params = {"readers": readers, "value_bytes": value_bytes, "events": n}
                        rec.add("fanout", system, params, round=k, **metrics)
    rec.note("fanout", _note(cfg))
    if failures:
        raise RuntimeError("shmcache failed the fan-out scenario: " + "; ".join(failures))


def _failed(rec: Recorder, system: str, err: Exception, failures: list[str]) -> None:
    reason = f"failed: {err}"
    rec.skip(system, reason)
    if system.startswith("shmcache"):
        # not a missing peer: the system under test lost, duplicated or
        # reordered an event, or hung; the figures of this run are void
        failures.append(f"{system}: {err}")
        print(f"!!! FAN-OUT FAILURE of {system}: {err}", file=sys.stderr, flush=True)


def _note(cfg: Config) -> str:
    big = [v for v in cfg.value_sizes if cfg.fanout_events * v > MAX_BYTES_PER_READER]
    parts = [
        (f"The writer publishes {cfg.fanout_events:,} events to keys k0..k{KEYS - 1}; every reader "
         "receives and checks all of them, in order. delivered_eps = readers × events over the time "
         "from the writer's first publish to the slowest reader's last event."),
        (f"shmcache: put_many() in batches of {BATCH} (\"shmcache put()\": one put() per event); "
         "readers in watch_batches() (a list per refill, looped over like the Redis and faster-fifo batches) with its default buffer of 100 events; the ring holds a whole run, so no "
         "reader can fall behind it, and the writer fills it once before the readers start (untimed): "
         "a fresh segment's pages fault in on first write, which a long-running cache pays once."),
        ("mp.Queue, faster-fifo and pyzmq carry each event as one bytes message (value, then key); "
         "mp.Queue and faster-fifo have one queue per reader, the writer putting every event into each "
         f"(faster-fifo: put_many of {BATCH}, get_many of up to {READ_COUNT}, "
         f"{FASTER_FIFO_BYTES >> 20} MiB per queue); pyzmq PUB/SUB over ipc://, HWM 0, one send per "
         "event, after a probe handshake; Redis one stream of {key: value} entries, XADD in pipelines "
         f"of {BATCH}, XREAD BLOCK COUNT {READ_COUNT}, on a private redis-server over a Unix socket."),
    ]
    if big:
        sizes = ", ".join(f"{v:,} B: {MAX_BYTES_PER_READER // v:,} events" for v in big)
        parts.append(f"Big values move at most {MAX_BYTES_PER_READER >> 20} MiB per reader per run "
                     f"({sizes}).")
    if not cfg.quick:
        slow = ", ".join(f"{s} {cap:,}" for s, cap in SLOW_PEER_DELIVERED.items())
        parts.append("The slow peers publish fewer events per run, to fit the time budget: at most "
                     f"readers × events = {slow} (see the events column); their rates hardly depend "
                     "on the number of events.")
    return " ".join(parts)


def _run_once(pools: Pools, system: str, n: int, value_bytes: int, readers: int, tmp: Path,
              redis_sock: str) -> dict[str, float]:
    name = unique_name("fanout")
    job = Job(system=system, events=n, value_bytes=value_bytes, readers=readers, wait_s=CHILD_WAIT)
    with contextlib.ExitStack() as stack:
        if system.startswith("shmcache"):
            from shmcache import Writer

            record = 24 + 8 + value_bytes  # the store's record header, key, value, padding
            stack.enter_context(Writer(name, capacity=n, arena_bytes=n * (value_bytes + 4),
                                       max_keys=KEYS, store_bytes=4 * KEYS * record))
            job = dataclasses.replace(job, cache=name, since_rv=n // BATCH * BATCH)
        elif system == "pyzmq":
            job = dataclasses.replace(job, address=f"ipc://{tmp}/{name}.sock")
        elif system == "redis":
            job = dataclasses.replace(job, address=redis_sock, stream=name)
            stack.callback(drop_stream, redis_sock, name)
        pool = pools.get()
        try:
            run_id = pool.start("fanout", job, readers)
            pool.wait(run_id, "ready", START_TIMEOUT)
            pool.go(run_id)
            done = pool.wait(run_id, "done", RUN_TIMEOUT)
        except BaseException:
            pools.discard()  # before the cache goes: no worker is left inside it
            raise
    t0, t1 = done.pop("writer")
    slowest = (max(done.values()) - t0) / 1e9
    return {"writer_eps": n / ((t1 - t0) / 1e9), "delivered_eps": readers * n / slowest, "slowest_s": slowest}
