"""Scenario "watchmem": what starting many watches costs a reader process.

The parent fills a ring holding ``cfg.watch_ring_bytes`` of events; a fresh
reader process (spawned: it inherits none of the parent's memory) opens
``cfg.watch_intervals`` intervals at the oldest resource version, takes the
first event of each (which fills that interval's local buffer) and keeps
them all alive.  Its private memory grows with intervals × buffer, not with
the ring: the ring is mapped shared and read only where it is copied from.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

from shmcache import Reader, Writer

from ._common import Config, Recorder, unique_name

__all__ = ["run"]

VALUE_BYTES = 16 << 10
KEYS = 64  # the events cycle over a few keys, so the store stays small
BUFFER_SIZES = (100, 1000)
CHILD_TIMEOUT = 300.0


def _key(i: int) -> str:
    return f"watch-{i % KEYS:02d}"


def _status_kib() -> dict[str, int]:
    """RssAnon and RssShmem of this process, in KiB (/proc/self/status)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            field, _, rest = line.partition(":")
            if field in ("RssAnon", "RssShmem"):
                out[field] = int(rest.split()[0])
    return out


def _trim() -> None:
    """Hand freed heap memory back to the kernel (glibc), so that what the
    intervals allocate shows as growth instead of reusing freed pages."""
    import ctypes
    import ctypes.util

    path = ctypes.util.find_library("c")
    if path:
        try:
            ctypes.CDLL(path).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the figure is only less exact


def _memory() -> dict[str, int]:
    import psutil

    m = _status_kib()
    m["uss"] = psutil.Process().memory_full_info().uss // 1024
    return m


def _child(name: str, intervals: int, buffer_size: int, conn: Connection) -> None:
    """The reader process: memory before and after opening the intervals."""
    try:
        import gc

        reader = Reader(name)
        since = reader.oldest_resource_version - 1
        # a throwaway interval first, so the code paths' one-time allocations
        # (imports, struct caches) are not counted as the intervals' cost
        warm = reader.interval(since, buffer_size=buffer_size)
        warm.next()
        del warm
        gc.collect()
        _trim()
        before = _memory()
        kept = []
        firsts = []
        for _ in range(intervals):
            it = reader.interval(since, buffer_size=buffer_size)
            ev = it.next()
            if ev is None or ev.rv != since + 1:
                got = "none" if ev is None else f"rv {ev.rv}"
                raise RuntimeError(f"the first event has {got}, not rv {since + 1}")
            kept.append(it)
            firsts.append(ev)
        gc.collect()
        after = _memory()
        # how many events one refill put in the local buffer: fewer than
        # buffer_size when the events outgrow the buffer's byte budget
        buffered = len(getattr(kept[0], "_events", ())) if kept else 0
        conn.send({"before": before, "after": after, "buffered": buffered})
    except BaseException as err:  # noqa: BLE001 (any failure is the parent's to report)
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def _measure(name: str, intervals: int, buffer_size: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, intervals, buffer_size, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(CHILD_TIMEOUT):
            raise RuntimeError(f"the reader process said nothing within {CHILD_TIMEOUT:.0f} s")
        result: dict[str, Any] = parent.recv()
    except EOFError:
        proc.join(30)
        raise RuntimeError(f"the reader process ended (exit code {proc.exitcode}) without a result") from None
    finally:
        parent.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in result:
        raise RuntimeError(f"the reader process failed: {result['error']}")
    return result


def run(cfg: Config, rec: Recorder) -> None:
    ring_bytes = cfg.watch_ring_bytes
    key_bytes = len(_key(0).encode())
    events = max(1, ring_bytes // (VALUE_BYTES + key_bytes))
    arena = events * (key_bytes + VALUE_BYTES)  # exactly ``events`` fit
    value = os.urandom(VALUE_BYTES)
    store = 4 * KEYS * (VALUE_BYTES + 64)
    name = unique_name("watchmem")
    with Writer(name, capacity=events, arena_bytes=arena, max_keys=KEYS, store_bytes=store) as w:
        # one event more than the ring holds: the oldest held is rv 2, so the
        # intervals start after rv 1 (since_rv 0 would ask for a snapshot)
        total = events + 1
        t0 = time.perf_counter()
        for i in range(0, total, 100):
            w.put_many([(_key(j), value) for j in range(i, min(total, i + 100))])
        fill_s = time.perf_counter() - t0
        with Reader(name) as r:
            if r.oldest_resource_version != 2 or r.resource_version != total:
                raise RuntimeError(f"the ring holds rv {r.oldest_resource_version}..{r.resource_version}, "
                                   f"not 2..{total}")
        for k in range(cfg.rounds):
            for buffer_size in BUFFER_SIZES:
                n = cfg.watch_intervals
                try:
                    got = _measure(name, n, buffer_size)
                except RuntimeError as err:
                    rec.skip("shmcache (watchmem reader)", f"failed: {err}")
                    return
                b, a = got["before"], got["after"]
                anon = a["RssAnon"] - b["RssAnon"]
                rec.add("watchmem", "shmcache",
                        {"intervals": n, "ring_bytes": arena, "buffer_size": buffer_size,
                         "value_bytes": VALUE_BYTES}, round=k,
                        anon_kib=float(anon), shmem_kib=float(a["RssShmem"] - b["RssShmem"]),
                        uss_kib=float(a["uss"] - b["uss"]), per_interval_kib=anon / n,
                        ring_kib=arena / 1024, buffered_events=float(got["buffered"]))
    rec.note("watchmem", (
        f"A ring of {events:,} events of {VALUE_BYTES // 1024} KiB ({arena / (1 << 20):,.0f} MiB, "
        f"filled in {fill_s:.1f} s); a spawned reader opens the intervals at the oldest resource version "
        f"and takes one event from each.  Growth of that process after it opened them: RssAnon "
        f"(anon_kib), RssShmem (shmem_kib: ring pages it touched), USS (uss_kib); buffered_events: the "
        f"events one refill copied into an interval's local buffer."))
