"""Scenarios "get" and "list": point lookups and full listings of a filled
cache, against the peers a reader could use instead.

"get": p50/p99/mean of one lookup of a random existing key, each call timed
on its own (time.perf_counter_ns around it), at every key count of
``cfg.get_key_counts``; 100-byte values.  A plain dict in this process is
the floor.  "list": one full listing of ``cfg.list_keys`` keys.

Every fixture is filled once, before the rounds, so that the rounds
alternate the systems over identical data; only lookups are timed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shmcache import Reader, Writer

from ._common import Config, Recorder, median, percentile, unique_name
from ._peers import PeerUnavailable, missing, redis_server

__all__ = ["run"]

VALUE = bytes(range(100))
#: a fill that runs past this is stopped, and larger key counts are not tried
FILL_LIMIT_S = 60.0
#: pairs per put_many / MSET / HSET call while filling
CHUNK = 10_000
#: UltraDict pickles every change into its stream buffer; a full buffer makes
#: it pickle the whole dict (O(n) per overflow), so the buffer takes the
#: whole fill: this many bytes per key (pickled tuple + frame header) ...
UD_BYTES_PER_KEY = len(VALUE) + 80
UD_BUFFER_LIMIT = (1 << 32) - 1  # ... below UltraDict's own limit

GET_SYSTEMS = ("shmcache", "UltraDict", "redis GET", "redis HGET", "dict")
LIST_SYSTEMS = ("shmcache", "UltraDict", "redis HGETALL", "dict")
REDIS_SYSTEMS = ("redis GET", "redis HGET", "redis HGETALL")


def key_of(i: int) -> str:
    return f"key-{i:07d}"


def _record_bytes(key: str, value: bytes) -> int:
    """A store record's size in a shmcache cache (24-byte header, padded to 8)."""
    return (24 + len(key.encode()) + len(value) + 7) & ~7


def _append_note(rec: Recorder, scenario: str, text: str) -> None:
    # Recorder keeps one note per scenario: several findings share it
    old = rec.notes.get(scenario, "")
    rec.note(scenario, f"{old} {text}".strip())


@dataclass
class _Fixture:
    """Every system filled with the same ``keys`` keys."""

    keys: int
    lookups: dict[str, Callable[[str], object]] = field(default_factory=dict)
    listings: dict[str, Callable[[], int]] = field(default_factory=dict)


class _FillTooSlow(Exception):
    pass


