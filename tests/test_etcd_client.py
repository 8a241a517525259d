"""daemon/_etcd.py against a real etcd (tests/_etcd.py starts one per test):
prefix ranges at one revision across pages, watches (events, transactions,
progress notifications, compaction, a crash and a restart), endpoint
failover and validation."""

from __future__ import annotations

import http.server
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon._etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdProtocolError,
    EtcdRequestError,
    EtcdUnavailable,
    KeyValue,
    Watch,
    WatchResponse,
    prefix_range_end,
)

from ._etcd import PROGRESS_INTERVAL, EtcdServer, dead_endpoint

TIMEOUT = 10.0  # the client's per-request timeout: generous on a loaded 2-core machine
IDLE = 20 * PROGRESS_INTERVAL  # idle_timeout of watches that get progress notifications
DEADLINE = 30.0  # for anything the tests wait for

Flat = tuple[str, bytes, bytes, int]


def client_of(server: EtcdServer) -> EtcdClient:
    return EtcdClient([server.url], timeout=TIMEOUT)


def responses_until(watch: Watch, revision: int, timeout: float = DEADLINE) -> list[WatchResponse]:
    """The responses with events, until one holds an event at ``revision``
    or later; progress notifications are left out."""
    deadline = time.monotonic() + timeout
    got: list[WatchResponse] = []
    for response in watch:
        if response.events:
            got.append(response)
            if response.events[-1].kv.mod_revision >= revision:
                return got
        assert time.monotonic() < deadline, f"no event at revision {revision} within {timeout} s; got {got}"
    raise AssertionError(f"the watch ended before revision {revision}; got {got}")


def flat(responses: list[WatchResponse]) -> list[Flat]:
    return [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for r in responses for e in r.events]


# ---- prefix_range_end -----------------------------------------------------------


@pytest.mark.parametrize(("prefix", "end"), [
    (b"/app/", b"/app0"),
    (b"a", b"b"),
    (b"a\x00", b"a\x01"),
    (b"a\xfe", b"a\xff"),
    (b"a\xff", b"b"),
    (b"a\xff\xff", b"b"),
    (b"\x01\xfe\xff", b"\x01\xff"),
    (b"\xff", b"\0"),
    (b"\xff\xff\xff", b"\0"),
    (b"", b"\0"),
])
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert prefix_range_end(prefix) == end


_EDGY = st.lists(st.sampled_from([0x00, 0x01, 0x2f, 0x7f, 0xfe, 0xff]), max_size=6).map(bytes)


@given(_EDGY, _EDGY)
def test_prefix_range_end_bounds_exactly_the_keys_with_the_prefix(prefix: bytes, key: bytes) -> None:
    end = prefix_range_end(prefix)
    in_range = key >= prefix and (end == b"\0" or key < end)  # b"\0": no upper bound
    assert in_range == key.startswith(prefix)


# ---- range_prefix ---------------------------------------------------------------


def test_range_of_an_empty_prefix(etcd: EtcdServer) -> None:
    etcd.put(b"/elsewhere", b"x")
    rev, kvs = client_of(etcd).range_prefix(b"/nothing/")
    assert (rev, kvs) == (etcd.revision(), [])


def test_range_takes_exactly_the_keys_under_the_prefix(etcd: EtcdServer) -> None:
    revs: dict[bytes, int] = {}
    for key in (b"/app", b"/ap", b"/app0", b"/apq", b"/app/\xff\xff", b"/app/", b"/app/b", b"/app/a",
                b"/app/\xff", b"/app/\x00", b"/app0/x"):
        revs[key] = etcd.put(key, b"v" + key)
    updated = etcd.put(b"/app/b", b"second")
    empty = etcd.put(b"/app/empty", b"")
    rev, kvs = client_of(etcd).range_prefix(b"/app/")
    assert rev == empty == etcd.revision()
    assert kvs == [
        KeyValue(b"/app/", b"v/app/", revs[b"/app/"], revs[b"/app/"], 1),
        KeyValue(b"/app/\x00", b"v/app/\x00", revs[b"/app/\x00"], revs[b"/app/\x00"], 1),
        KeyValue(b"/app/a", b"v/app/a", revs[b"/app/a"], revs[b"/app/a"], 1),
        KeyValue(b"/app/b", b"second", updated, revs[b"/app/b"], 2),
        KeyValue(b"/app/empty", b"", empty, empty, 1),
        KeyValue(b"/app/\xff", b"v/app/\xff", revs[b"/app/\xff"], revs[b"/app/\xff"], 1),
        KeyValue(b"/app/\xff\xff", b"v/app/\xff\xff", revs[b"/app/\xff\xff"], revs[b"/app/\xff\xff"], 1),
    ]


