"""The reader side: a read-only mapping, served without any lock or IPC.

Readers never write the segment (PROT_READ) and never touch the semaphore.
Every answer is either validated after the copy that produced it (the
seqlock-like re-read of startIndex, heap_tail or index_gen: docs/design.md)
or discarded.  Everything read from the segment is treated as untrusted.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

from . import _codec
from ._events import Event, EventType, Item, Snapshot
from ._figures import Figures, heartbeat_age_of, read_figures, recorded_socket_path
from ._layout import check_name, open_segment
from ._native import ffi, lib
from ._rules import encode_key, encode_prefix
from ._trust import OwnerSpec, trusted_owners
from .exceptions import (
    CacheClosed,
    CacheCorrupted,
    InvalidSize,
    ResourceExpired,
    ResourceVersionTooLarge,
)

__all__ = ["Interval", "RawBatch", "Reader"]

_META = struct.Struct("<QIIII")
_EVENT_TYPES = (EventType.ADDED, EventType.MODIFIED, EventType.DELETED)
_new_event = tuple.__new__
#: what watch_batches() and Interval.batches() yield (``list`` is a method name in Reader)
_Batch = list[Event]
#: copy buffers are written before they are read: zeroing them is wasted
_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)
LIST_ATTEMPTS = 8
MAX_BUFFER_SIZE = 1 << 16
#: an interval's payload buffer grows to hold buffer_size events, up to this
#: (a bigger single event still fits: the buffer then takes its size); past a
#: few hundred KiB a copy's fixed cost is amortised, so more only costs memory
MAX_BUFFER_BYTES = 1 << 20
#: payload bytes an event a new buffer starts with: a key and a value of
#: about 100 bytes fit, so a typical first refill is not cut short
INITIAL_EVENT_BYTES = 128
WINDOW_ATTEMPTS = 1000
#: seconds watch() waits for a since_rv the cache has not reached yet
#: (Kubernetes' watch cache waits 3 s before "too large resource version")
FRESH_WAIT = 3.0
MAX_RV = (1 << 63) - 1
U64_MAX = (1 << 64) - 1
#: get() attempts; one repeats only when the store moved on meanwhile (or a
#: copy kept being overtaken), so running out needs a writer that never stops
GET_ATTEMPTS = 1000
#: _newer_from_ring's answer "ask the store again"
_STORE_MOVED = object()
_OFF_EPOCH = ffi.offsetof("struct sc_header", "epoch")
_OFF_RV = ffi.offsetof("struct sc_header", "rv")
_OFF_STORE_RV = ffi.offsetof("struct sc_header", "store_rv")
_OFF_INDEX_GEN = ffi.offsetof("struct sc_header", "index_gen")
_OFF_OP_STATE = ffi.offsetof("struct sc_header", "op_state")
_OFF_HEARTBEAT = ffi.offsetof("struct sc_header", "heartbeat_ms")
#: notify_seq is the low half (little-endian) of an 8-byte aligned word
_OFF_NOTIFY = ffi.offsetof("struct sc_header", "notify_seq")




class Reader:
    """Reads cache ``name`` through a read-only mapping.

    CacheNotFound if there is no such cache; CacheNotTrusted if its segment
    belongs to a uid this process does not trust, or may be written by others
    (``owner``: whom to trust besides root and this uid, see _trust.py; by
    default ``$SHMCACHE_OWNER``, else the ``shmcache`` system user);
    CacheCorrupted if the segment is not one this library can read safely.  Every method raises CacheClosed
    once the owner closed the cache (or replaced it with a newer segment), or
    after :meth:`close`.  A Reader is meant for one thread at a time, with
    one exception: :meth:`close` may come from any thread, and ends every
    watch of every thread with CacheClosed.

    Python code never touches the mapping itself: every read of it is a C
    call that enters a guard (``sc_layout.users``), which ``close()`` waits to
    be empty before it unmaps, so no thread can be left reading memory that
    is gone.
    """

    def __init__(self, name: str, *, owner: OwnerSpec | None = None) -> None:
        self.name = check_name(name)
        self._map = open_segment(self.name, writable=False, owners=trusted_owners(owner))
        m = self._map
        self.geometry = m.geometry
        self._layout: Any = m.layout
        self._detached = False
        self._out_load = ffi.new("uint64_t[1]")
        self.epoch = self._load(_OFF_EPOCH)
        self._out = ffi.new("uint64_t[4]")  # results of the sc_* calls
        self._out_rv = self._out + 1
        self._out_seen = self._out + 2
        self._out32 = ffi.new("uint32_t[1]")
        self._win = ffi.new("uint64_t[5]")
        self._value_buf: Any = ffi.new("uint8_t[]", 4096)
        self._value_cap = 4096

    # ---- state -----------------------------------------------------------

    def _closed_error(self) -> CacheClosed:
        """What a reader C call's SC_CLOSED (or SC_WAIT_CLOSED) means here."""
        if self._detached:
            return CacheClosed(f"reader of {self.name!r} is closed")
        return CacheClosed(f"cache {self.name!r} was closed by its owner; reopen it")

    def _load(self, offset: int) -> int:
        """The 8 bytes at ``offset`` of the header (load-acquire)."""
        rc = lib.sc_header_load(self._layout, offset, self._out_load)
        if rc != lib.SC_OK:
            raise self._closed_error()
        return int(self._out_load[0])

    def _check_alive(self) -> None:
        if lib.sc_header_load(self._layout, _OFF_RV, self._out_load) != lib.SC_OK:
            raise self._closed_error()

    @property
    def resource_version(self) -> int:
        """The newest published resource version."""
        return self._load(_OFF_RV)

    def figures(self) -> Figures:
        """The cache's figures now (see Figures for what is consistent)."""
        return read_figures(self.name, self._layout, self.geometry, self._closed_error)

    def header_copy(self) -> Any:
        """A private copy of the segment's header (``struct sc_header``), for
        tests and diagnostics that need what :meth:`figures` does not show
        (the lock word, ``op_state``); fields of concurrent writes may be
        mutually inconsistent, and their names are the C struct's."""
        copy = ffi.new("struct sc_header *")
        if lib.sc_header_copy(self._layout, copy) != lib.SC_OK:
            raise self._closed_error()
        return copy

    @property
    def socket_path(self) -> str:
        """The producer socket the owning daemon advertises ("" if none)."""
        return recorded_socket_path(self.header_copy())

    @property
    def heartbeat_age(self) -> float | None:
        """Seconds since the owning daemon last refreshed its heartbeat, or
        None if no daemon ever did."""
        return heartbeat_age_of(self._load(_OFF_HEARTBEAT))

    @property
    def oldest_resource_version(self) -> int:
        """The effective oldest resource version: that of the oldest event
        still held, except right after a replace at r with no eviction since,
        where it is r + 1, and for an empty ring after events at up to rv
        (a writer died making room), where it is rv + 1; 0 for a ring that
        never held an event."""
        self._check_alive()
        return self._window()[2]

    def _window(self) -> tuple[int, int, int]:
        """A consistent (start_index, end_index, oldest) of the ring (the
        oldest as oldest_resource_version defines it)."""
        w = self._win
        rc = lib.sc_ring_window(self._layout, w)
        if rc != lib.SC_OK:
            if rc == lib.SC_CLOSED:
                raise self._closed_error()
            raise CacheCorrupted(f"cache {self.name!r}: the ring's indices never read consistently")
        return int(w[0]), int(w[1]), int(w[2])

    def _replaced_at(self) -> tuple[int, int]:
        """(replace_index, replace_rv) of the window last read by _window()."""
        w = self._win
        return int(w[3]), int(w[4])

    # ---- get / list --------------------------------------------------------

    def get(self, key: str) -> Item | None:
        """The key's current value and resource version, or None.  O(1) and
        lock-free.  Never older than an event a watcher of this cache has
        already been served (see docs/design.md, "get")."""
        raw = encode_key(key)
        out = self._out
        rc = lib.SC_RETRY
        for _ in range(GET_ATTEMPTS):
            rc = lib.sc_store_get(self._layout, raw, len(raw), self._value_buf, self._value_cap,
                                  out, self._out_rv, self._out_seen)
            if rc == lib.SC_OK or rc == lib.SC_NOTFOUND:
                item = (_new_event(Item, (key, ffi.buffer(self._value_buf, out[0])[:], out[1]))
                        if rc == lib.SC_OK else None)
                if out[3] <= out[2]:
                    return item
                # the ring is ahead of the store
                answer = self._newer_from_ring(key, raw, int(out[2]), item)
                if answer is not _STORE_MOVED:
                    return answer  # type: ignore[return-value]
                continue
            if rc == lib.SC_NOSPACE and out[0] <= self.geometry.max_record:
                self._value_cap = max(int(out[0]), 2 * self._value_cap)
                self._value_buf = ffi.new("uint8_t[]", self._value_cap)
                continue
            if rc == lib.SC_RETRY:
                continue
            if rc == lib.SC_CLOSED:
                raise self._closed_error()
            break
        raise CacheCorrupted(f"cache {self.name!r}: no stable copy of {key!r} (code {rc})")

    def _newer_from_ring(self, key: str, raw: bytes, store_rv: int, item: Item | None) -> Item | None | object:
        """The key's state after the newest of its events with rv > store_rv
        that the store may not show yet (or the store's answer if newer);
        _STORE_MOVED if the store has moved on meanwhile: ask it again.

        Exact without Kubernetes' "too old" rule: evicting an event needs a
        later one appended, which needs the evicted one applied first, which
        moves store_rv past it.  So if store_rv still equals ``store_rv``
        after the copy, no event after it has been evicted: the window read
        after the lookup held all of them (docs/design.md, "get")."""
        try:
            index, end = self._search(store_rv, too_old_rule=False)
        except ResourceExpired:
            return _STORE_MOVED  # the writer kept evicting during every search
        newest = None
        for event in self._copy_events(index, end, raw, MAX_RV):
            if event is None:
                return _STORE_MOVED  # evicted while copied: applied before
            if event[1] == raw:
                newest = event
        if self._load(_OFF_STORE_RV) != store_rv:
            return _STORE_MOVED
        if newest is None or (item is not None and item.rv >= newest[3]):
            return item
        t, _, value, rv = newest
        return None if t == lib.SC_DELETED else _new_event(Item, (key, value, rv))

    def list(self, prefix: str = "") -> Snapshot:
        """The store's exact state at one resource version, sorted by key.

        Lock-free: a fuzzy copy of the store, then a replay of the ring's
        events between the store's applied RV and the newest RV
        (docs/design.md, "list").  If the writer outruns it LIST_ATTEMPTS
        times, ResourceExpired says why."""
        raw_prefix = encode_prefix(prefix)
        reason = ""
        for attempt in range(LIST_ATTEMPTS):
            result = self._try_list(raw_prefix)
            if isinstance(result, Snapshot):
                return result
            reason = result
            if self._load(_OFF_OP_STATE) == lib.SC_OP_COMMITTING:  # wait for the switch, do not spin
                self._wait_change(0.05 * (attempt + 1))
        raise ResourceExpired(
            f"list() found no consistent snapshot in {LIST_ATTEMPTS} attempts: {reason}",
            oldest_rv=self._window()[2],
        )

    def _try_list(self, prefix: bytes) -> Snapshot | str:
        s0 = self._load(_OFF_STORE_RV)
        gen = self._load(_OFF_INDEX_GEN)
        items = self._scan_store(gen, prefix)
        if items is None:
            return "the store's index was rebuilt during the copy"
        r1 = self._load(_OFF_RV)
        if s0 > r1:
            return "a replace() was in progress"
        if self._load(_OFF_OP_STATE) == lib.SC_OP_COMMITTING:
            # a snapshot at r1 is true, but its window is already expired:
            # nobody could watch from it
            return "a replace() was being committed"
        if s0 < r1:
            try:
                index, end = self._locate(s0)
            except ResourceExpired:
                return f"the events after resource version {s0} were evicted during the copy"
            replayed = s0
            for event in self._copy_events(index, end, b"", r1):
                if event is None:
                    return f"the events after resource version {s0} were evicted during the copy"
                t, k, v, rv = event
                replayed = rv
                if not k.startswith(prefix):
                    continue
                if t == lib.SC_DELETED:
                    items.pop(k, None)
                else:
                    items[k] = (v, rv)
            if replayed != r1:
                return f"the ring did not hold the events up to resource version {r1}"
        try:
            out, newest = _codec.items_sorted(items, Item)
        except UnicodeDecodeError as err:
            raise CacheCorrupted(f"cache {self.name!r}: a key is not UTF-8") from err
        if newest > r1:
            return "the store moved past the snapshot's resource version"
        return Snapshot(r1, out)

    def _scan_store(self, gen: int, prefix: bytes) -> dict[bytes, tuple[bytes, int]] | None:
        cap = 1 << 16
        buf: Any = ffi.new("uint8_t[]", cap)
        cursor = ffi.new("uint64_t *", 0)
        used, count = self._out, self._out32
        items: dict[bytes, tuple[bytes, int]] = {}
        limit = self.geometry.index_slots
        while cursor[0] < limit:
            rc = lib.sc_store_scan(self._layout, gen, cursor, prefix, len(prefix), buf, cap, used, count)
            if rc == lib.SC_RETRY:
                return None
            if rc == lib.SC_CLOSED:
                raise self._closed_error()
            if rc == lib.SC_NOSPACE:
                need = int(used[0])
                if need > self.geometry.max_record + 16:
                    raise CacheCorrupted(f"cache {self.name!r}: a store record claims {need} bytes")
                cap = max(need, 2 * cap)
                buf = ffi.new("uint8_t[]", cap)
                continue
            if rc != lib.SC_OK:
                raise CacheCorrupted(f"cache {self.name!r}: the store holds an impossible record")
            try:
                _codec.decode_scan(ffi.buffer(buf, used[0]), count[0], items)
            except ValueError as err:
                raise CacheCorrupted(f"cache {self.name!r}: {err}") from err
        return items

    # ---- the ring ----------------------------------------------------------

    def _locate(self, since_rv: int) -> tuple[int, int]:
        """(index of the first event with rv > since_rv, end_index), found
        by a binary search that read only stable slots; ResourceExpired if
        the events right after since_rv are gone (Kubernetes' rule)."""
        return self._search(since_rv, too_old_rule=True)

    def _search(self, since_rv: int, *, too_old_rule: bool) -> tuple[int, int]:
        out = self._out
        for _ in range(WINDOW_ATTEMPTS):
            start, end, oldest = self._window()
            if too_old_rule and oldest and since_rv < oldest - 1:
                raise ResourceExpired.too_old(since_rv, oldest)
            # an RV beyond 64 bits is newer than any event: search for the largest
            rc = lib.sc_ring_find(self._layout, start, end, min(since_rv, U64_MAX), out, out + 1)
            if rc == lib.SC_CLOSED:
                raise self._closed_error()
            if rc != lib.SC_OK:
                raise CacheCorrupted(f"cache {self.name!r}: impossible ring window")
            if out[1] == start:  # no slot the search read was being reused
                return int(out[0]), end
        oldest = self._window()[2]
        raise ResourceExpired(
            f"too old resource version: {since_rv} ({oldest - 1}): the writer evicted events "
            f"faster than {WINDOW_ATTEMPTS} searches could complete",
            requested_rv=since_rv, oldest_rv=oldest)

    def _copy_events(self, index: int, end: int, prefix: bytes, max_rv: int) -> Iterator[tuple[int, bytes, bytes, int] | None]:
        """Raw (type, key, value, rv) of the events at [index, end) with
        rv <= max_rv, validated chunk by chunk; None if they were evicted."""
        buf = _CopyBuffer(256, self.geometry.arena_bytes)
        while index < end:
            filled = buf.fill(self, index, end, prefix)
            if filled is None:
                yield None
                return
            index = buf.next_index
            for t, k, v, rv in buf.raw_events(*filled):
                if rv > max_rv:
                    return
                yield t, k, v, rv

    def interval(self, since_rv: int, *, prefix: str = "", buffer_size: int = 100) -> Interval:
        """The events after ``since_rv`` up to the newest one now present,
        served through a local buffer of at most ``buffer_size`` events
        (Kubernetes' watchCacheInterval).  ``since_rv == 0``: one ADDED event
        per item of a consistent snapshot, each carrying the snapshot's RV.
        ResourceExpired if the events right after ``since_rv`` are gone;
        ResourceVersionTooLarge if the cache has not reached ``since_rv``."""
        if isinstance(since_rv, bool) or not isinstance(since_rv, int):
            raise TypeError(f"since_rv must be int, not {type(since_rv).__name__}")
        if since_rv < 0:
            raise InvalidSize(f"since_rv={since_rv} must be >= 0")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int):
            raise TypeError("buffer_size must be int")
        if not 1 <= buffer_size <= MAX_BUFFER_SIZE:
            raise InvalidSize(f"buffer_size={buffer_size} is out of range [1, {MAX_BUFFER_SIZE}]")
        raw_prefix = encode_prefix(prefix)
        self._check_alive()
        if since_rv == 0:
            snap = self.list(prefix)
            events = [_new_event(Event, (EventType.ADDED, i.key, i.value, snap.rv)) for i in snap.items]
            return Interval(self, snap.rv, -1, -1, raw_prefix, buffer_size, events)
        if since_rv > self._load(_OFF_RV):
            current = self._newest_rv()
            if since_rv > current:
                # the events up to since_rv are still to come: an interval
                # after it cannot be placed (and an RV of another epoch must
                # not make a client skip this one's events)
                raise ResourceVersionTooLarge(since_rv, current)
        return self._interval_after(since_rv, raw_prefix, buffer_size)

    def _interval_after(self, since_rv: int, prefix: bytes, buffer_size: int) -> Interval:
        """The events with rv > since_rv (since_rv may be 0 here: after an
        empty snapshot, "everything")."""
        index, end = self._locate(since_rv)
        return Interval(self, since_rv, index, end, prefix, buffer_size, None)

    def watch(self, since_rv: int, *, prefix: str = "", timeout: float | None = None,
              buffer_size: int = 100) -> Iterator[Event]:
        """Every event after ``since_rv``, forever: drains intervals, then
        blocks on the segment's futex (no polling) until the writer publishes
        more.  ``timeout`` bounds each wait in seconds; on expiry the iterator
        ends.  ResourceExpired when it fell behind the ring; CacheClosed when
        the owner closed the cache.  A ``since_rv`` the cache has not reached
        yet is waited for, at most FRESH_WAIT seconds (and ``timeout``), then
        ResourceVersionTooLarge."""
        return _flatten(self.watch_batches(since_rv, prefix=prefix, timeout=timeout, buffer_size=buffer_size))

    def watch_batches(self, since_rv: int, *, prefix: str = "", timeout: float | None = None,
                      buffer_size: int = 100) -> Iterator[_Batch]:
        """watch(), one list per refill of the local buffer (at most
        ``buffer_size`` events, never empty): for consumers that loop over
        events themselves, without a generator step per event.  The lists
        are the caller's to keep."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0):
            raise InvalidSize(f"timeout={timeout!r} must be None or >= 0 seconds")
        if isinstance(since_rv, int) and not isinstance(since_rv, bool):
            self._wait_for_rv(since_rv, FRESH_WAIT if timeout is None else min(timeout, FRESH_WAIT))
        interval = self.interval(since_rv, prefix=prefix, buffer_size=buffer_size)
        return self._watch(interval, timeout)

    def _watch(self, interval: Interval, timeout: float | None) -> Iterator[_Batch]:
        while True:
            yield from interval.batches()
            # a snapshot (end_index < 0) continues at once after its RV
            if interval.end_index >= 0 and not self._wait_past(interval, timeout):
                return
            interval = interval.continuation()

    def _wait_past(self, interval: Interval, timeout: float | None) -> bool:
        """Block until the interval's continuation has something to say:
        new events, or ResourceExpired (the window moved past it, or a
        replace happened at or after it); False if timeout expired."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ns = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1e9))
            rc = lib.sc_wait_past(self._layout, interval.end_index, interval.last_rv, wait_ns)
            if rc == lib.SC_WAIT_PASSED:
                return True
            if rc == lib.SC_WAIT_TIMEOUT:
                return False
            if rc == lib.SC_WAIT_CLOSED:
                raise self._closed_error()
            # SC_WAIT_INTERRUPTED: a signal handler has run on the way back; wait again

    def _newest_rv(self) -> int:
        """The newest published RV.  A writer publishes an event (end_index)
        just before it stores the header's rv, so a reader may hold an event
        newer than that rv: the newest slot's RV counts too."""
        out = self._out_load
        rc = lib.sc_newest_rv(self._layout, out)
        if rc == lib.SC_CLOSED:
            raise self._closed_error()
        if rc != lib.SC_OK:
            raise CacheCorrupted(f"cache {self.name!r}: the ring's indices never read consistently")
        return int(out[0])

    def _wait_for_rv(self, rv: int, seconds: float) -> None:
        """Block until the newest RV is at least ``rv``, or ``seconds`` passed."""
        deadline = time.monotonic() + seconds
        while True:
            seq = self._load(_OFF_NOTIFY) & 0xFFFFFFFF
            left = deadline - time.monotonic()
            if left <= 0 or self._newest_rv() >= rv:
                return
            if lib.sc_wait_change(self._layout, seq, int(left * 1e9)) == lib.SC_WAIT_CLOSED:
                raise self._closed_error()

    def _wait_change(self, seconds: float) -> None:
        seq = self._load(_OFF_NOTIFY) & 0xFFFFFFFF
        if lib.sc_wait_change(self._layout, seq, int(seconds * 1e9)) == lib.SC_WAIT_CLOSED:
            raise self._closed_error()

    # ---- lifecycle -----------------------------------------------------

    def close(self) -> None:
        """Unmap the segment.  Never unlinks anything: readers do not own it.

        May be called from any thread: a watch blocked in another thread
        wakes and raises CacheClosed, and the mapping goes only once no
        thread is inside it."""
        if not self._map.closed:
            self._detached = True
            self._map.close()

    @property
    def closed(self) -> bool:
        return self._map.closed

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmcache.Reader {self.name!r}{' closed' if self.closed else ''}>"


