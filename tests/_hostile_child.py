"""Child process of tests/stress/test_hostile_segments.py: readers on hostile shared memory.

Run as ``python -c "from tests._hostile_child import main; main()" cases NAME
GEOMETRY VARIANT FIRST COUNT``.  It builds one pristine segment named NAME
with a Writer (which then stays idle: nothing writes the segment but this
process's mutations), keeps a copy of its bytes, and for every seed in
``[FIRST, FIRST + COUNT)`` restores the pristine bytes, applies the seed's
mutation and runs a Reader's whole API on the result.

Per case it prints ``BEGIN seed description`` before the reader runs and
``END seed outcome...`` after (one outcome per reader operation: ``ok``, the
ShmCacheError subclass name, or ``BAD:op:ExceptionName`` with a traceback on
stderr), flushing each line, so a parent that sees the process die by a
signal or by the per-case watchdog knows which case did it.

Modes ``scribble`` and ``readloop`` do the same with the mutations happening
*while* a reader in another process reads (values changing between two
loads of the same field).
"""

from __future__ import annotations

import faulthandler
import itertools
import mmap
import os
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from shmcache import CacheFull, Reader, ShmCacheError, Writer
from shmcache._native import ffi

# Geometries of the pristine segments (kept small: each case copies the segment).
GEOMETRIES: dict[str, dict[str, int]] = {
    "tiny": {"capacity": 3, "arena_bytes": 256, "max_keys": 8, "store_bytes": 1024},
    "small": {"capacity": 8, "arena_bytes": 512, "max_keys": 16, "store_bytes": 2048},
    "medium": {"capacity": 64, "arena_bytes": 4096, "max_keys": 64, "store_bytes": 8192},
    "large": {"capacity": 256, "arena_bytes": 1 << 16, "max_keys": 256, "store_bytes": 1 << 16},
}
# How the history of the pristine segment ends.
VARIANTS = ("plain", "after_replace", "replace_then_few", "deletes")
# A case that takes longer than this is a hang (list() on a segment stuck in
# "replace in progress" legitimately takes ~2 s per call).
CASE_TIMEOUT = 60.0

U64 = (1 << 64) - 1
TOMBSTONE = U64
SLOT_BYTES = 32
ENTRY_BYTES = 16
RECORD_BYTES = 24
SC_OP_COMMITTING = 4  # a replace being switched in: list() waits for it


def _header_fields() -> dict[str, tuple[int, int]]:
    """name -> (offset, width in bytes) of every scalar field of sc_header."""
    fields: dict[str, tuple[int, int]] = {}
    for fname, f in ffi.typeof("struct sc_header").fields:
        cname = f.type.cname
        if cname == "uint64_t":
            fields[fname] = (f.offset, 8)
        elif cname == "uint32_t":
            fields[fname] = (f.offset, 4)
        elif cname == "uint64_t[2]":
            fields[f"{fname}[0]"] = (f.offset, 8)
            fields[f"{fname}[1]"] = (f.offset + 8, 8)
    return fields


FIELDS = _header_fields()
DYNAMIC_START = FIELDS["end_index"][0]
DYNAMIC_END = FIELDS["notify_seq"][0] + 8
GEOMETRY_FIELDS = ("magic", "layout_version", "header_bytes", "total_bytes", "capacity",
                   "arena_bytes", "max_keys", "store_bytes", "index_slots", "heap_bytes",
                   "slots_offset", "arena_offset", "index_offset[0]", "index_offset[1]",
                   "heap_offset", "hash_seed", "epoch")
DYNAMIC_FIELDS = ("end_index", "rv", "start_index", "replace_index", "replace_rv", "arena_head",
                  "store_rv", "heap_head", "heap_tail", "active_index", "index_gen",
                  "live_keys", "live_bytes", "tombstones", "closed", "notify_seq", "op_state",
                  "op_arg", "lock_token", "events_written", "events_evicted")
# The fields the reader actually consults get most of the attention.
READER_FIELDS = ("end_index", "rv", "start_index", "replace_index", "replace_rv", "store_rv",
                 "heap_tail", "active_index", "index_gen", "closed", "notify_seq")


