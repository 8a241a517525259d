"""The daemon's limits and producer policy against real processes of other
users (the test runs as root; children drop to other uids and gids, which
need no /etc/passwd entry):

* memory: 1,024 connections of one allowed uid each announce a frame of
  --max-frame-bytes and send part of it; the daemon's private memory
  (RssAnon: VmRSS would count the segment's shared pages) stays under the
  bound docs/protocol.md states, computed from the options; a producer of
  another uid keeps being served, a large frame of its included; flooders
  are dropped after --client-timeout and the budget comes back whole;
* a client that pipelines STATS and never reads its replies holds a small,
  bounded amount of memory, and gets every reply once it reads;
* --max-clients-per-uid;
* who may produce: root and the daemon's uid, --allow-uid, members of
  --allow-gid; groups as they were at connect() (SO_PEERGROUPS), not as
  /proc says later;
* who may choose resource versions (--allow-rv-uid, --max-rv-jump): one
  producer cannot exhaust them for everyone;
* --mode and --socket-mode refuse modes that let others write.

Figures go to the stress report.  SHMCACHE_STRESS=soak repeats the flood
and its checks four times against the same daemon.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from shmcache import Reader

from .._report import Report
from ..support import (
    FORBIDDEN,
    INVALID_RV,
    MAX_RV,
    OK,
    REPO,
    STOP_TIMEOUT,
    LineProcess,
    connect,
    ping,
    put,
    running,
    scaled,
    stats,
    wait_for,
)
from ..support import request as call
from ..test_daemon import (
    test_bad_configuration_exits_2_with_one_line as bad_configuration,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to become other uids and gids in child processes")

GROUP = 40400  # --group: owns the socket (0660), so its members may connect
FLOODER = 40401
PRODUCER = 40402
OTHER = 40403
RV_PRODUCER = 40404
OWNER = 40405  # uid and gid of a daemon that does not run as root
EXTRA = 40406  # a group named in --allow-gid

# docs/protocol.md, "Limits": per connection, 32 KiB of input, 16 KiB of
# unsent replies and one more reply, with the connection's own objects
# 64 KiB; a frame over 32 KiB is buffered only within --max-buffered-bytes;
# the frame being applied is copied out of its buffer, a BATCH once more.
PER_CONNECTION = 64 << 10
ALLOWANCE = 32 << 10


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory anybody may traverse (pytest's tmp_path is root's 0700), so
    that the socket's own mode and the daemon decide who gets in."""
    path = Path(tempfile.mkdtemp(prefix="shmcached-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def memory_bound(max_clients: int, max_buffered: int, max_frame: int) -> int:
    """What producers may make the daemon hold, by docs/protocol.md."""
    return max_clients * PER_CONNECTION + max_buffered + 2 * max_frame


def rss_anon(pid: int) -> int:
    """The process's private resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


class PeakSampler:
    """RssAnon of ``pid`` every 20 ms in a thread; ``peak`` the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_anon(pid)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss_anon(self.pid))
                self.samples += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT)
        return self.peak


def figures(sock: socket.socket) -> dict[str, Any]:
    """The daemon's STATS, over ``sock``."""
    status, _, body = call(sock, stats())
    assert status == OK, body
    out: dict[str, Any] = json.loads(body)
    return out


#: runs ``shmcached`` with RLIMIT_NOFILE = argv[1] (a flood needs more than
#: the usual 1,024 descriptors)
NOFILE = ("import os, resource, sys; n = int(sys.argv.pop(1)); "
          "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
          "os.execv(sys.executable, [sys.executable, '-m', 'shmcached', *sys.argv[1:]])")

#: run shmcached (argv after the code) as uid/gid OWNER, no supplementary
#: group; imported first, as root, so that OWNER need not read the
#: interpreter's files
AS_OWNER = [sys.executable, "-c",
            (f"import os, shutil, sys, shmcached; os.setgroups([]); os.setgid({OWNER}); os.setuid({OWNER}); "
             "sys.exit(shmcached.main())")]

# ---- children as other users -----------------------------------------------------