def _flatten(batches: Iterator[_Batch]) -> Iterator[Event]:
    for batch in batches:
        yield from batch


class _CopyBuffer:
    """An interval's local buffer: metadata and payload of at most
    ``max_events`` events.  The payload part starts at INITIAL_EVENT_BYTES an event and
    grows (at least doubling, up to MAX_BUFFER_BYTES) when max_events events
    of the sizes met do not fit; one event bigger than it gets its size."""

    def __init__(self, max_events: int, arena_bytes: int) -> None:
        self.max_events = max_events
        self._arena_bytes = arena_bytes
        self._meta = bytearray(max_events * _META.size)
        self._meta_c = ffi.from_buffer("struct sc_event_meta[]", self._meta)
        self._cap = min(max(INITIAL_EVENT_BYTES * max_events, 4096), arena_bytes)
        self._max_cap = min(arena_bytes, MAX_BUFFER_BYTES)
        self._data: Any = _new_uncleared("uint8_t[]", self._cap)
        self._out = ffi.new("uint64_t[4]")
        self._grow = 0  # the payload size of the next fill, if it must grow
        self.next_index = 0

    def fill(self, reader: Reader, index: int, end: int, prefix: bytes) -> tuple[int, Any] | None:
        """Copy the next events at [index, end): returns (count, payload: a
        buffer of this object's memory, valid until the next fill) with the
        metadata in ``meta()``, or None if the copy was invalidated
        (startIndex passed index).  Sets next_index."""
        out = self._out
        if self._grow:
            self._cap = self._grow
            self._data = _new_uncleared("uint8_t[]", self._cap)
            self._grow = 0
        while True:
            rc = lib.sc_ring_copy(reader._layout, index, end, self.max_events, prefix, len(prefix),
                                  self._meta_c, self._data, self._cap, out)
            if rc == lib.SC_CLOSED:
                raise reader._closed_error()
            nxt, count, used, start = ffi.unpack(out, 4)
            if start > index:
                return None
            if rc == lib.SC_NOSPACE:
                if used > self._arena_bytes:
                    raise CacheCorrupted(f"cache {reader.name!r}: an event claims {used} bytes")
                self._cap = max(used, min(2 * self._cap, self._arena_bytes))
                self._data = _new_uncleared("uint8_t[]", self._cap)
                continue
            if rc != lib.SC_OK:
                raise CacheCorrupted(f"cache {reader.name!r}: impossible event in ring slot {nxt}")
            break
        self.next_index = nxt
        if count < self.max_events and nxt < end and self._cap < self._max_cap:
            # stopped by bytes, not by count: size the next fill for max_events
            # events of this size (so the buffer stays O(max_events)); grown
            # at the next fill, the caller still reads this one
            per_event = -(-used // max(count, 1))
            want = min(MAX_BUFFER_BYTES, per_event * self.max_events * 5 // 4)
            if want > self._cap:
                self._grow = min(self._arena_bytes, max(2 * self._cap, want))
        return count, ffi.buffer(self._data, used)

    def meta(self, count: int) -> memoryview:
        """The metadata records of the last fill's ``count`` events."""
        return memoryview(self._meta)[: count * _META.size]

    def raw_events(self, count: int, data: Any) -> list[tuple[int, bytes, bytes, int]]:
        result = []
        pos = 0
        for rv, t, kl, vl, _ in _META.iter_unpack(self.meta(count)):
            result.append((t, data[pos:pos + kl], data[pos + kl:pos + kl + vl], rv))
            pos += kl + vl
        return result


class RawBatch:
    """Events as copied from the ring, undecoded: ``count`` metadata records
    in ``meta`` — 24 bytes each, little-endian ``rv`` u64, ``type`` u32
    (EventType), ``key_len`` u32, ``value_len`` u32, 4 reserved bytes — and
    the events' UTF-8 keys and values back to back, in order, in ``data``.
    ``last_rv`` is the RV of the last event.  Both views point into the
    interval's local buffer, which the next refill overwrites: copy what you
    keep (``bytes(batch.data)``, or ``events()``).  Keys are not decoded, so
    not checked to be UTF-8 either."""

    __slots__ = ("count", "data", "last_rv", "meta")

    def __init__(self, count: int, meta: memoryview, data: memoryview, last_rv: int) -> None:
        self.count = count
        self.meta = meta
        self.data = data
        self.last_rv = last_rv

    @classmethod
    def of_events(cls, events: list[Event]) -> RawBatch:
        meta = b"".join(_META.pack(e.rv, e.type, len(k), len(e.value), 0)
                        for e, k in zip(events, (e.key.encode() for e in events)))
        data = b"".join(e.key.encode() + e.value for e in events)
        return cls(len(events), memoryview(meta), memoryview(data), events[-1].rv)

    def records(self) -> Iterator[tuple[int, int, int, int, int]]:
        """(rv, type, key_len, value_len, 0) of each event."""
        return _META.iter_unpack(self.meta)

    def events(self) -> list[Event]:
        """The batch as Event objects (keys decoded: CacheCorrupted if one is
        not UTF-8).  The order of RVs was checked when the batch was made
        (a snapshot's events all carry its RV)."""
        try:
            return _codec.decode_events(self.meta, self.data, self.count, 0, Event, _EVENT_TYPES, False)
        except ValueError as err:
            raise CacheCorrupted(f"a raw batch does not decode: {err}") from err

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<RawBatch of {self.count} events up to rv {self.last_rv}, {len(self.data)} bytes>"


class Interval:
    """A bounded run of events, served from a local buffer refilled at most
    ``buffer_size`` events at a time; each refill is validated after its copy
    by re-reading startIndex.  Events already served stay valid; a refill
    whose copy was overtaken by the writer raises ResourceExpired.

    ``resource_version`` is the RV it was built from (``since_rv``, or the
    snapshot's RV for ``since_rv == 0``).
    """

    def __init__(self, reader: Reader, rv: int, index: int, end: int, prefix: bytes,
                 buffer_size: int, events: list[Event] | None) -> None:
        self._reader = reader
        self.resource_version = rv
        self.end_index = end
        self.prefix = prefix.decode()
        self.raw_prefix = prefix
        self.buffer_size = buffer_size
        self._index = index
        self._last_rv = rv
        self._events: list[Event] = events if events is not None else []
        self._pos = 0
        self._copy: _CopyBuffer | None = None

    def continuation(self) -> Interval:
        """The interval after this one, up to the newest event present now
        (it reuses this interval's buffer); after a snapshot (``interval(0)``),
        the events after the snapshot's RV.  ResourceExpired if events after
        the last one served are gone, or a replace happened after it."""
        if self.end_index < 0:
            return self._reader._interval_after(self._last_rv, self.raw_prefix, self.buffer_size)
        start, end, _ = self._reader._window()
        rep_index, rep_rv = self._reader._replaced_at()
        nxt = Interval(self._reader, self._last_rv, self.end_index, end, self.raw_prefix,
                       self.buffer_size, None)
        nxt._copy = self._copy
        # evicted past our position; or replaced right at it: a replace
        # changes the state without events (and evicts nothing when the ring
        # was already drained to it), so the events after it do not continue
        # what we served
        if start > self.end_index or (rep_rv > self._last_rv and rep_index >= self.end_index):
            nxt._expired()
        return nxt

    @property
    def last_rv(self) -> int:
        """The RV of the last event served (``resource_version`` before any)."""
        return self._last_rv

    def _expired(self) -> None:
        oldest = self._reader._window()[2]
        raise ResourceExpired.too_old(self._last_rv, oldest)

    def _fill(self) -> tuple[int, Any] | None:
        """The next copy of at most buffer_size events into the local
        buffer: (count, payload), or None when the interval is drained.
        ResourceExpired if the writer overtook the copy."""
        if self._index < 0 or self._index >= self.end_index:
            return None
        if self._copy is None:
            self._copy = _CopyBuffer(self.buffer_size, self._reader.geometry.arena_bytes)
        filled = self._copy.fill(self._reader, self._index, self.end_index, self.raw_prefix)
        if filled is None:
            self._expired()
        assert filled is not None
        self._index = self._copy.next_index
        return filled

    def _refill(self) -> bool:
        while True:
            filled = self._fill()
            if filled is None:
                return False
            count, data = filled
            if count:
                break
            # a prefix interval may copy nothing from a stretch of other keys
        assert self._copy is not None
        try:
            events = _codec.decode_events(self._copy.meta(count), data, count, self._last_rv, Event,
                                          _EVENT_TYPES)
        except ValueError as err:  # UnicodeDecodeError included
            raise CacheCorrupted(f"cache {self._reader.name!r}: {err}") from err
        self._last_rv = events[-1].rv
        self._events = events
        self._pos = 0
        return True

    def raw_batches(self) -> Iterator[RawBatch]:
        """The interval's events as the ring holds them, one RawBatch per
        refill of the local buffer: no Python object per event.  Each
        batch's views are valid until the next one is requested.  Events
        already decoded (a partly consumed buffer, a snapshot) come first, in
        a batch of their own; mixing with ``next()`` afterwards is fine."""
        if self._pos < len(self._events):
            rest = self._events[self._pos:]
            self._pos = len(self._events)
            yield RawBatch.of_events(rest)
        while True:
            filled = self._fill()
            if filled is None:
                return
            count, data = filled
            if not count:
                continue
            assert self._copy is not None
            meta = self._copy.meta(count)
            # sc_ring_copy checked the order inside the copy; across copies here
            first = _META.unpack_from(meta)[0]
            last = _META.unpack_from(meta, (count - 1) * _META.size)[0]
            if first <= self._last_rv:
                raise CacheCorrupted(f"cache {self._reader.name!r}: resource versions go backwards")
            self._last_rv = last
            yield RawBatch(count, meta, memoryview(data), last)

    def next(self) -> Event | None:
        """The next event, or None when the interval is drained."""
        while self._pos >= len(self._events):
            if not self._refill():
                return None
        event = self._events[self._pos]
        self._pos += 1
        return event

    def __iter__(self) -> Iterator[Event]:
        return _flatten(self.batches())

    def batches(self) -> Iterator[_Batch]:
        """The events not served yet, one list per refill (never empty)."""
        while True:
            if self._pos < len(self._events):
                batch = self._events[self._pos:] if self._pos else self._events
                self._pos = len(self._events)
                yield batch
            if not self._refill():
                return
