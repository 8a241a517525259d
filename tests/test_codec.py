"""The C codec behind put_many and interval refills, and RawBatch: the fast
paths must behave exactly like the Python reference they replace."""

from __future__ import annotations

import gc
import pickle
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache import (
    CacheFull,
    Event,
    EventType,
    InvalidKey,
    InvalidSize,
    Item,
    RawBatch,
    Reader,
    ResourceExpired,
    ValueTooLarge,
    Writer,
    _codec,
)

SMALL: dict[str, Any] = {"capacity": 16, "arena_bytes": 4096, "max_keys": 8, "store_bytes": 4096}
MANY_KEYS: dict[str, Any] = {"capacity": 16, "arena_bytes": 4096, "max_keys": 16, "store_bytes": 4096}
META = struct.Struct("<QIIII")
TYPES: tuple[EventType, ...] = (EventType.ADDED, EventType.MODIFIED, EventType.DELETED)

EventTuple = tuple[EventType, str, bytes, int]


def record_size(key_len: int, value_len: int) -> int:
    """A store record: 24-byte header, key, value, padded to 8."""
    return (24 + key_len + value_len + 7) // 8 * 8


def state(reader: Reader) -> tuple[object, int]:
    return reader.list(), reader.resource_version


def as_tuples(events: list[Event]) -> list[EventTuple]:
    return [(e.type, e.key, e.value, e.rv) for e in events]


def pack(records: list[tuple[int, int, bytes, bytes]]) -> tuple[bytes, bytes]:
    """(meta, data) of (rv, type, key, value) records, laid out as the ring
    copy lays them out."""
    meta = b"".join(META.pack(rv, t, len(k), len(v), 0) for rv, t, k, v in records)
    return meta, b"".join(k + v for _, _, k, v in records)


# ---- put_many: bad items ----------------------------------------------------

# geometry SMALL: arena 4,096 bytes, largest store record 2,048 bytes
BAD_ITEMS: list[tuple[str, object, type[Exception]]] = [
    ("list not tuple", ["k", b"v"], TypeError),
    ("1-tuple", ("k",), TypeError),
    ("3-tuple", ("k", b"v", b"w"), TypeError),
    ("bytes key", (b"k", b"v"), TypeError),
    ("int key", (7, b"v"), TypeError),
    ("empty key", ("", b"v"), InvalidKey),
    ("1025-byte key", ("\u00e9" * 512 + "a", b"v"), InvalidKey),
    ("lone surrogate", ("a\ud800", b"v"), InvalidKey),
    ("str value", ("k", "v"), TypeError),
    ("int value", ("k", 1), TypeError),
    ("beyond the arena", ("big", b"x" * 4094), ValueTooLarge),
    ("beyond half the store", ("big", b"x" * 2030), ValueTooLarge),
]

# valid items around the bad one; the unusual ones make the fast path give up
# before reaching it, so the reference path alone must find the bad item
PLAIN_FILLERS: list[tuple[str, Any]] = [("a", b"x"), ("c", b"3"), ("b", None), ("a", b"y")]
UNUSUAL_FILLERS: list[tuple[str, Any]] = [("a", bytearray(b"x")), ("c", memoryview(b"3")),
                                          ("b", None), ("a", b"y")]


@pytest.mark.parametrize("fillers", ["plain", "unusual"])
@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize(("label", "bad", "expected"), BAD_ITEMS, ids=[b[0] for b in BAD_ITEMS])
def test_bad_item_raises_like_the_reference_and_changes_nothing(
        name: str, label: str, bad: object, expected: type[Exception], position: int,
        fillers: str) -> None:
    batch: list[Any] = list(PLAIN_FILLERS if fillers == "plain" else UNUSUAL_FILLERS)
    batch.insert(position, bad)
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("a", b"1")
        w.put("b", b"2")
        before = state(r)
        fast = _codec.encode_batch(batch, w.geometry.arena_bytes, w.geometry.max_record)
        if fillers == "plain":
            assert fast == position, label
        else:
            assert isinstance(fast, int) and fast <= position, label
        with pytest.raises(Exception) as reference:
            w._encode_batch(batch)
        with pytest.raises(expected) as info:
            w.put_many(batch)
        assert type(info.value) is type(reference.value) is expected, label
        assert state(r) == before
        assert list(r.interval(before[1])) == []


