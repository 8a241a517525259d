"""Core figures: put() and put_many() events/s, one reader draining a full
ring into Event objects, get() and list().

    python -m bench.core [--quick]

Each figure is the median of several runs in this one process; the machine
is shared and noisy, so compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

from shmcache._native import ffi

from shmcache import Reader, Writer


def _median_rate(runs: int, n: int, body: Callable[[], object]) -> float:
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        body()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    capacity = 4096 if args.quick else 1 << 17
    n_put = 5_000 if args.quick else 200_000
    runs = 3 if args.quick else 5
    value = b"v" * 100
    name = f"bench-{os.getpid()}"
    print(f"# shmcache core benchmark on {platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# values of {len(value)} bytes; medians of {runs} runs")
    with Writer(name, capacity=capacity, arena_bytes=capacity * 160, max_keys=1 << 17,
                store_bytes=64 << 20) as w, Reader(name) as r:
        keys = [f"key/{i % 10_000}" for i in range(n_put)]

        def puts() -> None:
            for k in keys:
                w.put(k, value)

        rate = _median_rate(runs, n_put, puts)
        print(f"put()                      {rate:>12,.0f} events/s   ({1e6 / rate:.2f} us each)")
        batches = [[(k, value) for k in keys[i:i + 100]] for i in range(0, n_put, 100)]

        def put_manys() -> None:
            for batch in batches:
                w.put_many(batch)

        rate = _median_rate(runs, n_put, put_manys)
        print(f"put_many(100)              {rate:>12,.0f} events/s")

        # the ring is full now: drain all of it, as a reader catching up would
        since = r.oldest_resource_version - 1
        held = r.resource_version - since
        def drain(buffer_size: int) -> int:
            return sum(1 for _ in r.interval(since, buffer_size=buffer_size))

        for buffer_size in (100, 1000):
            rate = _median_rate(runs, held, functools.partial(drain, buffer_size))
            print(f"drain into Events (buf {buffer_size:>4}) {rate:>10,.0f} events/s   ({held:,} events)")
        payload = held * (len(keys[0]) + len(value))
        src, dst = ffi.new("char[]", payload), ffi.new("char[]", payload)
        rate = _median_rate(runs, held, lambda: ffi.memmove(dst, src, payload))
        print(f"memcpy of the same bytes   {rate:>12,.0f} events/s   (the physical limit)")

        some = keys[: min(len(keys), 10_000)]
        rate = _median_rate(runs, len(some), lambda: [r.get(k) for k in some])
        print(f"get()                      {rate:>12,.0f} gets/s     ({1e6 / rate:.2f} us each, "
              f"{len(r.list().items):,} keys)")
        rate = _median_rate(runs, 1, r.list)
        print(f"list()                     {1e3 / rate:>12.1f} ms         ({len(r.list().items):,} keys)")


if __name__ == "__main__":
    main()
