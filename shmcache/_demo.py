"""``shmcache demo``: the tour of a cache shared by processes, with figures.

Two demos share one value scheme and one set of checks.  The daemon demo:
shmcached owns a new cache, producer processes write through its socket,
reader processes watch and verify every event, then the daemon is stopped
with SIGTERM and nothing may be left behind.  The direct demo (``--direct``):
one Writer in this process publishes the events, no daemon.

Each reader lists and watches with ``watch(0)``, verifies every event
(intact value, strictly consecutive resource versions: no silent gap),
relists on ResourceExpired, and reports what it saw.  A demo says its
progress through ``say`` (one human line at a time) and returns its figures
as a JSON-ready summary; errors go to stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._checked import make_value, value_seq
from ._entries import segment_path, semaphore_path
from ._inspect import mapping_processes
from ._launch import start_daemon, stop_daemon, wait_ready
from ._producer import Producer
from ._reader import Reader
from ._writer import Writer
from .exceptions import ResourceExpired, ShmCacheError

__all__ = ["DEMO_KEYS", "STOP_KEY", "DemoResult", "run_daemon_demo", "run_direct_demo"]

STOP_KEY = "demo/stop"
START_KEY = "demo/start"
DEMO_KEYS = 1000  # the events cycle through demo/0 .. demo/999
DEMO_WAIT = 60.0  # seconds: the longest any step of a demo may take


@dataclass
class DemoResult:
    """Whether every check held, and the demo's figures (JSON-ready)."""

    ok: bool
    summary: dict[str, Any] = field(default_factory=dict)


# ---- the value scheme: shmcache/_checked.py's, which a reader checks without ---
# ---- knowing what was written -------------------------------------------------


def _key(seq: int) -> str:
    return f"demo/{seq % DEMO_KEYS}"


def _intact(key: str, value: bytes) -> bool:
    return value_seq(key, value) is not None


def _expected_keys(events: int) -> int:
    """Keys in the final list: the ones the events cycle through, the start
    and the stop key."""
    return min(DEMO_KEYS, events) + 2


# ---- child processes -----------------------------------------------------------


def _reader(name: str, ready: Any, results: Any, index: int) -> None:
    """A reader process: list, watch and verify until the stop key; then one
    result tuple (index, seen, expired, bad, final rv, final keys)."""
    seen = expired = bad = 0
    with Reader(name) as reader:
        ready.put(index)
        since = 0
        done = False
        while not done:
            try:
                if since == 0:  # list, as a Kubernetes client does first
                    snapshot = reader.interval(0)
                    for event in snapshot:
                        bad += event.key.startswith("demo/") and event.key[5:].isdigit() \
                            and not _intact(event.key, event.value)
                        done = done or event.key == STOP_KEY
                    since = snapshot.resource_version
                    if done:
                        break
                for event in reader.watch(since, timeout=30):
                    # one writer (the Writer, or the daemon for every producer)
                    # with automatic RVs: each event is the last + 1, so a
                    # skipped event cannot go unnoticed
                    bad += event.rv != since + 1 or not (
                        event.key in (STOP_KEY, START_KEY) or _intact(event.key, event.value))
                    since = event.rv
                    seen += 1
                    if event.key == STOP_KEY:
                        done = True
                        break
                else:
                    break  # a 30 s silence: the writer is gone
            except ResourceExpired:
                expired += 1
                since = 0  # relist, as after Kubernetes' 410 Gone
        final = reader.list()
    results.put((index, seen, expired, bad, final.rv, len(final.items)))


def _produce(name: str, index: int, producers: int, events: int, batch: int, ready: Any,
             go: Any, results: Any) -> None:
    """A producer process of the daemon demo: its share of the events, in
    put_many batches through the daemon's socket."""
    try:
        seqs = range(index, events, producers)
        with Producer(name) as producer:
            ready.put(index)
            if not go.wait(DEMO_WAIT):
                raise TimeoutError("never told to start")
            start = time.perf_counter()
            rv = 0
            for i in range(0, len(seqs), batch):
                rv = producer.put_many([(_key(s), make_value(_key(s), s)) for s in seqs[i:i + batch]])
            elapsed = time.perf_counter() - start
        results.put((index, len(seqs), elapsed, rv, ""))
    except Exception as err:  # noqa: BLE001 -- whatever it is, the parent reports it and fails the demo
        results.put((index, 0, 0.0, 0, f"{type(err).__name__}: {err}"))
        sys.exit(1)  # the parent may be waiting for this producer's "connected"


# ---- the parent's plumbing -----------------------------------------------------


