"""A read-only etcd v3 client over etcd's JSON gateway, standard library only.

It is the etcd side of mirroring a key prefix: list everything under the
prefix at one revision (``EtcdClient.range_prefix``), then follow every change
after it (``EtcdClient.watch``).  It speaks HTTP/1.1 to the gRPC gateway every
etcd member serves on its client URLs (``POST /v3/kv/range``, ``/v3/watch``,
``/v3/maintenance/status``), so the daemon needs no gRPC or protobuf
dependency.

On that wire (as etcd 3.4 answers): ``bytes`` fields are base64, ``int64``
fields are JSON strings, and fields at their default (``PUT`` = 0, an empty
value, ``more: false``, a revision of 0) are left out.  A watch is one
long-lived response: chunked, one JSON object per line, each wrapping a
``WatchResponse`` in ``{"result": ...}`` or a failure in ``{"error": ...}``.

Errors: ``EtcdUnavailable`` when no endpoint answers (retry later),
``EtcdCompacted`` when the revision asked for is gone (list again),
``EtcdRequestError`` when etcd refuses the request, ``EtcdProtocolError`` when
an answer is not what etcd sends.  All derive from ``EtcdError``.
``EtcdTooLarge``, an ``EtcdUnavailable``, when an answer or watch message
outgrows the client's limits (see ``message_limit``): nothing bigger than
the limit is ever read or parsed.
"""

from __future__ import annotations

import base64
import binascii
import errno
import http.client
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdProtocolError",
    "EtcdRequestError",
    "EtcdTooLarge",
    "EtcdUnavailable",
    "KeyValue",
    "Watch",
    "WatchEvent",
    "WatchResponse",
    "message_limit",
    "prefix_range_end",
]

_T = TypeVar("_T")

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_READ_BYTES = 1 << 16
#: JSON bytes of one key-value beside its base64 key and value, at most:
#: ``{"type":"DELETE","kv":{"key":"","create_revision":"","mod_revision":"",
#: "version":"","value":"","lease":""}},`` is 108, four int64 of up to 20
#: digits 80, base64 padding 6; the rest is room for fields etcd may add
KV_FRAMING = 256
#: JSON bytes of a message beside its key-values (header, flags, counts)
MESSAGE_FRAMING = 4096
#: JSON values per key-value allowed in a message, as ``_json`` counts
#: them (commas and opening brackets): a watch event has at most 8, a range kv 7
VALUES_PER_KV = 12
#: every byte outside ASCII made "?": etcd's JSON is ASCII (base64, numbers,
#: field names) but for error texts
_ASCII = bytes(range(128)) + b"?" * 128
#: the smallest max_message_bytes: a status answer or a watch's "created"
#: message is a few hundred bytes
MIN_MESSAGE_BYTES = 4096
#: gRPC status codes the gateway reports in ``code`` / ``grpc_code``
_OUT_OF_RANGE = 11
_UNAVAILABLE = 14
_INT64 = re.compile(r"-?[0-9]+")


# ---- errors -------------------------------------------------------------------


class EtcdError(Exception):
    """Base of the errors of this module; never raised itself."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered: connection refused or reset, a timeout, an HTTP
    5xx, a watch stream that ended or went silent.  Nothing is known about
    the request's effect; retry later (a watch: from the revision after the
    last event seen)."""


class EtcdCompacted(EtcdError):
    """The revision asked for was compacted away: list the prefix again at the
    current revision.  ``compact_revision`` is the oldest revision still
    kept, as etcd reports it when it cancels a watch; 0 when etcd does not
    say (a range at a compacted revision only says "compacted")."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message, compact_revision)
        self.message = message
        self.compact_revision = compact_revision

    def __str__(self) -> str:
        return self.message


class EtcdRequestError(EtcdError):
    """etcd refused the request (a revision in the future, permission
    denied, ...): asking another member would not help.  ``code`` is the
    gRPC status code the gateway reports, ``message`` etcd's text."""

    def __init__(self, where: str, code: int, message: str) -> None:
        super().__init__(where, code, message)
        self.where = where
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.where}: etcd refused the request (gRPC code {self.code}): {self.message}"


