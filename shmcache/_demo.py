"""``python -m shmcache demo``: one writer process, a few reader processes.

The writer publishes events in batches; each reader lists and watches with
``watch(0)``, verifies every event (intact value, strictly increasing
resource versions, no silent gap), relists on ResourceExpired, and reports
what it saw.  It exercises the whole cross-process path in a few seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import zlib
from typing import Any

from ._reader import Reader
from ._writer import Writer
from .exceptions import ResourceExpired

STOP_KEY = "demo/stop"


def _value(key: str, seq: int) -> bytes:
    body = f"{key}|{seq}|".encode()
    return body + b"%08x" % zlib.crc32(body)


def _intact(key: str, value: bytes) -> bool:
    body, _, crc = value.rpartition(b"|")
    body += b"|"
    return body.startswith(key.encode() + b"|") and crc == b"%08x" % zlib.crc32(body)


def _reader(name: str, ready: Any, results: Any, index: int) -> None:
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
                    # one writer with automatic RVs: each event is the last + 1,
                    # so a skipped event cannot go unnoticed
                    bad += event.rv != since + 1 or not (
                        event.key in (STOP_KEY, "demo/start") or _intact(event.key, event.value))
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


def run(*, readers: int = 3, events: int = 200_000, batch: int = 64, keys: int = 1000,
        capacity: int = 4096, name: str | None = None) -> int:
    """Run the demo; returns a process exit status (0: every check held)."""
    name = name or f"demo-{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    with Writer(name, capacity=capacity, arena_bytes=capacity * 256, max_keys=keys + 2,
                store_bytes=max(1 << 20, keys * 256)) as writer:
        writer.put("demo/start", b"")  # readers' snapshots start past rv 0
        procs = [ctx.Process(target=_reader, args=(name, ready, results, i)) for i in range(readers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=60)
        print(f"cache {name!r}: {capacity} ring slots, {readers} reader processes watching")
        seq = 0
        start = time.perf_counter()
        while seq < events:
            n = min(batch, events - seq)
            writer.put_many([(f"demo/{(seq + i) % keys}", _value(f"demo/{(seq + i) % keys}", seq + i))
                             for i in range(n)])
            seq += n
        elapsed = time.perf_counter() - start
        writer.put(STOP_KEY, b"")
        print(f"writer: {events:,} events in {elapsed:.2f} s = {events / elapsed:,.0f} events/s "
              f"(put_many batches of {batch}), last rv {writer.resource_version}")
        ok = True
        for _ in procs:
            index, seen, expired, bad, rv, items = results.get(timeout=120)
            print(f"reader {index}: {seen:,} events verified, {expired} relists after "
                  f"ResourceExpired, {bad} bad; final list() at rv {rv}: {items} keys")
            ok = ok and bad == 0 and items == min(keys, events) + 2
        for p in procs:
            p.join(timeout=30)
            ok = ok and p.exitcode == 0
    print("all checks held" if ok else "A CHECK FAILED", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
