"""A raw client of the producer protocol, written from docs/protocol.md (not
from shmcache/_protocol.py, so that the tests check the daemon against the
document)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

IO_TIMEOUT = 10.0  # any single socket read or write the daemon should answer at once

PING, PUT, DELETE, BATCH, STATS = 1, 2, 3, 4, 5
OK, BAD_FRAME, FRAME_TOO_LARGE, UNKNOWN_OP, INVALID_KEY = 0, 1, 2, 3, 4
VALUE_TOO_LARGE, CACHE_FULL, KEY_NOT_FOUND, INVALID_RV, LOCK_TIMEOUT = 5, 6, 7, 8, 9
SHUTTING_DOWN, FORBIDDEN, READ_ONLY, INTERNAL = 10, 11, 12, 13
#: statuses after which the daemon closes the connection
CLOSING = frozenset({BAD_FRAME, FRAME_TOO_LARGE, FORBIDDEN})
MAX_RV = (1 << 63) - 1
MAX_KEY_BYTES = 1024


def record_size(key: bytes, value: bytes) -> int:
    """Bytes a store record takes (docs/design.md): 24-byte header, key,
    value, padded to 8."""
    return (24 + len(key) + len(value) + 7) & ~7


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def ping() -> bytes:
    return bytes([PING])


def stats() -> bytes:
    return bytes([STATS])


def put(key: bytes, value: bytes, rv: int = 0) -> bytes:
    return struct.pack("!BQH", PUT, rv, len(key)) + key + value


def delete(key: bytes, rv: int = 0) -> bytes:
    return struct.pack("!BQH", DELETE, rv, len(key)) + key


def batch(items: Sequence[tuple[bytes, bytes | None]], count: int | None = None) -> bytes:
    """A BATCH payload; ``count`` overrides the item count in the header."""
    parts = [struct.pack("!BI", BATCH, len(items) if count is None else count)]
    for key, value in items:
        if value is None:
            parts += [struct.pack("!BHI", DELETE, len(key), 0), key]
        else:
            parts += [struct.pack("!BHI", PUT, len(key), len(value)), key, value]
    return b"".join(parts)


def connect(path: str, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at end of stream (EOF or a reset) before any byte."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = sock.recv(n - got)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if got:
                raise AssertionError(f"stream ended inside a frame ({got} of {n} bytes)")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_reply(sock: socket.socket) -> tuple[int, int, bytes] | None:
    """The next reply (status, rv, body), or None at end of stream."""
    header = recv_exact(sock, 4)
    if header is None:
        return None
    (size,) = struct.unpack("!I", header)
    assert 9 <= size <= 1 << 20, f"reply frame of {size} bytes"
    payload = recv_exact(sock, size)
    assert payload is not None, "stream ended after a reply's length prefix"
    status, rv = struct.unpack_from("!BQ", payload)
    return status, rv, payload[9:]


def request(sock: socket.socket, payload: bytes) -> tuple[int, int, bytes]:
    sock.sendall(frame(payload))
    reply = read_reply(sock)
    assert reply is not None, "the daemon closed the connection instead of replying"
    return reply


def at_eof(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bool:
    """True if the peer closed the connection (after any pending replies were
    read) within ``timeout``; False if it stays open."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert not data, f"unexpected bytes {data!r} from the daemon"
    return True
