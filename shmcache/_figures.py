"""A cache's figures: a read-only, public view of what its header records.

``Reader.figures()`` and ``Writer.figures()`` return a :class:`Figures`; the
``shmcache status`` command, the daemon's STATS and status line, the
benchmarks and the tests read a cache's state through it, not through the
header's C fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._layout import Geometry, creator_of
from ._native import ffi, lib
from ._owner import ProcessIdentity
from .exceptions import CacheClosed, CacheCorrupted

__all__ = ["Figures", "RingFill", "StoreFill", "heartbeat_age_of", "read_figures", "recorded_socket_path"]

_OFF_RV = ffi.offsetof("struct sc_header", "rv")
_OFF_HEARTBEAT = ffi.offsetof("struct sc_header", "heartbeat_ms")
_OFF_WRITTEN = ffi.offsetof("struct sc_header", "events_written")
_OFF_EVICTED = ffi.offsetof("struct sc_header", "events_evicted")
_OFF_KEYS = ffi.offsetof("struct sc_header", "live_keys")
_OFF_BYTES = ffi.offsetof("struct sc_header", "live_bytes")
_OFF_RECOVERIES = ffi.offsetof("struct sc_header", "lock_recoveries")


@dataclass(frozen=True, slots=True)
class RingFill:
    """How full the ring is: ``events`` of ``capacity`` slots, whose keys
    and values take ``bytes`` of the ``arena_bytes`` arena (never more)."""

    events: int
    capacity: int
    bytes: int
    arena_bytes: int


@dataclass(frozen=True, slots=True)
class StoreFill:
    """How full the store is: ``keys`` of at most ``max_keys``, whose records
    (24-byte record header + key + value, padded to 8) take ``bytes`` of at
    most ``store_bytes``."""

    keys: int
    max_keys: int
    bytes: int
    store_bytes: int


@dataclass(frozen=True, slots=True)
class Figures:
    """What a cache's header says about it, read without any lock.

    ``name``: the cache's name.  ``epoch``: the segment's random 64-bit tag
    (a new one for every created segment).  ``created``: when the segment
    was created, in seconds since the Unix epoch.  ``owner``: the process
    that created the segment, as the header records it (whether it still
    lives is for ``_inspect.owner_status`` to judge).  ``heartbeat_age``:
    seconds since the owning daemon last refreshed its heartbeat, None if no
    daemon ever did.  ``socket_path``: the producer socket that daemon
    advertises, "" if none (or not UTF-8).  ``rv``: the newest published
    resource version.  ``oldest_rv``: as ``Reader.oldest_resource_version``
    defines it (0 for a ring that never held an event).  ``ring``,
    ``store``: how full they are.  ``events_written``: events published
    since the segment was created; ``events_evicted``: those of them pushed
    out of the ring to make room for newer ones (a replace empties the
    window without counting).  ``lock_recoveries``: how often a writer
    recovered the lock from a holder that died.

    What is consistent: ``name``, ``epoch``, ``created``, ``owner``,
    ``ring.capacity``, ``ring.arena_bytes``, ``store.max_keys`` and
    ``store.store_bytes`` never change during a segment's life.
    ``ring.events`` and ``ring.bytes`` come from one consistent reading of
    the ring's window.  Every other figure is read on its own, with one
    atomic load, so none is torn, and each was true at some moment of the
    call — but not at the same moment as the others: while writers are
    active, ``store.keys`` may not yet count a key whose event
    ``events_written`` already counts, and ``oldest_rv`` may be past
    ``rv + 1`` for an instant (a writer publishes an event just before it
    stores the header's rv).  ``rv``, ``events_written``,
    ``events_evicted`` and ``lock_recoveries`` never decrease: figures read
    later show them at least as large.  ``socket_path`` is written once, by
    the daemon as it starts, and ``heartbeat_age`` is measured against this
    process's clock when read.  For a segment only this library has written,
    ``ring.events <= ring.capacity``, ``ring.bytes <= ring.arena_bytes``,
    ``store.keys <= store.max_keys`` and ``store.bytes <= store.store_bytes``;
    the figures are reported as the header holds them, not checked.
    """

    name: str
    epoch: int
    created: float
    owner: ProcessIdentity
    heartbeat_age: float | None
    socket_path: str
    rv: int
    oldest_rv: int
    ring: RingFill
    store: StoreFill
    events_written: int
    events_evicted: int
    lock_recoveries: int


def heartbeat_age_of(beat_ms: int) -> float | None:
    """Seconds since the heartbeat ``beat_ms`` (ms since the epoch; 0: none)."""
    return None if beat_ms == 0 else max(0.0, time.time() - beat_ms / 1000)


def recorded_socket_path(header: Any) -> str:
    """The socket path a header copy records; "" if none, or not UTF-8 (it
    was not written by this library, and names nothing a client can use)."""
    raw: bytes = ffi.string(header.socket_path, 255)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return ""


def read_figures(name: str, layout: Any, geometry: Geometry, closed: Callable[[], CacheClosed]) -> Figures:
    """The figures of the segment mapped as ``layout`` (an ``sc_layout``);
    ``closed()`` is the error to raise when the mapping or the cache is
    closed, CacheCorrupted if the ring's window never reads consistently."""
    header: Any = ffi.new("struct sc_header *")
    if lib.sc_header_copy(layout, header) != lib.SC_OK:
        raise closed()
    out: Any = ffi.new("uint64_t[5]")

    def load(offset: int) -> int:
        if lib.sc_header_load(layout, offset, out) != lib.SC_OK:
            raise closed()
        return int(out[0])

    def window(call: Any) -> None:
        rc = call(layout, out)
        if rc == lib.SC_CLOSED:
            raise closed()
        if rc != lib.SC_OK:
            raise CacheCorrupted(f"cache {name!r}: the ring's indices never read consistently")

    window(lib.sc_ring_window)
    oldest = int(out[2])
    window(lib.sc_ring_usage)
    ring = RingFill(int(out[0]), geometry.capacity, int(out[1]), geometry.arena_bytes)
    return Figures(
        name=name,
        epoch=int(header.epoch),
        created=int(header.created_ms) / 1000,
        owner=creator_of(header),
        heartbeat_age=heartbeat_age_of(load(_OFF_HEARTBEAT)),
        socket_path=recorded_socket_path(header),
        rv=load(_OFF_RV),
        oldest_rv=oldest,
        ring=ring,
        store=StoreFill(load(_OFF_KEYS), geometry.max_keys, load(_OFF_BYTES), geometry.store_bytes),
        events_written=load(_OFF_WRITTEN),
        events_evicted=load(_OFF_EVICTED),
        lock_recoveries=load(_OFF_RECOVERIES),
    )
