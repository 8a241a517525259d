"""shmcache: a node-local watch cache in POSIX shared memory.

Writers change a key→value store and publish every change as an event into a
bounded ring; readers map the segment read-only and, without any lock,
``get``, ``list`` at a resource version, and watch every change after it.
"""

from importlib import metadata as _metadata

from ._events import Event, EventType, Item, Snapshot
from ._figures import Figures, RingFill, StoreFill
from ._owner import ProcessIdentity
from ._producer import Producer
from ._reader import Interval, RawBatch, Reader
from ._writer import Writer
from .exceptions import (
    CacheClosed,
    CacheCorrupted,
    CacheExists,
    CacheFull,
    CacheNotFound,
    CacheNotTrusted,
    DaemonUnavailable,
    InvalidKey,
    InvalidName,
    InvalidOwner,
    InvalidResourceVersion,
    InvalidSize,
    LockTimeout,
    ProtocolError,
    ResourceExpired,
    ResourceVersionTooLarge,
    ShmCacheError,
    ValueTooLarge,
)

__all__ = [
    "CacheClosed",
    "CacheCorrupted",
    "CacheExists",
    "CacheFull",
    "CacheNotFound",
    "CacheNotTrusted",
    "DaemonUnavailable",
    "Event",
    "EventType",
    "Figures",
    "Interval",
    "InvalidKey",
    "InvalidName",
    "InvalidOwner",
    "InvalidResourceVersion",
    "InvalidSize",
    "Item",
    "LockTimeout",
    "ProcessIdentity",
    "Producer",
    "ProtocolError",
    "RawBatch",
    "Reader",
    "ResourceExpired",
    "ResourceVersionTooLarge",
    "RingFill",
    "ShmCacheError",
    "Snapshot",
    "StoreFill",
    "ValueTooLarge",
    "Writer",
]

# pyproject.toml's version, the one place it is written. No fallback: the C
# extensions exist only once pip has built them, and pip writes the metadata too.
__version__: str = _metadata.version("shmcache")
