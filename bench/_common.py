"""What every scenario shares: the run's sizes, the record of results and
skipped systems, timing helpers and unique cache names.

A scenario module exposes ``run(cfg: Config, rec: Recorder) -> None``.  It
measures shmcache and every peer *in the same run*, alternating them round
by round (``cfg.rounds``), and records one Result per (system, params,
round); the report takes medians over rounds.  A peer that cannot run is
recorded with ``rec.skip(system, reason)`` — never replaced by a fake.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Config", "Recorder", "Result", "median", "percentile", "unique_name"]

_counter = itertools.count()


def unique_name(tag: str) -> str:
    """A cache (or socket, or queue) name no other run or scenario uses."""
    return f"bench-{tag}-{os.getpid()}-{next(_counter)}"


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of one run.  ``quick`` is a smoke run (seconds, tiny
    sizes); ``full`` the published figures (minutes)."""

    quick: bool
    rounds: int
    fanout_events: int            # events the writer publishes per fan-out run
    fanout_readers: tuple[int, ...]
    value_sizes: tuple[int, ...]  # bytes; the first is the headline size
    drain_events: int             # events in the full ring a reader drains
    latency_samples: int          # events published one at a time
    latency_rate: float           # events/s the latency writer publishes at
    get_key_counts: tuple[int, ...]
    list_keys: int
    watch_intervals: int          # intervals opened by the watch-start reader
    watch_ring_bytes: int         # bytes of events held by that ring
    producer_events: int

    @classmethod
    def for_mode(cls, mode: str) -> Config:
        if mode == "quick":
            return cls(quick=True, rounds=1, fanout_events=2_000, fanout_readers=(1, 2),
                       value_sizes=(100,), drain_events=5_000, latency_samples=200,
                       latency_rate=2_000.0, get_key_counts=(1_000, 5_000), list_keys=5_000,
                       watch_intervals=20, watch_ring_bytes=4 << 20, producer_events=5_000)
        if mode == "full":
            return cls(quick=False, rounds=3, fanout_events=200_000, fanout_readers=(1, 2, 4, 8),
                       value_sizes=(100, 1024, 16384), drain_events=1_000_000,
                       latency_samples=20_000, latency_rate=2_000.0,
                       get_key_counts=(1_000, 100_000, 1_000_000), list_keys=100_000,
                       watch_intervals=1_000, watch_ring_bytes=1 << 30, producer_events=200_000)
        raise ValueError(f"unknown mode {mode!r}: quick or full")


@dataclasses.dataclass
class Result:
    scenario: str
    system: str
    params: dict[str, Any]
    metrics: dict[str, float]
    round: int = 0


class Recorder:
    """Collects results and skip reasons, and prints each result as it comes
    (a long run shows progress; a crash keeps what was measured)."""

    def __init__(self, *, echo: bool = True) -> None:
        self.results: list[Result] = []
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self._echo = echo

    def add(self, scenario: str, system: str, params: dict[str, Any], round: int = 0,
            **metrics: float) -> None:
        self.results.append(Result(scenario, system, dict(params), dict(metrics), round))
        if self._echo:
            p = " ".join(f"{k}={v}" for k, v in params.items())
            m = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            print(f"  {scenario:<10} {system:<18} {p:<28} {m}", flush=True)

    def skip(self, system: str, reason: str) -> None:
        """``system`` cannot run here; said once, with the reason."""
        if system not in self.skipped:
            self.skipped[system] = reason
            if self._echo:
                print(f"  skipped {system}: {reason}", flush=True)

    def note(self, scenario: str, text: str) -> None:
        """A sentence the report prints under the scenario's table."""
        self.notes[scenario] = text

    def medians(self, scenario: str) -> list[Result]:
        """One Result per (system, params): each metric's median over rounds,
        in the order the results first appeared."""
        groups: dict[tuple[str, str], list[Result]] = {}
        for r in self.results:
            if r.scenario == scenario:
                groups.setdefault((r.system, repr(sorted(r.params.items()))), []).append(r)
        out = []
        for rs in groups.values():
            keys = rs[0].metrics.keys()
            out.append(Result(scenario, rs[0].system, rs[0].params,
                              {k: median(r.metrics[k] for r in rs if k in r.metrics) for k in keys},
                              len(rs)))
        return out


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        raise ValueError("no values")
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def timed(body: Callable[[], object]) -> float:
    """Seconds ``body()`` took (perf_counter)."""
    start = time.perf_counter()
    body()
    return time.perf_counter() - start
