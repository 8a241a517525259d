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
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

from shmcache import (
    CacheCorrupted,
    CacheNotFound,
    Reader,
    ResourceExpired,
    ShmCacheError,
    Writer,
)
from shmcache._layout import LAYOUT_VERSION
from shmcache._native import ffi

from .._hostile_child import CASE_TIMEOUT, FIELDS, write_field
from .._report import Report
from ..support import STRESS, python, remove_cache, scaled

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
    deaths: collections.Counter[str] = field(default_factory=collections.Counter)  # how, per crash

    def died(self, returncode: int, err: str) -> str:
        """Count a child's death in ``deaths`` ("hang", a signal's name, or
        "exit N"); returns how it died, for the message."""
        if "[killed by the test" in err or "Timeout (" in err:  # the test's or faulthandler's watchdog
            kind = "hang"
        elif returncode < 0:
            try:
                kind = signal.Signals(-returncode).name
            except ValueError:  # a real-time signal
                kind = f"SIG{-returncode}"
        else:
            kind = f"exit {returncode}"
        self.deaths[kind] += 1
        return kind

    def figures(self) -> dict[str, Any]:
        """The report's figures: cases, crashes (deaths by a signal: SIGSEGV,
        SIGBUS...), hangs, and every outcome of a reader operation: ok, the
        ShmCacheError subclass raised, or BAD:op:OtherException."""
        hangs = self.deaths["hang"]
        return {"cases": self.cases, "crashes": sum(n for k, n in self.deaths.items() if k.startswith("SIG")),
                "segfaults": self.deaths["SIGSEGV"], "hangs": hangs, "deaths": dict(self.deaths),
                "bad": len(self.bad), "exception_types": sorted(k for k in self.outcomes if k != "ok"),
                "outcomes": dict(self.outcomes.most_common())}


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
    how += f" ({run.died(proc.returncode, err)})"
    if begun is None:  # died outside any case: building, or a harness error
        raise AssertionError(f"hostile child {geometry}/{variant} failed outside a case ({how}):\n"
                             f"{err[-6000:]}")
    seed, desc = begun
    again = f"python -c '{CHILD}' cases NAME {geometry} {variant} {seed} 1"
    run.crashes.append(f"{geometry}/{variant} seed {seed} [{desc}]: {how}\n"
                       f"rerun alone: {again}\n{err[-4000:]}")
    return seed + 1


@pytest.mark.parametrize(("geometry", "variant"), PARTS)
def test_readers_survive_hostile_segments(name: str, geometry: str, variant: str, report: Report) -> None:
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
    report(checked=f"readers on {geometry}/{variant} segments mutated at random: every operation answers "
                   "or raises a ShmCacheError; no crash, hang or other exception",
           events=sum(run.outcomes.values()), faults=run.cases, failures=len(run.crashes) + len(run.bad),
           restarts=restarts, **run.figures())
    assert not run.crashes, "reader crashed or hung:\n" + "\n".join(run.crashes)
    assert not run.bad, "reader raised non-ShmCacheError exceptions:\n" + "\n".join(run.bad)
    assert run.cases == CASES_PER_PART
    # the mutations must reach beyond the open-time checks
    assert run.outcomes["ok"] > run.cases


def test_readers_survive_a_scribbler(name: str, report: Report) -> None:
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
    scribbled = sum(int(line.split()[1]) for line in rounds)
    if reader.returncode != 0:
        run.died(reader.returncode, err)
    report(checked="a reader reading while another process rewrites the segment under it (fields change "
                   "between two loads): every operation answers or raises a ShmCacheError",
           events=sum(run.outcomes.values()), faults=scribbled,
           failures=len(run.bad) + int(reader.returncode != 0 or begun is not None),
           scribbled_rounds=scribbled, scribbler_status=scribbler.returncode, **run.figures())
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


def test_missing_cache_is_not_found(name: str, report: Report) -> None:
    with pytest.raises(CacheNotFound):
        Reader(name)
    report(checked="no segment: Reader() raises CacheNotFound", events=1, faults=1, failures=0)


def test_wrong_magic_is_corrupted(name: str, report: Report) -> None:
    with _small_writer(name):
        _patch(name, "magic", int.from_bytes(b"SHMCACHF", "little"))
        with pytest.raises(CacheCorrupted, match="magic"):
            Reader(name)
    report(checked="a wrong magic: Reader() raises CacheCorrupted naming it", events=1, faults=1, failures=0)


