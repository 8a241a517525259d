"""The exceptions shmcache raises.

``ShmCacheError`` is the base of them all and is never raised itself.  Errors
about a bad argument also subclass :class:`ValueError`; a delete of an absent
key raises the built-in :class:`KeyError` and a wrong type :class:`TypeError`,
as a dict would.
"""

from __future__ import annotations

__all__ = [
    "CacheClosed",
    "CacheCorrupted",
    "CacheExists",
    "CacheFull",
    "CacheNotFound",
    "CacheNotTrusted",
    "DaemonUnavailable",
    "InvalidKey",
    "InvalidName",
    "InvalidOwner",
    "InvalidResourceVersion",
    "InvalidSize",
    "LockTimeout",
    "ProtocolError",
    "ResourceExpired",
    "ShmCacheError",
    "ValueTooLarge",
]


class ShmCacheError(Exception):
    """Base class of every shmcache error; never raised itself."""


class CacheNotFound(ShmCacheError):
    """No cache of that name exists (or it is still being created)."""


class CacheNotTrusted(ShmCacheError, PermissionError):
    """A cache's segment or semaphore belongs to a uid this process does not
    trust, or may be written by others; or the process listening at a
    daemon's socket runs as such a uid.  Nothing was read from it or sent to
    it (docs/design.md, "Trust").  ``path`` is the file or socket,
    ``owner_uid`` the uid found."""

    def __init__(self, message: str, *, path: str = "", owner_uid: int = -1) -> None:
        super().__init__(message)
        self.path = path
        self.owner_uid = owner_uid

    def __str__(self) -> str:  # PermissionError's would print the args tuple
        return str(self.args[0]) if self.args else ""


class CacheExists(ShmCacheError):
    """A live process owns a cache of that name; nothing was changed."""


class CacheCorrupted(ShmCacheError):
    """The segment holds values no correct writer produces (wrong magic or
    layout version, impossible sizes, offsets or lengths)."""


class CacheClosed(ShmCacheError):
    """The cache was closed by its owner, or its name now names a newer
    segment; reopen it to continue."""


class ResourceExpired(ShmCacheError):
    """The events after the requested resource version are no longer held
    (Kubernetes' 410 Gone, "too old resource version"): list again.

    ``requested_rv`` is the resource version asked for; ``oldest_rv`` the
    cache's effective oldest resource version at the time (0 when unknown).
    """

    def __init__(self, message: str, *, requested_rv: int = 0, oldest_rv: int = 0) -> None:
        super().__init__(message)
        self.requested_rv = requested_rv
        self.oldest_rv = oldest_rv

    @classmethod
    def too_old(cls, requested_rv: int, oldest_rv: int) -> ResourceExpired:
        """The Kubernetes form: ``too old resource version: 8 (9)``."""
        return cls(
            f"too old resource version: {requested_rv} ({oldest_rv - 1})",
            requested_rv=requested_rv,
            oldest_rv=oldest_rv,
        )


class ResourceVersionTooLarge(ShmCacheError):
    """The requested resource version is newer than any this cache has
    published (Kubernetes' "too large resource version"; ``watch()`` first
    waits up to 3 seconds for the cache to reach it).  It comes from another cache of
    the same source that is ahead — retry shortly — or from another epoch of
    this cache — list again.

    ``requested_rv`` is the resource version asked for; ``current_rv`` the
    cache's newest at the time.
    """

    def __init__(self, requested_rv: int, current_rv: int) -> None:
        super().__init__(f"too large resource version: {requested_rv} (current {current_rv})")
        self.requested_rv = requested_rv
        self.current_rv = current_rv


class LockTimeout(ShmCacheError, TimeoutError):
    """The writers' lock stayed held by a live process for ``lock_timeout``."""


class CacheFull(ShmCacheError):
    """The store has no room for the change (too many keys or too many bytes);
    nothing was changed."""


class DaemonUnavailable(ShmCacheError, ConnectionError):
    """The daemon's producer socket could not be reached, or the connection
    broke before a reply: the request may or may not have been applied."""


class ProtocolError(ShmCacheError):
    """The daemon refused a request for a reason no Writer would raise
    (a malformed frame, a forbidden peer, a read-only mirror...).
    ``status`` is the protocol's status code (docs/protocol.md)."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class InvalidName(ShmCacheError, ValueError):
    """A cache name that cannot name a shared memory object."""


class InvalidOwner(ShmCacheError, ValueError):
    """An ``owner`` (or ``$SHMCACHE_OWNER``) naming no user, or a uid out of range."""


class InvalidSize(ShmCacheError, ValueError):
    """A capacity or size argument out of its range."""


class InvalidKey(ShmCacheError, ValueError):
    """A key that is empty, longer than 1,024 UTF-8 bytes, or not encodable."""


class ValueTooLarge(ShmCacheError, ValueError):
    """A value that could never fit in this cache's ring or store."""


class InvalidResourceVersion(ShmCacheError, ValueError):
    """An explicit resource version that is not greater than the current one."""
