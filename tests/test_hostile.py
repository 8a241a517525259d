"""Readers on hostile shared memory.

Shared memory is untrusted input for a reader: whatever the segment holds,
a Reader must answer or raise a ShmCacheError subclass, never crash the
process, hang, or raise anything else.  The cases (random content of the
right and of wrong sizes, truncated files, bit flips, byte runs and boundary
values in the header, the slot table, the arena, the index tables and the
heap of a real, wrapped segment) run in child processes
(tests/_hostile_child.py), so that a segfault or a hang is caught and
pinned to one case.

``SHMCACHE_STRESS=soak`` runs 100,000+ cases instead of the default few
thousand (``ci``).
"""

from __future__ import annotations

import collections
import mmap
import os
import select
import subprocess
from dataclasses import dataclass, field

import pytest
from shmcache._native import ffi

from shmcache import (
    CacheCorrupted,
    CacheNotFound,
    Reader,
    ResourceExpired,
    ShmCacheError,
    Writer,
)

from ._hostile_child import CASE_TIMEOUT, FIELDS, write_field
from .helpers import STRESS, python, remove_cache, scaled

CASES_PER_PART = scaled(500, 12_600)
PARTS = [
    ("tiny", "plain"),
    ("tiny", "replace_then_few"),
    ("small", "plain"),
    ("small", "after_replace"),
    ("small", "deletes"),
    ("medium", "plain"),
    ("medium", "replace_then_few"),
    ("large", "deletes"),
]
# A child that keeps dying is not worth restarting forever.
MAX_RESTARTS = 5
CHILD = "from tests._hostile_child import main; main()"


@dataclass
class Run:
    cases: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)        # non-ShmCacheError exceptions
    crashes: list[str] = field(default_factory=list)    # died by a signal, or hung

    def summary(self) -> str:
        by_class = ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common())
        return (f"{self.cases} cases, {len(self.crashes)} crashes/hangs, {len(self.bad)} bad; "
                f"operation outcomes: {by_class}")


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for a child at most ``timeout`` seconds (then kill it and say so
    on its stderr)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return out, err + f"\n[killed by the test after {timeout:.0f} s]"


def parse(out: str, label: str, run: Run) -> tuple[tuple[int, str] | None, int | None]:
    """Count a child's END lines into ``run``; returns the case begun but not
    ended (if any) and the seed after the last ended one."""
    begun: tuple[int, str] | None = None
    next_seed = None
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "BEGIN":
            seed, _, desc = rest.partition(" ")
            begun = (int(seed), desc)
        elif tag == "END":
            seed, _, results = rest.partition(" ")
            begun = None
            next_seed = int(seed) + 1
            run.cases += 1
            for outcome in results.split():
                run.outcomes[outcome] += 1
                if outcome.startswith("BAD"):
                    run.bad.append(f"{label} seed {seed}: {outcome}")
    return begun, next_seed


