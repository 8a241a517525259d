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
from ._layout import check_name
from ._reader import Reader
from ._trust import OwnerSpec, TrustedOwners, trusted_owners
from ._writer import ValueLike, _as_bytes, check_rv, encode_key
from .exceptions import (
    CacheClosed,
    CacheCorrupted,
    CacheNotFound,
    CacheNotTrusted,
    DaemonUnavailable,
    ProtocolError,
)

__all__ = ["Producer", "socket_path_of"]

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path_of(name: str, owners: TrustedOwners) -> str:
    """The socket the daemon owning cache ``name`` recorded in the segment's
    header, read only from a segment ``owners`` trust (CacheNotTrusted
    otherwise).  DaemonUnavailable if the header cannot be read here or
    names no socket: a producer never guesses a path, since whoever listens
    at a guessed one would receive its writes."""
    hint = "; pass the daemon's socket path instead of the cache name"
    try:
        with Reader(name, owner=owners.uids) as reader:
            recorded = reader.socket_path
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
    return recorded


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
    """

    def __init__(self, name_or_path: str = "default", *, timeout: float = 10.0,
                 owner: OwnerSpec | None = None) -> None:
        owners = trusted_owners(owner)
        if "/" in name_or_path:
            self.path = name_or_path
        else:
            self.path = socket_path_of(check_name(name_or_path), owners)
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
        """Set ``key``; the event's resource version."""
        raw = encode_key(key)
        return self._call(proto.encode_keyed(proto.Op.PUT, raw, _as_bytes(value), check_rv(rv)))[0]

    def delete(self, key: str, *, rv: int | None = None) -> int:
        """Remove ``key`` (KeyError if absent); the event's resource version."""
        raw = encode_key(key)
        return self._call(proto.encode_keyed(proto.Op.DELETE, raw, b"", check_rv(rv)))[0]

    def put_many(self, items: Iterable[tuple[str, ValueLike | None]]) -> int:
        """Apply the pairs under one lock hold (None deletes), validated as a
        whole; the last resource version."""
        batch: list[tuple[bytes, bytes | None]] = []
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"put_many items are (key, value) pairs, not {item!r:.60}")
            key, value = item
            batch.append((encode_key(key), None if value is None else _as_bytes(value)))
        return self._call(proto.encode_batch(batch))[0]

    def ping(self) -> int:
        """The cache's current resource version, from the daemon."""
        return self._call(proto.encode_simple(proto.Op.PING))[0]

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (docs/protocol.md, STATS)."""
        body = self._call(proto.encode_simple(proto.Op.STATS))[1]
        result: dict[str, Any] = json.loads(body)
        return result

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
        with self._lock:
            self._close_locked()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmcache.Producer {self.path!r}{' closed' if self._sock is None else ''}>"