#: what every child runs first: ``uid gid groups nofile``, then its own
#: arguments; the raw protocol (docs/protocol.md), JSON lines out
PRELUDE = """
    import json, os, resource, socket, struct, sys, time
    uid, gid, groups, nofile = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    args = sys.argv[5:]
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)

    def say(**fields):
        print(json.dumps(fields), flush=True)

    def frame(payload):
        return struct.pack("!I", len(payload)) + payload

    def put(key, value, rv=0):
        return frame(struct.pack("!BQH", 2, rv, len(key)) + key + value)

    PING, STATS = frame(bytes([1])), frame(bytes([5]))

    def recv_exact(s, n):
        data = b""
        while len(data) < n:
            try:
                chunk = s.recv(n - len(data))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            data += chunk
        return data

    def reply(s):
        head = recv_exact(s, 4)
        if head is None:
            return None
        body = recv_exact(s, struct.unpack("!I", head)[0])
        status, rv = struct.unpack_from("!BQ", body)
        return [status, rv, body[9:].decode(errors="replace")]

    def dial(path, timeout=60):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)  # blocking: waits while the listen backlog is full (with a timeout: EAGAIN)
        s.settimeout(timeout)
        return s

    def call(s, data):
        try:
            s.sendall(data)
        except OSError:
            pass  # refused and closed: the reply (if any) is still readable
        return reply(s)
"""


class Actor(LineProcess):
    """``python -c PRELUDE + code`` as ``uid``/``gid``/``groups``; its JSON
    lines arrive on a queue; its stdin is a pipe (``tell`` writes a line)."""

    line_timeout = 120.0

    def __init__(self, uid: int, gid: int, groups: Sequence[int], code: str, *args: str,
                 nofile: int = 0) -> None:
        super().__init__([sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(code),
                          str(uid), str(gid), json.dumps(list(groups)), str(nofile), *args],
                         label="child", stdin=True)

    def next(self, timeout: float = 120.0) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.line(timeout))
        return out

    def until(self, key: str, timeout: float = 120.0) -> dict[str, Any]:
        """Read lines until one carries ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.0, deadline - time.monotonic()))
            if key in msg:
                return msg

    def tell(self, line: str = "go") -> None:
        self.send(line + "\n")


@contextmanager
def actor(uid: int, code: str, *args: str, groups: Sequence[int] = (GROUP,), gid: int | None = None,
          nofile: int = 0) -> Iterator[Actor]:
    a = Actor(uid, uid if gid is None else gid, groups, code, *args, nofile=nofile)
    try:
        yield a
    finally:
        a.kill()


#: ``sock n frame_size part``: n connections, each announcing a PUT frame of
#: frame_size bytes and sending its first ``part`` bytes as fast as the
#: daemon takes them, never the rest; says {"connected": n}, then every
#: 0.3 s {"pushed": bytes, "dropped": connections the daemon closed}, until
#: killed
FLOOD = """
    path, n, size, part = args[0], int(args[1]), int(args[2]), int(args[3])
    conns = []
    for _ in range(n):
        s = dial(path)
        s.setblocking(False)
        conns.append(s)
    say(connected=len(conns))
    head = struct.pack("!I", size) + struct.pack("!BQH", 2, 0, 5) + b"flood"
    data = memoryview(head + bytes(part - len(head)))
    sent = [0] * n
    dropped = set()
    last = 0.0
    while True:
        for i, s in enumerate(conns):
            if i in dropped:
                continue
            try:
                if sent[i] < part:
                    sent[i] += s.send(data[sent[i]:])
                elif s.recv(1) == b"":
                    dropped.add(i)
            except BlockingIOError:
                pass
            except OSError:
                dropped.add(i)
        if time.monotonic() - last > 0.3:
            last = time.monotonic()
            say(pushed=sum(sent), dropped=len(dropped))
        time.sleep(0.1)
"""

#: ``sock rounds value_bytes big_bytes``: rounds of small PUTs, one large
#: PUT in the middle; says each {"small": seconds} / {"large": seconds} and
#: {"error": ...} for a reply that is not OK, then {"end": 1}
PRODUCE = """
    path, rounds, small, big = args[0], int(args[1]), int(args[2]), int(args[3])
    s = dial(path, timeout=300)
    for i in range(rounds):
        if i == rounds // 2:
            started = time.monotonic()
            got = call(s, put(b"large-%d" % uid, b"L" * big))
            if got is None or got[0] != 0:
                say(error=got, op="large")
            say(large=time.monotonic() - started, rv=got and got[1])
        started = time.monotonic()
        got = call(s, put(b"small-%d-%d" % (uid, i), b"s" * small))
        if got is None or got[0] != 0:
            say(error=got, op="small")
        say(small=time.monotonic() - started, rv=got and got[1])
    say(end=1)