class _Lookup:
    def __init__(self, cfg: Config, rec: Recorder, stack: contextlib.ExitStack) -> None:
        self.cfg = cfg
        self.rec = rec
        self.stack = stack
        self.redis_sock: str | None = None
        self.redis_db = 0
        self.ultradict_ok = missing("UltraDict") is None
        # larger key counts are not tried once a fill ran past FILL_LIMIT_S;
        # the smaller ones already filled are still measured
        self.ultradict_too_slow = False
        self.failed: set[str] = set()
        self.fill_s: dict[str, list[tuple[int, float]]] = {}

    # ---- peers ----------------------------------------------------------

    def start_redis(self) -> None:
        try:
            self.redis_sock = self.stack.enter_context(redis_server())
        except PeerUnavailable as err:
            for system in REDIS_SYSTEMS:
                self.rec.skip(system, str(err))

    def fail(self, system: str, err: BaseException) -> None:
        """``system`` broke: no more figures from it (nor from its siblings
        on the same server)."""
        group = REDIS_SYSTEMS if system in REDIS_SYSTEMS else (system,)
        for s in group:
            self.failed.add(s)
            self.rec.skip(s, f"failed: {type(err).__name__}: {err}")

    def usable(self, system: str) -> bool:
        return system not in self.failed

    # ---- fixtures ---------------------------------------------------------

    def build(self, n: int) -> _Fixture:
        fx = _Fixture(n)
        keys = [key_of(i) for i in range(n)]
        self._dict(fx, keys)
        self._shmcache(fx, keys)
        if self.ultradict_ok and not self.ultradict_too_slow and self.usable("UltraDict"):
            try:
                self._ultradict(fx, keys)
            except _FillTooSlow:
                self.ultradict_too_slow = True
            except Exception as err:  # noqa: BLE001 (a peer's failure costs its figures only)
                self.fail("UltraDict", err)
        if self.redis_sock is not None and self.usable("redis GET"):
            try:
                self._redis(fx, keys)
            except Exception as err:  # noqa: BLE001 (a peer's failure costs its figures only)
                self.fail("redis GET", err)
        return fx

    def _timed_fill(self, system: str, n: int, started: float) -> None:
        self.fill_s.setdefault(system, []).append((n, time.perf_counter() - started))

    def _dict(self, fx: _Fixture, keys: list[str]) -> None:
        d = dict.fromkeys(keys, VALUE)
        fx.lookups["dict"] = d.__getitem__
        fx.listings["dict"] = lambda: len(dict(d))

    def _shmcache(self, fx: _Fixture, keys: list[str]) -> None:
        n = len(keys)
        # every record the same size; slack for the store's own rounding
        store = max(1 << 20, n * _record_bytes(keys[-1], VALUE) + (1 << 20))
        name = unique_name("lookup")
        w = self.stack.enter_context(Writer(name, max_keys=n, store_bytes=store))
        t0 = time.perf_counter()
        for i in range(0, n, CHUNK):
            w.put_many([(k, VALUE) for k in keys[i:i + CHUNK]])
        self._timed_fill("shmcache", n, t0)
        r = self.stack.enter_context(Reader(name))
        # a long-lived reader has faulted every page of its mapping in once;
        # a fresh one pays a page fault per first touch
        for k in keys:
            r.get(k)
        fx.lookups["shmcache"] = r.get
        fx.listings["shmcache"] = lambda: len(r.list().items)

    def _ultradict(self, fx: _Fixture, keys: list[str]) -> None:
        from UltraDict import UltraDict

        n = len(keys)
        name = unique_name("ud")
        size = min(UD_BUFFER_LIMIT, n * UD_BYTES_PER_KEY + (1 << 20))
        # shared_lock=False: one writer process; its lock is a
        # multiprocessing RLock, whose semaphore glibc unlinks at once
        writer: Any = UltraDict(name=name, create=True, buffer_size=size, shared_lock=False,
                                auto_unlink=True)
        # unlink() also removes any full-dump segment the writer made
        self.stack.callback(writer.unlink)
        t0 = time.perf_counter()
        deadline = t0 + FILL_LIMIT_S
        for i, k in enumerate(keys):
            writer[k] = VALUE
            if i % 10_000 == 9_999 and time.perf_counter() > deadline:
                rate = (i + 1) / (time.perf_counter() - t0)
                writer.unlink()
                _append_note(self.rec, "get", (
                    f"UltraDict: filling {n:,} keys was stopped after {FILL_LIMIT_S:.0f} s at {i + 1:,} keys "
                    f"({rate:,.0f} keys/s): {n:,} keys and more are not measured."))
                if self.cfg.list_keys >= n:
                    _append_note(self.rec, "list", f"UltraDict: not measured at {self.cfg.list_keys:,} keys "
                                                   f"(its fill was stopped: see get).")
                raise _FillTooSlow
        self._timed_fill("UltraDict", n, t0)
        reader: Any = UltraDict(name=name, create=False)
        self.stack.callback(reader.close)
        if len(reader) != n:
            raise RuntimeError(f"the attached UltraDict holds {len(reader)} keys, not {n}")
        for k in keys:
            reader[k]
        fx.lookups["UltraDict"] = reader.__getitem__
        fx.listings["UltraDict"] = lambda: len(dict(reader))

    def _redis(self, fx: _Fixture, keys: list[str]) -> None:
        import redis

        assert self.redis_sock is not None
        if self.redis_db >= 16:
            raise RuntimeError("more key counts than redis-server's 16 databases")
        client = redis.Redis(unix_socket_path=self.redis_sock, db=self.redis_db)
        self.redis_db += 1
        self.stack.callback(client.close)
        client.flushdb()
        n = len(keys)
        t0 = time.perf_counter()
        for i in range(0, n, CHUNK):
            client.mset(dict.fromkeys(keys[i:i + CHUNK], VALUE))
        self._timed_fill("redis MSET", n, t0)
        t0 = time.perf_counter()
        for i in range(0, n, CHUNK):
            client.hset("h", mapping=dict.fromkeys(keys[i:i + CHUNK], VALUE))
        self._timed_fill("redis HSET", n, t0)
        if client.dbsize() != n + 1 or client.hlen("h") != n:
            raise RuntimeError("redis-server does not hold the keys it was given")
        fx.lookups["redis GET"] = client.get
        fx.lookups["redis HGET"] = functools.partial(client.hget, "h")
        fx.listings["redis HGETALL"] = lambda: len(client.hgetall("h"))


