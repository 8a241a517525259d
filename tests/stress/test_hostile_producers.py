"""Hostile producers against a real ``shmcached``: clients that stall
mid-frame, keep completing frames slowly, pipeline without reading, open
hundreds of connections, burst in while the daemon is stopped, disconnect
mid-frame, exceed --max-clients, send truncated, oversized, malformed and
fuzzed frames.  Meanwhile a Producer keeps being served and the cache changes
only by what was answered OK.

Helpers (the daemon, raw frames written from docs/protocol.md) are in
tests/support/, the ``served`` fixture in tests/conftest.py.  SHMCACHE_STRESS sets the number of
fuzzed connections (``ci`` or ``soak``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from shmcache import DaemonUnavailable, Producer, Reader

from .._report import Report
from ..support import (
    BAD_FRAME,
    BATCH,
    CACHE_FULL,
    CLOSING,
    DELETE,
    FRAME_TOO_LARGE,
    INVALID_KEY,
    INVALID_RV,
    IO_TIMEOUT,
    KEY_NOT_FOUND,
    MAX_FRAME,
    MAX_KEY_BYTES,
    MAX_RV,
    OK,
    PING,
    PUT,
    STATS,
    UNKNOWN_OP,
    VALUE_TOO_LARGE,
    Served,
    as_dict,
    at_eof,
    batch,
    connect,
    delete,
    frame,
    ping,
    producer_when_admitted,
    put,
    read_reply,
    record_size,
    recv_exact,
    running,
    scaled,
    sock_in,
    stats,
    wait_for,
)
from ..support import (
    request as call,
)

# ==== 1. truncated, oversized and malformed frames ==============================


def test_truncated_frame_then_close(served: Served, report: Report) -> None:
    cuts = (1, 3, 4, 10, 20)
    for cut in cuts:
        with connect(served.sock) as s:
            s.sendall(frame(put(b"x", b"y" * 100))[:cut])
    report(checked="clients closing after a truncated frame: dropped, nothing changed, the producer served",
           events=len(cuts), faults=len(cuts), failures=0, connections=len(cuts))
    served.wait_only_producer()
    served.assert_unchanged()


def test_frame_over_the_limit_is_refused_and_closed(served: Served, report: Report) -> None:
    sizes = (MAX_FRAME + 1, 1 << 31, (1 << 32) - 1)
    for size in sizes:
        with connect(served.sock) as s:
            s.sendall(struct.pack("!I", size) + put(b"x", b"y"))
            reply = read_reply(s)
            assert reply is not None and reply[:2] == (FRAME_TOO_LARGE, 0), reply
            assert str(MAX_FRAME).encode() in reply[2]
            assert at_eof(s), "still open after FRAME_TOO_LARGE"
    # exactly the limit is read and parsed (here: a value too large for the arena)
    with connect(served.sock) as s:
        payload = put(b"big", b"v" * (MAX_FRAME - 14))
        assert len(payload) == MAX_FRAME
        assert call(s, payload)[:2] == (VALUE_TOO_LARGE, 0)
        assert call(s, ping())[:2] == (OK, served.snapshot.rv)
    report(checked="frames over --max-frame-bytes get FRAME_TOO_LARGE and the connection closed; one of "
                   "exactly the limit is parsed", events=len(sizes) + 2, faults=len(sizes), failures=0,
           max_frame=MAX_FRAME)
    served.assert_unchanged()


BAD_FRAMES = [
    ("empty", b""),
    ("ping-with-body", b"\x01\x00"),
    ("stats-with-body", b"\x05xyz"),
    ("put-header-truncated", b"\x02\x00\x00\x00"),
    ("put-key-past-frame", struct.pack("!BQH", PUT, 0, 10) + b"abc"),
    ("delete-header-truncated", struct.pack("!BQ", DELETE, 0)),
    ("delete-trailing-bytes", delete(b"a") + b"x"),
    ("batch-header-truncated", b"\x04\x00\x00"),
    ("batch-count-huge", batch([(b"k", b"v")], count=1 << 31)),
    ("batch-count-past-payload", batch([(b"k", b"v")], count=1000)),
    ("batch-count-one-short", batch([(b"k", b"v"), (b"a", None)], count=3)),
    ("batch-bad-kind", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", 9, 1, 0) + b"k"),
    ("batch-ping-kind", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", PING, 1, 0) + b"k"),
    ("batch-delete-with-value", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", DELETE, 1, 1) + b"kv"),
    ("batch-item-past-frame", struct.pack("!BI", BATCH, 1) + struct.pack("!BHI", PUT, 1, 100) + b"kv"),
    ("batch-trailing-bytes", batch([(b"k", b"v")]) + b"zz"),
    ("batch-fewer-items", batch([(b"k", b"v")], count=0)),
]


def test_malformed_frames_get_bad_frame_and_are_closed(served: Served, report: Report) -> None:
    for label, payload in BAD_FRAMES:
        with connect(served.sock) as s:
            s.sendall(frame(payload) + frame(put(b"after", b"v")) + frame(ping()))
            reply = read_reply(s)
            assert reply is not None and reply[:2] == (BAD_FRAME, 0), f"{label}: {reply}"
            assert at_eof(s), f"{label}: the connection stays open after BAD_FRAME"
        served.assert_unchanged()
    with connect(served.sock) as s:  # and a client that sends garbage then reads nothing
        s.sendall(b"\x00\x00\x00\x02\xff\xff" * 1000)
    report(checked="malformed frames get BAD_FRAME, the connection closed, the frames behind them ignored; "
                   "a garbage sender that reads nothing is dropped", events=len(BAD_FRAMES) + 1,
           faults=len(BAD_FRAMES) + 1, failures=0, malformed_kinds=len(BAD_FRAMES))
    served.wait_only_producer()
    served.assert_unchanged()


# ==== 2. clients that stall, flood, or leave mid-frame ========================


def test_stalled_client_is_dropped_while_others_are_served(served: Served, report: Report) -> None:
    rejected = served.producer.stats()["rejected"]
    stalled = [connect(served.sock) for _ in range(3)]
    dropped = 0
    try:
        for s, cut in zip(stalled, (2, 4, 12), strict=True):
            s.sendall(frame(put(b"stall", b"v" * 50))[:cut])
        # meanwhile others are served
        assert served.producer.put("live", b"1") == served.snapshot.rv + 1
        with connect(served.sock) as other:
            assert call(other, ping())[:2] == (OK, served.snapshot.rv + 1)
        for s in stalled:
            assert at_eof(s, timeout=20), "a client stalled mid-frame was never dropped"
            dropped += 1
    finally:
        for s in stalled:
            s.close()
    rejected_after = served.producer.stats()["rejected"]
    report(checked="clients stalled mid-frame are dropped after --client-timeout while others are served",
           events=2, faults=len(stalled), failures=len(stalled) - dropped, dropped=dropped,
           rejected_counted=rejected_after - rejected)
    assert rejected_after >= rejected + 3
    assert served.reader.get("stall") is None


def test_client_that_keeps_completing_frames_is_not_dropped(name: str, tmp_path: Path, report: Report) -> None:
    """--client-timeout is for a client *stalled* mid-frame: one whose every
    write completes a frame and starts the next is making progress."""
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--client-timeout", "1", "--heartbeat", "0.1"):
        one = frame(ping())
        with connect(sock) as s:
            s.sendall(one[:3])
            replies = 0
            started = time.monotonic()
            try:
                while time.monotonic() - started < 4:  # four client timeouts
                    s.sendall(one[3:] + one[:3])  # the end of one PING, the start of the next
                    reply = read_reply(s)
                    assert reply is not None and reply[0] == OK
                    replies += 1
                    time.sleep(0.05)
            except (OSError, AssertionError) as err:
                raise AssertionError(f"dropped after {replies} complete frames in "
                                     f"{time.monotonic() - started:.1f} s: {err!r}") from None
    report(checked="a client whose every write completes a frame and starts the next is never dropped "
                   "(4 client timeouts long)", events=replies, faults=0, failures=0, client_timeout_s=1)


# a long --client-timeout: whether a client paused by the daemon while
# mid-frame counts as stalled is not what this test is about
@pytest.mark.parametrize("served", [["--client-timeout", "60"]], indirect=True)
def test_pipelining_client_that_reads_nothing_is_paused_not_buffered(served: Served, report: Report) -> None:
    rv = served.snapshot.rv
    chunk = frame(ping()) * 5000
    limit = 64 << 20
    sent = 0
    with connect(served.sock) as s:
        s.setblocking(False)
        blocked_since: float | None = None
        while sent < limit:
            try:
                sent += s.send(chunk[sent % len(chunk):] if sent % len(chunk) else chunk)
                blocked_since = None
            except BlockingIOError:
                now = time.monotonic()
                blocked_since = blocked_since or now
                if now - blocked_since > 1.0:
                    break
                time.sleep(0.02)
        assert sent < limit, "the daemon kept reading from a client that reads nothing"
        # others are served meanwhile; the daemon's memory stays bounded
        assert served.producer.ping() == rv
        with connect(served.sock) as other:
            assert call(other, ping())[:2] == (OK, rv)
        rss = psutil.Process(served.daemon.pid).memory_info().rss
        assert rss < 512 << 20
        # finish the last frame, read every reply
        s.settimeout(IO_TIMEOUT)
        rest = (-sent) % len(frame(ping()))
        got: list[bytes | BaseException] = []
        want = (sent + rest) // 5 * 13

        def read_all() -> None:
            try:
                got.append(recv_exact(s, want) or b"")
            except BaseException as err:  # noqa: BLE001 - reported below
                got.append(err)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        if rest:
            s.sendall(chunk[:5][-rest:])
        reader.join(timeout=60)
        assert not reader.is_alive(), "the replies never came"
    report(checked="a client pipelining PINGs without reading is paused (the daemon stops reading it), "
                   "others are served, memory stays bounded, then every reply arrives in order",
           events=want // 13, faults=1, failures=0, bytes_sent_before_paused=sent,
           daemon_rss_mib=rss >> 20)
    assert got[0] == struct.pack("!IBQ", 9, OK, rv) * (want // 13), repr(got[0])[:200]
    served.assert_unchanged()


def test_many_connections_at_once_are_all_served(served: Served, report: Report) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.connect(served.sock)  # blocking: waits while the backlog is full
            s.settimeout(IO_TIMEOUT)
        for i, s in enumerate(socks):
            s.sendall(frame(ping() if i % 2 else stats()))
        for s in socks:
            reply = read_reply(s)
            assert reply is not None and reply[:2] == (OK, served.snapshot.rv)
        connections = served.connections()
        assert connections == 201
    finally:
        for s in socks:
            s.close()
    report(checked="200 connections at once (connect blocking while the backlog is full): each served",
           events=len(socks), faults=0, failures=0, connections_counted_by_the_daemon=connections)
    served.wait_only_producer()
    served.assert_unchanged()


def test_burst_of_producers_while_the_daemon_is_busy(served: Served, report: Report) -> None:
    """200 producers connect while the daemon cannot accept (stopped, as a
    daemon busy with a large batch would be): each waits up to its timeout
    and is then served, none fails at once because the listen backlog is full."""
    results: list[object] = []
    started = threading.Semaphore(0)

    def one() -> None:
        started.release()
        try:
            with Producer(served.sock, timeout=30) as p:
                results.append(p.ping())
        except Exception as err:  # noqa: BLE001 - reported below
            results.append(err)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(200)]
    os.kill(served.daemon.pid, signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=30)
        time.sleep(0.5)  # let every connect() reach the daemon's socket
    finally:
        os.kill(served.daemon.pid, signal.SIGCONT)
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    errors = [r for r in results if not isinstance(r, int)]
    report(checked="200 producers connecting while the daemon is SIGSTOPped: each waits and is then served",
           events=len(results), faults=1, failures=len(errors), producers=len(threads))
    assert not errors, f"{len(errors)} of 200 producers failed, e.g. {errors[0]!r}"
    assert results == [served.snapshot.rv] * 200
    served.wait_only_producer()


def test_clients_disconnecting_mid_frame(served: Served, report: Report) -> None:
    connections = 0
    for whole in (frame(put(b"gone", b"v" * 300)), frame(batch([(b"gone2", b"v"), (b"a", None)]))):
        for cut in [*range(0, len(whole), 7), len(whole) - 1]:
            with connect(served.sock) as s:
                s.sendall(frame(ping()) + whole[:cut])  # one answered request, then half a frame
            connections += 1
    report(checked="clients leaving at every 7th byte of a PUT and of a BATCH frame: dropped, nothing changed",
           events=connections, faults=connections, failures=0)
    served.wait_only_producer()
    served.assert_unchanged()


def test_max_clients(name: str, tmp_path: Path, report: Report) -> None:
    sock = sock_in(tmp_path)
    with running(name, sock, tmp_path / "d.log", "--max-clients", "2"):
        first = producer_when_admitted(sock)
        second = producer_when_admitted(sock)
        try:
            with Producer(sock) as third, pytest.raises(DaemonUnavailable):
                third.ping()
            assert first.ping() == second.ping() == 0
            first.close()
            producer_when_admitted(sock).close()  # a slot is free again
        finally:
            first.close()
            second.close()
    report(checked="--max-clients 2: a third producer gets DaemonUnavailable, a freed slot admits again",
           events=3, faults=1, failures=0, max_clients=2)


#: runs ``shmcached`` with RLIMIT_NOFILE = argv[1]
LOW_NOFILE = ("import os, resource, sys; n = int(sys.argv.pop(1)); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
              "os.execv(sys.executable, [sys.executable, '-m', 'shmcached', *sys.argv[1:]])")


def test_out_of_file_descriptors(name: str, tmp_path: Path, report: Report) -> None:
    """More connections than the daemon has descriptors for (a low
    ``LimitNOFILE``): accept() fails with EMFILE while the connection waits,
    so the listener stays readable.  The daemon must neither spin on it nor
    flood the journal: it logs the episode once, keeps serving its producers,
    and accepts again as soon as descriptors are free."""
    sock = sock_in(tmp_path)
    log = tmp_path / "d.log"
    flood: list[socket.socket] = []
    with running(name, sock, log, "--max-clients", "1000", "--heartbeat", "0.1",
                 command=[sys.executable, "-c", LOW_NOFILE, "32"]) as d:
        with Producer(sock) as early:
            early.put("before", b"1")
            try:
                for _ in range(60):  # the backlog takes them all; the daemon cannot
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    flood.append(s)
                    s.connect(sock)
                wait_for(lambda: "Too many open files" in d.output, "accept() meets EMFILE")
                for i in range(20):  # several heartbeats retry the accept
                    assert early.put(f"during{i}", b"2") > 0
                    time.sleep(0.02)
                cpu = psutil.Process(d.pid).cpu_times()
                failures = d.output.count("accept failed")
            finally:
                for s in flood:
                    s.close()
            with Producer(sock, timeout=10) as late:  # descriptors are free again
                assert late.put("after", b"3") > 0
            assert early.ping() > 0
    report(checked="60 connections beyond RLIMIT_NOFILE=32: one log line for the episode, producers served "
                   "throughout, new ones accepted once descriptors are free",
           events=22, faults=len(flood), failures=0, accept_failed_lines=failures,
           daemon_cpu_seconds=round(cpu.user + cpu.system, 2))
    assert failures == 1, f"{failures} 'accept failed' lines: the daemon logs each retry"


# ==== 3. fuzzing frames =========================================================

FUZZ_MAX_KEYS = 8
FUZZ_STORE = 4096
FUZZ_ARENA = 4096
FUZZ_FRAME = 100_000
MAX_RV_JUMP = 1 << 40  # --max-rv-jump's default: an explicit rv further ahead is INVALID_RV
GOOD_KEYS = [b"a", b"b", b"c", b"d", b"pods/x", b"pods/y", b"pods/z", "é".encode(), "日本".encode(),
             b"k\x00nul", b"k" * MAX_KEY_BYTES] + [f"key{i}".encode() for i in range(12)]
BAD_KEYS = [b"", b"k" * (MAX_KEY_BYTES + 1), b"\xff", b"\xc3", b"\xed\xa0\x80"]


_STATUS_NAMES = {OK: "OK", BAD_FRAME: "BAD_FRAME", FRAME_TOO_LARGE: "FRAME_TOO_LARGE",
                 UNKNOWN_OP: "UNKNOWN_OP", INVALID_KEY: "INVALID_KEY", VALUE_TOO_LARGE: "VALUE_TOO_LARGE",
                 CACHE_FULL: "CACHE_FULL", KEY_NOT_FOUND: "KEY_NOT_FOUND", INVALID_RV: "INVALID_RV"}


@dataclass
class FuzzModel:
    """What the cache must hold: only requests answered OK changed it."""

    items: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    rv: int = 0

    def allowed(self, op: int, rv: int, items: list[tuple[bytes, bytes | None]]) -> set[int]:
        """{OK} if the request must succeed, else the errors it may get."""
        errors: set[int] = set()
        for key, value in items:
            if not key or len(key) > MAX_KEY_BYTES:
                errors.add(INVALID_KEY)
            elif value is not None and (len(key) + len(value) > FUZZ_ARENA
                                        or record_size(key, value) > FUZZ_STORE // 2 // 8 * 8):
                errors.add(VALUE_TOO_LARGE)
        if op == BATCH and not items:
            return {OK}
        if rv and not self.rv < rv <= min(MAX_RV, self.rv + MAX_RV_JUMP):
            errors.add(INVALID_RV)
        if not rv and self.rv + len(items) > MAX_RV:
            errors.add(INVALID_RV)
        state = {k: v for k, (v, _) in self.items.items()}
        for key, value in items:
            if value is None:
                if key not in state:
                    errors.add(KEY_NOT_FOUND)
                    break
                del state[key]
            else:
                state[key] = value
                if len(state) > FUZZ_MAX_KEYS or sum(record_size(k, v) for k, v in state.items()) > FUZZ_STORE:
                    errors.add(CACHE_FULL)
                    break
        return errors or {OK}

    def apply(self, op: int, rv: int, items: list[tuple[bytes, bytes | None]], reply_rv: int) -> None:
        if op == BATCH and not items:
            assert reply_rv == self.rv
            return
        for key, value in items:
            self.rv = rv or self.rv + 1
            if value is None:
                del self.items[key]
            else:
                self.items[key] = (value, self.rv)
        assert reply_rv == self.rv, f"reply rv {reply_rv}, expected {self.rv}"


def classify(payload: bytes) -> tuple[set[int], tuple[int, int, list[tuple[bytes, bytes | None]]] | None]:
    """docs/protocol.md applied to one complete payload: the statuses a
    malformed one may get, or the request a well-formed one is."""
    def utf8(raw: bytes) -> bool:
        try:
            raw.decode()
            return True
        except UnicodeDecodeError:
            return False

    if not payload:
        return {BAD_FRAME}, None
    op = payload[0]
    if op in (PING, STATS):
        return ({BAD_FRAME}, None) if len(payload) != 1 else (set(), (op, 0, []))
    if op in (PUT, DELETE):
        if len(payload) < 11:
            return {BAD_FRAME}, None
        _, rv, key_len = struct.unpack_from("!BQH", payload)
        end = 11 + key_len
        if end > len(payload) or (op == DELETE and end != len(payload)):
            return {BAD_FRAME}, None
        key = payload[11:end]
        if not utf8(key):
            return {INVALID_KEY}, None
        return set(), (op, rv, [(key, payload[end:] if op == PUT else None)])
    if op == BATCH:
        if len(payload) < 5:
            return {BAD_FRAME}, None
        (count,) = struct.unpack_from("!I", payload, 1)
        pos, items, bad_key, broken = 5, [], False, False
        for _ in range(count):
            if pos + 7 > len(payload):
                broken = True
                break
            kind, key_len, value_len = struct.unpack_from("!BHI", payload, pos)
            pos += 7
            if kind not in (PUT, DELETE) or (kind == DELETE and value_len):
                broken = True
                break
            end = pos + key_len + value_len
            if end > len(payload):
                broken = True
                break
            key = payload[pos:pos + key_len]
            bad_key = bad_key or not utf8(key)
            items.append((key, payload[pos + key_len:end] if kind == PUT else None))
            pos = end
        else:
            broken = pos != len(payload)
        if broken:  # which is found first is the daemon's business
            return ({BAD_FRAME, INVALID_KEY} if bad_key else {BAD_FRAME}), None
        if bad_key:
            return {INVALID_KEY}, None
        return set(), (BATCH, 0, items)
    return {UNKNOWN_OP}, None


# What is drawn never depends on the model (Hypothesis replays draws): the
# model only interprets them (an index among its keys, an offset from its RV).


def _keys(data: st.DataObject, model: FuzzModel) -> bytes:
    pick = data.draw(st.integers(0, 9))
    index = data.draw(st.integers(0, 63))
    if pick < 6:
        return GOOD_KEYS[index % len(GOOD_KEYS)]
    if pick < 8:
        present = sorted(model.items) or GOOD_KEYS
        return present[index % len(present)]
    if pick < 9:
        return data.draw(st.binary(min_size=1, max_size=6))
    return BAD_KEYS[index % len(BAD_KEYS)]


def _value(data: st.DataObject) -> bytes:
    pick = data.draw(st.integers(0, 9))
    if pick < 7:
        return data.draw(st.binary(max_size=24))
    if pick < 9:
        return data.draw(st.binary(min_size=200, max_size=500))
    return data.draw(st.sampled_from([b"v" * 2100, b"v" * (FUZZ_ARENA + 1)]))


def _rv(data: st.DataObject, model: FuzzModel) -> int:
    pick = data.draw(st.integers(0, 9))
    if pick < 7:
        return 0
    if pick < 9:
        return max(1, model.rv + data.draw(st.integers(-2, 3)))
    # far ahead (valid), or past the last RV; never exactly the last one,
    # which would leave the rest of the run nothing but INVALID_RV
    return data.draw(st.sampled_from([model.rv + 1000, MAX_RV + 1, 1 << 63 | 12345, (1 << 64) - 1]))


def _payload(data: st.DataObject, model: FuzzModel) -> bytes:
    kind = data.draw(st.sampled_from(["ping", "stats", "put", "put", "put", "delete", "delete", "batch", "batch"]))
    if kind == "ping":
        return ping()
    if kind == "stats":
        return stats()
    if kind == "put":
        return put(_keys(data, model), _value(data), _rv(data, model))
    if kind == "delete":
        return delete(_keys(data, model), _rv(data, model))
    n = data.draw(st.integers(0, 5))
    return batch([(_keys(data, model), None if data.draw(st.booleans()) else _value(data)) for _ in range(n)])


def _position(data: st.DataObject, n: int) -> int:
    """A number in [0, n), drawn without depending on n."""
    return data.draw(st.integers(0, 1 << 20)) % n


def _chunk(data: st.DataObject, model: FuzzModel) -> bytes:
    """The bytes of one frame as sent: valid, damaged, or garbage."""
    how = data.draw(st.sampled_from(["valid"] * 5 + ["flip", "flip", "truncate", "extend", "relength",
                                                      "random", "random-length", "huge", "cut"]))
    if how == "random":
        return frame(data.draw(st.binary(max_size=40)))
    if how == "random-length":
        return data.draw(st.binary(min_size=4, max_size=4)) + data.draw(st.binary(max_size=20))
    if how == "huge":
        return struct.pack("!I", data.draw(st.integers(FUZZ_FRAME + 1, (1 << 32) - 1))) + b"\x01"
    payload = _payload(data, model)
    if how == "flip":
        damaged = bytearray(payload)
        for bit in data.draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3)):
            bit %= len(payload) * 8
            damaged[bit // 8] ^= 1 << (bit % 8)
        return frame(bytes(damaged))
    if how == "truncate":
        return frame(payload[:_position(data, len(payload))])
    if how == "extend":
        return frame(payload + data.draw(st.binary(min_size=1, max_size=8)))
    if how == "relength":
        return struct.pack("!I", _position(data, len(payload) + 9)) + payload
    if how == "cut":
        whole = frame(payload)
        return whole[:_position(data, len(whole))]
    return frame(payload)


def _exchange(path: str, stream: bytes, splits: list[int]) -> list[tuple[int, int, bytes]]:
    """Send ``stream`` (in pieces), half-close, and read every reply until
    the daemon closes the connection."""
    replies: list[tuple[int, int, bytes]] = []
    with connect(path) as s:
        last = 0
        try:
            for cut in [*sorted(splits), len(stream)]:
                s.sendall(stream[last:cut])
                last = max(last, cut)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed after a refusal: its replies are still readable
        while (reply := read_reply(s)) is not None:
            replies.append(reply)
    return replies


def _check_replies(stream: bytes, replies: list[tuple[int, int, bytes]], model: FuzzModel,
                   seen: dict[str, int]) -> None:
    """Walk ``stream`` as the daemon must: match each complete frame with its
    reply, update the model for every OK write."""
    pos, i = 0, 0
    while len(stream) - pos >= 4:
        (size,) = struct.unpack_from("!I", stream, pos)
        if size > FUZZ_FRAME:
            assert replies[i:i + 1] and replies[i][:2] == (FRAME_TOO_LARGE, 0), (replies[i:], size)
            seen["FRAME_TOO_LARGE"] = seen.get("FRAME_TOO_LARGE", 0) + 1
            i += 1
            break
        if len(stream) - pos - 4 < size:
            break  # incomplete: never answered
        payload = stream[pos + 4:pos + 4 + size]
        pos += 4 + size
        assert i < len(replies), f"no reply to frame {payload[:60]!r}"
        status, rv, body = replies[i]
        i += 1
        seen[_STATUS_NAMES.get(status, str(status))] = seen.get(_STATUS_NAMES.get(status, str(status)), 0) + 1
        malformed, req = classify(payload)
        note(f"frame {payload[:60]!r} -> status {status} rv {rv} {body[:80]!r}")
        if req is None:
            assert status in malformed and rv == 0, (payload[:60], status, body, malformed)
            if status in CLOSING:
                break
            continue
        op, req_rv, items = req
        if op in (PING, STATS):
            assert (status, rv) == (OK, model.rv), (status, rv, body)
            if op == STATS:
                figures = json.loads(body)
                assert figures["rv"] == model.rv and figures["keys"] == len(model.items)
            continue
        allowed = model.allowed(op, req_rv, items)
        assert status in allowed, f"{payload[:60]!r}: status {status} {body!r}, expected one of {allowed}"
        if status == OK:
            model.apply(op, req_rv, items, rv)
        else:
            assert rv == 0 and body
    assert i == len(replies), f"{len(replies) - i} replies too many: {replies[i:]}"


def test_fuzzed_frames_never_hurt_the_daemon(name: str, tmp_path: Path, report: Report) -> None:
    sock = sock_in(tmp_path)
    model = FuzzModel()
    counts = {"frames": 0, "examples": 0, "replies": 0, "served": 0}
    statuses: dict[str, int] = {}
    failed = True
    try:
        _fuzz(name, tmp_path, sock, model, counts, statuses)
        failed = False
    finally:
        rejected = sum(n for status, n in statuses.items() if status != "OK")
        report(checked="fuzzed streams of valid, damaged and garbage frames, split at random: every reply is "
                       "what docs/protocol.md allows, the cache changes only by what was answered OK, the "
                       "daemon lives and serves a fresh Producer and the Reader after each connection",
               events=counts["frames"], faults=rejected, failures=int(failed), frames_sent=counts["frames"],
               replies=counts["replies"], accepted=statuses.get("OK", 0), rejected=rejected,
               connections=counts["examples"], served_meanwhile=counts["served"], final_rv=model.rv,
               keys=len(model.items), statuses=dict(sorted(statuses.items())))


def _fuzz(name: str, tmp_path: Path, sock: str, model: FuzzModel, counts: dict[str, int],
          statuses: dict[str, int]) -> None:
    with running(name, sock, tmp_path / "d.log", "--capacity", "32", "--arena-bytes", str(FUZZ_ARENA),
                 "--max-keys", str(FUZZ_MAX_KEYS), "--store-bytes", str(FUZZ_STORE),
                 "--max-frame-bytes", str(FUZZ_FRAME), small=False) as d, Reader(name) as reader:

        # soak: 26,000 streams of 1-7 frames, about 104,000 frames
        @settings(max_examples=scaled(200, 26000), deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.data())
        def one_connection(data: st.DataObject) -> None:
            chunks = [_chunk(data, model) for _ in range(data.draw(st.integers(1, 7)))]
            stream = b"".join(chunks)
            splits = [_position(data, len(stream) + 1) for _ in range(data.draw(st.integers(0, 3)))]
            counts["examples"] += 1
            counts["frames"] += len(chunks)
            replies = _exchange(sock, stream, splits)
            counts["replies"] += len(replies)
            _check_replies(stream, replies, model, statuses)
            assert d.proc.poll() is None, d.fail("died")
            with Producer(sock) as p:  # a fresh producer is served
                assert p.ping() == model.rv
            counts["served"] += 1
            snap = reader.list()
            assert snap.rv == model.rv
            assert as_dict(snap) == {k.decode(): v for k, v in model.items.items()}

        one_connection()
        with Producer(sock) as p:
            wait_for(lambda: p.stats()["producers"] == 1, "connections left open")