"""


# ==== 1. memory ====================================================================


def test_flood_of_large_frames_stays_within_the_memory_bound(name: str, tmp_path: Path, socket_dir: Path,
                                                             report: Report) -> None:
    """1,024 connections of an allowed uid each announce a frame of
    --max-frame-bytes and send its first 128 KiB (the kernel holds what the
    daemon does not read).  Without a bound the daemon would buffer all of
    it (128 MiB here, 17 MiB a connection with the defaults); with it, its
    RssAnon grows by less than max_clients x 64 KiB + max_buffered_bytes +
    2 x max_frame_bytes.  Meanwhile another uid's small PUTs and one large PUT
    are applied (its large frame gets the next free reservation: the budget
    is shared fairly among uids), the flooders that got a reservation and
    stall are dropped after --client-timeout, and once the flooder is gone
    the whole budget is free."""
    flooders = 1024
    max_clients, max_buffered, max_frame, timeout = flooders + 32, 8 << 20, 2 << 20, 2.0
    part = 128 << 10
    bound = memory_bound(max_clients, max_buffered, max_frame)
    sock = str(socket_dir / "d.sock")
    options = ("--capacity", "1024", "--arena-bytes", str(4 << 20), "--max-keys", "1024",
               "--store-bytes", str(8 << 20), "--group", str(GROUP),
               "--allow-uid", f"{FLOODER},{PRODUCER}", "--max-clients", str(max_clients),
               "--max-clients-per-uid", str(flooders + 8), "--max-frame-bytes", str(max_frame),
               "--max-buffered-bytes", str(max_buffered), "--client-timeout", str(timeout),
               "--heartbeat", "0.1")
    rounds = scaled(1, 4)
    small_latencies: list[float] = []
    large_latencies: list[float] = []
    errors: list[Any] = []
    peak = before = 0
    buffered_seen = waiting_seen = dropped = 0
    with running(name, sock, tmp_path / "d.log", *options, small=False,
                 command=[sys.executable, "-c", NOFILE, "4096"]) as d, connect(sock, timeout=60) as admin:
        for _ in range(3):  # warm up the paths a flood takes
            figures(admin)
            assert call(admin, put(b"warm", b"w" * (ALLOWANCE + 10)))[0] == OK
        before = rss_anon(d.pid)
        sampler = PeakSampler(d.pid)
        try:
            for _ in range(rounds):
                with actor(FLOODER, FLOOD, sock, str(flooders), str(max_frame), str(part),
                           nofile=4096) as flood:
                    assert flood.until("connected")["connected"] == flooders
                    wait_for(lambda: figures(admin)["waiting_for_buffer"] > 0,
                             "the flood never filled the budget", timeout=120)
                    with actor(PRODUCER, PRODUCE, sock, "40", "200", str(3 * max_frame // 4)) as producer:
                        while "end" not in (msg := producer.next(300)):
                            if "error" in msg:
                                errors.append(msg)
                            elif "small" in msg:
                                small_latencies.append(msg["small"])
                            elif "large" in msg:
                                large_latencies.append(msg["large"])
                            f = figures(admin)
                            buffered_seen = max(buffered_seen, f["buffered_bytes"])
                            waiting_seen = max(waiting_seen, f["waiting_for_buffer"])
                            assert f["buffered_bytes"] <= max_buffered, f
                    # the flooders holding the budget stall: dropped, and others get it
                    deadline = time.monotonic() + 120
                    while (got := flood.until("dropped"))["dropped"] < max_buffered // max_frame:
                        assert time.monotonic() < deadline, f"stalled flooders not dropped: {got}"
                    dropped = max(dropped, got["dropped"])
                # the flooder is gone: every connection and byte of budget comes back
                wait_for(lambda: (f := figures(admin))["producers"] == 1 and f["buffered_bytes"] == 0
                         and f["waiting_for_buffer"] == 0, "the budget did not come back", timeout=120)
        finally:
            peak = sampler.stop()
        # the budget is whole again: a frame of the largest size is admitted at once
        status, _, body = call(admin, put(b"after", b"A" * (max_frame - 64)))
        assert status == OK, body
        with Reader(name) as r:
            assert r.get(f"large-{PRODUCER}") is not None and r.get(f"small-{PRODUCER}-39") is not None
    small_latencies.sort()
    report(checked="1,024 connections of one uid announce max-size frames and send 128 KiB of each: the "
                   "daemon's RssAnon stays under max_clients x 64 KiB + max_buffered + 2 x max_frame; another uid's "
                   "puts (one large) are applied meanwhile; stalled flooders dropped; the budget comes back",
           events=len(small_latencies) + len(large_latencies), faults=flooders * rounds, failures=len(errors),
           rounds=rounds, rss_anon_before_mib=round(before / 2**20, 1), rss_anon_peak_mib=round(peak / 2**20, 1),
           growth_mib=round((peak - before) / 2**20, 1), bound_mib=round(bound / 2**20, 1),
           samples=sampler.samples, buffered_bytes_max=buffered_seen, waiting_max=waiting_seen,
           flooders_dropped_by_timeout=dropped,
           small_put_median_ms=round(1000 * small_latencies[len(small_latencies) // 2], 1),
           small_put_max_ms=round(1000 * small_latencies[-1], 1),
           large_put_s=[round(x, 2) for x in large_latencies])
    assert not errors, errors
    assert peak - before <= bound, f"RssAnon grew by {peak - before} bytes, over the bound {bound}"
    assert waiting_seen > 0 and dropped >= max_buffered // max_frame


#: ``sock n``: n connections pipelining STATS without reading (each socket's
#: send buffer made small); says {"sent": [frames per connection]} once the
#: daemon stopped taking them, then on "go" reads every reply and says
#: {"replies": [...], "bad": n}
REPLY_FLOOD = """
    path, n = args[0], int(args[1])
    conns = []
    for _ in range(n):
        s = dial(path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setblocking(False)
        conns.append(s)
    chunk = STATS * 4096
    sent = [0] * n
    idle = [0.0] * n
    while not all(idle):
        for i, s in enumerate(conns):
            if idle[i]:
                continue
            try:
                sent[i] += s.send(chunk[sent[i] % len(STATS):])
            except BlockingIOError:
                idle[i] = time.monotonic()
        time.sleep(0.01)
    time.sleep(1.0)  # blocked for good: the daemon stopped reading them
    for i, s in enumerate(conns):
        try:
            sent[i] += s.send(chunk[sent[i] % len(STATS):])
        except BlockingIOError:
            pass
    say(sent=[x // len(STATS) + (x % len(STATS) > 0) for x in sent])
    sys.stdin.readline()
    replies, bad = [], 0
    for i, s in enumerate(conns):
        s.setblocking(True)
        s.settimeout(120)
        rest = -sent[i] % len(STATS)
        if rest:
            s.sendall(STATS[-rest:])
        count = 0
        for _ in range((sent[i] + rest) // len(STATS)):
            got = reply(s)
            if got is None or got[0] != 0 or json.loads(got[2])["name"] != args[2]:
                bad += 1
                break
            count += 1
        replies.append(count)
    say(replies=replies, bad=bad)
"""


def test_client_that_never_reads_its_replies_holds_little(name: str, tmp_path: Path, socket_dir: Path,
                                                          report: Report) -> None:
    """STATS is 5 bytes in and about 500 out.  Ten connections pipeline
    STATS and read nothing: the daemon applies no further frame of a
    connection while 16 KiB of its replies are unsent and reads nothing more
    from it, so its RssAnon grows by less than the bound (before: it read
    and answered 256 KiB of requests at a time, about 25 MiB of replies per
    connection).  Another producer is served meanwhile; then each connection
    reads and gets every reply, in order."""
    conns = 10
    max_clients, max_buffered, max_frame = 20, 4 << 20, 1 << 20
    bound = memory_bound(max_clients, max_buffered, max_frame)
    sock = str(socket_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), "--allow-uid", str(FLOODER),
                 "--max-clients", str(max_clients), "--max-buffered-bytes", str(max_buffered),
                 "--max-frame-bytes", str(max_frame), "--client-timeout", "60") as d, \
            connect(sock, timeout=60) as admin:
        for _ in range(20):
            figures(admin)
        before = rss_anon(d.pid)
        sampler = PeakSampler(d.pid)
        try:
            with actor(FLOODER, REPLY_FLOOD, sock, str(conns), name) as flood:
                sent = flood.until("sent")["sent"]
                assert call(admin, ping())[0] == OK  # served meanwhile
                paused = rss_anon(d.pid)
                flood.tell()
                got = flood.until("replies", timeout=300)
        finally:
            peak = sampler.stop()
    report(checked="10 connections pipelining STATS without reading: the daemon stops applying and reading "
                   "at 16 KiB of unsent replies; RssAnon stays under the bound; every reply arrives later",
           events=sum(sent), faults=conns, failures=got["bad"], requests_per_connection=sent,
           rss_anon_before_mib=round(before / 2**20, 1), rss_anon_paused_mib=round(paused / 2**20, 1),
           rss_anon_peak_mib=round(peak / 2**20, 1), bound_mib=round(bound / 2**20, 1))
    assert got["bad"] == 0 and got["replies"] == sent
    assert peak - before <= bound, f"RssAnon grew by {peak - before} bytes, over the bound {bound}"


# ==== 2. connections per uid =======================================================

#: ``sock n``: opens n connections and PINGs on each; says {"pings": [status
#: or null per connection]}; on "go" closes the first and says {"again":
#: status} of a PING on a new one (retried while the daemon has not yet
#: noticed the close)
HOLD = """
    path, n = args[0], int(args[1])
    conns, pings = [], []
    for _ in range(n):
        s = dial(path, timeout=20)
        conns.append(s)
        got = call(s, PING)
        pings.append(got and got[0])
    say(pings=pings)
    sys.stdin.readline()
    conns[0].close()
    deadline = time.monotonic() + 60
    while True:
        s = dial(path, timeout=20)
        got = call(s, PING)
        if got is not None or time.monotonic() > deadline:
            break
        s.close()
        time.sleep(0.05)
    say(again=got and got[0])
    sys.stdin.readline()
"""


def test_connections_per_uid(name: str, tmp_path: Path, socket_dir: Path, report: Report) -> None:
    """--max-clients-per-uid 3: a uid's fourth and fifth connections are
    closed without a reply (Producer: DaemonUnavailable), while another uid
    and root (exempt, like the daemon's own uid) are served; when one of the
    first three closes, the uid gets a connection again.  Without the
    limit, one uid could take every one of --max-clients."""
    sock = str(socket_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), "--allow-uid", f"{FLOODER},{OTHER}",
                 "--max-clients-per-uid", "3", "--heartbeat", "0.1") as d, \
            actor(FLOODER, HOLD, sock, "5") as greedy:
        pings = greedy.until("pings")["pings"]
        with actor(OTHER, HOLD, sock, "3") as other:
            others = other.until("pings")["pings"]
        roots = []
        admins = [connect(sock) for _ in range(5)]
        try:
            roots = [call(s, ping())[0] for s in admins]
        finally:
            for s in admins:
                s.close()
        greedy.tell()
        again = greedy.until("again")["again"]
        greedy.tell()
        refusals = d.output.count(f"refusing producers of uid {FLOODER}")
    report(checked="--max-clients-per-uid 3: a uid's 4th and 5th connections closed, another uid and root "
                   "served, a freed slot admits again; one log line per episode",
           events=len(pings) + len(others) + len(roots) + 1, faults=2, failures=0, flooder=pings,
           other_uid=others, root=roots, after_a_close=again, log_lines=refusals)
    assert pings == [OK, OK, OK, None, None]
    assert others == [OK] * 3 and roots == [OK] * 5 and again == OK
    assert refusals == 1


# ==== 3. who may produce ===========================================================

#: ``sock``: one PUT of key "from-UID"; says {"put": [status, rv, text] or null}
PUT_ONCE = """
    s = dial(args[0], timeout=20)
    say(put=call(s, put(b"from-%d" % uid, b"p")))
"""


def _put_as(uid: int, sock: str, groups: Sequence[int], gid: int | None = None) -> Any:
    with actor(uid, PUT_ONCE, sock, groups=groups, gid=gid) as a:
        return a.until("put")["put"]


@pytest.mark.parametrize(("allow", "verdicts"), [
    pytest.param((), {"owner": OK, "member": FORBIDDEN, "stranger": FORBIDDEN}, id="defaults"),
    pytest.param(("--allow-uid", str(OTHER)), {"owner": OK, "member": FORBIDDEN, "stranger": OK},
                 id="allow-uid"),
    pytest.param(("--allow-gid", str(EXTRA)), {"owner": OK, "member": FORBIDDEN, "stranger": OK},
                 id="allow-gid-supplementary"),
    pytest.param(("--allow-gid", str(OWNER)), {"owner": OK, "member": OK, "stranger": OK},
                 id="allow-gid-the-daemons"),
])
def test_who_may_produce(name: str, tmp_path: Path, socket_dir: Path, allow: tuple[str, ...],
                         verdicts: dict[str, int], report: Report, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon runs as OWNER (uid and gid), its socket 0660 OWNER:OWNER,
    so every child here may connect by the socket's mode; then the daemon
    decides.  Another process of OWNER's uid always produces.  A member of
    the daemon's group (the group that reads the segment, and may connect)
    produces only if --allow-gid names that group (before, the daemon's gid
    was the default: every reader could write); --allow-uid OTHER admits
    OTHER and no other member; --allow-gid EXTRA admits a process that has
    EXTRA as a supplementary group, and no other member."""
    os.chown(socket_dir, OWNER, OWNER)  # the service's runtime directory
    monkeypatch.setenv("SHMCACHE_OWNER", str(OWNER))  # this process and its children trust the service user
    sock = str(socket_dir / "d.sock")
    got: dict[str, Any] = {}
    with running(name, sock, tmp_path / "d.log", *allow, command=AS_OWNER):
        got["owner"] = _put_as(OWNER, sock, [])
        got["member"] = _put_as(PRODUCER, sock, [OWNER])
        got["stranger"] = _put_as(OTHER, sock, [OWNER, EXTRA] if "--allow-gid" in allow else [OWNER])
        with Reader(name) as r:
            seen = {who: r.get(f"from-{uid}") is not None
                    for who, uid in (("owner", OWNER), ("member", PRODUCER), ("stranger", OTHER))}
    statuses = {who: g and g[0] for who, g in got.items()}
    report(checked=f"who may produce with {' '.join(allow) or 'the default lists'}: the daemon's uid always, "
                   "others only as the lists say, judged by SO_PEERCRED and SO_PEERGROUPS",
           events=3, faults=sum(s != OK for s in statuses.values()), failures=int(statuses != verdicts),
           statuses=statuses)
    assert statuses == verdicts, got
    assert seen == {who: v == OK for who, v in verdicts.items()}, "a refused put changed the cache"


#: ``sock before after delay``: keeps a saved uid of 0, so that it can change
#: its groups after connect(): groups ``before`` at connect(), then ``after``;
#: says {"switched": pid}, waits for "go", PINGs and says {"ping": status}
SWITCH = """
    import json, os, socket, struct, sys
    path, before, after = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    uid = int(sys.argv[4])
    os.setgroups(before)
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, 0)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    os.seteuid(0)
    os.setgroups(after)
    os.seteuid(uid)
    print(json.dumps({"switched": os.getpid(), "groups": sorted(os.getgroups())}), flush=True)
    sys.stdin.readline()
    try:
        s.sendall(struct.pack("!IB", 1, 1))
    except OSError:
        pass
    head = s.recv(4)
    body = s.recv(struct.unpack("!I", head)[0]) if len(head) == 4 else b""
    print(json.dumps({"ping": body[0] if body else None}), flush=True)
"""


@pytest.mark.parametrize(("before", "after", "verdict"), [
    pytest.param([GROUP], [GROUP, EXTRA], FORBIDDEN, id="joins-the-allowed-group-after-connect"),
    pytest.param([GROUP, EXTRA], [GROUP], OK, id="leaves-the-allowed-group-after-connect"),
])
def test_groups_are_judged_as_of_connect(name: str, tmp_path: Path, socket_dir: Path, before: list[int],
                                         after: list[int], verdict: int, report: Report) -> None:
    """--allow-gid EXTRA.  A process connects with groups ``before``, then
    (while the daemon is stopped, so before it accepts) changes them to
    ``after``.  The verdict follows ``before``: the daemon reads the groups
    the socket recorded at connect() (SO_PEERGROUPS), as it does uid and gid
    (SO_PEERCRED).  Reading /proc/PID/status at accept time, as before,
    judged the process by ``after`` -- and by whatever process had taken its
    pid by then."""
    sock = str(socket_dir / "d.sock")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), "--allow-gid", str(EXTRA)) as d, \
            connect(sock) as admin:
        assert figures(admin)["producers"] == 1
        os.kill(d.pid, signal.SIGSTOP)  # it accepts nothing until the child has switched
        try:
            proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SWITCH), sock, json.dumps(before),
                                     json.dumps(after), str(OTHER)], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            switched = json.loads(proc.stdout.readline() or "{}")
        finally:
            os.kill(d.pid, signal.SIGCONT)
        try:
            assert switched.get("groups") == sorted(after), (switched, proc.stderr and proc.stderr.read())
            # the verdict, before the child says anything (a PING racing a
            # refusal could meet a reset instead of the FORBIDDEN reply)
            wait_for(lambda: f"refused producer pid {switched['switched']} " in d.output
                     or figures(admin)["producers"] == 2, "the daemon never judged the child")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            got = json.loads(proc.stdout.readline() or "{}")
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=STOP_TIMEOUT)
    report(checked="supplementary groups judged as of connect() (SO_PEERGROUPS), not as /proc says at accept",
           events=1, faults=1, failures=int(got.get("ping") != verdict), groups_at_connect=before,
           groups_at_accept=after, status=got.get("ping"))
    assert got.get("ping") == verdict, (got, err)