@dataclass(frozen=True)
class Layout:
    """Where things are in the pristine segment (read from its header)."""

    total: int
    capacity: int
    arena_bytes: int
    index_slots: int
    heap_bytes: int
    slots: int
    arena: int
    index: tuple[int, int]
    heap: int

    @classmethod
    def of(cls, data: bytes) -> Layout:
        def f(n: str) -> int:
            return read_field(data, n)

        return cls(f("total_bytes"), f("capacity"), f("arena_bytes"), f("index_slots"),
                   f("heap_bytes"), f("slots_offset"), f("arena_offset"),
                   (f("index_offset[0]"), f("index_offset[1]")), f("heap_offset"))

    def regions(self) -> dict[str, tuple[int, int]]:
        """name -> (offset, size)."""
        return {
            "header": (0, DYNAMIC_END),
            "header_dynamic": (DYNAMIC_START, DYNAMIC_END - DYNAMIC_START),
            "slots": (self.slots, self.capacity * SLOT_BYTES),
            "arena": (self.arena, self.arena_bytes),
            "index0": (self.index[0], self.index_slots * ENTRY_BYTES),
            "index1": (self.index[1], self.index_slots * ENTRY_BYTES),
            "heap": (self.heap, self.heap_bytes),
            "anywhere": (0, self.total),
        }


def read_field(data: bytes | bytearray, name: str) -> int:
    off, width = FIELDS[name]
    return int.from_bytes(data[off:off + width], "little")