def test_keys_at_the_limits_are_taken(name: str) -> None:
    longest = "\u00e9" * 512  # 1,024 UTF-8 bytes
    with Writer(name, **SMALL) as w, Reader(name) as r:
        fitting = b"x" * (w.geometry.max_record - 24 - 3)  # a record of exactly max_record
        assert w.put_many([(longest, b"v"), ("big", fitting)]) == 2
        assert r.get(longest) == Item(longest, b"v", 1)
        assert r.get("big") == Item("big", fitting, 2)


# ---- put_many: valid batches ------------------------------------------------


class Pair(NamedTuple):
    key: str
    value: bytes | bytearray | memoryview | None


def test_bytes_like_values_are_stored_exactly(name: str) -> None:
    strided = memoryview(b"a-b-c-")[::2]  # not contiguous
    batch: list[tuple[str, bytes | bytearray | memoryview | None]] = [
        ("bytes", b"\x00\xff"),
        ("bytearray", bytearray(b"ba\x00")),
        ("memoryview", memoryview(b"xxmv")[2:]),
        ("strided", strided),
        ("empty", b""),
        Pair("pair", b"tuple subclass"),
    ]
    with Writer(name, **SMALL) as w, Reader(name) as r:
        assert w.put_many(batch) == 6
        assert [(i.key, i.value, i.rv) for i in r.list().items] == sorted([
            ("bytes", b"\x00\xff", 1), ("bytearray", b"ba\x00", 2), ("memoryview", b"mv", 3),
            ("strided", b"abc", 4), ("empty", b"", 5), ("pair", b"tuple subclass", 6)])
        for e in r.interval(0):
            assert type(e.value) is bytes


def test_generator_and_tuple_of_items(name: str) -> None:
    def gen() -> Iterator[tuple[str, bytes | None]]:
        yield ("g1", b"1")
        yield ("g2", b"2")
        yield ("g1", None)

    with Writer(name, **SMALL) as w, Reader(name) as r:
        assert w.put_many(gen()) == 3
        assert w.put_many((("t1", b"x"), ("t2", b"y"))) == 5
        assert [(i.key, i.value) for i in r.list().items] == [("g2", b"2"), ("t1", b"x"), ("t2", b"y")]
        assert [(e.type, e.key, e.value, e.rv) for e in r.interval(2)] == [
            (EventType.DELETED, "g1", b"1", 3), (EventType.ADDED, "t1", b"x", 4),
            (EventType.ADDED, "t2", b"y", 5)]