def test_range_of_everything_and_of_an_all_ff_prefix(etcd: EtcdServer) -> None:
    keys = [b"\x00", b"a", b"\xfe", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\x01"]
    rev = etcd.txn([(k, k) for k in keys])
    client = client_of(etcd)
    assert client.range_prefix(b"") == (rev, [KeyValue(k, k, rev, rev, 1) for k in keys])
    assert [kv.key for kv in client.range_prefix(b"\xff")[1]] == [b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\x01"]
    assert [kv.key for kv in client.range_prefix(b"\xff\xff")[1]] == [b"\xff\xff", b"\xff\xff\x01"]


@pytest.mark.parametrize("page", [1, 2, 4, 5, 6, 1000])
def test_range_pages_of_any_size_give_the_same_list(etcd: EtcdServer, page: int) -> None:
    rev = etcd.txn([(b"/p/%d" % i, b"%d" % i) for i in range(5)])
    etcd.put(b"/p0", b"outside")
    got_rev, kvs = client_of(etcd).range_prefix(b"/p/", page=page)
    assert got_rev == rev + 1
    assert kvs == [KeyValue(b"/p/%d" % i, b"%d" % i, rev, rev, 1) for i in range(5)]


def test_range_reads_every_page_at_the_first_pages_revision(etcd: EtcdServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [b"/big/%05d" % i for i in range(2500)]
    for i in range(0, len(keys), 100):  # within etcd's default --max-txn-ops (128)
        rev = etcd.txn([(k, b"value of " + k) for k in keys[i:i + 100]])
    client = client_of(etcd)
    real_call = client._call
    bodies: list[dict[str, Any]] = []

    def call_then_change(path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = real_call(path, body)
        bodies.append(body)
        if len(bodies) == 1:  # after the first page: change keys in every part of the range
            etcd.txn([(b"/big/00500x", b"new"), (b"/big/01500x", b"new"), (b"/big/99999", b"new")],
                     [b"/big/02000", b"/big/00010"])
            etcd.put(b"/big/01200", b"changed")
            etcd.put(b"/big/02499", b"changed")
        return answer

    monkeypatch.setattr(client, "_call", call_then_change)
    got_rev, kvs = client.range_prefix(b"/big/", page=1000)
    monkeypatch.undo()

    assert got_rev == rev
    assert [kv.key for kv in kvs] == keys
    assert all(kv.value == b"value of " + kv.key for kv in kvs)
    assert max(kv.mod_revision for kv in kvs) == rev
    assert len(bodies) == 3
    assert "revision" not in bodies[0]
    assert [b["revision"] for b in bodies[1:]] == [str(rev)] * 2
    # what changed after the first page is there for a list at the current revision
    now_rev, now = client.range_prefix(b"/big/")
    assert now_rev == etcd.revision() > rev
    current = {kv.key: kv.value for kv in now}
    assert b"/big/02000" not in current and b"/big/00010" not in current
    assert current[b"/big/01500x"] == current[b"/big/99999"] == b"new"
    assert current[b"/big/01200"] == b"changed"
    assert len(current) == 2500 + 3 - 2
    # and the old revision still lists as it was
    assert client.range_prefix(b"/big/", revision=rev, page=700) == (rev, kvs)


def test_range_at_a_compacted_revision(etcd: EtcdServer) -> None:
    first = etcd.put(b"/c/a", b"1")
    etcd.put(b"/c/a", b"2")
    kept = etcd.put(b"/c/b", b"3")
    client = client_of(etcd)
    assert client.range_prefix(b"/c/", revision=first) == (first, [KeyValue(b"/c/a", b"1", first, first, 1)])
    etcd.compact(kept)
    with pytest.raises(EtcdCompacted, match="compacted") as info:
        client.range_prefix(b"/c/", revision=first)
    assert info.value.compact_revision == 0  # a range does not say where compaction stopped
    rev, kvs = client.range_prefix(b"/c/", revision=kept)  # the compaction revision itself is kept
    assert rev == kept and [kv.value for kv in kvs] == [b"2", b"3"]


def test_range_refusals_and_bad_arguments(etcd: EtcdServer) -> None:
    client = client_of(etcd)
    with pytest.raises(EtcdRequestError, match="future revision") as info:
        client.range_prefix(b"/x/", revision=etcd.revision() + 100)
    assert info.value.code == 11  # gRPC OutOfRange
    with pytest.raises(ValueError, match="revision"):
        client.range_prefix(b"/x/", revision=-1)
    with pytest.raises(ValueError, match="page"):
        client.range_prefix(b"/x/", page=0)


def test_status(etcd: EtcdServer) -> None:
    status = client_of(etcd).status()
    assert isinstance(status["version"], str) and status["version"].startswith("3.")
    assert int(status["header"]["revision"]) == etcd.revision()


# ---- watch ----------------------------------------------------------------------


def test_watch_sees_puts_deletes_and_transactions(etcd: EtcdServer) -> None:
    start = etcd.put(b"/w/old", b"before the watch")
    with client_of(etcd).watch(b"/w/", start + 1, idle_timeout=IDLE) as watch:
        r1 = etcd.put(b"/w/a", b"1")
        etcd.put(b"/x", b"outside the prefix")
        r2 = etcd.put(b"/w/b", b"2")
        r3 = etcd.delete(b"/w/a")
        r4 = etcd.txn([(b"/w/c", b"3"), (b"/w/d", b"")], [b"/w/b"])
        r5 = etcd.put(b"/w/c", b"4")
        got = responses_until(watch, r5)
    assert flat(got) == [
        ("PUT", b"/w/a", b"1", r1),
        ("PUT", b"/w/b", b"2", r2),
        ("DELETE", b"/w/a", b"", r3),
        ("PUT", b"/w/c", b"3", r4),
        ("PUT", b"/w/d", b"", r4),
        ("DELETE", b"/w/b", b"", r4),
        ("PUT", b"/w/c", b"4", r5),
    ]
    [txn] = [r for r in got if any(e.kv.mod_revision == r4 for e in r.events)]
    assert txn.revision == r4 and len(txn.events) == 3 and not txn.progress
    events = [e for r in got for e in r.events]
    assert events[0].kv == KeyValue(b"/w/a", b"1", r1, r1, 1)
    assert events[2].kv == KeyValue(b"/w/a", b"", r3, 0, 0)  # a deletion: key and revision only
    assert events[6].kv == KeyValue(b"/w/c", b"4", r5, r4, 2)


def test_watch_catches_up_from_an_old_revision(etcd: EtcdServer) -> None:
    r1 = etcd.put(b"/u/a", b"1")
    r2 = etcd.put(b"/u/b", b"2")
    r3 = etcd.delete(b"/u/a")
    etcd.put(b"/v", b"outside")
    with client_of(etcd).watch(b"/u/", r1, idle_timeout=IDLE) as watch:
        got = responses_until(watch, r3)
        r4 = etcd.put(b"/u/c", b"3")
        got += responses_until(watch, r4)
    assert flat(got) == [("PUT", b"/u/a", b"1", r1), ("PUT", b"/u/b", b"2", r2), ("DELETE", b"/u/a", b"", r3),
                         ("PUT", b"/u/c", b"3", r4)]
    # a catch-up message may hold several revisions; its header is never behind them
    assert all(r.revision >= e.kv.mod_revision for r in got for e in r.events)


def test_watch_progress_notifications_while_idle(etcd: EtcdServer) -> None:
    start = etcd.put(b"/q/a", b"1")
    with client_of(etcd).watch(b"/q/", start + 1, idle_timeout=IDLE) as watch:
        first = next(watch)
        assert first == WatchResponse(start, [], True)
        outside = etcd.put(b"/r", b"moves the revision, not the prefix")
        deadline = time.monotonic() + DEADLINE
        for response in watch:
            assert response.progress and not response.events
            assert start <= response.revision <= outside
            if response.revision == outside:
                break
            assert time.monotonic() < deadline, "no progress notification at the new revision"


def test_watch_without_progress_notifications_ends_at_the_idle_timeout(etcd: EtcdServer) -> None:
    start = etcd.revision()
    with client_of(etcd).watch(b"/i/", start + 1, progress_notify=False, idle_timeout=1.0) as watch:
        with pytest.raises(EtcdUnavailable, match="timed out"):
            next(watch)
        with pytest.raises(StopIteration):
            next(watch)


def test_watch_from_a_compacted_revision(etcd: EtcdServer) -> None:
    r1 = etcd.put(b"/k/a", b"1")
    etcd.put(b"/k/a", b"2")
    r3 = etcd.put(b"/k/b", b"3")
    etcd.compact(r3)
    client = client_of(etcd)
    with client.watch(b"/k/", r1, idle_timeout=IDLE) as watch:
        with pytest.raises(EtcdCompacted) as info:
            next(watch)
        assert info.value.compact_revision == r3
        with pytest.raises(StopIteration):
            next(watch)  # the cancelled watch is closed
    with client.watch(b"/k/", r3, idle_timeout=IDLE) as watch:
        assert flat(responses_until(watch, r3)) == [("PUT", b"/k/b", b"3", r3)]


def test_watch_of_every_key(etcd: EtcdServer) -> None:
    start = etcd.revision()
    with client_of(etcd).watch(b"", start + 1, idle_timeout=IDLE) as watch:
        r1 = etcd.put(b"\x00", b"a")
        r2 = etcd.put(b"\xff\xff", b"b")
        assert flat(responses_until(watch, r2)) == [("PUT", b"\x00", b"a", r1), ("PUT", b"\xff\xff", b"b", r2)]


def test_watch_ends_when_etcd_dies_and_resumes_after_a_restart(etcd: EtcdServer) -> None:
    client = client_of(etcd)
    start = etcd.revision()
    seen: list[Flat] = []
    watch = client.watch(b"/d/", start + 1, idle_timeout=6 * PROGRESS_INTERVAL)
    with watch:
        r1 = etcd.put(b"/d/a", b"1")
        seen += flat(responses_until(watch, r1))
        r2 = etcd.put(b"/d/b", b"2")  # acknowledged; the watch may or may not deliver it before the crash
        etcd.kill()
        began = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            for response in watch:
                seen += flat([response])
        assert time.monotonic() - began < DEADLINE
    assert seen in ([("PUT", b"/d/a", b"1", r1)], [("PUT", b"/d/a", b"1", r1), ("PUT", b"/d/b", b"2", r2)])
    with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
        client.range_prefix(b"/d/")

    etcd.start()  # the same data directory and ports
    assert etcd.revision() == r2
    last_seen = seen[-1][3]
    with client.watch(b"/d/", last_seen + 1, idle_timeout=IDLE) as watch:
        r3 = etcd.put(b"/d/c", b"3")
        assert r3 == r2 + 1
        seen += flat(responses_until(watch, r3))
    assert seen == [("PUT", b"/d/a", b"1", r1), ("PUT", b"/d/b", b"2", r2), ("PUT", b"/d/c", b"3", r3)]
    assert client.range_prefix(b"/d/")[0] == r3


def test_watch_close_from_another_thread_ends_a_blocked_iteration(etcd: EtcdServer) -> None:
    # the idle timeout only turns a close that fails to wake the reader into a failure, not a hang
    watch = client_of(etcd).watch(b"/b/", etcd.revision() + 1, progress_notify=False, idle_timeout=DEADLINE)
    outcome: list[object] = []

    def iterate() -> None:
        try:
            outcome.append(list(watch))
        except BaseException as err:  # noqa: BLE001 (reported by the assertion below)
            outcome.append(err)

    thread = threading.Thread(target=iterate, daemon=True)
    thread.start()
    time.sleep(0.3)  # most likely blocked in a read by now; ending earlier is just as good
    watch.close()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert outcome == [[]]
    watch.close()  # idempotent


def test_watch_close_from_a_signal_handler_ends_the_iteration_it_interrupts(etcd: EtcdServer) -> None:
    watch = client_of(etcd).watch(b"/s/", etcd.revision() + 1, progress_notify=False, idle_timeout=DEADLINE)
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: watch.close())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        assert list(watch) == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        watch.close()


def test_watch_bad_arguments(etcd: EtcdServer) -> None:
    client = client_of(etcd)
    with pytest.raises(ValueError, match="start_revision"):
        client.watch(b"/x/", -1)
    with pytest.raises(ValueError, match="idle_timeout"):
        client.watch(b"/x/", 1, idle_timeout=0)


# ---- endpoints ------------------------------------------------------------------


class _Fake(http.server.BaseHTTPRequestHandler):
    """Answers every POST with the server's canned status and body."""

    def do_POST(self) -> None:
        server: Any = self.server
        server.hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(server.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(server.body)))
        self.end_headers()
        self.wfile.write(server.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def fake_endpoint(status: int, body: bytes) -> Iterator[Any]:
    """An HTTP server on a free port answering ``status`` and ``body``; its
    ``url`` and ``hits`` (requests served)."""
    server: Any = http.server.HTTPServer(("127.0.0.1", 0), _Fake)
    server.status, server.body, server.hits = status, body, 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


def test_failover_past_a_dead_endpoint(etcd: EtcdServer) -> None:
    rev = etcd.put(b"/f/a", b"1")
    with dead_endpoint() as dead:
        client = EtcdClient([dead, etcd.url], timeout=TIMEOUT)
        assert client.range_prefix(b"/f/") == (rev, [KeyValue(b"/f/a", b"1", rev, rev, 1)])
        assert int(client.status()["header"]["revision"]) == rev
        with client.watch(b"/f/", rev, idle_timeout=IDLE) as watch:
            assert watch.url == etcd.url
            assert flat(responses_until(watch, rev)) == [("PUT", b"/f/a", b"1", rev)]


def test_failover_past_a_5xx_starts_from_the_endpoint_that_answered(etcd: EtcdServer) -> None:
    rev = etcd.put(b"/f/a", b"1")
    with fake_endpoint(503, b"no leader") as sick:
        client = EtcdClient([sick.url, etcd.url], timeout=TIMEOUT)
        assert client.range_prefix(b"/f/")[0] == rev
        assert sick.hits == 1
        assert client.range_prefix(b"/f/")[0] == rev
        client.status()
        assert sick.hits == 1  # the next requests went to the endpoint that answered


def test_an_endpoint_that_is_not_etcd(etcd: EtcdServer) -> None:
    with fake_endpoint(404, b"Not Found") as other:
        client = EtcdClient([other.url, etcd.url], timeout=TIMEOUT)
        with pytest.raises(EtcdProtocolError, match="404"):
            client.range_prefix(b"/f/")


def test_every_endpoint_dead() -> None:
    with dead_endpoint() as one, dead_endpoint() as two:
        client = EtcdClient([one, two], timeout=2.0)
        began = time.monotonic()
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered") as info:
            client.range_prefix(b"/")
        assert time.monotonic() - began < DEADLINE
        assert one in str(info.value) and two in str(info.value)
        assert isinstance(info.value.__cause__, EtcdUnavailable)
        with pytest.raises(EtcdUnavailable):
            client.watch(b"/", 1)
        with pytest.raises(EtcdUnavailable):
            client.status()


@pytest.mark.parametrize("endpoint", [
    "ftp://x:2379", "http://", "http://h:notaport", "http://h", "h:2379", "127.0.0.1:2379",
    "http://h:99999", "http://h:0", "http://h:2379/v3", "http://u:p@h:2379", "http://h:2379?x=1", "",
])
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError) as info:
        EtcdClient(["http://127.0.0.1:2379", endpoint])
    assert repr(endpoint) in str(info.value)


def test_bad_client_arguments() -> None:
    with pytest.raises(ValueError, match="no etcd endpoint"):
        EtcdClient([])
    with pytest.raises(TypeError):
        EtcdClient("http://127.0.0.1:2379")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        EtcdClient(["http://127.0.0.1:2379"], timeout=0)
    good = EtcdClient(["http://127.0.0.1:2379", "http://[::1]:2379/", "http://etcd-0.example:2379"])
    assert good.endpoints == ("http://127.0.0.1:2379", "http://[::1]:2379/", "http://etcd-0.example:2379")
    assert EtcdClient(["https://[::1]:2379/", "https://etcd-0.example:2379"]).endpoints == (
        "https://[::1]:2379/", "https://etcd-0.example:2379")


def test_tls_options_are_checked_at_construction(tmp_path: Path) -> None:
    https = ["https://127.0.0.1:2379"]
    missing = str(tmp_path / "no-such-ca.pem")
    with pytest.raises(FileNotFoundError) as info:
        EtcdClient(https, ca=missing)
    assert info.value.filename == missing and "CA" in str(info.value)
    with pytest.raises(FileNotFoundError, match="client certificate"):
        EtcdClient(https, cert=str(tmp_path / "no-such-cert.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="garbage.pem"):
        EtcdClient(https, ca=str(garbage))
    with pytest.raises(ValueError, match="without a client certificate"):
        EtcdClient(https, key=str(garbage))
    with pytest.raises(ValueError, match="'http://127.0.0.1:2379' is not https://, but TLS files are given"):
        EtcdClient(["http://127.0.0.1:2379"], ca=str(garbage))
    EtcdClient(https)  # the system's CAs