class EtcdProtocolError(EtcdError):
    """An answer that is not what etcd sends: not JSON, a field of the wrong
    type, keys out of order or outside the prefix, a watch event older than
    the one before it.  A wrong endpoint (not etcd) or an incompatible
    version; retrying the same endpoint will most likely fail the same way."""


class EtcdTooLarge(EtcdUnavailable):
    """An answer or watch message bigger than the client's limits
    (``max_message_bytes``, or more than ``max_message_kvs`` key-values'
    worth of JSON values): refused after reading at most the limit + 1
    bytes, never parsed.  An ``EtcdUnavailable``, so a request fails over to
    the next endpoint (this one may be an impostor streaming garbage) and the
    upstream backs off and retries.  From a watch it most often means a
    catch-up message spanning many revisions (etcd batches up to 1,000):
    list the prefix again at the current revision, which is bounded by what
    the cache holds, and watch from there."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message, limit)
        self.message = message
        self.limit = limit

    def __str__(self) -> str:
        return self.message


# ---- values -------------------------------------------------------------------


class KeyValue(NamedTuple):
    """One key as etcd stores it.  Revisions count etcd's changes (each
    transaction is one revision); ``version`` counts the key's changes since
    its creation.  In a DELETE event only ``key`` and ``mod_revision`` (the
    deletion's revision) are set; the rest are empty or 0."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int


class WatchEvent(NamedTuple):
    type: Literal["PUT", "DELETE"]
    kv: KeyValue


class WatchResponse(NamedTuple):
    """One message of a watch.

    ``revision`` is etcd's store revision when the message was sent, not a
    watermark of the events: while a watch catches up from an old revision,
    one message carries the events of many revisions (each event's
    ``kv.mod_revision`` tells which) and ``revision`` is already the current
    one.  Resume after the last event's ``mod_revision``.  A progress
    notification (``progress``: no events) does promise that every change up
    to its ``revision`` has been delivered, so resuming after it is safe.
    The events of one transaction are never split across messages."""

    revision: int
    events: list[WatchEvent]
    progress: bool


def message_limit(store_bytes: int, max_keys: int, prefix_bytes: int = 0) -> int:
    """The largest etcd answer or watch message, in bytes of JSON, that a
    cache of ``store_bytes`` (record bytes: key + value + a 24-byte header
    each) and ``max_keys`` keys can need, for keys under a prefix of
    ``prefix_bytes`` bytes (what the cache strips from each etcd key)::

        ceil(4 * store_bytes / 3)                 # keys and values in base64
        + max_keys * (KV_FRAMING + ceil(4 * prefix_bytes / 3))
        + MESSAGE_FRAMING

    with KV_FRAMING = 256 and MESSAGE_FRAMING = 4,096 bytes.  Why it is
    enough: a listing holds at most what the store holds (at most
    ``max_keys`` keys whose keys and values add up to at most
    ``store_bytes``), and a range page is part of a listing; one revision's
    events (a transaction never writes a key twice) are part of the state
    after it, or keys it deleted, which were held.  The ring arena does not
    enter: what it carries must fit the store as well.  What does not fit:
    a catch-up watch message spanning many revisions (``EtcdTooLarge``:
    list again instead), a revision the cache could not hold anyway, keys
    the mirror skips (not UTF-8, over 1,024 bytes) beyond the framing's
    slack.

    Give it to ``EtcdClient`` as ``max_message_bytes``, with ``max_keys``
    as ``max_message_kvs``.  The memory that bounds: a message is read up
    to max_message_bytes + 1 bytes, and parsing and decoding it takes at
    most about ``3 * max_message_bytes + 2.5 KiB * max_message_kvs`` at
    its peak (measured with crafted messages: the bytes, their text, the
    parsed strings; at most 210 bytes a JSON value, 12 values a key-value
    counted before parsing; a real message of big values peaks at 2 times
    its size).  For the daemon's default cache (64 MiB store, 65,536 keys,
    a 32-byte prefix): a limit of 104 MiB, a worst case of 472 MiB; for a
    1 MiB store of 1,024 keys: 1.6 MiB and 7.3 MiB."""
    _check_count("store_bytes", store_bytes, 1)
    _check_count("max_keys", max_keys, 1)
    _check_count("prefix_bytes", prefix_bytes, 0)
    return (-(-4 * store_bytes // 3) + max_keys * (KV_FRAMING - (-4 * prefix_bytes // 3))
            + MESSAGE_FRAMING)


def _check_count(label: str, value: int, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{label} must be an integer >= {least}, not {value!r}")


#: the limits of a client that is not told any: those of the daemon's
#: default cache (64 MiB store, 65,536 keys) under a prefix of 32 bytes
DEFAULT_MAX_MESSAGE_KVS = 65536
DEFAULT_MAX_MESSAGE_BYTES = message_limit(64 << 20, DEFAULT_MAX_MESSAGE_KVS, 32)


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes [prefix, range_end) exactly the keys that
    start with ``prefix``: the prefix without its trailing 0xff bytes, last
    byte + 1.  ``b"\\0"`` (etcd's "every key from ``key`` on") when no such
    bound exists: an empty prefix or one of 0xff bytes only."""
    stem = prefix.rstrip(b"\xff")
    if not stem:
        return b"\0"
    return stem[:-1] + bytes([stem[-1] + 1])


# ---- endpoints and transport ---------------------------------------------------


class _Endpoint(NamedTuple):
    url: str  # as given, for messages
    scheme: str
    host: str
    port: int


def _parse_endpoint(text: str) -> _Endpoint:
    if not isinstance(text, str):
        raise ValueError(f"etcd endpoint {text!r}: not a string")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:  # a port that is not a number, or out of range
        raise ValueError(f"etcd endpoint {text!r}: {err}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {text!r}: the scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {text!r}: no host")
    if port is None or port == 0:
        raise ValueError(f"etcd endpoint {text!r}: no port (etcd's client port is usually 2379)")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"etcd endpoint {text!r}: credentials in the URL are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {text!r}: only scheme://host:port is allowed")
    return _Endpoint(text, parts.scheme, parts.hostname, port)


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    for label, path in (("CA", ca), ("client certificate", cert), ("client key", key)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"etcd {label} file not found", path)
    if key is not None and cert is None:
        raise ValueError("etcd client key given without a client certificate (cert=)")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        raise ValueError(f"etcd TLS files (ca={ca!r}, cert={cert!r}, key={key!r}): {err}") from err
    return context


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, http.client.IncompleteRead):
        return "the connection was closed in the middle of an answer"
    return str(err) or type(err).__name__


@contextmanager
def _transport(where: str) -> Iterator[None]:
    """The one place where socket, TLS and HTTP failures become
    ``EtcdUnavailable``.  ValueError is among them because http.client
    raises it for a chunked stream cut off inside a chunk header."""
    try:
        yield
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise EtcdUnavailable(f"{where}: {_describe(err)}") from err


def _read_body(where: str, response: http.client.HTTPResponse, limit: int) -> bytearray:
    """The whole body of ``response``, read a block at a time: never more
    than ``limit`` + 1 bytes, whatever Content-Length says or however long
    a chunked body goes on."""
    if response.length is not None and response.length > limit:
        raise EtcdTooLarge(f"{where}: an answer of {response.length} bytes, over the limit of {limit}", limit)
    data = bytearray()
    while True:
        block = response.read1(min(_READ_BYTES, limit + 1 - len(data)))
        if not block:
            break
        data += block
        if len(data) > limit:
            raise EtcdTooLarge(f"{where}: an answer over the limit of {limit} bytes", limit)
    if response.length:  # read1 returns b"" at a premature end instead of raising IncompleteRead
        raise http.client.IncompleteRead(bytes(data[-80:]), response.length)
    return data


# ---- decoding -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name, 0)  # absent: proto3's default
    if isinstance(value, str) and _INT64.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise EtcdProtocolError(f"field {name!r} is not an integer: {value!r}")


def _bytes(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name, "")
    if not isinstance(value, str):
        raise EtcdProtocolError(f"field {name!r} is not base64 text: {value!r}")
    try:
        # what b64decode(validate=True) checks, without its ASCII copy of the text
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as err:
        raise EtcdProtocolError(f"field {name!r} is not base64: {value[:80]!r}") from err


def _dict(obj: dict[str, Any], name: str) -> dict[str, Any]:
    value = obj.get(name)
    if not isinstance(value, dict):
        raise EtcdProtocolError(f"field {name!r} missing or not an object: {value!r}")
    return value


def _list(obj: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = obj.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise EtcdProtocolError(f"field {name!r} is not a list of objects")
    return value


def _bool(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise EtcdProtocolError(f"field {name!r} is not a boolean: {value!r}")
    return value


def _header_revision(answer: dict[str, Any]) -> int:
    return _int(_dict(answer, "header"), "revision")


def _kv(obj: dict[str, Any]) -> KeyValue:
    return KeyValue(_bytes(obj, "key"), _bytes(obj, "value"), _int(obj, "mod_revision"),
                    _int(obj, "create_revision"), _int(obj, "version"))


def _event(obj: dict[str, Any]) -> WatchEvent:
    kind = obj.get("type", "PUT")
    if kind not in ("PUT", "DELETE"):
        raise EtcdProtocolError(f"unknown event type {kind!r}")
    return WatchEvent(kind, _kv(_dict(obj, "kv")))


def _refusal(where: str, status: int, answer: Any) -> EtcdError:
    """The error an answer other than 200 stands for.  The gateway's body is
    ``{"error": text, "message": text, "code": gRPC code}`` for a unary call
    and ``{"grpc_code", "http_code", "message", "http_status"}`` inside a
    stream's ``{"error": ...}``."""
    if isinstance(answer, dict):
        code = answer.get("code", answer.get("grpc_code"))
        message = answer.get("message")
        http_status = answer.get("http_code", status)
        if isinstance(code, int) and isinstance(message, str) and isinstance(http_status, int):
            if code == _UNAVAILABLE or http_status >= 500 or http_status == 429:
                return EtcdUnavailable(f"{where}: {message}")
            if code == _OUT_OF_RANGE and "compacted" in message:
                return EtcdCompacted(f"{where}: {message}", 0)
            return EtcdRequestError(where, code, message)
    return EtcdProtocolError(f"{where}: HTTP {status} with an answer etcd does not give: {answer!r:.200}")


def _json(where: str, what: str, data: bytearray, max_values: int) -> Any:
    """``data`` parsed, and emptied, unless it holds more than
    ``max_values`` JSON values.

    json builds an object of 50 to 250 bytes per value however short its
    text (``[{},{},...]`` costs 24 times its size), so values are counted
    first, at C speed: each but the first follows a ``,`` or opens an object
    or array (commas inside strings only overcount; etcd's strings are
    base64 and numbers).  Bytes beyond ASCII become "?": etcd's JSON is
    ASCII but for error texts, and one character beyond U+FFFF would make
    the str of the whole message, and each string with it, 4 bytes a
    character.  ``data`` is emptied once decoded, so that the parse never
    holds the message's bytes and its text at once."""
    values = data.count(b",") + data.count(b"{") + data.count(b"[") + 1
    if values > max_values:
        raise EtcdTooLarge(f"{where}: {what} of {values} JSON values or more, over the limit of "
                           f"{max_values}", max_values)
    text = (data if data.isascii() else data.translate(_ASCII)).decode("ascii")
    data.clear()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise EtcdProtocolError(f"{where}: {what} that is not JSON: {text[:200]!r}") from None


def _answer(where: str, status: int, data: bytearray, max_values: int) -> dict[str, Any]:
    """The JSON object of a 200 answer; any other status raises.  Empties ``data``."""
    # 5xx is the gateway's translation of Unavailable (no leader, shutting
    # down), DeadlineExceeded, Internal; 429 of "too many requests": all
    # about this member now, so another member may well answer.
    if status >= 500 or status == 429:
        raise EtcdUnavailable(f"{where}: HTTP {status}: {bytes(data[:200])!r}")
    answer = _json(where, f"HTTP {status} with a body", data, max_values)
    if status != 200:
        raise _refusal(where, status, answer)
    if not isinstance(answer, dict):
        raise EtcdProtocolError(f"{where}: an answer that is not a JSON object: {answer!r:.200}")
    return answer


# ---- the client -----------------------------------------------------------------


class EtcdClient:
    """A read-only client of one etcd cluster, by any of its members' client
    URLs.

    ``endpoints`` are ``http://host:port`` or ``https://host:port``, all
    with the same scheme (a failover never moves from TLS to plaintext).
    For https, ``ca`` is the CA bundle that signed the members' certificates
    (default: the system's) and ``cert`` / ``key`` the client certificate
    and its key (``key`` may be left out when ``cert`` holds both); with any
    of them, every endpoint must be https.  Files are read, and endpoints
    checked, here: a bad one raises ValueError (or FileNotFoundError)
    naming it.

    ``max_message_bytes`` bounds each answer and each watch message, in
    bytes of JSON, and ``max_message_kvs`` the key-values' worth of JSON
    values in one (range pages ask for no more keys than that); a bigger
    one raises ``EtcdTooLarge`` after at most ``max_message_bytes`` + 1
    bytes were read.  ``message_limit`` derives the bytes from the cache
    the answers go to, with ``max_message_kvs`` its ``max_keys``; the
    defaults fit the daemon's default cache.

    ``timeout`` (seconds) bounds connecting and each wait for an answer's
    bytes, per endpoint: a request tries the endpoints round-robin, from the
    last one that answered, and moves on when one cannot be reached, times
    out or answers 5xx; when all fail it raises ``EtcdUnavailable``.  So a
    request takes at most about ``len(endpoints) * timeout`` when endpoints
    hang, much less when they refuse connections.

    Every request uses its own connection, so one client may serve several
    threads, and a failover never meets a stale keep-alive connection.
    """

    def __init__(self, endpoints: list[str], *, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, timeout: float = 5.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_message_kvs: int = DEFAULT_MAX_MESSAGE_KVS) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a list of URLs, not one string")
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        _check_count("max_message_bytes", max_message_bytes, MIN_MESSAGE_BYTES)
        _check_count("max_message_kvs", max_message_kvs, 1)
        self._endpoints = tuple(_parse_endpoint(e) for e in endpoints)
        self.endpoints = tuple(e.url for e in self._endpoints)
        self.timeout = float(timeout)
        self.max_message_bytes = max_message_bytes
        self.max_message_kvs = max_message_kvs
        # a status answer or an error is a few values however small the cache
        self._max_values = VALUES_PER_KV * max_message_kvs + 64
        if ca is not None or cert is not None or key is not None:
            for endpoint in self._endpoints:
                if endpoint.scheme != "https":
                    raise ValueError(f"etcd endpoint {endpoint.url!r} is not https://, but TLS files are given "
                                     f"(ca/cert/key): with TLS every endpoint must be https://")
        first = self._endpoints[0]
        for endpoint in self._endpoints[1:]:
            if endpoint.scheme != first.scheme:
                # a failover from an https endpoint to an http one would send
                # the same requests, and get the answers, in plaintext
                raise ValueError(f"etcd endpoints {first.url!r} and {endpoint.url!r}: all endpoints must use "
                                 f"the same scheme (http:// or https://)")
        self._tls: ssl.SSLContext | None = None
        if first.scheme == "https":
            self._tls = _tls_context(ca, cert, key)
        self._preferred = 0  # index of the endpoint that answered last

    def __repr__(self) -> str:
        return (f"EtcdClient({list(self.endpoints)!r}, timeout={self.timeout}, "
                f"max_message_bytes={self.max_message_bytes}, max_message_kvs={self.max_message_kvs})")

    # ---- requests --------------------------------------------------------

    def range_prefix(self, prefix: bytes, *, revision: int = 0, page: int = 1000) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` at one revision: ``(revision, kvs)``,
        kvs sorted by key.

        ``revision`` 0 reads the current revision (the one returned); any
        other is read as it was then, and raises ``EtcdCompacted`` if etcd no
        longer keeps it.  ``page`` keys at most are asked for at a time; the
        pages after the first read at the first one's revision, so the list
        is one consistent snapshot however long it takes (unless a
        compaction passes that revision in between: ``EtcdCompacted``)."""
        if revision < 0:
            raise ValueError(f"revision must be >= 0, not {revision}")
        if page < 1:
            raise ValueError(f"page must be >= 1, not {page}")
        page = min(page, self.max_message_kvs)  # a fuller page would be refused as too large
        start = prefix or b"\0"  # etcd has no empty key; b"\0" is the smallest
        end = prefix_range_end(prefix)
        at = revision
        kvs: list[KeyValue] = []
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": str(page)}
            if at:
                body["revision"] = str(at)
            answer = self._call("/v3/kv/range", body)
            if not at:
                # the revision a range at "now" was served at; when a
                # revision is given, the header carries the current one
                at = _header_revision(answer)
                if at < 1:
                    raise EtcdProtocolError(f"a range answer at revision {at}")
            got = [_kv(item) for item in _list(answer, "kvs")]
            more = _bool(answer, "more")
            del answer  # the parsed page costs several times its kvs: not kept while the next is read
            for kv in got:
                if not kv.key.startswith(prefix) or kv.key < start or (kvs and kv.key <= kvs[-1].key):
                    raise EtcdProtocolError(f"range under {prefix!r}: key {kv.key!r} out of order or outside")
                if kv.mod_revision > at:
                    raise EtcdProtocolError(f"range at revision {at}: key {kv.key!r} "
                                            f"modified at {kv.mod_revision}")
                kvs.append(kv)
            if not more:
                return at, kvs
            if not got:
                raise EtcdProtocolError(f"range under {prefix!r}: 'more' without any key")
            start = kvs[-1].key + b"\0"  # the next key after the last one

    def watch(self, prefix: bytes, start_revision: int, *, progress_notify: bool = True,
              idle_timeout: float | None = None) -> Watch:
        """Every change under ``prefix`` from ``start_revision`` on (0: from
        the next change), as a ``Watch``: iterate it for ``WatchResponse``s,
        close it (or use it as a context manager) when done.

        ``progress_notify`` asks etcd for progress notifications while
        nothing changes (every ``--experimental-watch-progress-notify-
        interval`` of the server, 10 min by default).  ``idle_timeout``
        (seconds; None: wait forever) bounds the wait for the next message:
        set it to a few times that interval so that a member that silently
        went away ends the watch with ``EtcdUnavailable`` instead of a hang.

        The watch is established here (failover as for any request: an
        endpoint that cannot be reached is skipped); a ``start_revision``
        etcd no longer keeps shows as ``EtcdCompacted`` from the first
        iteration."""
        if start_revision < 0:
            raise ValueError(f"start_revision must be >= 0, not {start_revision}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds or None, not {idle_timeout!r}")
        create: dict[str, Any] = {"key": _b64(prefix or b"\0"), "range_end": _b64(prefix_range_end(prefix))}
        if start_revision:
            create["start_revision"] = str(start_revision)
        if progress_notify:
            create["progress_notify"] = True
        payload = json.dumps({"create_request": create}).encode()

        def attempt(endpoint: _Endpoint) -> Watch:
            return Watch._open(self._connection(endpoint), endpoint.url, payload, prefix, start_revision,
                               idle_timeout, self.max_message_bytes, self._max_values)

        return self._failover(attempt)

    def status(self) -> dict[str, Any]:
        """The answering member's ``/v3/maintenance/status``, as etcd sent it
        (int64 fields as strings): ``version``, ``dbSize``, ``leader``,
        ``header`` (``member_id``, ``revision``, ...)."""
        answer = self._call("/v3/maintenance/status", {})
        _header_revision(answer)
        return answer

    # ---- plumbing --------------------------------------------------------

    def _connection(self, endpoint: _Endpoint) -> http.client.HTTPConnection:
        # TLS is decided once for the client, not per endpoint: no endpoint
        # can take a request to plaintext (the constructor refused mixed schemes)
        if self._tls is not None:
            return http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=self.timeout,
                                               context=self._tls)
        return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)

    def _failover(self, attempt: Callable[[_Endpoint], _T]) -> _T:
        count = len(self._endpoints)
        first = self._preferred
        failures: list[EtcdUnavailable] = []
        for i in range(count):
            index = (first + i) % count
            try:
                result = attempt(self._endpoints[index])
            except EtcdUnavailable as err:
                failures.append(err)
                continue
            self._preferred = index
            return result
        raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(map(str, failures))) from failures[-1]

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body).encode()

        def attempt(endpoint: _Endpoint) -> dict[str, Any]:
            where = endpoint.url + path
            conn = self._connection(endpoint)
            try:
                with _transport(where):
                    conn.request("POST", path, body=payload, headers=_HEADERS)
                    with conn.getresponse() as response:
                        status, data = response.status, _read_body(where, response, self.max_message_bytes)
            finally:
                conn.close()
            return _answer(where, status, data, self._max_values)

        return self._failover(attempt)


class Watch:
    """One watch stream (see ``EtcdClient.watch``): an iterator of
    ``WatchResponse``s and a context manager.

    Iteration raises ``EtcdCompacted`` if etcd cancels the watch because its
    start revision was compacted, ``EtcdUnavailable`` if the stream breaks,
    ends or stays silent past ``idle_timeout``; after either, or after
    ``close()``, the watch is closed and iteration stops.  Events arrive in
    revision order, each at most once.  One thread iterates; ``close()`` may
    come from any thread or a signal handler."""

    def __init__(self, conn: http.client.HTTPConnection, url: str, prefix: bytes, start_revision: int,
                 idle_timeout: float | None, max_bytes: int, max_values: int) -> None:
        self.url = url
        self.prefix = prefix
        self.start_revision = start_revision
        self.idle_timeout = idle_timeout
        self._max_bytes = max_bytes
        self._max_values = max_values
        self._conn = conn
        self._response: http.client.HTTPResponse | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer known to hold no newline
        self._last_event = 0  # mod_revision of the newest event delivered
        self._closed = False
        self._lock = threading.Lock()  # held while a thread reads the stream

    @classmethod
    def _open(cls, conn: http.client.HTTPConnection, url: str, payload: bytes, prefix: bytes,
              start_revision: int, idle_timeout: float | None, max_bytes: int, max_values: int) -> Watch:
        watch = cls(conn, url, prefix, start_revision, idle_timeout, max_bytes, max_values)
        try:
            watch._establish(payload)
        except BaseException:
            watch.close()
            raise
        return watch

    def _establish(self, payload: bytes) -> None:
        where = self.url + "/v3/watch"
        with _transport(where):
            self._conn.request("POST", "/v3/watch", body=payload, headers=_HEADERS)
            self._sock = self._conn.sock
            self._response = self._conn.getresponse()
        if self._response.status != 200:
            with _transport(where):
                data = _read_body(where, self._response, self._max_bytes)
            _answer(where, self._response.status, data, self._max_values)
            raise EtcdProtocolError(f"{where}: HTTP {self._response.status}")
        first = self._result()
        if not _bool(first, "created") or _bool(first, "canceled"):
            raise EtcdProtocolError(f"{where}: the first message does not confirm the watch: {first!r:.300}")
        if self._sock is not None:
            # the connection's timeout covered connecting and the first
            # message; from now on silence is normal up to idle_timeout
            self._sock.settimeout(self.idle_timeout)

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> WatchResponse:
        if not self._lock.acquire(blocking=False):
            if self._closed:  # close() is releasing the connection
                raise StopIteration
            raise RuntimeError(f"{self!r} is being iterated by another thread")
        try:
            if self._closed:
                raise StopIteration
            try:
                return self._next()
            except EtcdError:
                if self._closed:  # close() from another thread cut the stream
                    raise StopIteration from None
                self._closed = True
                raise
            except BaseException:
                self._closed = True  # interrupted inside a message: the stream is no longer usable
                raise
        finally:
            self._lock.release()
            if self._closed:
                self._release_if_idle()

    def _next(self) -> WatchResponse:
        result = self._result()
        if _bool(result, "canceled"):
            compacted = _int(result, "compact_revision")
            if compacted > 0:
                raise EtcdCompacted(f"{self.url}: watch from revision {self.start_revision}: etcd compacted "
                                    f"the revisions before {compacted}", compacted)
            reason = result.get("cancel_reason") or "no reason given"
            raise EtcdUnavailable(f"{self.url}: etcd canceled the watch: {reason}")
        if _bool(result, "created") or _bool(result, "fragment"):
            raise EtcdProtocolError(f"{self.url}: unexpected watch message {result!r:.300}")
        revision = _header_revision(result)
        events = [_event(item) for item in _list(result, "events")]
        for event in events:
            rev = event.kv.mod_revision
            if not event.kv.key.startswith(self.prefix) or rev < self._last_event or rev > revision \
                    or rev < self.start_revision:
                raise EtcdProtocolError(f"{self.url}: watch event {event!r:.200} at header revision {revision} "
                                        f"after revision {self._last_event}")
            self._last_event = rev
        return WatchResponse(revision, events, not events)

    def _result(self) -> dict[str, Any]:
        """The next message's ``result`` object; a stream ``error`` raises."""
        message = _json(self.url, "a watch message", self._line(), self._max_values)
        if not isinstance(message, dict):
            raise EtcdProtocolError(f"{self.url}: a watch message that is not an object: {message!r:.200}")
        if "error" in message:
            raise _refusal(self.url + "/v3/watch", 200, message["error"])
        return _dict(message, "result")

    def _line(self) -> bytearray:
        """The next non-empty line of the stream (the gateway ends each
        message with a newline; a last one without it counts too).  The
        buffer never holds more than the limit + 1 bytes without a newline."""
        response = self._response
        if response is None:
            raise EtcdUnavailable(f"{self.url}: the watch is closed")
        limit = self._max_bytes
        while True:
            buffer = self._buffer
            end = buffer.find(b"\n", self._scanned)
            if end >= 0:
                if end > limit:  # cannot happen with the reads below; refused all the same
                    raise EtcdTooLarge(f"{self.url}: a watch message over the limit of {limit} bytes", limit)
                # copy the smaller part: a big message is not copied again
                if 2 * end > len(buffer):
                    line, self._buffer = buffer, buffer[end + 1:]
                    del line[end:]
                else:
                    line = buffer[:end]
                    del buffer[:end + 1]
                self._scanned = 0
                if line and not line.isspace():  # strip() would copy the message
                    return line
                continue
            self._scanned = len(buffer)
            room = limit + 1 - len(buffer)
            if room <= 0:
                raise EtcdTooLarge(f"{self.url}: a watch message over the limit of {limit} bytes", limit)
            with _transport(self.url + "/v3/watch"):
                chunk = response.read1(min(_READ_BYTES, room))
            if not chunk:
                if buffer and not buffer.isspace():
                    self._buffer = bytearray()
                    self._scanned = 0
                    return buffer
                raise EtcdUnavailable(f"{self.url}: the watch stream ended")
            buffer += chunk

    def close(self) -> None:
        """End the watch and close its connection; idempotent.  Safe from
        another thread, and from a signal handler, while an iteration waits
        for etcd: that iteration stops."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            # Wakes a thread blocked reading (it then sees _closed).  The
            # plain socket's shutdown, also for TLS: SSLSocket.shutdown would
            # drop the TLS object under that thread's feet.
            with suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        """Close the connection unless an iteration is reading from it.  Never
        waits, so that a signal handler interrupting that very iteration
        cannot deadlock: the iteration closes it on its way out instead (it
        looks at _closed after letting go of the lock, and _closed was set
        before this attempt to take it)."""
        if self._lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._lock.release()

    def _release(self) -> None:
        response, self._response, self._sock = self._response, None, None
        try:
            if response is not None:
                response.close()
        finally:
            self._conn.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Watch {self.prefix!r} from {self.start_revision} on {self.url}, {state}>"