def write_field(buf: bytearray, name: str, value: int) -> None:
    off, width = FIELDS[name]
    buf[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def write_circular(buf: bytearray, base: int, size: int, pos: int, data: bytes) -> None:
    """Write data at logical position pos of the circular buffer [base, base + size)."""
    for i, b in enumerate(data):
        buf[base + (pos + i) % size] = b


def read_circular(buf: bytes | bytearray, base: int, size: int, pos: int, n: int) -> bytes:
    return bytes(buf[base + (pos + i) % size] for i in range(n))


# ---- building the pristine segment ------------------------------------------


def build(name: str, geo: dict[str, int], variant: str, rng: random.Random) -> Writer:
    """A Writer whose segment has wrapped its ring, arena and heap, with
    deletes (tombstones, an index rebuild), a replace, and non-ASCII keys."""
    cap, arena, max_keys = geo["capacity"], geo["arena_bytes"], geo["max_keys"]
    w = Writer(name, capacity=cap, arena_bytes=arena, max_keys=max_keys, store_bytes=geo["store_bytes"])
    max_record = geo["store_bytes"] // 2 // 8 * 8
    keys = [f"{p}/{i}" for i in range(max_keys) for p in ("a", "b", "ü")][: max_keys + 4]
    keys += ["c", "a", "ab"]
    vmax = max(8, min(arena // 3, max_record // 2, 4 * geo["store_bytes"] // max_keys) - 16)

    def value() -> bytes:
        return rng.randbytes(rng.choice((0, 1, rng.randint(0, vmax), rng.randint(0, 16))))

    def step() -> None:
        op = rng.random()
        key = rng.choice(keys)
        try:
            if op < 0.6:
                w.put(key, value())
            elif op < 0.85:
                w.delete(key)
            elif op < 0.95:
                w.put_many([(rng.choice(keys), None if rng.random() < 0.3 else value())
                            for _ in range(rng.randint(1, 4))])
            else:
                items = {rng.choice(keys): value() for _ in range(rng.randint(0, max_keys // 2))}
                w.replace(list(items.items()), rv=w.resource_version + rng.randint(1, 3))
        except (KeyError, CacheFull):
            pass

    h = w._map.header
    heap_bytes = int(h.heap_bytes)
    for n in itertools.count():
        step()
        wrapped = (h.end_index > 3 * cap + 10 and h.arena_head > 2 * arena
                   and h.heap_head > heap_bytes + heap_bytes // 2 and h.index_gen > 2)
        if (n > 40 and wrapped) or n > 20000:
            break
    if variant in ("after_replace", "replace_then_few"):
        items = {rng.choice(keys): rng.randbytes(rng.randint(0, 16)) for _ in range(max_keys // 2)}
        w.replace(list(items.items()), rv=w.resource_version + 2)
        if variant == "replace_then_few":
            for _ in range(min(2, cap - 1)):
                w.put(rng.choice(list(items)), b"x")
    elif variant == "deletes":
        for _ in range(cap + 2):
            try:
                w.put(rng.choice(keys), value())
            except CacheFull:
                pass
        for key in keys:
            try:
                w.delete(key)
            except KeyError:
                pass
            if rng.random() < 0.2:
                break
        w.put(keys[0], b"last")
    return w


# ---- mutations --------------------------------------------------------------


def interesting(rng: random.Random, original: int, lay: Layout, width: int = 8) -> int:
    """A value likely to sit on some boundary of the reader's checks."""
    cap = lay.capacity
    choices: list[Callable[[], int]] = [
        lambda: 0, lambda: 1, lambda: 2, lambda: 3,
        lambda: original + 1, lambda: original - 1,
        lambda: original + rng.randint(2, 8), lambda: original - rng.randint(2, 8),
        lambda: original + cap, lambda: original - cap, lambda: original + cap + 1,
        lambda: original - cap - 1, lambda: original * 2, lambda: original // 2,
        lambda: original ^ (1 << rng.randrange(8 * width)),
        lambda: (1 << 31) - 1, lambda: 1 << 31, lambda: (1 << 32) - 1, lambda: 1 << 32,
        lambda: (1 << 63) - 1, lambda: 1 << 63, lambda: U64, lambda: U64 - 1,
        lambda: U64 - rng.randint(2, 300), lambda: rng.getrandbits(8 * width),
        lambda: rng.getrandbits(16), lambda: lay.arena_bytes, lambda: lay.heap_bytes,
        lambda: lay.heap_bytes + 1, lambda: lay.index_slots, lambda: lay.total,
    ]
    return rng.choice(choices)() % (1 << (8 * width))


def mutate_fields(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    """1-3 header fields get interesting values (or another field's value)."""
    done = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        pool = rng.choice((READER_FIELDS, READER_FIELDS, DYNAMIC_FIELDS, GEOMETRY_FIELDS))
        name = rng.choice(pool)
        width = FIELDS[name][1]
        if rng.random() < 0.15:
            other = rng.choice(READER_FIELDS + ("heap_head", "arena_head"))
            value = read_field(buf, other) % (1 << (8 * width))
        else:
            value = interesting(rng, read_field(buf, name), lay, width)
        write_field(buf, name, value)
        done.append(f"{name}={value:#x}")
    return "field " + " ".join(done)


def mutate_flips(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    region = rng.choice(("header_dynamic", "header_dynamic", "header", "slots", "arena", "index0",
                         "index1", "heap", "anywhere"))
    off, size = lay.regions()[region]
    bits = [rng.randrange(8 * size) for _ in range(rng.choice((1, 1, 2, 3, 8, 32)))]
    for bit in bits:
        buf[off + bit // 8] ^= 1 << (bit % 8)
    return f"flip {region} bits={bits[:8]}"


def mutate_bytes(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    region = rng.choice(("header_dynamic", "slots", "arena", "index0", "index1", "heap", "anywhere"))
    off, size = lay.regions()[region]
    runs = []
    for _ in range(rng.choice((1, 2, 4))):
        n = min(size, rng.choice((1, 1, 2, 4, 8, 16, 64)))
        at = rng.randrange(size - n + 1)
        fill = rng.choice((b"\xff", b"\x00", b"\x80", b"\xc3", None))
        buf[off + at:off + at + n] = rng.randbytes(n) if fill is None else fill * n
        runs.append((at, n))
    return f"bytes {region} runs={runs}"


def mutate_words(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    """Random or interesting 64-bit values at aligned places of a table."""
    region = rng.choice(("header_dynamic", "slots", "index0", "index1", "heap"))
    off, size = lay.regions()[region]
    done = []
    for _ in range(rng.choice((1, 2, 3))):
        at = rng.randrange(size // 8) * 8
        old = int.from_bytes(buf[off + at:off + at + 8], "little")
        value = interesting(rng, old, lay)
        buf[off + at:off + at + 8] = value.to_bytes(8, "little")
        done.append(f"{at}={value:#x}")
    return f"words {region} " + " ".join(done)


def live_slots(buf: bytearray, lay: Layout) -> list[int]:
    start, end = read_field(buf, "start_index"), read_field(buf, "end_index")
    return [i % lay.capacity for i in range(max(start, end - lay.capacity), end)]


def mutate_slot(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    """A field of a ring slot, preferably one inside the published window."""
    live = live_slots(buf, lay)
    i = rng.choice(live) if live and rng.random() < 0.85 else rng.randrange(lay.capacity)
    base = lay.slots + i * SLOT_BYTES
    rv, pos, kl, vl, _ = struct.unpack_from("<QQIII", buf, base)
    field = rng.choice(("rv", "data_pos", "key_len", "value_len", "type", "key_bytes"))
    if field == "rv":
        prev = lay.slots + ((i - 1) % lay.capacity) * SLOT_BYTES
        value = rng.choice((0, rv - 1, rv + 1, U64, struct.unpack_from("<Q", buf, prev)[0],
                            interesting(rng, rv, lay))) % (1 << 64)
        struct.pack_into("<Q", buf, base, value)
    elif field == "data_pos":
        value = rng.choice((pos + 1, pos - 1, U64, U64 - rng.randrange(lay.arena_bytes),
                            pos + lay.arena_bytes - 1, interesting(rng, pos, lay))) % (1 << 64)
        struct.pack_into("<Q", buf, base + 8, value)
    elif field in ("key_len", "value_len"):
        value = rng.choice((0, 1, 1024, 1025, lay.arena_bytes, lay.arena_bytes + 1,
                            lay.arena_bytes - kl, lay.arena_bytes - kl + 1, (1 << 32) - 1,
                            1 << 31, interesting(rng, kl if field == "key_len" else vl, lay, 4)))
        value %= 1 << 32
        struct.pack_into("<I", buf, base + (16 if field == "key_len" else 20), value)
    elif field == "type":
        value = rng.choice((0, 1, 2, 3, 4, 255, (1 << 32) - 1))
        struct.pack_into("<I", buf, base + 24, value)
    else:  # the key's bytes in the arena: not UTF-8, or another key
        n = max(1, min(kl, 8))
        value = 0
        data = rng.choice((b"\xff" * n, b"\xc3", b"\x80", b"\x00", rng.randbytes(n)))
        write_circular(buf, lay.arena, lay.arena_bytes, pos + rng.randrange(max(1, kl)), data)
    return f"slot {i} {field}={value:#x}"


def live_entries(buf: bytearray, lay: Layout, which: int) -> list[int]:
    off = lay.index[which]
    return [i for i in range(lay.index_slots)
            if struct.unpack_from("<Q", buf, off + i * ENTRY_BYTES)[0] not in (0, TOMBSTONE)]


def mutate_index(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    """An index entry's ptr or hash, usually in the active table."""
    which = read_field(buf, "active_index") & 1
    if rng.random() < 0.2:
        which ^= 1
    live = live_entries(buf, lay, which)
    i = rng.choice(live) if live and rng.random() < 0.8 else rng.randrange(lay.index_slots)
    base = lay.index[which] + i * ENTRY_BYTES
    ptr, hsh = struct.unpack_from("<QQ", buf, base)
    others = live_entries(buf, lay, which) or [i]
    other_ptr, other_hash = struct.unpack_from("<QQ", buf, lay.index[which] + rng.choice(others) * ENTRY_BYTES)
    if rng.random() < 0.7:
        value = rng.choice((0, TOMBSTONE, TOMBSTONE - 1, 1, ptr + 1, ptr - 1, ptr + 8, ptr - 8,
                            ptr + lay.heap_bytes, ptr - lay.heap_bytes, other_ptr,
                            rng.randrange(lay.heap_bytes) + 1, interesting(rng, ptr, lay))) % (1 << 64)
        struct.pack_into("<Q", buf, base, value)
        what = "ptr"
    else:
        value = rng.choice((0, other_hash, hsh ^ 1, interesting(rng, hsh, lay))) % (1 << 64)
        struct.pack_into("<Q", buf, base + 8, value)
        what = "hash"
    if rng.random() < 0.1:  # a whole table of entries claiming the same hash
        for j in range(lay.index_slots):
            struct.pack_into("<QQ", buf, lay.index[which] + j * ENTRY_BYTES, ptr, hsh)
        what += "+all"
    return f"index{which} {i} {what}={value:#x}"


def mutate_record(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    """A field of a live store record in the heap (it may straddle the heap's end)."""
    which = read_field(buf, "active_index") & 1
    live = live_entries(buf, lay, which)
    if not live:
        return mutate_bytes(buf, lay, rng)
    i = rng.choice(live)
    ptr = struct.unpack_from("<Q", buf, lay.index[which] + i * ENTRY_BYTES)[0]
    pos = ptr - 1
    rv, kl, vl = struct.unpack("<QII", read_circular(buf, lay.heap, lay.heap_bytes, pos, 16))
    field = rng.choice(("rv", "key_len", "value_len", "value_len", "key_bytes", "hash"))
    if field == "rv":
        value = rng.choice((0, U64, rv + 1, interesting(rng, rv, lay))) % (1 << 64)
        write_circular(buf, lay.heap, lay.heap_bytes, pos, value.to_bytes(8, "little"))
    elif field in ("key_len", "value_len"):
        value = rng.choice((0, 1, 1024, 1025, lay.heap_bytes, lay.heap_bytes // 4, (1 << 32) - 1,
                            1 << 31, vl + 1, vl + 8, interesting(rng, vl, lay, 4))) % (1 << 32)
        at = 8 if field == "key_len" else 12
        write_circular(buf, lay.heap, lay.heap_bytes, pos + at, value.to_bytes(4, "little"))
    elif field == "hash":
        value = rng.getrandbits(64)
        write_circular(buf, lay.heap, lay.heap_bytes, pos + 16, value.to_bytes(8, "little"))
    else:
        value = 0
        data = rng.choice((b"\xff", b"\xc3", b"\x80\x80", rng.randbytes(max(1, min(kl, 4)))))
        write_circular(buf, lay.heap, lay.heap_bytes, pos + RECORD_BYTES + rng.randrange(max(1, kl)), data)
    return f"record@{pos:#x} {field}={value:#x}"


def mutate_random_body(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    """Keep the identity part of the header (so the reader opens), randomise
    some or all of the rest."""
    regions = lay.regions()
    picked = [r for r in ("header_dynamic", "slots", "arena", "index0", "index1", "heap")
              if rng.random() < 0.5] or ["slots"]
    for r in picked:
        off, size = regions[r]
        buf[off:off + size] = rng.randbytes(size)
    if rng.random() < 0.8:
        write_field(buf, "closed", 0)
    return "random_body " + ",".join(picked)


SIMPLE = (mutate_fields, mutate_flips, mutate_bytes, mutate_words, mutate_slot, mutate_index,
          mutate_record)


def mutate_mix(buf: bytearray, lay: Layout, rng: random.Random) -> str:
    return "mix[" + "; ".join(rng.choice(SIMPLE)(buf, lay, rng) for _ in range(rng.randint(2, 5))) + "]"


# ---- the cases --------------------------------------------------------------


@dataclass
class Case:
    desc: str
    content: bytes | None = None  # whole-file content of the right size
    size: int | None = None       # a file of another size: its content
    raw: bytes = b""


def make_case(seed: int, pristine: bytes, lay: Layout) -> Case:
    rng = random.Random(seed)
    kind = rng.choices(
        ("random", "size", "random_body", "fields", "flips", "bytes", "words", "slot", "index",
         "record", "mix"),
        weights=(3, 4, 6, 14, 10, 8, 8, 12, 10, 10, 15),
    )[0]
    if kind == "random":
        data = bytearray(rng.randbytes(lay.total))
        how = rng.choice(("all", "magic", "identity"))
        if how != "all":  # get past the first checks of open
            end = 16 if how == "magic" else DYNAMIC_START
            data[:end] = pristine[:end]
        return Case(f"random {how}", content=bytes(data))
    if kind == "size":
        size = rng.choice((0, 1, 8, 255, 4095, 4096, 4097, lay.total - 1, lay.total + 1,
                           lay.total - 4096, lay.total + 4096, rng.randrange(1, 2 * lay.total)))
        size = max(0, size)
        if size == lay.total:
            size += 8
        how = rng.choice(("truncated", "random", "pristine_prefix_random_rest"))
        if how == "truncated":
            raw = pristine[:size] + bytes(max(0, size - len(pristine)))
        elif how == "random":
            raw = rng.randbytes(size)
        else:
            raw = (pristine[:size] + rng.randbytes(max(0, size - len(pristine))))[:size]
        return Case(f"size {size} {how}", size=size, raw=raw)
    buf = bytearray(pristine)
    fn = {"random_body": mutate_random_body, "fields": mutate_fields, "flips": mutate_flips,
          "bytes": mutate_bytes, "words": mutate_words, "slot": mutate_slot,
          "index": mutate_index, "record": mutate_record, "mix": mutate_mix}[kind]
    desc = fn(buf, lay, rng)
    if read_field(buf, "op_state") == SC_OP_COMMITTING:
        # A replace stuck "committing" makes every list() wait ~2 s before its
        # ResourceExpired: test_hostile_segments covers that once, not here.
        write_field(buf, "op_state", 3)
        desc += " (op_state 4->3)"
    return Case(desc, content=bytes(buf))


def exercise(name: str, present: list[str], absent: list[str], rng: random.Random,
             capacity: int) -> list[tuple[str, str]]:
    """The whole reader API on the segment: (operation, outcome) pairs, the
    outcome being ``ok``, a ShmCacheError subclass name or ``BAD:Name``."""
    results: list[tuple[str, str]] = []

    def attempt(label: str, fn: Callable[[], object]) -> object:
        try:
            value = fn()
        except ShmCacheError as err:
            results.append((label, type(err).__name__))
            return None
        except Exception as err:  # noqa: BLE001 - anything else is a bug
            results.append((label, f"BAD:{type(err).__name__}"))
            print(f"--- BAD {label}: {type(err).__name__}: {err}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            return None
        results.append((label, "ok"))
        return value

    try:
        reader = Reader(name)
    except ShmCacheError as err:
        return [("open", type(err).__name__)]
    except Exception as err:  # noqa: BLE001 - anything else is a bug
        print(f"--- BAD open: {type(err).__name__}: {err}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return [("open", f"BAD:{type(err).__name__}")]

    bound = 4 * capacity + 4096

    def drain(events: Iterable[object]) -> int:
        n = 0
        for _ in events:
            n += 1
            if n > bound:
                raise AssertionError(f"an interval yielded more than {bound} events")
        return n

    def drain_next(since: int, buffer_size: int) -> int:
        interval = reader.interval(since, buffer_size=buffer_size)
        n = 0
        while interval.next() is not None:
            n += 1
            if n > bound:
                raise AssertionError(f"an interval yielded more than {bound} events")
        return n

    def getter(key: str) -> Callable[[], object]:
        return lambda: reader.get(key)

    try:
        rv = attempt("resource_version", lambda: reader.resource_version)
        oldest = attempt("oldest_resource_version", lambda: reader.oldest_resource_version)
        for key in present + absent:
            attempt(f"get({key!r})", getter(key))
        attempt("list()", reader.list)
        attempt("list('a/')", lambda: reader.list("a/"))
        size = rng.choice((1, 2, 3))
        attempt("interval(0)", lambda: drain_next(0, size))
        since = oldest - 1 if isinstance(oldest, int) and oldest > 0 else 1
        attempt("interval(oldest-1)", lambda: drain_next(since, size))
        attempt("interval(1,'a/')", lambda: drain(reader.interval(1, prefix="a/", buffer_size=1)))
        if isinstance(rv, int) and rng.random() < 0.3:
            # clamped to 64 bits: test_hostile_segments's test_since_rv_beyond_64_bits_...
            # covers larger since_rv values on their own
            near = max(0, min(rv + rng.randint(-3, 1), U64))
            attempt("interval(rv-k)", lambda: drain_next(near, size))
        watch_since = rng.choice((0, since, 1))
        attempt("watch", lambda: drain(
            itertools.islice(reader.watch(watch_since, timeout=0.01, buffer_size=2), 3)))
    finally:
        reader.close()
    return results


def _pristine_keys(name: str) -> tuple[list[str], list[str]]:
    with Reader(name) as r:
        snap = r.list()
    assert snap.items, "the pristine segment has an empty store"
    keys = {i.key for i in snap.items}
    present = [i.key for i in snap.items][:4]
    absent = [k for k in ("a/0", "b/1", "ü/2", "zz", "c") if k not in keys][:2]
    return present, absent


@contextmanager
def _pristine(name: str, geometry: str, variant: str) -> Iterator[tuple[int, mmap.mmap, bytes, Layout]]:
    """Build the segment; yield (fd, read-write mmap, its pristine bytes, its layout)."""
    writer = build(name, GEOMETRIES[geometry], variant, random.Random(f"{geometry}-{variant}"))
    fd = os.open(f"/dev/shm/shmcache.{name}", os.O_RDWR)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size) as mm:
            pristine = bytes(mm)
            yield fd, mm, pristine, Layout.of(pristine)
    finally:
        os.close(fd)
        writer.close()


def run_cases(name: str, geometry: str, variant: str, first: int, count: int) -> None:
    """Seeds [first, first + count) against one pristine segment."""
    with _pristine(name, geometry, variant) as (fd, mm, pristine, lay):
        total = len(pristine)
        present, absent = _pristine_keys(name)
        # The pristine segment itself must read cleanly.
        sane = exercise(name, present, absent, random.Random(0), lay.capacity)
        assert all(o == "ok" or (o == "ResourceExpired" and op in ("interval(1,'a/')", "interval(rv-k)"))
                   for op, o in sane), f"the pristine segment does not read cleanly: {sane}"
        print(f"READY {total} {read_field(pristine, 'end_index')} {read_field(pristine, 'rv')}", flush=True)
        for seed in range(first, first + count):
            case = make_case(seed, pristine, lay)
            print(f"BEGIN {seed} {case.desc}", flush=True)
            faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
            try:
                if case.content is not None:
                    mm[:] = case.content
                else:
                    assert case.size is not None
                    os.ftruncate(fd, case.size)
                    os.pwrite(fd, case.raw, 0)
                outcome = exercise(name, present, absent, random.Random(seed), lay.capacity)
            finally:
                faulthandler.cancel_dump_traceback_later()
                if case.content is None:
                    os.ftruncate(fd, total)
                mm[:] = pristine
            print(f"END {seed} {' '.join(o for _, o in outcome)}", flush=True)


def scribble(name: str, geometry: str, variant: str, seconds: float, seed: int) -> None:
    """Keep rewriting the segment (mutations as in the cases, re-applied from
    the pristine bytes every few rounds) while readers in other processes
    read it; prints READY once the segment exists and SCRIBBLED n at the end."""
    rng = random.Random(seed)
    with _pristine(name, geometry, variant) as (_, mm, pristine, lay):
        print("READY", flush=True)
        deadline = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < deadline:
            buf = bytearray(pristine)
            rng.choice(SIMPLE)(buf, lay, rng)
            if read_field(buf, "op_state") == SC_OP_COMMITTING:
                write_field(buf, "op_state", 3)
            write_field(buf, "closed", 0)
            # flip between the two: the reader sees fields change between its loads
            for _ in range(rng.randint(1, 20)):
                mm[:] = bytes(buf) if rng.random() < 0.5 else pristine
            rounds += 1
        mm[:] = pristine
        print(f"SCRIBBLED {rounds}", flush=True)


def read_loop(name: str, seconds: float, capacity: int) -> None:
    """Reader side of scribble(): exercise the API until the deadline, one
    BEGIN/END pair per round."""
    deadline = time.monotonic() + seconds
    rng = random.Random(1)
    present, absent = ["a/0", "a/1", "b/0", "c"], ["zz"]
    n = 0
    while time.monotonic() < deadline:
        print(f"BEGIN {n} round", flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
        outcome = exercise(name, present, absent, rng, capacity)
        faulthandler.cancel_dump_traceback_later()
        print(f"END {n} {' '.join(o for _, o in outcome)}", flush=True)
        n += 1


def main(argv: list[str] | None = None) -> None:
    """``cases NAME GEOMETRY VARIANT FIRST COUNT`` | ``scribble NAME GEOMETRY
    VARIANT SECONDS SEED`` | ``readloop NAME SECONDS CAPACITY``."""
    args = sys.argv[1:] if argv is None else argv
    faulthandler.enable()
    mode = args[0]
    if mode == "cases":
        run_cases(args[1], args[2], args[3], int(args[4]), int(args[5]))
    elif mode == "scribble":
        scribble(args[1], args[2], args[3], float(args[4]), int(args[5]))
    elif mode == "readloop":
        read_loop(args[1], float(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
