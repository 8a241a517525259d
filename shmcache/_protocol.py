"""The producer protocol between ``shmcache.Producer`` and ``shmcached``.

docs/protocol.md is the reference; this module is its one implementation,
shared by the client and the daemon.  Every frame is a 4-byte big-endian
payload length followed by the payload.  Requests start with an opcode byte;
replies with a status byte and the 8-byte resource version.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .exceptions import (
    CacheClosed,
    CacheFull,
    InvalidKey,
    InvalidResourceVersion,
    LockTimeout,
    ProtocolError,
    ShmCacheError,
    ValueTooLarge,
)

__all__ = [
    "FRAME_HEADER",
    "MIN_FRAME_BYTES",
    "Op",
    "Request",
    "Status",
    "decode_request",
    "encode_reply",
    "error_reply",
    "raise_for",
]

FRAME_HEADER = struct.Struct("!I")  # payload bytes
#: every daemon takes request frames (payloads) of this many bytes: its
#: --max-frame-bytes may not be less, so a client need not ask before sending one
MIN_FRAME_BYTES = 64 << 10
KEYED = struct.Struct("!BQH")  # opcode, rv (0: next), key bytes; then key [, value]
BATCH = struct.Struct("!BI")  # opcode, item count; then items
BATCH_ITEM = struct.Struct("!BHI")  # kind (PUT or DELETE), key bytes, value bytes; key, value
REPLY = struct.Struct("!BQ")  # status, rv; then a UTF-8 message (errors) or JSON (STATS)


class Op(enum.IntEnum):
    PING = 1
    PUT = 2
    DELETE = 3
    BATCH = 4
    STATS = 5


class Status(enum.IntEnum):
    OK = 0
    BAD_FRAME = 1  # malformed payload: the daemon closes the connection after replying
    FRAME_TOO_LARGE = 2  # length prefix over the limit: reply, then close
    UNKNOWN_OP = 3
    INVALID_KEY = 4
    VALUE_TOO_LARGE = 5
    CACHE_FULL = 6
    KEY_NOT_FOUND = 7
    INVALID_RV = 8
    LOCK_TIMEOUT = 9
    SHUTTING_DOWN = 10  # not applied: the daemon is stopping
    FORBIDDEN = 11  # the peer's uid/gid is not allowed: reply, then close
    READ_ONLY = 12  # the cache is a mirror; local writes are refused
    INTERNAL = 13


@dataclass(frozen=True)
class Request:
    """A decoded request.  ``items`` (BATCH): (key, value or None) pairs;
    PUT/DELETE: one pair.  ``rv`` 0 means "the next one"."""

    op: Op
    rv: int
    items: list[tuple[str, bytes | None]]


class BadFrame(Exception):
    """A payload that does not parse; carries the status to reply with."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def _key(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as err:
        raise BadFrame(Status.INVALID_KEY, f"key is not valid UTF-8 ({err.reason})") from None


def decode_request(payload: bytes) -> Request:
    """Parse one request payload.  BadFrame with the status to reply:
    INVALID_KEY for a key that is not UTF-8 (the connection stays usable),
    UNKNOWN_OP, or BAD_FRAME for anything malformed."""
    if not payload:
        raise BadFrame(Status.BAD_FRAME, "empty request")
    op = payload[0]
    if op in (Op.PING, Op.STATS):
        if len(payload) != 1:
            raise BadFrame(Status.BAD_FRAME, f"{Op(op).name} takes no body")
        return Request(Op(op), 0, [])
    if op in (Op.PUT, Op.DELETE):
        if len(payload) < KEYED.size:
            raise BadFrame(Status.BAD_FRAME, "truncated PUT/DELETE header")
        _, rv, key_len = KEYED.unpack_from(payload)
        end = KEYED.size + key_len
        if end > len(payload) or (op == Op.DELETE and end != len(payload)):
            raise BadFrame(Status.BAD_FRAME, "key length does not match the frame")
        key = _key(payload[KEYED.size:end])
        return Request(Op(op), rv, [(key, payload[end:] if op == Op.PUT else None)])
    if op == Op.BATCH:
        if len(payload) < BATCH.size:
            raise BadFrame(Status.BAD_FRAME, "truncated BATCH header")
        _, count = BATCH.unpack_from(payload)
        if count > len(payload) // BATCH_ITEM.size:
            raise BadFrame(Status.BAD_FRAME, f"BATCH claims {count} items in {len(payload)} bytes")
        items: list[tuple[str, bytes | None]] = []
        pos = BATCH.size
        for _ in range(count):
            if pos + BATCH_ITEM.size > len(payload):
                raise BadFrame(Status.BAD_FRAME, "truncated BATCH item")
            kind, key_len, value_len = BATCH_ITEM.unpack_from(payload, pos)
            pos += BATCH_ITEM.size
            if kind not in (Op.PUT, Op.DELETE) or (kind == Op.DELETE and value_len):
                raise BadFrame(Status.BAD_FRAME, f"bad BATCH item kind {kind}")
            end = pos + key_len + value_len
            if end > len(payload):
                raise BadFrame(Status.BAD_FRAME, "BATCH item runs past the frame")
            key = _key(payload[pos:pos + key_len])
            items.append((key, payload[pos + key_len:end] if kind == Op.PUT else None))
            pos = end
        if pos != len(payload):
            raise BadFrame(Status.BAD_FRAME, "bytes after the last BATCH item")
        return Request(Op.BATCH, 0, items)
    raise BadFrame(Status.UNKNOWN_OP, f"unknown opcode {op}")


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


def encode_keyed(op: Op, key: bytes, value: bytes, rv: int) -> bytes:
    return frame(KEYED.pack(op, rv, len(key)) + key + value)


def encode_batch(items: list[tuple[bytes, bytes | None]]) -> bytes:
    parts = [BATCH.pack(Op.BATCH, len(items))]
    for key, value in items:
        if value is None:
            parts += (BATCH_ITEM.pack(Op.DELETE, len(key), 0), key)
        else:
            parts += (BATCH_ITEM.pack(Op.PUT, len(key), len(value)), key, value)
    return frame(b"".join(parts))


def encode_simple(op: Op) -> bytes:
    return frame(bytes([op]))


def encode_reply(status: Status, rv: int = 0, body: bytes = b"") -> bytes:
    return frame(REPLY.pack(status, rv) + body)


_STATUS_OF: list[tuple[type[BaseException], Status]] = [
    (KeyError, Status.KEY_NOT_FOUND),
    (InvalidKey, Status.INVALID_KEY),
    (ValueTooLarge, Status.VALUE_TOO_LARGE),
    (CacheFull, Status.CACHE_FULL),
    (InvalidResourceVersion, Status.INVALID_RV),
    (LockTimeout, Status.LOCK_TIMEOUT),
    (CacheClosed, Status.SHUTTING_DOWN),
]


def error_reply(exc: BaseException) -> bytes:
    """The reply frame for an exception raised while applying a request."""
    for cls, status in _STATUS_OF:
        if isinstance(exc, cls):
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return encode_reply(status, 0, str(message).encode())
    return encode_reply(Status.INTERNAL, 0, f"{type(exc).__name__}: {exc}".encode())


def raise_for(status: int, message: str) -> None:
    """Raise, in a client, the exception a Writer would have raised."""
    if status == Status.KEY_NOT_FOUND:
        raise KeyError(message)
    for cls, known in _STATUS_OF:
        if known == status and issubclass(cls, ShmCacheError):
            raise cls(message)
    try:
        label = Status(status).name
    except ValueError:
        label = f"status {status}"
    raise ProtocolError(f"{label}: {message}", status=status)