def _collect(results: Any, procs: list[Any], count: int, what: str) -> list[Any]:
    """``count`` results from the queue; RuntimeError if a process died
    without one or DEMO_WAIT passed."""
    got: list[Any] = []
    deadline = time.monotonic() + DEMO_WAIT
    while len(got) < count:
        try:
            got.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a {what} process exited with status {dead[0].exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count - len(got)} {what} processes said nothing for {DEMO_WAIT:.0f} s")
    return sorted(got)


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.exitcode is None:
            p.kill()
            p.join(timeout=10)


def _start_readers(ctx: Any, name: str, count: int, results: Any, procs: list[Any]) -> list[Any]:
    """``count`` reader processes, each watching once this returns."""
    ready = ctx.Queue()
    watchers = [ctx.Process(target=_reader, args=(name, ready, results, i))
                for i in range(count)]
    procs += watchers  # before they start: whatever happens next stops them
    for p in watchers:
        p.start()
    _collect(ready, watchers, count, "reader")
    return watchers


def _check_readers(results: Any, watchers: list[Any], events: int,
                   say: Callable[[str], None]) -> tuple[bool, list[dict[str, Any]]]:
    ok = True
    figures = []
    for index, seen, expired, bad, rv, items in _collect(results, watchers, len(watchers), "reader"):
        say(f"reader {index}: {seen:,} events verified, {expired} relists after "
            f"ResourceExpired, {bad} bad; final list() at rv {rv}: {items} keys")
        ok = ok and bad == 0 and items == _expected_keys(events)
        figures.append({"index": index, "verified": seen, "relists": expired, "bad": bad,
                        "final_rv": rv, "final_keys": items})
    return ok, figures


def _join(procs: list[Any]) -> bool:
    """Every process ended with status 0."""
    ok = True
    for p in procs:
        p.join(timeout=DEMO_WAIT)
        ok = ok and p.exitcode == 0
    return ok


def _rate(events: int, seconds: float) -> float:
    return events / max(seconds, 1e-9)


def _fail(errors: list[str], message: str) -> None:
    print(message, file=sys.stderr)
    errors.append(message)


# ---- the demos -----------------------------------------------------------------