def test_empty_batch_returns_current_rv(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        assert w.put_many([]) == 0
        w.put("a", b"1", rv=41)
        before = state(r)
        assert w.put_many([]) == 41
        assert w.put_many(()) == 41
        assert w.put_many(iter([])) == 41
        assert state(r) == before == (r.list(), 41)


@pytest.mark.parametrize("existing", [False, True])
def test_put_delete_put_in_one_batch(name: str, existing: bool) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("other", b"o")  # since_rv 0 would ask for a snapshot
        if existing:
            w.put("k", b"0")
        since = r.resource_version
        last = w.put_many([("k", b"1"), ("k", None), ("k", b"2")])
        assert last == since + 3
        assert as_tuples(list(r.interval(since))) == [
            (EventType.MODIFIED if existing else EventType.ADDED, "k", b"1", since + 1),
            (EventType.DELETED, "k", b"1", since + 2),
            (EventType.ADDED, "k", b"2", since + 3),
        ]
        assert r.get("k") == Item("k", b"2", last)
        assert r.list().items == [Item("k", b"2", last), Item("other", b"o", 1)]


def test_delete_twice_in_one_batch(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("a", b"1")
        w.put("b", b"2")
        before = state(r)
        with pytest.raises(KeyError) as info:
            w.put_many([("c", b"3"), ("b", None), ("a", b"9"), ("b", None)])
        assert info.value.args == ("b",)
        assert state(r) == before
        # put back in between: then the second delete is fine
        assert w.put_many([("b", None), ("b", b"3"), ("b", None)]) == before[1] + 3
        assert [i.key for i in r.list().items] == ["a"]


def test_key_error_names_the_failing_key(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put("present", b"1")
        before = state(r)
        for batch, missing in (
            ([("absent", None)], "absent"),
            ([("present", None), ("new", b"1"), ("other", None)], "other"),
            ([("new", b"1"), ("new", None), ("present", b"2"), ("new", None)], "new"),
        ):
            with pytest.raises(KeyError) as info:
                w.put_many(batch)
            assert info.value.args == (missing,)
            assert state(r) == before


def test_cache_full_by_keys_at_the_exact_step(name: str) -> None:
    with Writer(name, capacity=64, arena_bytes=1 << 14, max_keys=4, store_bytes=4096) as w, \
            Reader(name) as r:
        assert w.put_many([(f"k{i}", b"v") for i in range(4)]) == 4
        assert w.put_many([("k0", None), ("k4", b"v")]) == 6  # fits: 4 keys throughout
        before = state(r)
        for batch, adding in (
            ([("k1", None), ("k5", b"v"), ("k6", b"v")], "k6"),
            ([("k5", b"v"), ("k1", None)], "k5"),  # the delete comes one step too late
            ([("k1", None), ("k1", b"v"), ("k2", b"w"), ("k7", b"v")], "k7"),
        ):
            with pytest.raises(CacheFull, match=f"adding '{adding}'"):
                w.put_many(batch)
            assert state(r) == before
        # re-adding a key deleted in the same batch takes its place back
        assert w.put_many([("k1", None), ("k1", b"again"), ("k2", None), ("k5", b"v")]) == 10
        assert [i.key for i in r.list().items] == ["k1", "k3", "k4", "k5"]


def test_cache_full_by_bytes(name: str) -> None:
    with Writer(name, capacity=64, arena_bytes=1 << 14, max_keys=8, store_bytes=1024) as w, \
            Reader(name) as r:
        assert w.geometry.max_record == 512
        w.put_many([(f"k{i}", b"v" * 200) for i in range(4)])
        base = record_size(2, 200)
        assert 4 * base == 928
        before = state(r)
        grown = b"g" * 300
        too_big = b"g" * 303
        assert 3 * base + record_size(2, len(grown)) == 1024
        assert 3 * base + record_size(2, len(too_big)) == 1032
        for batch, putting in (
            ([("k1", too_big)], "k1"),
            ([("k1", grown), ("k2", grown)], "k2"),  # each alone fits
            ([("k1", too_big), ("k0", None)], "k1"),  # the room comes one step too late
            ([("k0", None), ("k4", b"v" * 200), ("k5", b"v" * 100)], "k5"),
        ):
            with pytest.raises(CacheFull, match=f"putting '{putting}'"):
                w.put_many(batch)
            assert state(r) == before
        assert w.put_many([("k1", grown)]) == before[1] + 1  # exactly store_bytes
        assert w.put_many([("k0", None), ("k2", too_big)]) == before[1] + 3
        assert r.get("k2") == Item("k2", too_big, before[1] + 3)


# ---- put_many: fast path against the reference -------------------------------

KEYS = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12),
    st.integers(1000, 1024).map(lambda n: "k" * n),
    st.integers(1, 341).map(lambda n: "\u20ac" * n),  # 3 UTF-8 bytes a character
)
VALID_ITEMS = st.tuples(KEYS, st.one_of(st.none(), st.binary(max_size=300)))
INVALID_ITEMS = st.sampled_from([b for _, b, _ in BAD_ITEMS])


def test_fast_path_equals_reference_on_valid_batches(name: str) -> None:
    with Writer(name, **SMALL) as w:
        arena, max_record = w.geometry.arena_bytes, w.geometry.max_record

        @settings(max_examples=200, deadline=None, database=None)
        @given(st.lists(VALID_ITEMS, max_size=30))
        def check(items: list[tuple[str, bytes | None]]) -> None:
            fast = _codec.encode_batch(items, arena, max_record)
            assert not isinstance(fast, int)
            blob, ops = fast
            ref_blob, ref_ops = w._encode_batch(items)
            assert type(blob) is bytes and type(ops) is bytes
            assert blob == ref_blob and ops == ref_ops
            assert len(ops) == 16 * len(items)

        check()


def test_fast_path_gives_up_at_or_before_an_invalid_item(name: str) -> None:
    with Writer(name, **SMALL) as w:
        arena, max_record = w.geometry.arena_bytes, w.geometry.max_record

        @settings(max_examples=100, deadline=None, database=None)
        @given(st.lists(VALID_ITEMS, max_size=20), INVALID_ITEMS, st.data())
        def check(items: list[Any], bad: object, data: st.DataObject) -> None:
            at = data.draw(st.integers(0, len(items)))
            items = [*items[:at], bad, *items[at:]]
            fast = _codec.encode_batch(items, arena, max_record)
            assert isinstance(fast, int) and 0 <= fast <= at
            with pytest.raises((TypeError, InvalidKey, ValueTooLarge)):
                w._encode_batch(items)

        check()


# ---- decode_events ----------------------------------------------------------


def test_decode_good_records() -> None:
    meta, data = pack([
        (5, 1, b"a", b""),
        (6, 2, "\u00e9/k".encode(), b"\x00value"),
        (1 << 63, 3, b"z" * 1024, b"v" * 5000),
    ])
    for m, d in ((meta, data), (bytearray(meta), memoryview(data)), (memoryview(meta), bytearray(data))):
        events = _codec.decode_events(m, d, 3, 4, Event, TYPES)
        assert events == [
            Event(EventType.ADDED, "a", b"", 5),
            Event(EventType.MODIFIED, "\u00e9/k", b"\x00value", 6),
            Event(EventType.DELETED, "z" * 1024, b"v" * 5000, 1 << 63),
        ]
        for ev in events:
            assert type(ev) is Event
            assert type(ev.type) is EventType and ev.type in TYPES
            assert type(ev.key) is str and type(ev.value) is bytes and type(ev.rv) is int
            assert hash(ev) == hash(tuple(ev))
            assert ev == Event(*ev) and ev == tuple(ev)
            assert pickle.loads(pickle.dumps(ev)) == ev
            assert ev._replace(value=b"new") == Event(ev.type, ev.key, b"new", ev.rv)
            assert ev._asdict()["key"] == ev.key
        assert {events[0]: 1}[Event(EventType.ADDED, "a", b"", 5)] == 1


def test_decode_fewer_than_the_meta_holds() -> None:
    meta, data = pack([(1, 1, b"a", b"1"), (2, 1, b"b", b"2"), (0, 9, b"", b"")])
    assert _codec.decode_events(meta, data, 2, 0, Event, TYPES) == [
        Event(EventType.ADDED, "a", b"1", 1), Event(EventType.ADDED, "b", b"2", 2)]


def test_decode_count_zero() -> None:
    assert _codec.decode_events(b"", b"", 0, 0, Event, TYPES) == []
    meta, data = pack([(1, 1, b"a", b"1")])
    assert _codec.decode_events(meta, data, 0, 7, Event, TYPES) == []


@pytest.mark.parametrize(("records", "last_rv"), [
    ([(5, 1, b"a", b""), (5, 1, b"b", b"")], 0),  # equal
    ([(5, 1, b"a", b""), (4, 1, b"b", b"")], 0),  # lower
    ([(5, 1, b"a", b"")], 5),  # not above last_rv
    ([(5, 1, b"a", b"")], 9),
    ([(0, 1, b"a", b"")], 0),
    ([(3, 1, b"a", b""), (7, 2, b"b", b""), (6, 3, b"c", b"")], 2),
], ids=["equal", "lower", "at-last-rv", "below-last-rv", "zero", "third"])
def test_decode_rv_not_increasing(records: list[tuple[int, int, bytes, bytes]], last_rv: int) -> None:
    meta, data = pack(records)
    with pytest.raises(ValueError, match="resource versions go backwards"):
        _codec.decode_events(meta, data, len(records), last_rv, Event, TYPES)


@pytest.mark.parametrize("bad_type", [0, 4, 1 << 31])
def test_decode_bad_type(bad_type: int) -> None:
    meta, data = pack([(1, 1, b"a", b"1"), (2, bad_type, b"b", b"2")])
    with pytest.raises(ValueError, match="an event of type"):
        _codec.decode_events(meta, data, 2, 0, Event, TYPES)


@pytest.mark.parametrize(("key_len", "value_len"), [
    (3, 0), (2, 1), (0, 3), (1 << 31, 0), (1, (1 << 32) - 1), ((1 << 32) - 1, (1 << 32) - 1),
])
def test_decode_lengths_past_the_data(key_len: int, value_len: int) -> None:
    # the data holds "a1" of the first event and "bb" of the second
    meta = META.pack(1, 1, 1, 1, 0) + META.pack(2, 1, key_len, value_len, 0)
    with pytest.raises(ValueError, match="runs past"):
        _codec.decode_events(meta, b"a1bb", 2, 0, Event, TYPES)


@pytest.mark.parametrize("count", [2, 3, 1 << 40])
def test_decode_count_beyond_the_meta(count: int) -> None:
    meta, data = pack([(1, 1, b"a", b"1")])
    with pytest.raises(ValueError, match="do not fit"):
        _codec.decode_events(meta + b"\x00" * 23, data, count, 0, Event, TYPES)


def test_decode_negative_count() -> None:
    with pytest.raises(ValueError):
        _codec.decode_events(b"", b"", -1, 0, Event, TYPES)


@pytest.mark.parametrize("key", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_decode_key_not_utf8(key: bytes) -> None:
    meta, data = pack([(1, 1, b"good", b"value"), (2, 2, key, b"v"), (3, 1, b"after", b"")])
    with pytest.raises(UnicodeDecodeError) as info:
        _codec.decode_events(meta, data, 3, 0, Event, TYPES)
    assert isinstance(info.value, ValueError)
    gc.collect()  # the half-built event was released without harm


# ---- intervals decoded by the codec ----------------------------------------

SIZES: dict[str, list[int]] = {
    "0": [0] * 40,
    "1": [1] * 40,
    "100": [100] * 40,
    "1KiB": [1024] * 40,
    "16KiB": [16384] * 40,
    "mixed": [0, 1, 100] * 10 + [16384] * 6 + [1, 1024] * 5 + [16384, 0] * 3 + [100] * 8,
}
RING: dict[str, Any] = {"capacity": 128, "arena_bytes": 1 << 21, "max_keys": 16, "store_bytes": 1 << 20}


def write_events(w: Writer, sizes: list[int]) -> list[EventTuple]:
    """Puts (and every fifth step a delete) of values of ``sizes``; the
    events they make."""
    store: dict[str, bytes] = {}
    made: list[EventTuple] = []
    for i, size in enumerate(sizes):
        key = f"k{i % 7}"
        if i % 5 == 4 and key in store:
            rv = w.delete(key)
            made.append((EventType.DELETED, key, store.pop(key), rv))
            continue
        value = bytes([i % 251]) * size
        rv = w.put(key, value)
        made.append((EventType.MODIFIED if key in store else EventType.ADDED, key, value, rv))
        store[key] = value
    return made


@pytest.mark.parametrize("buffer_size", [1, 3, 100, 1000])
@pytest.mark.parametrize("sizes", list(SIZES), ids=list(SIZES))
def test_interval_yields_what_was_written(name: str, sizes: str, buffer_size: int) -> None:
    with Writer(name, **RING) as w, Reader(name) as r:
        w.put("before", b"x")
        since = r.resource_version
        made = write_events(w, SIZES[sizes])
        assert as_tuples(list(r.interval(since, buffer_size=buffer_size))) == made
        stepped = r.interval(since, buffer_size=buffer_size)
        one_by_one: list[Event] = []
        while (ev := stepped.next()) is not None:
            one_by_one.append(ev)
        assert as_tuples(one_by_one) == made
        raw = [b for b in r.interval(since, buffer_size=buffer_size).raw_batches()]
        assert all(1 <= b.count <= buffer_size for b in raw)
        assert sum(b.count for b in raw) == len(made)


def test_copy_buffer_grows_for_big_values_after_small_ones(name: str) -> None:
    with Writer(name, **RING) as w, Reader(name) as r:
        made = write_events(w, [10] * 100 + [16384] * 20 + [3] * 5)
        iv = r.interval(1, buffer_size=1000)
        assert as_tuples(list(iv)) == made[1:]
        batches = [b.events() for b in r.interval(1, buffer_size=1000).raw_batches()]
        assert as_tuples([e for b in batches for e in b]) == made[1:]


# ---- raw batches ------------------------------------------------------------


def check_batch(batch: RawBatch, buffer_size: int) -> None:
    records = list(batch.records())
    assert batch.count == len(batch) == len(records) <= buffer_size
    assert len(batch.meta) == META.size * batch.count
    assert sum(kl + vl for _, _, kl, vl, _ in records) == len(batch.data)
    assert all(reserved == 0 for *_, reserved in records)
    assert batch.last_rv == records[-1][0]
    assert [rv for rv, *_ in records] == sorted({rv for rv, *_ in records})


@pytest.mark.parametrize("buffer_size", [1, 2, 7, 100])
def test_raw_batches_equal_the_events(name: str, buffer_size: int) -> None:
    with Writer(name, **RING) as w, Reader(name) as r:
        write_events(w, SIZES["mixed"])
        since = 3
        expected = list(r.interval(since, buffer_size=buffer_size))
        got: list[Event] = []
        for batch in r.interval(since, buffer_size=buffer_size).raw_batches():
            check_batch(batch, buffer_size)
            got.extend(batch.events())
            assert got[-1].rv == batch.last_rv
        assert got == expected and len(got) == len(SIZES["mixed"]) - since


def test_raw_batches_after_next(name: str) -> None:
    with Writer(name, **MANY_KEYS) as w, Reader(name) as r:
        w.put_many([(f"k{i}", str(i).encode()) for i in range(14)])
        expected = list(r.interval(2, buffer_size=4))
        iv = r.interval(2, buffer_size=4)
        first = [iv.next(), iv.next()]
        assert first == expected[:2]
        batches = iv.raw_batches()
        rest = next(batches)
        assert rest.count == 2  # the rest of the current buffer alone
        got = [e for e in first if e is not None] + rest.events()
        for batch in batches:
            check_batch(batch, 4)
            got.extend(batch.events())
        assert got == expected
        assert iv.next() is None


def test_next_after_raw_batches(name: str) -> None:
    with Writer(name, **MANY_KEYS) as w, Reader(name) as r:
        w.put_many([(f"k{i}", str(i).encode()) for i in range(14)])
        expected = list(r.interval(2, buffer_size=4))
        iv = r.interval(2, buffer_size=4)
        batches = iv.raw_batches()
        got = next(batches).events()
        assert len(got) == 4
        after = iv.next()
        assert after is not None
        got.append(after)
        got.extend(e for b in iv.raw_batches() for e in b.events())
        assert got == expected


def test_raw_batches_of_a_snapshot(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put_many([("b", b"2"), ("a", b"1"), ("c", b"333"), ("b", None)])
        batches = list(r.interval(0, buffer_size=1).raw_batches())
        assert len(batches) == 1
        (batch,) = batches
        assert batch.count == 2 and batch.last_rv == 4
        assert list(batch.records()) == [(4, EventType.ADDED, 1, 1, 0), (4, EventType.ADDED, 1, 3, 0)]
        assert bytes(batch.data) == b"a1c333"
        w.delete("c")
        (single,) = list(r.interval(0).raw_batches())
        assert single.events() == [Event(EventType.ADDED, "a", b"1", 5)]
        w.delete("a")
        assert list(r.interval(0).raw_batches()) == []


def test_raw_batch_events_of_a_snapshot(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put_many([("a", b"1"), ("b", b"2")])
        (batch,) = list(r.interval(0).raw_batches())
        assert batch.events() == list(r.interval(0))


def test_raw_batches_of_a_prefix(name: str) -> None:
    with Writer(name, **RING) as w, Reader(name) as r:
        keys = ["pods/a", "svc/x", "pods/b", "podsx", "pods/", "p", "svc/pods/a"]
        for i in range(60):
            w.put(keys[i % len(keys)], b"v" * (i * 37 % 500))
        expected = list(r.interval(1, prefix="pods/", buffer_size=3))
        assert {e.key for e in expected} == {"pods/a", "pods/b", "pods/"}
        got: list[Event] = []
        for batch in r.interval(1, prefix="pods/", buffer_size=3).raw_batches():
            check_batch(batch, 3)
            data, pos = bytes(batch.data), 0
            for _, _, kl, vl, _ in batch.records():
                assert data[pos:pos + kl].startswith(b"pods/")
                pos += kl + vl
            got.extend(batch.events())
        assert got == expected


def test_raw_batches_overtaken_by_the_writer(name: str) -> None:
    with Writer(name, capacity=8, arena_bytes=4096, max_keys=8, store_bytes=4096) as w, \
            Reader(name) as r:
        for i in range(8):
            w.put(f"k{i}", b"v")
        iv = r.interval(1, buffer_size=2)
        batches = iv.raw_batches()
        first = next(batches)
        assert [rv for rv, *_ in first.records()] == [2, 3]
        for i in range(50):
            w.put(f"k{i % 8}", b"w")
        with pytest.raises(ResourceExpired):
            next(batches)


def test_continuation_after_raw_batches(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
        iv = r.interval(1, buffer_size=2)
        drained = [e for b in iv.raw_batches() for e in b.events()]
        assert [e.rv for e in drained] == [2, 3]
        assert list(iv.raw_batches()) == [] and iv.next() is None
        w.put("d", b"4")
        w.delete("a")
        cont = iv.continuation()
        assert cont.resource_version == 3
        got = [e for b in cont.raw_batches() for e in b.events()]
        assert as_tuples(got) == [(EventType.ADDED, "d", b"4", 4), (EventType.DELETED, "a", b"1", 5)]
        w.put("e", b"5")
        assert list(cont.continuation()) == [Event(EventType.ADDED, "e", b"5", 6)]


def test_raw_batches_of_a_partly_consumed_snapshot(name: str) -> None:
    with Writer(name, **SMALL) as w, Reader(name) as r:
        w.put_many([("a", b"1"), ("b", b"2"), ("c", b"3"), ("d", b"4")])
        interval = r.interval(0)
        first = interval.next()
        rest = [e for batch in interval.raw_batches() for e in batch.events()]
        assert [first, *rest] == list(r.interval(0))
        assert [e.key for e in rest] == ["b", "c", "d"]


# ---- the decoder's key cache and the batch views -------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=70), min_size=1, max_size=300))
def test_decoded_keys_are_the_keys_whatever_the_cache_holds(keys: list[str]) -> None:
    # the decoder hands out cached str objects for keys it decoded before;
    # a cache slot shared by two keys (same hash bucket) must never mix them up
    records = [(i + 1, 1, k.encode(), b"") for i, k in enumerate(keys)]
    meta, data = pack(records)
    for _ in range(2):  # the second pass is served from the cache where it can be
        events = _codec.decode_events(meta, data, len(records), 0, Event, TYPES)
        assert [e.key for e in events] == keys


def test_key_cache_with_more_keys_than_slots() -> None:
    # 20,000 distinct keys of one length: every cache slot is reused many times
    keys = [f"key/{i:06d}".encode() for i in range(20_000)]
    meta, data = pack([(i + 1, 2, k, b"v") for i, k in enumerate(keys)])
    for _ in range(2):
        events = _codec.decode_events(meta, data, len(keys), 0, Event, TYPES)
        assert [e.key.encode() for e in events] == keys
    bad = pack([(1, 1, keys[0], b""), (2, 1, b"\xff" + keys[0][1:], b"")])
    with pytest.raises(UnicodeDecodeError):
        _codec.decode_events(bad[0], bad[1], 2, 0, Event, TYPES)


def test_watch_batches_and_interval_batches(name: str) -> None:
    with Writer(name, capacity=64, arena_bytes=1 << 14, max_keys=64, store_bytes=1 << 14) as w, \
            Reader(name) as r:
        with pytest.raises(TypeError):
            r.watch_batches("1")  # type: ignore[arg-type]
        with pytest.raises(InvalidSize):
            r.watch_batches(0, timeout=-1)
        w.put_many([(f"k{i}", b"v") for i in range(25)])
        batches = list(r.interval(5, buffer_size=7).batches())
        assert [len(b) for b in batches] == [7, 7, 6]
        assert [e.rv for b in batches for e in b] == list(range(6, 26))
        seen: list[Event] = []
        for batch in r.watch_batches(20, timeout=0.2, buffer_size=3):
            assert 1 <= len(batch) <= 3
            seen.extend(batch)
            if batch[-1].rv == 25:
                w.put("later", b"x")
        assert [e.rv for e in seen] == [21, 22, 23, 24, 25, 26]
        assert seen[-1].key == "later"
        # a snapshot first, then the events after it
        snap = next(iter(r.watch_batches(0, timeout=0.1)))
        assert {e.key for e in snap} == {f"k{i}" for i in range(25)} | {"later"}
