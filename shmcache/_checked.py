"""Values that carry their own checksum: ``KEY|SEQ|PAD|CRC32``.

A reader that knows nothing of what was written can still tell an intact
value of a key from a torn, foreign or misplaced one, and recover the
sequence number the writer gave it.  The demo's readers, the tests'
children and the stress tests all write and verify values this way.
"""

from __future__ import annotations

import zlib

__all__ = ["make_value", "value_seq"]


def make_value(key: str, seq: int, pad: str = "") -> bytes:
    """The value of ``key`` with sequence number ``seq`` (``pad``: filler
    for a wanted size; it must not contain ``|``)."""
    body = f"{key}|{seq}|{pad}"
    return f"{body}|{zlib.crc32(body.encode()):08x}".encode()


def value_seq(key: str, value: bytes) -> int | None:
    """The sequence number of an intact value of ``key``; None if the value
    is torn, belongs to another key or was not made by :func:`make_value`."""
    try:
        text = value.decode()
        body, crc = text.rsplit("|", 1)
        vkey, seq, _pad = body.split("|")
        if vkey != key or int(crc, 16) != zlib.crc32(body.encode()):
            return None
        return int(seq)
    except (UnicodeDecodeError, ValueError):
        return None