def run_child(name: str, geometry: str, variant: str, first: int, count: int, run: Run) -> int:
    """Run seeds [first, first + count) in one child; returns the next seed to
    run (first + count unless the child died; then the seed after the one that
    killed it, which is recorded in ``run.crashes``)."""
    budget = 120.0 + count * 0.1 + CASE_TIMEOUT
    proc = python(CHILD, "cases", name, geometry, variant, str(first), str(count),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = finish(proc, budget)
    begun, next_seed = parse(out, f"{geometry}/{variant}", run)
    next_seed = next_seed if next_seed is not None else first
    if proc.returncode == 0 and "DONE" in out:
        if run.bad:
            run.bad.append("child stderr:\n" + err[-6000:])
        return next_seed
    how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exit status {proc.returncode}")
    if begun is None:  # died outside any case: building, or a harness error
        raise AssertionError(f"hostile child {geometry}/{variant} failed outside a case ({how}):\n"
                             f"{err[-6000:]}")
    seed, desc = begun
    again = f"python -c '{CHILD}' cases NAME {geometry} {variant} {seed} 1"
    run.crashes.append(f"{geometry}/{variant} seed {seed} [{desc}]: {how}\n"
                       f"rerun alone: {again}\n{err[-4000:]}")
    return seed + 1


@pytest.mark.parametrize(("geometry", "variant"), PARTS)
def test_readers_survive_hostile_segments(name: str, geometry: str, variant: str) -> None:
    index = PARTS.index((geometry, variant))
    first = index * 10_000_000
    stop = first + CASES_PER_PART
    run = Run()
    seed, restarts = first, 0
    while seed < stop:
        seed = run_child(name, geometry, variant, seed, stop - seed, run)
        if seed < stop:
            remove_cache(name)  # what the dead child left may not even be a segment
            restarts += 1
            if restarts > MAX_RESTARTS:
                break
    print(f"\nhostile {geometry}/{variant}: {run.summary()}")
    assert not run.crashes, "reader crashed or hung:\n" + "\n".join(run.crashes)
    assert not run.bad, "reader raised non-ShmCacheError exceptions:\n" + "\n".join(run.bad)
    assert run.cases == CASES_PER_PART
    # the mutations must reach beyond the open-time checks
    assert run.outcomes["ok"] > run.cases


def test_readers_survive_a_scribbler(name: str) -> None:
    """The same mutations, made while a reader in another process reads: each
    field may change between two loads of it."""
    seconds = 60.0 if STRESS == "soak" else 3.0
    scribbler = python(CHILD, "scribble", name, "small", "plain", str(seconds + 2), "7",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert scribbler.stdout is not None
        ready, _, _ = select.select([scribbler.stdout], [], [], 60)
        line = scribbler.stdout.readline() if ready else ""
        assert line.startswith("READY"), f"scribbler did not start: {line!r}"
        reader = python(CHILD, "readloop", name, str(seconds), "8",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = finish(reader, seconds + CASE_TIMEOUT + 60)
    finally:
        s_out, s_err = finish(scribbler, seconds + 60)
    run = Run()
    begun, _ = parse(out, "scribbled", run)
    rounds = [line for line in s_out.splitlines() if line.startswith("SCRIBBLED")]
    print(f"\nhostile scribbled: {run.summary()}; {rounds}")
    assert scribbler.returncode == 0, f"scribbler failed:\n{s_err[-4000:]}"
    assert reader.returncode == 0 and begun is None, (
        f"reader crashed or hung (exit status {reader.returncode}) in round {begun}:\n{err[-6000:]}")
    assert not run.bad, "reader raised non-ShmCacheError exceptions:\n" + "\n".join(run.bad) + err[-6000:]
    assert run.cases > 0


# ---- segments that must be refused at open ----------------------------------


def _segment(name: str) -> str:
    return f"/dev/shm/shmcache.{name}"


def _patch(name: str, field_name: str, value: int) -> None:
    with open(_segment(name), "r+b") as f, mmap.mmap(f.fileno(), ffi.sizeof("struct sc_header")) as mm:
        buf = bytearray(mm[:])
        write_field(buf, field_name, value)
        mm[:] = bytes(buf)


def _small_writer(name: str) -> Writer:
    w = Writer(name, capacity=4, arena_bytes=256, max_keys=8, store_bytes=1024)
    for i in range(10):
        w.put(f"k{i % 3}", b"v%d" % i)
    return w


def test_missing_cache_is_not_found(name: str) -> None:
    with pytest.raises(CacheNotFound):
        Reader(name)


def test_wrong_magic_is_corrupted(name: str) -> None:
    with _small_writer(name):
        _patch(name, "magic", int.from_bytes(b"SHMCACHF", "little"))
        with pytest.raises(CacheCorrupted, match="magic"):
            Reader(name)


def test_wrong_layout_version_is_corrupted(name: str) -> None:
    with _small_writer(name):
        _patch(name, "layout_version", 2)
        with pytest.raises(CacheCorrupted, match="layout version"):
            Reader(name)


def test_magic_zero_is_still_being_created(name: str) -> None:
    with _small_writer(name):
        _patch(name, "magic", 0)
        with pytest.raises(CacheNotFound):
            Reader(name)


@pytest.mark.parametrize("size", [0, 1, 8, 4095])
def test_segment_shorter_than_its_header_is_corrupted(name: str, size: int) -> None:
    with _small_writer(name) as w, open(_segment(name), "r+b") as f:
        os.ftruncate(f.fileno(), size)
        try:
            with pytest.raises(CacheCorrupted):
                Reader(name)
        finally:  # the writer's mapping must be whole again before it closes
            os.ftruncate(f.fileno(), w.geometry.total_bytes)


def test_a_file_of_garbage_is_corrupted(name: str) -> None:
    with open(_segment(name), "wb") as f:
        f.write(os.urandom(3 * 4096))
    with pytest.raises(CacheCorrupted):
        Reader(name)


def test_geometry_out_of_line_is_corrupted(name: str) -> None:
    with _small_writer(name):
        for field_name in ("capacity", "arena_bytes", "max_keys", "index_slots", "heap_offset",
                           "total_bytes", "header_bytes"):
            offset, width = FIELDS[field_name]
            with open(_segment(name), "rb") as f:
                original = int.from_bytes(f.read(4096)[offset:offset + width], "little")
            _patch(name, field_name, original + 1)
            try:
                with pytest.raises(CacheCorrupted):
                    Reader(name)
            finally:
                _patch(name, field_name, original)
        with Reader(name) as r:  # restored: it reads again
            assert r.get("k0") is not None


# ---- other hostile values ---------------------------------------------------


def test_since_rv_beyond_64_bits_is_not_an_overflow(name: str) -> None:
    """A since_rv newer than anything the segment holds gives an empty
    interval (or a ShmCacheError), whatever its size: here 2**64 and more,
    e.g. ``resource_version + 1`` on a header whose rv is all ones."""
    with _small_writer(name), Reader(name) as r:
        for since in (2**63, 2**64 - 1, 2**64, 2**70):
            for watch in (False, True):
                try:
                    events = list(r.watch(since, timeout=0) if watch else r.interval(since))
                except ShmCacheError:
                    continue
                assert events == [], since
        _patch(name, "rv", 2**64 - 1)
        try:
            try:
                assert list(r.interval(r.resource_version + 1)) == []
            except ShmCacheError:
                pass
        finally:
            _patch(name, "rv", 10)


def test_replace_stuck_in_progress_bounds_list(name: str) -> None:
    """A segment whose op_state says "replacing" forever (its writer died in
    replace() and nobody repaired it): list() gives up with ResourceExpired
    after a bounded wait instead of waiting forever; get() still answers."""
    with _small_writer(name), Reader(name) as r:
        expected = r.list()
        _patch(name, "op_state", 2)
        assert r.get("k0") == next(i for i in expected.items if i.key == "k0")
        with pytest.raises(ResourceExpired, match="replace"):
            r.list()
        with pytest.raises(ResourceExpired):
            r.interval(0)
        _patch(name, "op_state", 0)
        assert r.list() == expected