# ==== 4. who may choose resource versions ============================================

#: ``sock rv``: on one connection, a PUT with rv, then one without; says
#: {"explicit": reply, "next": reply}
RV_THEN_NEXT = """
    s = dial(args[0], timeout=20)
    explicit = call(s, put(b"rv-%d" % uid, b"x", int(args[1])))
    say(explicit=explicit, next=call(s, put(b"next-%d" % uid, b"y")))
"""


def _rv_as(uid: int, sock: str, rv: int) -> dict[str, Any]:
    with actor(uid, RV_THEN_NEXT, sock, str(rv), groups=[OWNER]) as a:
        return a.until("explicit")


def test_only_trusted_uids_choose_resource_versions(name: str, tmp_path: Path, socket_dir: Path,
                                                    report: Report, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon runs as OWNER with --allow-uid PRODUCER,RV_PRODUCER and
    --allow-rv-uid RV_PRODUCER.  PRODUCER's PUT with rv 2**63 - 1 (which
    would have exhausted the resource versions for everyone until a restart)
    is refused with INVALID_RV, changes nothing, and the same connection's
    next PUT is applied.  RV_PRODUCER, OWNER (the daemon's uid) and root may
    choose an RV, within --max-rv-jump of the current one; past it, even
    they get INVALID_RV, and the next PUT still works."""
    os.chown(socket_dir, OWNER, OWNER)
    monkeypatch.setenv("SHMCACHE_OWNER", str(OWNER))
    sock = str(socket_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--allow-uid", f"{PRODUCER},{RV_PRODUCER}",
                 "--allow-rv-uid", str(RV_PRODUCER), command=AS_OWNER):
        plain = _rv_as(PRODUCER, sock, MAX_RV)
        chosen = _rv_as(RV_PRODUCER, sock, 1000)
        own = _rv_as(OWNER, sock, 2000)
        with connect(sock) as s:
            root = call(s, put(b"rv-0", b"x", 3000))
            too_far = call(s, put(b"far", b"x", MAX_RV))
            after = call(s, put(b"after", b"z"))
        with Reader(name) as r:
            keys = {i.key: i.rv for i in r.list().items}
    report(checked="explicit RVs: refused (INVALID_RV, connection kept) for a uid not in --allow-rv-uid; "
                   "allowed for it, the daemon's uid and root within --max-rv-jump; nothing exhausted",
           events=9, faults=2, failures=0, plain=plain, allowed=chosen, daemon_uid=own, root=root[:2],
           too_far=too_far[:2], rv_after=after[1])
    assert plain["explicit"][:2] == [INVALID_RV, 0] and "allow-rv-uid" in plain["explicit"][2], plain
    assert plain["next"][:2] == [OK, 1], plain
    assert chosen["explicit"][:2] == [OK, 1000] and chosen["next"][:2] == [OK, 1001], chosen
    assert own["explicit"][:2] == [OK, 2000] and own["next"][:2] == [OK, 2001], own
    assert root[:2] == (OK, 3000)
    assert too_far[:2] == (INVALID_RV, 0) and b"max-rv-jump" in too_far[2], too_far
    assert after[:2] == (OK, 3001)
    assert f"rv-{PRODUCER}" not in keys and keys[f"next-{PRODUCER}"] == 1 and "far" not in keys


# ==== 5. configuration =============================================================


@pytest.mark.parametrize(("argv", "option"), [
    pytest.param(["--mode", "0666"], "--mode", id="mode-0666"),
    pytest.param(["--mode", "0660"], "--mode", id="mode-0660"),
    pytest.param(["--mode", "0642"], "--mode", id="mode-0642"),
    pytest.param(["--socket-mode", "0666"], "--socket-mode", id="socket-mode-0666"),
    pytest.param(["--socket-mode", "0662"], "--socket-mode", id="socket-mode-0662"),
    pytest.param(["--max-frame-bytes", "2000000", "--max-buffered-bytes", "1000000"], "--max-buffered-bytes",
                 id="budget-below-frame"),
    pytest.param(["--max-rv-jump", "0"], "--max-rv-jump", id="max-rv-jump-0"),
    pytest.param(["--max-clients-per-uid", "0"], "--max-clients-per-uid", id="per-uid-0"),
])
def test_configuration_that_would_open_the_cache_is_refused(name: str, tmp_path: Path, argv: list[str],
                                                            option: str, report: Report) -> None:
    """Exit status 2 and one line naming the option, before anything is
    created: a segment (or semaphore) others may write, a socket every user
    may connect to, a budget smaller than one frame."""
    bad_configuration(name, tmp_path, argv, {}, None, option)
    report(checked=f"{' '.join(argv)}: exit 2 naming {option}, nothing created", events=1, faults=1, failures=0)


def test_group_writable_socket_is_the_way_for_a_group(name: str, tmp_path: Path) -> None:
    """A group-writable socket (0770 here; 0660 is the default) and a
    segment only its owner writes (0600, 0640) are accepted."""
    sock = str(tmp_path / "d.sock")
    with running(name, sock, tmp_path / "d.log", "--socket-mode", "0770", "--mode", "0600"):
        assert os.stat(sock).st_mode & 0o777 == 0o770


class _NoPeerGroups:
    """A socket whose kernel lacks SO_PEERGROUPS (or whose peer has more
    groups than CPython can fetch): getsockopt fails with ``errno``."""

    def __init__(self, errno_: int) -> None:
        self.errno = errno_

    def getsockopt(self, *_: object) -> bytes:
        raise OSError(self.errno, os.strerror(self.errno))


@pytest.mark.parametrize(("errno_", "expect_proc"), [
    pytest.param(errno.ENOPROTOOPT, True, id="no-SO_PEERGROUPS-reads-proc"),
    pytest.param(errno.ERANGE, False, id="too-many-groups-judged-without-them"),
])
def test_peer_groups_fallback(tmp_path: Path, errno_: int, expect_proc: bool) -> None:
    """Only a kernel without SO_PEERGROUPS (ENOPROTOOPT) makes the daemon
    read /proc/PID/status, and from then on for every peer; a peer with
    more groups than fit (ERANGE) is judged by uid and primary gid alone."""
    from daemon._config import parse
    from daemon._server import Daemon as Server

    server = Server(parse(["--name", "fallback", "--socket", str(tmp_path / "d.sock")]))
    try:
        groups = server._peer_groups(_NoPeerGroups(errno_), os.getpid())  # type: ignore[arg-type]
    finally:
        server.selector.close()
    assert groups == (tuple(os.getgroups()) if expect_proc else ())
    assert server.peergroups is not expect_proc
