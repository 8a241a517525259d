"""``Producer``: write to a cache through its daemon, without mapping the
segment read-write (docs/protocol.md)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import _protocol as proto
from ._layout import Geometry, check_name
from ._reader import Reader
from ._rules import ValueLike, as_bytes, check_rv, check_value_size, encode_key
from ._trust import OwnerSpec, TrustedOwners, trusted_owners
from .exceptions import (
    CacheClosed,
    CacheCorrupted,
    CacheNotFound,
    CacheNotTrusted,
    DaemonUnavailable,
    ProtocolError,
    ValueTooLarge,
)

__all__ = ["Producer", "socket_path_of"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path_of(name: str, owners: TrustedOwners) -> str:
    """The socket the daemon owning cache ``name`` recorded in the segment's
    header, read only from a segment ``owners`` trust (CacheNotTrusted
    otherwise).  DaemonUnavailable if the header cannot be read here or
    names no socket: a producer never guesses a path, since whoever listens
    at a guessed one would receive its writes."""
    return _header_of(name, owners)[0]


def _header_of(name: str, owners: TrustedOwners) -> tuple[str, Geometry]:
    """socket_path_of's socket, and the cache's geometry from the same header."""
    hint = "; pass the daemon's socket path instead of the cache name"
    try:
        with Reader(name, owner=owners.uids) as reader:
            recorded = reader.socket_path
            geometry = reader.geometry
    except (CacheNotFound, CacheClosed, CacheCorrupted) as err:
        raise DaemonUnavailable(f"cannot find the daemon of cache {name!r}: {err}{hint}") from err
    except CacheNotTrusted:
        raise
    except PermissionError as err:
        raise DaemonUnavailable(f"cannot find the daemon of cache {name!r}: its segment is not "
                                f"readable here ({err}){hint}") from err
    if not recorded:
        raise DaemonUnavailable(f"cache {name!r} has no daemon socket in its header "
                                f"(it is not served by shmcached){hint}")
    return recorded, geometry


class Producer:
    """A connection to the daemon owning a cache.

    ``name_or_path``: a cache name (the socket is the one the daemon recorded
    in the cache's header) or a socket path (anything containing ``/``).
    Before a byte is sent, the process listening there must run as a trusted
    owner (SO_PEERCRED; ``owner``: whom to trust besides root and this uid,
    as for :class:`Reader`), else CacheNotTrusted.  Methods mirror
    :class:`Writer` and raise the same exceptions (KeyError, CacheFull,
    InvalidKey, ValueTooLarge, InvalidResourceVersion, LockTimeout,
    CacheClosed while the daemon shuts down); ProtocolError for refusals no
    Writer makes, DaemonUnavailable when the daemon cannot be found or
    reached or the connection breaks (the request may then have been
    applied or not).  ``timeout`` bounds each request, in seconds.  Safe to
    share between threads (requests are serialised).

    A value too large for the cache, or a request too large for the daemon's
    ``--max-frame-bytes``, raises ValueTooLarge before anything is sent, and
    the Producer stays usable (the daemon would close the connection on a
    frame over its limit).  The limits: every daemon takes frames of up to
    64 KiB (``MIN_FRAME_BYTES``), so smaller requests go out unchecked
    against the frame limit; before the first larger one, the Producer asks
    the daemon once (STATS: ``max_frame_bytes``, ``arena_bytes``,
    ``max_record_bytes``) and keeps the answer.  Opened by cache name, it
    also checks every value against the geometry in the segment's header from
    the start, with Writer's messages; opened by socket path, a too-large
    value in a small request is refused by the daemon (the same
    ValueTooLarge, the connection kept).
    """

    def __init__(self, name_or_path: str = "default", *, timeout: float = 10.0,
                 owner: OwnerSpec | None = None) -> None:
        owners = trusted_owners(owner)
        # (arena_bytes, max_record) of the cache, and the daemon's frame limit: see the class docstring
        self._geometry: tuple[int, int] | None = None
        self._max_frame: int | None = None
        self._limits_asked = False
        if "/" in name_or_path:
            self.path = name_or_path
        else:
            self.path, geometry = _header_of(check_name(name_or_path), owners)
            self._geometry = (geometry.arena_bytes, geometry.max_record)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
                break
            except BlockingIOError as err:  # the listen backlog is full: wait for room
                sock.close()
                if time.monotonic() + pause > deadline:
                    raise DaemonUnavailable(f"daemon at {self.path} is not accepting: {err.strerror}") from err
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
            except PermissionError as err:
                sock.close()
                raise DaemonUnavailable(f"may not connect to the daemon at {self.path}: permission denied "
                                        f"(the socket's mode and group decide who may produce)") from err
            except OSError as err:
                sock.close()
                raise DaemonUnavailable(f"no daemon at {self.path}: {err.strerror or err}") from err
        try:
            pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            owners.check_peer(uid, pid, self.path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    # ---- requests ------------------------------------------------------

    def put(self, key: str, value: ValueLike, *, rv: int | None = None) -> int:
        """Set ``key``; the event's resource version.  ValueTooLarge, nothing
        sent, for a value the cache or the daemon's frame limit cannot take."""
        raw = encode_key(key)
        data = as_bytes(value)
        self._check_values([(raw, data)])
        request = proto.encode_keyed(proto.Op.PUT, raw, data, check_rv(rv))
        if self._over_limits(request, [(raw, data)]):
            raise ValueTooLarge(f"a put of {len(raw) + len(data)} bytes of key and value makes a request "
                                f"of {self._payload(request)} bytes; {self._frame_limit_text()}")
        return self._call(request)[0]

    def delete(self, key: str, *, rv: int | None = None) -> int:
        """Remove ``key`` (KeyError if absent); the event's resource version."""
        raw = encode_key(key)
        return self._call(proto.encode_keyed(proto.Op.DELETE, raw, b"", check_rv(rv)))[0]

    def put_many(self, items: Iterable[tuple[str, ValueLike | None]]) -> int:
        """Apply the pairs under one lock hold (None deletes), validated as a
        whole; the last resource version.  ValueTooLarge, nothing sent, for
        a value the cache cannot take or a batch over the daemon's frame
        limit (split it)."""
        batch: list[tuple[bytes, bytes | None]] = []
        puts: list[tuple[bytes, bytes]] = []
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"put_many items are (key, value) pairs, not {item!r:.60}")
            key, value = item
            raw = encode_key(key)
            if value is None:
                batch.append((raw, None))
            else:
                data = as_bytes(value)
                self._check_values([(raw, data)])  # item by item, as Writer: the first bad one is reported
                batch.append((raw, data))
                puts.append((raw, data))
        request = proto.encode_batch(batch)
        if self._over_limits(request, puts):
            raise ValueTooLarge(f"a batch of {len(batch)} items makes a request of {self._payload(request)} "
                                f"bytes; {self._frame_limit_text()}: split it")
        return self._call(request)[0]

    def ping(self) -> int:
        """The cache's current resource version, from the daemon."""
        return self._call(proto.encode_simple(proto.Op.PING))[0]

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (docs/protocol.md, STATS)."""
        body = self._call(proto.encode_simple(proto.Op.STATS))[1]
        result: dict[str, Any] = json.loads(body)
        return result

    # ---- limits --------------------------------------------------------

    def _check_values(self, puts: list[tuple[bytes, bytes]]) -> None:
        if self._geometry is not None:
            for raw, data in puts:
                check_value_size(raw, data, *self._geometry)

    def _over_limits(self, request: bytes, puts: list[tuple[bytes, bytes]]) -> bool:
        """Whether ``request`` exceeds the daemon's frame limit, asking the
        daemon for its limits first if the request is larger than every
        daemon takes; ValueTooLarge for a value its geometry refuses."""
        if self._payload(request) <= proto.MIN_FRAME_BYTES:
            return False
        if not self._limits_asked:
            self._ask_limits()
            self._check_values(puts)  # the daemon's geometry, if this Producer had none
        return self._max_frame is not None and self._payload(request) > self._max_frame

    def _ask_limits(self) -> None:
        figures = self.stats()
        self._limits_asked = True
        # a daemon older than these keys leaves the limit unknown: it refuses a frame over it itself
        limit = figures.get("max_frame_bytes")
        if isinstance(limit, int) and not isinstance(limit, bool):
            self._max_frame = limit
        arena, record = figures.get("arena_bytes"), figures.get("max_record_bytes")
        if isinstance(arena, int) and isinstance(record, int):
            # the daemon's own geometry wins over a header read before connecting
            self._geometry = (arena, record)

    @staticmethod
    def _payload(request: bytes) -> int:
        return len(request) - proto.FRAME_HEADER.size

    def _frame_limit_text(self) -> str:
        return f"the daemon at {self.path} takes requests of at most {self._max_frame} bytes (its --max-frame-bytes)"

    # ---- plumbing ------------------------------------------------------

    def _call(self, request: bytes) -> tuple[int, bytes]:
        with self._lock:
            sock = self._sock
            if sock is None:
                raise DaemonUnavailable("this producer is closed")
            try:
                try:
                    sock.sendall(request)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon may have refused and closed: its reply says why
                size = proto.FRAME_HEADER.unpack(self._read(sock, proto.FRAME_HEADER.size))[0]
                if size < proto.REPLY.size or size > 1 << 24:
                    raise ProtocolError(f"reply of {size} bytes does not parse")
                payload = self._read(sock, size)
            except OSError as err:
                self._close_locked()
                raise DaemonUnavailable(f"connection to {self.path} broke: {err}") from err
        status, rv = proto.REPLY.unpack_from(payload)
        body = payload[proto.REPLY.size:]
        if status != proto.Status.OK:
            if status in (proto.Status.BAD_FRAME, proto.Status.FRAME_TOO_LARGE, proto.Status.FORBIDDEN):
                self.close()  # the daemon closes these connections
            proto.raise_for(status, body.decode(errors="replace"))
        return int(rv), body

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes:
        chunks = []
        while n:
            chunk = sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionResetError("the daemon closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the connection to the daemon (idempotent); later requests
        raise DaemonUnavailable.  A request in progress in another thread
        gets its reply first: requests and close share one lock."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmcache.Producer {self.path!r}{' closed' if self._sock is None else ''}>"
