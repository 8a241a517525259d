"""Scenario "drain": one reader catching up on a full ring.

The writer fills the ring (put_many), then a reader drains all of it from
the oldest event: into Event objects (the ordinary iteration, at the
default buffer of 100 events and at 1,000), and through the raw batch path
(``Interval.raw_batches()``: the copy out of the segment, validated, with no
Python object per event).  The physical limit beside them: one memcpy of the
same key and value bytes between two private buffers.
"""

from __future__ import annotations

import functools

from shmcache import Reader, Writer
from shmcache._native import ffi

from ._common import Config, Recorder, timed, unique_name

#: bytes of events a drained ring holds at most (a big-value ring has fewer)
MAX_RING_BYTES = 256 << 20
RAW_BUFFER = 4096


def _events_for(cfg: Config, value_bytes: int) -> int:
    return max(1_000, min(cfg.drain_events, MAX_RING_BYTES // (value_bytes + 16)))


def run(cfg: Config, rec: Recorder) -> None:
    rec.note("drain", f"a full ring drained from its oldest event by one reader in the writer's process; "
                      f"events: Interval iteration into Event objects; raw: Interval.raw_batches() with a "
                      f"{RAW_BUFFER}-event buffer; memcpy: one ffi.memmove of the same key and value bytes; "
                      f"rings hold at most {MAX_RING_BYTES >> 20} MiB, so big values mean fewer events")
    for value_bytes in cfg.value_sizes:
        n = _events_for(cfg, value_bytes)
        value = b"v" * value_bytes
        keys = [f"drain/{i % 10_000:05d}" for i in range(n)]
        payload = sum(len(k) for k in keys) + n * value_bytes
        name = unique_name("drain")
        with Writer(name, capacity=n, arena_bytes=payload + 4096, max_keys=16_384,
                    store_bytes=max(64 << 20, 10_000 * (value_bytes + 64) * 2)) as w:
            # one batch more than the ring holds: the oldest event's RV is then
            # above 1, and interval(oldest - 1) is a drain, not a snapshot
            w.put_many([(k, value) for k in keys[:1000]])
            for i in range(0, n, 1000):
                w.put_many([(k, value) for k in keys[i:i + 1000]])
            with Reader(name) as r:
                since = r.oldest_resource_version - 1
                held = r.resource_version - since
                if held != n:
                    raise RuntimeError(f"the ring holds {held} events, not {n}")

                def events(buffer_size: int) -> None:
                    count = 0
                    last = since
                    for ev in r.interval(since, buffer_size=buffer_size):
                        count += 1
                        last = ev.rv
                    if count != n or last != since + n:
                        raise RuntimeError(f"drained {count} events up to rv {last}, not {n}")

                def raw() -> None:
                    count = 0
                    for batch in r.interval(since, buffer_size=RAW_BUFFER).raw_batches():
                        count += batch.count
                    if count != n:
                        raise RuntimeError(f"drained {count} raw events, not {n}")

                src, dst = ffi.new("char[]", payload), ffi.new("char[]", payload)
                # real pages on both sides (untouched ones all map the zero
                # page, which reads from cache): measure the copy, not the kernel
                ffi.memmove(src, b"\x5a" * payload, payload)
                ffi.memmove(dst, src, payload)

                params = {"value_bytes": value_bytes, "events": n}
                mib = payload / (1 << 20)
                for k in range(cfg.rounds):
                    for buffer_size in (100, 1000):
                        s = timed(lambda: events(buffer_size))
                        rec.add("drain", "shmcache", {"path": "events", **params, "buffer_size": buffer_size},
                                round=k, eps=n / s, mib_s=mib / s)
                    s = timed(raw)
                    rec.add("drain", "shmcache", {"path": "raw", **params, "buffer_size": RAW_BUFFER},
                            round=k, eps=n / s, mib_s=mib / s)
                    s = timed(functools.partial(ffi.memmove, dst, src, payload))
                    rec.add("drain", "memcpy", {"path": "memcpy", **params}, round=k, eps=n / s, mib_s=mib / s)
                del src, dst
