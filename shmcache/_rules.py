"""The cache's rules for what callers hand it — keys, prefixes, values,
resource versions — with the sizes they imply (a store record's bytes) and
the default geometry.  Their one home: the reader, the writer, the producer
and the daemon import them from here (docs/design.md, "Where things are").

Each check raises TypeError for a wrong type and a ValueError subclass of
shmcache's (InvalidKey, InvalidResourceVersion) for a bad value, before
anything is sent or written.
"""

from __future__ import annotations

from ._native import lib
from .exceptions import InvalidKey, InvalidResourceVersion, ValueTooLarge

__all__ = [
    "DEFAULT_ARENA_BYTES",
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_STORE_BYTES",
    "MAX_KEY_BYTES",
    "MAX_RV",
    "ValueLike",
    "as_bytes",
    "check_rv",
    "check_value_size",
    "encode_key",
    "encode_prefix",
    "record_size",
]

#: the default geometry of a new cache: ring events, ring payload bytes,
#: store keys, store record bytes (shmcache.Writer and shmcached alike)
DEFAULT_CAPACITY = 4096
DEFAULT_ARENA_BYTES = 16 << 20
DEFAULT_MAX_KEYS = 65536
DEFAULT_STORE_BYTES = 64 << 20

#: the longest key, in UTF-8 bytes (native/shmcache.h, SC_MAX_KEY_BYTES)
MAX_KEY_BYTES: int = lib.SC_MAX_KEY_BYTES
#: the last resource version: RVs are positive signed 64-bit integers, as etcd's
MAX_RV = (1 << 63) - 1

ValueLike = bytes | bytearray | memoryview


def _utf8(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    try:
        raw = text.encode()
    except UnicodeEncodeError as err:
        raise InvalidKey(f"{what} {text!r} is not encodable as UTF-8: {err.reason}") from err
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidKey(f"{what} is {len(raw)} UTF-8 bytes; keys have at most {MAX_KEY_BYTES}")
    return raw


def encode_key(key: object) -> bytes:
    """The UTF-8 bytes of a valid key (1 to MAX_KEY_BYTES of them);
    TypeError or InvalidKey otherwise."""
    raw = _utf8(key, "key")
    if not raw:
        raise InvalidKey("key must not be empty")
    return raw


def encode_prefix(prefix: object) -> bytes:
    """The UTF-8 bytes of a key prefix ("" matches every key): at most
    MAX_KEY_BYTES, since no longer prefix can match a key."""
    return _utf8(prefix, "prefix")


def as_bytes(value: object) -> bytes:
    """A value as bytes (bytes, bytearray and memoryview are values);
    TypeError otherwise."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"value must be bytes-like, not {type(value).__name__}")


def check_rv(rv: object) -> int:
    """0 for None ("the next one"), else a syntactically valid explicit rv
    in [1, MAX_RV]; whether it is greater than the current one is the
    writer's to check, under the lock."""
    if rv is None:
        return 0
    if isinstance(rv, bool) or not isinstance(rv, int):
        raise TypeError(f"rv must be int, not {type(rv).__name__}")
    if not 0 < rv <= MAX_RV:
        raise InvalidResourceVersion(f"rv {rv} must be in [1, {MAX_RV}]")
    return rv


def record_size(key_bytes: int, value_bytes: int) -> int:
    """The bytes a store record of that key and value takes (a 24-byte
    header, the key, the value, padded to 8: the C function the store
    allocates with)."""
    return int(lib.sc_record_size(key_bytes, value_bytes))


def check_value_size(key: bytes, value: bytes, arena_bytes: int, max_record: int) -> None:
    """ValueTooLarge for a key and value that no cache of this geometry can
    ever take: more than its ring arena holds, or a store record over
    ``max_record`` (half the store, Geometry.max_record)."""
    n = len(key) + len(value)
    if n > arena_bytes:
        raise ValueTooLarge(f"key + value are {n} bytes; the ring arena holds {arena_bytes}")
    size = record_size(len(key), len(value))
    if size > max_record:
        raise ValueTooLarge(f"store record of {size} bytes exceeds the largest one this cache takes "
                            f"({max_record} bytes: half of store_bytes)")