def test_wrong_layout_version_is_corrupted(name: str, report: Report) -> None:
    with _small_writer(name):
        _patch(name, "layout_version", LAYOUT_VERSION + 1)
        with pytest.raises(CacheCorrupted, match="layout version"):
            Reader(name)
    report(checked="another layout version: Reader() raises CacheCorrupted naming it",
           events=1, faults=1, failures=0)


def test_magic_zero_is_still_being_created(name: str, report: Report) -> None:
    with _small_writer(name):
        _patch(name, "magic", 0)
        with pytest.raises(CacheNotFound):
            Reader(name)
    report(checked="magic 0 (a segment still being created): Reader() raises CacheNotFound",
           events=1, faults=1, failures=0)


@pytest.mark.parametrize("size", [0, 1, 8, 4095])
def test_segment_shorter_than_its_header_is_corrupted(name: str, size: int, report: Report) -> None:
    with _small_writer(name) as w, open(_segment(name), "r+b") as f:
        os.ftruncate(f.fileno(), size)
        try:
            with pytest.raises(CacheCorrupted):
                Reader(name)
        finally:  # the writer's mapping must be whole again before it closes
            os.ftruncate(f.fileno(), w.geometry.total_bytes)
    report(checked=f"a segment truncated to {size} bytes: Reader() raises CacheCorrupted",
           events=1, faults=1, failures=0, size=size)


def test_a_file_of_garbage_is_corrupted(name: str, report: Report) -> None:
    with open(_segment(name), "wb") as f:
        f.write(os.urandom(3 * 4096))
    with pytest.raises(CacheCorrupted):
        Reader(name)
    report(checked="12 KiB of random bytes as the segment: Reader() raises CacheCorrupted",
           events=1, faults=1, failures=0)


def test_geometry_out_of_line_is_corrupted(name: str, report: Report) -> None:
    fields = ("capacity", "arena_bytes", "max_keys", "index_slots", "heap_offset", "total_bytes",
              "header_bytes")
    with _small_writer(name):
        for field_name in fields:
            offset, width = FIELDS[field_name]
            with open(_segment(name), "rb") as f:
                original = int.from_bytes(f.read(4096)[offset:offset + width], "little")
            _patch(name, field_name, original + 1)
            try:
                with pytest.raises(CacheCorrupted):
                    Reader(name)
            finally:
                _patch(name, field_name, original)
        report(checked="each geometry field off by one: Reader() raises CacheCorrupted; restored, it reads",
               events=len(fields) + 1, faults=len(fields), failures=0)
        with Reader(name) as r:  # restored: it reads again
            assert r.get("k0") is not None


# ---- other hostile values ---------------------------------------------------


def test_since_rv_beyond_64_bits_is_not_an_overflow(name: str, report: Report) -> None:
    """A since_rv newer than anything the segment holds gives an empty
    interval (or a ShmCacheError), whatever its size: here 2**64 and more,
    e.g. ``resource_version + 1`` on a header whose rv is all ones."""
    calls, refused = 0, 0
    with _small_writer(name), Reader(name) as r:
        for since in (2**63, 2**64 - 1, 2**64, 2**70):
            for watch in (False, True):
                calls += 1
                try:
                    events = list(r.watch(since, timeout=0) if watch else r.interval(since))
                except ShmCacheError:
                    refused += 1
                    continue
                assert events == [], since
        _patch(name, "rv", 2**64 - 1)
        report(checked="since_rv of 2**63 and more, and rv + 1 on a header whose rv is all ones: an empty "
                       "interval or a ShmCacheError, never an overflow",
               events=calls + 1, faults=1, failures=0, refused_with_shmcacheerror=refused)
        try:
            try:
                assert list(r.interval(r.resource_version + 1)) == []
            except ShmCacheError:
                pass
        finally:
            _patch(name, "rv", 10)


def test_replace_stuck_in_progress_bounds_list(name: str, report: Report) -> None:
    """A segment whose op_state says "committing a replace" forever (its
    writer died in replace() and nobody repaired it): list() gives up with
    ResourceExpired after a bounded wait instead of waiting forever; get()
    still answers.  "Staging" (2) forever changes nothing for readers."""
    with _small_writer(name), Reader(name) as r:
        expected = r.list()
        _patch(name, "op_state", 2)
        assert r.list() == expected
        _patch(name, "op_state", 4)
        assert r.get("k0") == next(i for i in expected.items if i.key == "k0")
        with pytest.raises(ResourceExpired, match="replace"):
            r.list()
        with pytest.raises(ResourceExpired):
            r.interval(0)
        _patch(name, "op_state", 0)
        assert r.list() == expected
    report(checked="op_state stuck in a replace: list() gives up with ResourceExpired after a bounded "
                   "wait, get() answers; restored, list() is as before", events=5, faults=1, failures=0)
