"""The values readers get back: events, items and snapshots."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["Event", "EventType", "Item", "Snapshot"]


class EventType(enum.IntEnum):
    """What happened to a key; the values are those stored in ring slots."""

    ADDED = 1
    MODIFIED = 2
    DELETED = 3


class Event(NamedTuple):
    """One change.  ``value`` of a DELETED event is the key's last value;
    ``rv`` is the event's resource version (for the ADDED events of a
    ``since_rv=0`` interval: the snapshot's)."""

    type: EventType
    key: str
    value: bytes
    rv: int


class Item(NamedTuple):
    """A key's current value and the resource version that last changed it."""

    key: str
    value: bytes
    rv: int


class Snapshot(NamedTuple):
    """The store's exact state at resource version ``rv``, sorted by key."""

    rv: int
    items: list[Item]
