"""The etcd client reads nothing without a bound: a peer that announces or
streams far more than the client's limit (an answer's Content-Length, an
endless chunked body, a watch line that never ends, a message of tiny JSON
values that costs 40 times its size to parse) gets ``EtcdTooLarge`` after
at most the limit + 1 bytes, and memory stays within a few times the limit
while the peer offered 50 times it.  The limits derive from the cache
(``message_limit``) and a full cache still fits them, against a real etcd;
a catch-up message over the limit makes the upstream list again.

Memory is measured with tracemalloc around the client call (the fake
server's thread writes from one preallocated block, so it adds nothing).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from daemon._etcd import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_MESSAGE_KVS,
    KV_FRAMING,
    MESSAGE_FRAMING,
    MIN_MESSAGE_BYTES,
    VALUES_PER_KV,
    EtcdClient,
    EtcdProtocolError,
    EtcdTooLarge,
    EtcdUnavailable,
    message_limit,
)
from daemon._upstream import Upstream
from shmcache import Reader, Writer

from ._etcd import PROGRESS_INTERVAL, EtcdServer
from ._fakehttp import FakeServer, Peer, fake_server
from .support import remove_cache, unique_name

LIMIT = 1 << 20  # the client's max_message_bytes in the fake-server tests
OFFERED = 50 * LIMIT  # what a hostile answer offers
TIMEOUT = 10.0
DEADLINE = 30.0
IDLE = 20 * PROGRESS_INTERVAL


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bounded_client(server: FakeServer | str, *, max_bytes: int = LIMIT, max_kvs: int = 1024) -> EtcdClient:
    url = server if isinstance(server, str) else server.url
    return EtcdClient([url], timeout=TIMEOUT, max_message_bytes=max_bytes, max_message_kvs=max_kvs)


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a list that holds, afterwards, the peak of Python memory
    allocated inside the block above what was allocated before it."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    out: list[int] = []
    try:
        yield out
    finally:
        out.append(tracemalloc.get_traced_memory()[1] - before)
        if not was_tracing:
            tracemalloc.stop()


def figures(what: str, peak: int, server: FakeServer | None = None) -> str:
    offered = f", the server offered {OFFERED / LIMIT:.0f}x" if server is not None else ""
    sent = f" and got {server.sent / LIMIT:.2f}x into the socket" if server is not None else ""
    return f"{what}: peak {peak / LIMIT:.2f}x the limit of {LIMIT} bytes{offered}{sent}"


# ---- answers of a hostile peer --------------------------------------------------


def huge_content_length(peer: Peer) -> None:
    peer.head(200, Content_Type="application/json", Content_Length=OFFERED)
    peer.stream(OFFERED, chunked=False)


def until_close(peer: Peer) -> None:
    """No Content-Length, not chunked: the body ends when the connection does."""
    peer.head(200, Content_Type="application/json", Connection="close")
    peer.stream(OFFERED, chunked=False)


def endless_chunks(peer: Peer) -> None:
    peer.head(200, Content_Type="application/json", Transfer_Encoding="chunked")
    peer.stream(OFFERED, chunked=True)


def created(revision: int = 5) -> bytes:
    return json.dumps({"result": {"header": {"revision": str(revision)}, "created": True}}).encode() + b"\n"


def watch_then(rest: Callable[[Peer], None]) -> Callable[[Peer], None]:
    """A watch stream: the "created" message, then ``rest``."""

    def answer(peer: Peer) -> None:
        peer.head(200, Content_Type="application/json", Transfer_Encoding="chunked")
        peer.chunk(created())
        rest(peer)

    return answer


def event_message(value: bytes, revision: int = 5) -> bytes:
    kv = {"key": b64(b"/p/k"), "value": b64(value), "mod_revision": str(revision),
          "create_revision": str(revision), "version": "1"}
    return json.dumps({"result": {"header": {"revision": str(revision)}, "events": [{"kv": kv}]}}).encode()


def padded(message: bytes, size: int) -> bytes:
    """``message`` grown to exactly ``size`` bytes with JSON whitespace."""
    assert message.endswith(b"}") and len(message) <= size
    return message[:-1] + b" " * (size - len(message)) + b"}"


# ---- message_limit and the client's arguments ------------------------------------


def test_message_limit_formula() -> None:
    assert message_limit(3, 1) == 4 + KV_FRAMING + MESSAGE_FRAMING
    assert message_limit(3, 1, 3) == 4 + KV_FRAMING + 4 + MESSAGE_FRAMING
    assert message_limit(1 << 16, 64, 6) == -(-(4 << 16) // 3) + 64 * (KV_FRAMING + 8) + MESSAGE_FRAMING
    assert DEFAULT_MAX_MESSAGE_BYTES == message_limit(64 << 20, DEFAULT_MAX_MESSAGE_KVS, 32)
    assert 104 << 20 < DEFAULT_MAX_MESSAGE_BYTES < 105 << 20
    assert message_limit(2, 1) < message_limit(3, 1) < message_limit(3, 2) < message_limit(3, 2, 1)
    assert message_limit(1, 1) >= MIN_MESSAGE_BYTES  # any cache's limit is a valid client limit


@pytest.mark.parametrize(("args", "what"), [
    ((0, 1), "store_bytes"), ((1, 0), "max_keys"), ((1, 1, -1), "prefix_bytes"),
    ((True, 1), "store_bytes"), ((1.5, 1), "store_bytes"), (("64", 1), "store_bytes"),
])
def test_message_limit_bad_arguments(args: tuple[object, ...], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        message_limit(*args)  # type: ignore[arg-type]


def test_client_limit_arguments() -> None:
    url = ["http://127.0.0.1:2379"]
    client = EtcdClient(url)
    assert (client.max_message_bytes, client.max_message_kvs) == (DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_KVS)
    assert f"max_message_bytes={DEFAULT_MAX_MESSAGE_BYTES}" in repr(client)
    for bad in (MIN_MESSAGE_BYTES - 1, 0, -1, True, 4096.0):
        with pytest.raises(ValueError, match="max_message_bytes"):
            EtcdClient(url, max_message_bytes=bad)  # type: ignore[arg-type]
    for bad in (0, -1, False):
        with pytest.raises(ValueError, match="max_message_kvs"):
            EtcdClient(url, max_message_kvs=bad)
    EtcdClient(url, max_message_bytes=MIN_MESSAGE_BYTES, max_message_kvs=1)


# ---- unary answers ----------------------------------------------------------------


@pytest.mark.parametrize("answer", [huge_content_length, until_close, endless_chunks],
                         ids=["content-length", "until-close", "chunked"])
def test_an_answer_over_the_limit_is_refused_in_bounded_memory(answer: Callable[[Peer], None]) -> None:
    with fake_server({"/v3/kv/range": answer, "/v3/maintenance/status": answer}) as server:
        client = bounded_client(server)
        with peak_memory() as peak, pytest.raises(EtcdUnavailable, match="over the limit of") as info:
            client.range_prefix(b"/p/")
        assert isinstance(info.value.__cause__, EtcdTooLarge)
        assert info.value.__cause__.limit == LIMIT
        with pytest.raises(EtcdUnavailable, match="over the limit of"):
            client.status()
    print(figures(f"range, {answer.__name__}", peak[0], server))
    assert peak[0] < 3 * LIMIT, figures(answer.__name__, peak[0], server)
    # what the client took: the limit and what the kernel's buffers held when it hung up
    assert server.sent < OFFERED / 2


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_of_exactly_the_limit_passes_one_byte_more_does_not(chunked: bool) -> None:
    body = json.dumps({"header": {"revision": "7"}, "version": "3.5.0"}).encode()

    def exact(size: int) -> Callable[[Peer], None]:
        def answer(peer: Peer) -> None:
            data = padded(body, size)
            if chunked:
                peer.head(200, Content_Type="application/json", Transfer_Encoding="chunked")
                for i in range(0, len(data), 1000):
                    peer.chunk(data[i:i + 1000])
                peer.send(b"0\r\n\r\n")
            else:
                peer.answer(data)
        return answer

    with fake_server({"/v3/maintenance/status": exact(MIN_MESSAGE_BYTES)}) as server:
        assert bounded_client(server, max_bytes=MIN_MESSAGE_BYTES).status()["version"] == "3.5.0"
    with fake_server({"/v3/maintenance/status": exact(MIN_MESSAGE_BYTES + 1)}) as server, \
            pytest.raises(EtcdUnavailable, match=f"over the limit of {MIN_MESSAGE_BYTES}"):
        bounded_client(server, max_bytes=MIN_MESSAGE_BYTES).status()


def test_an_answer_of_too_many_tiny_values_is_refused_unparsed() -> None:
    # 6 bytes a kv, 2 values each: what json turns into ~250 bytes a kv
    kvs = ",".join(["{}"] * 50_000)
    body = ('{"header":{"revision":"7"},"kvs":[' + kvs + "]}").encode()
    assert len(body) < LIMIT
    with fake_server({"/v3/kv/range": lambda peer: peer.answer(body)}) as server:
        with peak_memory() as peak, \
                pytest.raises(EtcdUnavailable, match="JSON values or more, over the limit of") as info:
            bounded_client(server, max_kvs=1000).range_prefix(b"/p/")
        assert isinstance(info.value.__cause__, EtcdTooLarge)
    print(figures("range of 50,000 empty kvs, 1,000 allowed", peak[0]))
    assert peak[0] < 2 * len(body)


def test_json_nested_beyond_the_recursion_limit_is_a_protocol_error() -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with fake_server({"/v3/maintenance/status": lambda peer: peer.answer(body)}) as server, \
            pytest.raises(EtcdProtocolError, match="not JSON"):
        bounded_client(server, max_kvs=100_000).status()


def test_an_answer_cut_short_of_its_content_length() -> None:
    def short(peer: Peer) -> None:
        peer.head(200, Content_Type="application/json", Content_Length=1000)
        peer.send(b'{"header":')

    with fake_server({"/v3/maintenance/status": short}) as server, \
            pytest.raises(EtcdUnavailable, match="closed in the middle of an answer"):
        bounded_client(server).status()


def test_text_beyond_ascii_is_parsed_as_question_marks() -> None:
    body = json.dumps({"header": {"revision": "7"}, "version": "3.5 \u00e9\U0001f600"}, ensure_ascii=False)
    with fake_server({"/v3/maintenance/status": lambda peer: peer.answer(body.encode())}) as server:
        assert bounded_client(server).status()["version"] == "3.5 ??????"


# ---- watch streams ----------------------------------------------------------------


def endless_line(peer: Peer) -> None:
    peer.stream(OFFERED, chunked=True)  # BLOCK holds no newline


def test_a_watch_line_over_the_limit_is_refused_in_bounded_memory() -> None:
    with fake_server({"/v3/watch": watch_then(endless_line)}) as server, peak_memory() as peak, \
            bounded_client(server).watch(b"/p/", 5) as watch:
        with pytest.raises(EtcdTooLarge, match="a watch message over the limit of") as info:
            next(watch)
        assert info.value.limit == LIMIT
        with pytest.raises(StopIteration):
            next(watch)  # the watch is closed
    print(figures("watch line", peak[0], server))
    assert peak[0] < 3 * LIMIT
    assert server.sent < OFFERED / 2


def test_a_first_watch_message_over_the_limit_fails_the_watch() -> None:
    def endless_first_line(peer: Peer) -> None:
        peer.head(200, Content_Type="application/json", Transfer_Encoding="chunked")
        peer.stream(OFFERED, chunked=True)

    with fake_server({"/v3/watch": endless_first_line}) as server:
        with peak_memory() as peak, \
                pytest.raises(EtcdUnavailable, match="a watch message over the limit of") as info:
            bounded_client(server).watch(b"/p/", 5)
        assert isinstance(info.value.__cause__, EtcdTooLarge)
    assert peak[0] < 3 * LIMIT


def test_a_refused_watch_with_an_endless_body() -> None:
    def refused(peer: Peer) -> None:
        peer.head(400, Content_Type="application/json", Transfer_Encoding="chunked")
        peer.stream(OFFERED, chunked=True)

    with fake_server({"/v3/watch": refused}) as server, peak_memory() as peak, \
            pytest.raises(EtcdUnavailable, match="an answer over the limit of"):
        bounded_client(server).watch(b"/p/", 5)
    assert peak[0] < 3 * LIMIT


def test_watch_messages_of_exactly_the_limit_pass_one_byte_more_does_not() -> None:
    message = event_message(b"v" * 1000)

    def lines(peer: Peer) -> None:
        peer.chunk(padded(message, LIMIT) + b"\n")
        peer.chunk(padded(message, LIMIT)[:LIMIT // 2])  # a message split across chunks
        peer.chunk(padded(message, LIMIT)[LIMIT // 2:] + b"\n" + padded(message, LIMIT + 1)[:10])
        peer.chunk(padded(message, LIMIT + 1)[10:] + b"\n")

    with fake_server({"/v3/watch": watch_then(lines)}) as server, bounded_client(server).watch(b"/p/", 5) as watch:
        for _ in range(2):
            response = next(watch)
            assert [e.kv.value for e in response.events] == [b"v" * 1000]
        with pytest.raises(EtcdTooLarge):
            next(watch)


def test_a_stream_of_many_big_messages_stays_bounded() -> None:
    count = 30
    value = b"v" * (LIMIT * 2 // 3)  # base64: 8/9 of the limit
    message = event_message(value) + b"\n"
    assert LIMIT * 3 // 4 < len(message) <= LIMIT

    def messages(peer: Peer) -> None:
        for _ in range(count):
            peer.chunk(message)
        peer.send(b"0\r\n\r\n")

    with fake_server({"/v3/watch": watch_then(messages)}) as server:
        got = 0
        with peak_memory() as peak, bounded_client(server).watch(b"/p/", 5) as watch, \
                pytest.raises(EtcdUnavailable, match="the watch stream ended"):
            for response in watch:
                assert len(response.events) == 1 and response.events[0].kv.value == value
                got += 1
        assert got == count
        assert server.sent > (count - 1) * len(message)
    print(figures(f"{count} watch messages of {len(message)} bytes", peak[0], None))
    # one message at a time: its bytes, json's str of it, the parsed strings, the decoded value
    assert peak[0] < 5 * LIMIT


def test_a_watch_message_of_too_many_tiny_values_is_refused_unparsed() -> None:
    events = ",".join(['{"kv":{}}'] * 20_000)
    line = ('{"result":{"header":{"revision":"5"},"events":[' + events + "]}}\n").encode()
    assert len(line) < LIMIT
    with fake_server({"/v3/watch": watch_then(lambda peer: peer.chunk(line))}) as server, peak_memory() as peak, \
            bounded_client(server, max_kvs=1000).watch(b"/p/", 5) as watch, \
            pytest.raises(EtcdTooLarge, match="JSON values or more"):
        next(watch)
    print(figures("watch of 20,000 empty events, 1,000 allowed", peak[0]))
    assert peak[0] < 3 * len(line)


def test_a_crafted_message_at_both_limits_stays_within_the_documented_bound() -> None:
    """message_limit's docstring: at most about 3 x max_message_bytes +
    2.5 KiB x max_message_kvs, for the costliest values json makes (distinct
    keys with string values) up to the count allowed, and the rest of the
    bytes one string that is not ASCII."""
    kvs = 1024
    count = VALUES_PER_KV * kvs + 64 - 8
    head = '{"result":{"header":{"revision":"5"},' + ",".join(f'"k{i}":"{i}"' for i in range(count)) + ',"pad":"'
    pad = LIMIT - len(head) - len('"}}') - 4
    line = (head + "\U0001f600" + "A" * pad + '"}}').encode()
    assert len(line) == LIMIT
    with fake_server({"/v3/watch": watch_then(lambda peer: peer.chunk(line + b"\n"))}) as server, \
            peak_memory() as peak, bounded_client(server, max_kvs=kvs).watch(b"/p/", 5) as watch:
        response = next(watch)  # a progress notification with many unknown fields
        assert response.progress
    bound = 3 * LIMIT + 2560 * kvs
    print(figures(f"crafted watch message, {kvs} kvs allowed: bound {bound / LIMIT:.2f}x", peak[0]))
    assert peak[0] < bound


# ---- against a real etcd ----------------------------------------------------------


def test_failover_past_an_endpoint_that_answers_too_much(etcd: EtcdServer) -> None:
    rev = etcd.put(b"/f/a", b"1")
    hostile = {"/v3/kv/range": endless_chunks, "/v3/maintenance/status": endless_chunks,
               "/v3/watch": watch_then(endless_line)}
    with fake_server(hostile) as server:
        client = EtcdClient([server.url, etcd.url], timeout=TIMEOUT, max_message_bytes=LIMIT)
        with peak_memory() as peak:
            assert client.range_prefix(b"/f/")[0] == rev
        assert len(server.peers) == 1
        assert peak[0] < 3 * LIMIT
        # the watch goes where the last request was answered: the real etcd
        with client.watch(b"/f/", rev, idle_timeout=IDLE) as watch:
            assert watch.url == etcd.url
            assert next(watch).events[0].kv.value == b"1"


def full_cache(store_bytes: int, max_keys: int, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """``max_keys`` keys under ``prefix`` whose records fill ``store_bytes``
    exactly (24-byte header + key + value each; keys are stored without the
    prefix), values as random as base64 gets."""
    room = store_bytes - max_keys * 24
    keys = [b"%s%04d" % (prefix, i) for i in range(max_keys)]
    sizes = [room // max_keys - 4] * max_keys
    sizes[-1] += room - sum(sizes) - 4 * max_keys
    values = [bytes(range(256)) * (n // 256) + bytes(range(n % 256)) for n in sizes]
    assert sum(len(k) - len(prefix) + len(v) + 24 for k, v in zip(keys, values, strict=True)) == store_bytes
    return list(zip(keys, values, strict=True))


def test_a_full_cache_fits_its_limit(etcd: EtcdServer) -> None:
    store, keys, prefix = 1 << 16, 64, b"/full/"
    limit = message_limit(store, keys, len(prefix))
    client = EtcdClient([etcd.url], timeout=TIMEOUT, max_message_bytes=limit, max_message_kvs=keys)
    items = full_cache(store, keys, prefix)
    before = etcd.revision()
    with client.watch(prefix, before + 1, idle_timeout=IDLE) as watch:
        written = etcd.txn(items)  # one revision: every key of the cache in one watch message
        response = next(r for r in watch if r.events)
        assert [(e.kv.key, e.kv.value) for e in response.events] == items
        deleted = etcd.txn([], [k for k, _ in items])
        response = next(r for r in watch if r.events)
        assert [(e.type, e.kv.mod_revision) for e in response.events] == [("DELETE", deleted)] * keys
    # the listing: one page of every key (page is capped to max_message_kvs)
    rev, kvs = client.range_prefix(prefix, revision=written)
    assert rev == written and [(kv.key, kv.value) for kv in kvs] == items
    raw = etcd.request("/v3/kv/range", {"key": b64(prefix), "range_end": b64(b"/full0"), "revision": str(written)})
    size = len(json.dumps(raw, separators=(",", ":")))
    assert size <= limit < 2 * size  # what etcd sends fits, and the bound is not lavish


def test_upstream_lists_again_when_a_catch_up_message_outgrows_the_limit(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    store, keys, prefix = 1 << 16, 64, b"/up/"
    limit = message_limit(store, keys, len(prefix))
    name = unique_name("bounds")
    try:
        with Writer(name, capacity=256, arena_bytes=1 << 16, max_keys=keys, store_bytes=store) as writer, \
                Reader(name) as reader:
            client = EtcdClient([etcd.url], timeout=TIMEOUT, max_message_bytes=limit, max_message_kvs=keys)
            old = etcd.put(b"/up/k", b"0")
            value = b"v" * 12_000  # each revision fits the cache; 12 of them in one message do not fit the limit
            for i in range(12):
                last = etcd.put(b"/up/k", value + b"%d" % i)
            assert 12 * len(b64(value)) > limit
            upstream = Upstream(writer, client, prefix, keep_prefix=False, idle_timeout=IDLE)
            upstream.mirror.relist(*client.range_prefix(prefix, revision=old))  # behind by 12 revisions
            with caplog.at_level(logging.INFO, logger="shmcached.upstream"):
                upstream.start()
                try:
                    deadline = time.monotonic() + DEADLINE
                    while upstream.mirror.revision < last:
                        assert time.monotonic() < deadline, f"the upstream is stuck: {upstream.state()}"
                        time.sleep(0.05)
                finally:
                    upstream.stop()
            assert not upstream.is_alive()
            assert upstream.relists == 1
            item = reader.get("k")
            assert item is not None and item.value == value + b"11"
            assert "a watch message over the limit" in caplog.text and "listing the prefix again" in caplog.text
    finally:
        remove_cache(name)
