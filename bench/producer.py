"""Scenario "producer": events/s of 100-byte puts, written directly (a
Writer mapping the segment read-write) or through a ``shmcached`` daemon
(a Producer on its Unix socket), one event per call or 100 per put_many;
through the socket also with 4 producer processes at once (aggregate).

The socket producers are spawned processes that stay up for the whole run
(connected once), so a measurement times only the requests: each worker
builds its batches, says it is ready, and starts on a common "go".
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shmcache import Producer, Writer
from shmcache._launch import DaemonNotReady, daemon_env, daemon_output, start_daemon, stop_daemon, wait_ready

from ._common import Config, Recorder, unique_name

__all__ = ["run"]

VALUE = bytes(range(100))
BATCH = 100
KEYS_PER_PRODUCER = 10_000  # keys cycle: the store stays the same size
PRODUCER_COUNTS = (1, 4)
# one geometry for the daemon's cache and the direct one
CAPACITY = 4096
ARENA_BYTES = 16 << 20
MAX_KEYS = 65536
STORE_BYTES = 64 << 20
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
STEP_TIMEOUT = 600.0
SOCKET_SYSTEM = "shmcache (socket)"  # the name a failing daemon is skipped under


def _keys(worker: int, n: int) -> list[str]:
    return [f"p{worker}-{i % KEYS_PER_PRODUCER:05d}" for i in range(n)]


def _batches(keys: list[str], batch: int) -> list[list[tuple[str, bytes | None]]]:
    return [[(k, VALUE) for k in keys[i:i + batch]] for i in range(0, len(keys), batch)]


def _worker(sock: str, index: int, conn: Connection) -> None:
    """A producer process: (events, batch) → "ready"; "go" → (t0, t1)."""
    try:
        with Producer(sock, timeout=60.0) as p:
            conn.send("connected")
            while True:
                msg = conn.recv()
                if msg is None:
                    break
                n, batch = msg
                keys = _keys(index, n)
                batches = _batches(keys, batch) if batch > 1 else []
                conn.send("ready")
                conn.recv()  # go
                t0 = time.perf_counter()
                if batch == 1:
                    put = p.put
                    for k in keys:
                        put(k, VALUE)
                else:
                    put_many = p.put_many
                    for items in batches:
                        put_many(items)
                conn.send((t0, time.perf_counter()))
    except BaseException as err:  # noqa: BLE001 (any failure is the parent's to report)
        with suppress(OSError):
            conn.send(f"error: {type(err).__name__}: {err}")
    finally:
        conn.close()


class _Workers:
    """``count`` producer processes connected to the daemon at ``sock``."""

    def __init__(self, sock: str, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(sock, i, child), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._expect("connected", START_TIMEOUT)

    def _expect(self, what: str, timeout: float) -> list[Any]:
        replies = []
        for i, conn in enumerate(self.conns):
            if not conn.poll(timeout):
                raise RuntimeError(f"producer process {i} did not answer within {timeout:.0f} s")
            try:
                reply = conn.recv()
            except EOFError:
                raise RuntimeError(f"producer process {i} ended (exit code {self.procs[i].exitcode})") from None
            if isinstance(reply, str) and reply.startswith("error"):
                raise RuntimeError(f"producer process {i}: {reply}")
            if what and reply != what:
                raise RuntimeError(f"producer process {i} said {reply!r}, not {what!r}")
            replies.append(reply)
        return replies

    def measure(self, total: int, batch: int) -> float:
        """Aggregate events/s of ``total`` events split between the workers."""
        share = total // len(self.conns)
        for conn in self.conns:
            conn.send((share, batch))
        self._expect("ready", STEP_TIMEOUT)
        for conn in self.conns:
            conn.send("go")
        spans = self._expect("", STEP_TIMEOUT)
        start = min(float(t0) for t0, _ in spans)
        end = max(float(t1) for _, t1 in spans)
        return share * len(self.conns) / (end - start)

    def close(self) -> None:
        for conn in self.conns:
            with suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(STOP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()


def _daemon_env() -> dict[str, str]:
    # a developer's or systemd's SHMCACHED_* settings must not change the geometry
    root = str(Path(__file__).resolve().parent.parent)
    return daemon_env({"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})


@contextmanager
def _daemon(name: str, tmp: Path) -> Iterator[str]:
    """A serving shmcached owning cache ``name``; yields its socket path.
    Stopped with SIGTERM afterwards; RuntimeError if it does not start or
    does not stop cleanly."""
    sock = str(tmp / "shmcached.sock")
    log = tmp / "shmcached.log"
    argv = ["--name", name, "--socket", sock,
            "--capacity", str(CAPACITY), "--arena-bytes", str(ARENA_BYTES),
            "--max-keys", str(MAX_KEYS), "--store-bytes", str(STORE_BYTES),
            "--heartbeat", "1", "--log-level", "warning"]
    proc = start_daemon(argv, log, env=_daemon_env())

    def output() -> str:
        return daemon_output(log).strip()[-400:]

    try:
        try:
            wait_ready(proc, name, sock, log, START_TIMEOUT)
        except DaemonNotReady as err:
            # the report keeps one line per skipped system: the log's tail, not all of it
            raise RuntimeError(f"shmcached {err.why}: {output()}") from None
        yield sock
    finally:
        rc = stop_daemon(proc, STOP_TIMEOUT)
        if rc == -signal.SIGKILL:
            raise RuntimeError(f"shmcached ignored SIGTERM for {STOP_TIMEOUT:.0f} s")
    if rc != 0:
        raise RuntimeError(f"shmcached exited with {rc} after SIGTERM: {output()}")
    left = [f for f in os.listdir("/dev/shm") if name in f]
    if left:
        raise RuntimeError(f"shmcached left {', '.join(left)} in /dev/shm")


def _direct(w: Writer, total: int, batch: int) -> float:
    keys = _keys(0, total)
    if batch == 1:
        put = w.put
        t0 = time.perf_counter()
        for k in keys:
            put(k, VALUE)
    else:
        batches = _batches(keys, batch)
        put_many = w.put_many
        t0 = time.perf_counter()
        for items in batches:
            put_many(items)
    return total / (time.perf_counter() - t0)


def run(cfg: Config, rec: Recorder) -> None:
    total = cfg.producer_events
    name = unique_name("producer")
    with tempfile.TemporaryDirectory(prefix="shmcache-bench-producer-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            with _daemon(name, tmp) as sock, \
                    Writer(unique_name("direct"), capacity=CAPACITY, arena_bytes=ARENA_BYTES,
                           max_keys=MAX_KEYS, store_bytes=STORE_BYTES) as w:
                pools: dict[int, _Workers] = {}
                try:
                    for count in PRODUCER_COUNTS:
                        pools[count] = _Workers(sock, count)
                    _rounds(cfg, rec, w, pools, total)
                finally:
                    for pool in pools.values():
                        pool.close()
        except RuntimeError as err:
            rec.skip(SOCKET_SYSTEM, f"failed: {err}")
    rec.note("producer", (
        f"{total:,} events of {len(VALUE)} bytes per figure, over {KEYS_PER_PRODUCER:,} keys per producer; "
        f"direct: a Writer in the measuring process; socket: Producer processes, connected beforehand, "
        f"to a shmcached started for the run (aggregate events/s from the first start to the last end)."))


def _rounds(cfg: Config, rec: Recorder, w: Writer, pools: dict[int, _Workers], total: int) -> None:
    for k in range(cfg.rounds):
        for batch in (1, BATCH):
            label = "put()" if batch == 1 else f"put_many({BATCH})"
            rec.add("producer", "shmcache", {"path": f"direct {label}", "producers": 1}, round=k,
                    eps=_direct(w, total, batch))
            for count, pool in pools.items():
                rec.add("producer", "shmcache", {"path": f"socket {label}", "producers": count}, round=k,
                        eps=pool.measure(total, batch))
