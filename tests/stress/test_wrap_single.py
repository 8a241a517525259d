"""One writer process wraps a tiny ring while reader processes follow it:
every event and every snapshot is checked against the writer's deterministic
sequence (tests/_children.py's Workload and Model), so a gap without
ResourceExpired, a torn or foreign event, or a snapshot that is not the model
at its rv fails.  (Several writers at once, checked without a model:
tests/stress/test_wrap.py.)

Loop sizes follow SHMCACHE_STRESS (``ci`` or ``soak``).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict

import pytest

from shmcache import Reader, Writer

from .._report import Report
from ..support import Cursor, Model, Workload, ring_events, scaled, spawn

# ---- 1. drain while the writer wraps the ring ---------------------------------

# capacity, arena_bytes, readers as (mode, prefix, buffer_size), writer pace (burst, max sleep)
DRAIN_CASES: dict[str, tuple[int, int, list[tuple[str, str, int]], tuple[int, float]]] = {
    "cap8": (8, 1024, [("watch", "", 7), ("interval", "", 3)], (8, 0.002)),
    "cap64": (64, 4096, [("watch", "", 100), ("interval", "", 16)], (30, 0.002)),
    "prefixes-cap32": (32, 2048, [("watch", "a/", 5), ("interval", "b/", 50), ("watch", "c/1", 100)],
                       (15, 0.002)),
}


@pytest.mark.parametrize("case", DRAIN_CASES)
def test_drain_while_wrapping(name: str, case: str, report: Report) -> None:
    """A writer process wraps a tiny ring (slots and arena) many times while
    reader processes follow it with interval() refills or watch(); every
    event is checked against the writer's deterministic sequence, so a gap
    without ResourceExpired, a torn or foreign event fails."""
    capacity, arena_bytes, readers, (burst, max_sleep) = DRAIN_CASES[case]
    wl = Workload(seed=len(case), events=scaled(20_000, 300_000))
    batches = wl.batches()
    model = Model(batches)
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, capacity=capacity, arena_bytes=arena_bytes,
                                       max_keys=256, store_bytes=1 << 18))
        (seed_key, seed_value), = batches[0]
        assert seed_value is not None and w.put(seed_key, seed_value) == 1
        kids = [stack.enter_context(spawn("drain", {
            "name": name, "workload": asdict(wl), "mode": mode, "prefix": prefix,
            "buffer_size": buffer_size})) for mode, prefix, buffer_size in readers]
        for kid in kids:
            kid.expect("ready")
        writer = stack.enter_context(spawn("write_workload", {
            "name": name, "workload": asdict(wl), "pace_seed": 7, "burst": burst,
            "max_sleep": max_sleep}))
        writer.expect("ready")
        wstats = writer.result()
        rstats = [kid.result() for kid in kids]
        report(checked=f"1 writer wrapping a {capacity}-slot/{arena_bytes}-byte ring, {len(readers)} readers: "
                       "every event is the model's, no gap without ResourceExpired; store and ring tail "
                       "equal the model at the end",
               events=sum(st["events"] for st in rstats), faults=sum(st["expired"] for st in rstats),
               failures=0, case=case, written=model.last_rv, evicted=wstats["evicted"],
               slot_bound=wstats["slot_bound"], arena_bound=wstats["arena_bound"],
               per_reader=[f"{mode}({prefix!r},{size}): {st['events']} events, {st['expired']} expired, "
                           f"{st['relists']} relists ({st['snapshot_items']} items), "
                           f"{st['list_expired']} list() expired"
                           for (mode, prefix, size), st in zip(readers, rstats)])

        # the writer really wrapped the ring, bounded by its slots and by its arena
        assert wstats["rv"] == model.last_rv
        assert wstats["slot_bound"] > 0 and wstats["arena_bound"] > 0, wstats
        assert wstats["evicted"] >= model.last_rv - capacity
        for (_mode, prefix, _), stats in zip(readers, rstats):
            assert stats["events"] > 0, stats
            assert model.next_rv(prefix, stats["pos"]) is None

        # what is left: the store is the model's final state, the ring its tail
        with Reader(name) as r:
            assert r.list().items == Cursor(model).items(model.last_rv)
            oldest = r.oldest_resource_version
            assert ring_events(r, oldest - 1) == model.events[oldest - 1:]


# ---- 2. list() consistency under writes -----------------------------------------


def test_list_consistent_under_writes(name: str, report: Report) -> None:
    """While a writer process runs a seeded sequence of puts, deletes and
    put_many, a reader process's list(), list(prefix), interval(0) and get()
    each equal the model at the rv they report."""
    wl = Workload(seed=22, events=scaled(20_000, 300_000), keys=48)
    batches = wl.batches()
    model = Model(batches)
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, capacity=16, arena_bytes=4096, max_keys=256,
                                       store_bytes=1 << 18))
        (seed_key, seed_value), = batches[0]
        assert seed_value is not None and w.put(seed_key, seed_value) == 1
        lister = stack.enter_context(spawn("lister", {"name": name, "workload": asdict(wl)}))
        lister.expect("ready")
        writer = stack.enter_context(spawn("write_workload", {
            "name": name, "workload": asdict(wl), "pace_seed": 3, "burst": 40, "max_sleep": 0.002}))
        writer.expect("ready")
        assert writer.result()["rv"] == model.last_rv
        stats = lister.result()
        with Reader(name) as r:
            snap = r.list()
            assert snap.rv == model.last_rv and snap.items == Cursor(model).items(snap.rv)
    ok = stats["lists_ok"] + stats["interval0_ok"]
    report(checked="list(), list(prefix), interval(0) and get() in a reader process while 1 writer "
                   "process writes: each equals the model at the rv it reports",
           events=ok + stats["gets"], faults=stats["lists_expired"], failures=0, written=model.last_rv,
           lists_ok=stats["lists_ok"], interval0_ok=stats["interval0_ok"],
           while_writing=stats["while_writing"], lists_expired=stats["lists_expired"], gets=stats["gets"])
    assert ok >= 10 and stats["while_writing"] > 0, stats
    assert ok >= (ok + stats["lists_expired"]) // 4, f"most snapshots expired: {stats}"