def run_daemon_demo(*, readers: int = 3, producers: int = 2, events: int = 200_000,
                    batch: int = 64, capacity: int = 4096, name: str | None = None,
                    say: Callable[[str], None] = print) -> DemoResult:
    """shmcached owns the cache, producer processes write through its
    socket, reader processes watch and verify every event; then SIGTERM and
    a check that nothing is left behind."""
    name = name or f"demo-{os.getpid()}"
    tmp = tempfile.mkdtemp(prefix="shmcache-demo-")
    sock = os.path.join(tmp, "shmcached.sock")
    log_path = os.path.join(tmp, "shmcached.log")
    cmd = ["--name", name, "--capacity", str(capacity),
           "--arena-bytes", str(capacity * 256), "--max-keys", str(DEMO_KEYS + 2),
           "--store-bytes", str(max(1 << 20, DEMO_KEYS * 256)), "--socket", sock,
           "--heartbeat", "0.2", "--log-level", "warning"]
    ctx = multiprocessing.get_context("spawn")
    ready, results, produced, go = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    procs: list[Any] = []
    errors: list[str] = []
    summary: dict[str, Any] = {"demo": "daemon", "name": name, "events": events, "batch": batch,
                               "capacity": capacity}
    ok = True
    daemon: subprocess.Popen[bytes] = start_daemon(cmd, log_path)
    summary["daemon"] = {"pid": daemon.pid, "socket": sock}
    try:
        try:
            wait_ready(daemon, name, sock, log_path, DEMO_WAIT)
            say(f"shmcached: pid {daemon.pid} owns cache {name!r} ({capacity} ring slots); "
                f"producers connect to {sock}")
            with Producer(name) as control:
                control.put(START_KEY, b"")  # readers' snapshots start past rv 0
                watchers = _start_readers(ctx, name, readers, results, procs)
                mapped, _ = mapping_processes(name)
                summary["mapped_by"] = [{"pid": m["pid"], "mode": m["mode"]} for m in mapped]
                say(f"{readers} reader process{'' if readers == 1 else 'es'} watching; mapping the "
                    "segment: " + ", ".join(f"pid {m['pid']} ({m['mode']})" for m in mapped))
                writers = [ctx.Process(target=_produce,
                                       args=(name, i, producers, events, batch, ready, go, produced))
                           for i in range(producers)]
                procs += writers
                for p in writers:
                    p.start()
                _collect(ready, writers, producers, "producer")  # each one connected
                start = time.perf_counter()
                go.set()
                summary["producers"] = []
                for index, n, elapsed, rv, error in _collect(produced, writers, producers, "producer"):
                    if error:
                        _fail(errors, f"producer {index}: FAILED: {error}")
                        ok = False
                    else:
                        say(f"producer {index}: {n:,} events in {elapsed:.2f} s = "
                            f"{_rate(n, elapsed):,.0f} events/s through the socket "
                            f"(put_many batches of {batch}), last rv {rv}")
                    summary["producers"].append({
                        "index": index, "events": n, "seconds": round(elapsed, 3),
                        "events_per_s": round(_rate(n, elapsed)), "last_rv": rv, "error": error or None})
                elapsed = time.perf_counter() - start
                control.put(STOP_KEY, b"")
                stats = control.stats()
            say(f"shmcached: {events:,} events in {elapsed:.2f} s = {_rate(events, elapsed):,.0f} "
                f"events/s from {producers} producers; {stats['requests']:,} requests, "
                f"{stats['rejected']} rejected; rv {stats['rv']}, {stats['keys']} keys")
            summary.update(seconds=round(elapsed, 3), events_per_s=round(_rate(events, elapsed)))
            summary["daemon"].update(requests=stats["requests"], rejected=stats["rejected"],
                                     rv=stats["rv"], keys=stats["keys"])
            readers_ok, summary["readers"] = _check_readers(results, watchers, events, say)
            ok = ok and readers_ok and _join(procs)
        except (RuntimeError, ShmCacheError, OSError) as err:
            _fail(errors, f"demo failed: {err}")
            ok = False
        finally:
            _stop(procs)
        rc = stop_daemon(daemon, DEMO_WAIT)
        left = [path for path in (segment_path(name), semaphore_path(name), sock)
                if os.path.exists(path)]
        summary["daemon"].update(exit_status=rc, left_behind=left)
        if rc == 0 and not left:
            say("shmcached stopped on SIGTERM: exit status 0; segment, semaphore and socket removed")
        else:
            ok = False
            _fail(errors, f"shmcached: exit status {rc}; left behind: {', '.join(left) or 'nothing'}")
        if not ok:
            with open(log_path, "rb") as f:
                logged = f.read().decode(errors="replace").strip()
            if logged:
                print(f"shmcached's log:\n{logged}", file=sys.stderr)
    finally:  # after an unexpected exception (Ctrl-C) too: stop the daemon, cleanly if it can
        stop_daemon(daemon, DEMO_WAIT)
        shutil.rmtree(tmp, ignore_errors=True)
    summary["errors"] = errors
    return DemoResult(ok, summary)


def run_direct_demo(*, readers: int = 3, events: int = 200_000, batch: int = 64,
                    capacity: int = 4096, name: str | None = None,
                    say: Callable[[str], None] = print) -> DemoResult:
    """One Writer in this process publishes the events, no daemon; reader
    processes watch and verify every one."""
    name = name or f"demo-{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs: list[Any] = []
    errors: list[str] = []
    summary: dict[str, Any] = {"demo": "direct", "name": name, "events": events, "batch": batch,
                               "capacity": capacity}
    ok = True
    try:
        with Writer(name, capacity=capacity, arena_bytes=capacity * 256, max_keys=DEMO_KEYS + 2,
                    store_bytes=max(1 << 20, DEMO_KEYS * 256)) as writer:
            writer.put(START_KEY, b"")  # readers' snapshots start past rv 0
            watchers = _start_readers(ctx, name, readers, results, procs)
            say(f"cache {name!r}: {capacity} ring slots, {readers} reader processes watching")
            seq = 0
            start = time.perf_counter()
            while seq < events:
                n = min(batch, events - seq)
                writer.put_many([(_key(seq + i), make_value(_key(seq + i), seq + i)) for i in range(n)])
                seq += n
            elapsed = time.perf_counter() - start
            writer.put(STOP_KEY, b"")
            say(f"writer: {events:,} events in {elapsed:.2f} s = {_rate(events, elapsed):,.0f} "
                f"events/s (put_many batches of {batch}), last rv {writer.resource_version}")
            summary.update(seconds=round(elapsed, 3), events_per_s=round(_rate(events, elapsed)),
                           last_rv=writer.resource_version)
            readers_ok, summary["readers"] = _check_readers(results, watchers, events, say)
            ok = readers_ok and _join(procs)
    except RuntimeError as err:  # a reader that died or hung; the Writer's own errors propagate
        _fail(errors, f"demo failed: {err}")
        ok = False
    finally:
        _stop(procs)
    summary["errors"] = errors
    return DemoResult(ok, summary)