def _time_calls(fn: Callable[[str], object], keys: list[str]) -> list[int]:
    """Nanoseconds of each call ``fn(key)``, sorted."""
    ns = time.perf_counter_ns
    out = [0] * len(keys)
    for i, k in enumerate(keys):
        t0 = ns()
        fn(k)
        out[i] = ns() - t0
    out.sort()
    return out


def _warm(system: str, fn: Callable[[str], object], keys: list[str]) -> None:
    for k in keys:
        if fn(k) is None:
            raise RuntimeError(f"{system}: key {k!r} is missing")


def _nothing(key: str) -> None:
    return None


def run(cfg: Config, rec: Recorder) -> None:
    lookups = 2_000 if cfg.quick else 20_000
    warmup = min(2_000, lookups)
    list_reps = 3 if cfg.quick else 5
    counts = sorted(set(cfg.get_key_counts))
    reason = missing("UltraDict")
    if reason:
        rec.skip("UltraDict", reason)
    with contextlib.ExitStack() as stack:
        lk = _Lookup(cfg, rec, stack)
        lk.start_redis()
        fixtures: dict[int, _Fixture] = {}
        for n in sorted(set(counts) | {cfg.list_keys}):
            fixtures[n] = lk.build(n)
        _note_fills(rec, lk)

        overhead: list[float] = []
        for k in range(cfg.rounds):
            rng = random.Random(1000 + k)
            for n in counts:
                fx = fixtures[n]
                probe = [key_of(rng.randrange(n)) for _ in range(lookups)]
                warm = [key_of(rng.randrange(n)) for _ in range(warmup)]
                for system in GET_SYSTEMS:
                    fn = fx.lookups.get(system)
                    if fn is None or not lk.usable(system):
                        continue
                    try:
                        _warm(system, fn, warm)
                        gc.collect()
                        t = _time_calls(fn, probe)
                    except Exception as err:  # noqa: BLE001 (a peer's failure costs its figures only)
                        lk.fail(system, err)
                        continue
                    rec.add("get", system, {"keys": n}, round=k,
                            p50_us=percentile(t, 0.5) / 1e3, p99_us=percentile(t, 0.99) / 1e3,
                            mean_us=sum(t) / len(t) / 1e3)
                    if system == "shmcache":
                        overhead.append(percentile(_time_calls(_nothing, probe), 0.5) / 1e3)
            fx = fixtures[cfg.list_keys]
            for system in LIST_SYSTEMS:
                body = fx.listings.get(system)
                if body is None or not lk.usable(system):
                    continue
                try:
                    got = body()  # warm-up, and proof that it lists every key
                    if got != cfg.list_keys:
                        raise RuntimeError(f"listed {got} items, not {cfg.list_keys}")
                    times = []
                    for _ in range(list_reps):
                        gc.collect()
                        t0 = time.perf_counter()
                        body()
                        times.append(time.perf_counter() - t0)
                except Exception as err:  # noqa: BLE001 (a peer's failure costs its figures only)
                    lk.fail(system, err)
                    continue
                rec.add("list", system, {"keys": cfg.list_keys}, round=k, ms=median(times) * 1e3)
        if overhead:
            _append_note(rec, "get", (
                f"Each figure includes the timer: perf_counter_ns() around an empty Python call "
                f"measures {median(overhead):.3f} µs (p50)."))
        _append_note(rec, "get", (
            f"{lookups:,} lookups of random existing keys per figure, after {warmup:,} untimed ones (and, for "
            f"shmcache and UltraDict, one untimed lookup of every key once the fixture was filled); "
            f"redis-py over a Unix socket; UltraDict read through a second instance attached by name."))
        _append_note(rec, "list", f"Median of {list_reps} listings per round; UltraDict: dict(ud).")


def _note_fills(rec: Recorder, lk: _Lookup) -> None:
    parts = []
    for system, fills in lk.fill_s.items():
        n, s = fills[-1]
        parts.append(f"{system} {n / s:,.0f} keys/s")
    if parts:
        _append_note(rec, "get", f"Filling the largest fixture: {'; '.join(parts)}.")

