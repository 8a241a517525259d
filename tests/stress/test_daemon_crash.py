"""The daemon SIGKILLed under producer load and restarted on the same name and
socket: producers get errors (never a hang) while it is down and succeed
after; the restarted daemon adopts the killed one's segment, so no
acknowledged write is missing and the readers — one Reader for the whole run
and a watcher process per round — go on in the same epoch without
reopening.  And no acknowledged write is lost across a clean SIGTERM stop."""

from __future__ import annotations

import json
import os
import queue
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmcache import Item, Reader

from .._report import Report
from ..support import (
    Daemon,
    LineChild,
    as_dict,
    child,
    remove_cache,
    running,
    scaled,
    seg_path,
    sock_in,
    unique_name,
    wait_for,
)
from ..test_daemon import _copy_segment

#: ``PRODUCER socket tag stop_file``: puts key TAG/I = b"TAG/I" (a new I for
#: every attempt) through a Producer(timeout=5) until the stop file exists;
#: prints {"ack": [key, rv]} per acknowledged put, {"error": kind, "connect":
#: bool} per DaemonUnavailable/CacheClosed (then a fresh Producer after 50 ms;
#: "connect": the Producer could not even connect), and {"end": errors} last.
#: Any other exception kills it.
PRODUCER = """
    import json, os, sys, time
    from shmcache import CacheClosed, DaemonUnavailable, Producer
    sock, tag, stop = sys.argv[1:4]
    i = errors = 0
    p = None
    while not os.path.exists(stop):
        connecting = p is None
        try:
            if p is None:
                p = Producer(sock, timeout=5)
                connecting = False
            key = f"{tag}/{i}"
            i += 1
            rv = p.put(key, key.encode())
            print(json.dumps({"ack": [key, rv]}), flush=True)
        except (DaemonUnavailable, CacheClosed) as err:
            errors += 1
            print(json.dumps({"error": type(err).__name__, "connect": connecting}), flush=True)
            if p is not None:
                p.close()
                p = None
            time.sleep(0.05)
    if p is not None:
        p.close()
    print(json.dumps({"end": errors}), flush=True)
"""

#: Every key a producer puts is a new one, and a restart adopts the cache, so
#: the store holds every acknowledged put of the whole run: room for the soak
#: size's 40 rounds (about 150,000 puts) with margin; the ring still wraps.
SIZES = ("--capacity", "4096", "--arena-bytes", str(1 << 20), "--max-keys", str(1 << 18),
         "--store-bytes", str(32 << 20))

#: A watcher that, like a Kubernetes client, relists (resumes from the newest
#: RV) whenever it falls behind the ring under the producers' load, so that
#: it is still watching when the daemon dies; prints {"ready": epoch} first,
#: then {"rv": the last RV seen, "gaps": ResourceExpired so far} at most
#: every 50 ms while events come, and {"end": "CacheClosed" | "timeout"}
#: last.  It starts from ``since``, or from the cache's current RV if that is
#: older: an RV the cache has not reached yet is no resume point.
WATCHER = """
    import json, sys, time
    from shmcache import CacheClosed, Reader, ResourceExpired
    name, since, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    reader = Reader(name)
    since = min(since, reader.resource_version)
    print(json.dumps({"ready": reader.epoch}), flush=True)
    end, gaps, said = "timeout", 0, 0.0
    while True:
        try:
            for ev in reader.watch(since, timeout=timeout):
                since = ev.rv
                if time.monotonic() - said > 0.05:  # progress, not a line per event
                    print(json.dumps({"rv": since, "gaps": gaps}), flush=True)
                    said = time.monotonic()
            break
        except CacheClosed:
            end = "CacheClosed"
            break
        except ResourceExpired:
            gaps += 1
            try:
                since = reader.resource_version
            except CacheClosed:
                end = "CacheClosed"
                break
    print(json.dumps({"end": end}), flush=True)
"""


@dataclass
class Producing:
    """A producer child and what it said so far."""

    proc: LineChild
    acks: list[tuple[str, int]] = field(default_factory=list)
    errors: int = 0
    #: errors of a Producer that could not connect: no daemon listens
    refused: int = 0
    #: acks since the last error; cleared by the test at each phase
    since_error: list[tuple[str, int]] = field(default_factory=list)

    def pump(self) -> None:
        while True:
            try:
                line = self.proc.lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self.proc.lines.put(None)
                raise AssertionError(f"producer {self.proc.proc.pid} ended early "
                                     f"(rc {self.proc.proc.poll()}); stderr:\n{self.proc.stderr}")
            msg: dict[str, Any] = json.loads(line)
            if "ack" in msg:
                key, rv = msg["ack"]
                self.acks.append((key, rv))
                self.since_error.append((key, rv))
            else:
                assert "error" in msg, msg
                self.errors += 1
                self.refused += bool(msg["connect"])
                self.since_error = []

    def finish(self) -> int:
        rest, end = self.proc.until_end()
        for msg in rest:
            if "ack" in msg:
                key, rv = msg["ack"]
                self.acks.append((key, rv))
            else:
                self.errors += 1
        assert self.proc.close() == 0, self.proc.stderr
        assert end["end"] == self.errors
        return self.errors


def producers(sock: str, stop: Path, n: int) -> list[Producing]:
    out: list[Producing] = []
    try:
        for i in range(n):
            out.append(Producing(LineChild(PRODUCER, sock, f"p{i}", str(stop))))
    except BaseException:
        for p in out:
            p.proc.kill()
        raise
    return out


def pump_until(ps: list[Producing], what: str, ok: Any, timeout: float = 30) -> None:
    def check() -> bool:
        for p in ps:
            p.pump()
        return all(ok(p) for p in ps)
    wait_for(check, what, timeout=timeout, step=0.01)


def assert_in(reader: Reader, acks: list[tuple[str, int]], when: str) -> None:
    for key, rv in acks:
        got = reader.get(key)
        assert got == Item(key, key.encode(), rv), f"{when}: acknowledged put {key} at rv {rv} is {got}"


def test_daemon_sigkill_restart_under_producer_load(name: str, tmp_path: Path, report: Report) -> None:
    rounds = scaled(3, 40)
    sock = sock_in(tmp_path)
    stop = tmp_path / "stop"
    d = Daemon.start(name, sock, tmp_path / "d0.log", *SIZES, small=False)
    ps: list[Producing] = []
    checked_acks = adoptions = watched_past_restart = watcher_gaps = 0
    seen: set[str] = set()  # the keys of the acknowledged puts already checked
    try:
        d.wait_ready()
        ps = producers(sock, stop, 3)
        reader = Reader(name)  # never reopened: the adopting daemons keep its segment
        epoch = reader.epoch
        for rnd in range(rounds):
            with child(WATCHER, name, str(reader.resource_version), "60") as watcher:
                assert watcher.next()["ready"] == epoch
                for p in ps:
                    p.since_error = []
                pump_until(ps, "every producer is acknowledged", lambda p: len(p.since_error) >= 20)
                assert d.stop(signal.SIGKILL) == -signal.SIGKILL
                # A refused connection is the proof that a producer saw the daemon
                # down (an error still queued from before the kill, e.g. a put
                # timed out under load, is not): every ack it printed before that
                # came from the killed daemon, and no later one can.
                refused_before = [p.refused for p in ps]
                pump_until(ps, "every producer sees the daemon down",
                           lambda p, ps=ps, before=refused_before: p.refused > before[ps.index(p)])
                # the killed daemon's segment stays readable: every acknowledged put is there
                epoch_acks = [a for p in ps for a in p.acks if a[0] not in seen]
                assert_in(reader, epoch_acks, f"round {rnd}, after SIGKILL")
                checked_acks += len(epoch_acks)
                seen.update(k for k, _ in epoch_acks)
                rv_at_kill = reader.resource_version
                d = Daemon.start(name, sock, tmp_path / f"d{rnd + 1}.log", *SIZES, small=False)
                d.wait_ready()
                assert f"adopted cache {name!r}" in d.output, d.output
                adoptions += 1
                assert reader.figures().epoch == epoch and reader.figures().owner.pid == d.pid
                for p in ps:
                    p.since_error = []
                pump_until(ps, "every producer succeeds after the restart", lambda p: len(p.since_error) >= 5)
                # the watcher, never reopened, goes on past the restart: it
                # reaches events the adopter published (resuming from the
                # newest RV when it fell behind the wrapping ring) and never
                # gets CacheClosed
                while True:
                    msg = watcher.next()
                    assert "end" not in msg, f"round {rnd}: the watcher ended: {msg}"
                    if msg["rv"] > rv_at_kill:
                        watched_past_restart += 1
                        watcher_gaps += msg["gaps"]
                        break
        stop.touch()
        errors = [p.finish() for p in ps]
        fresh = [a for p in ps for a in p.acks if a[0] not in seen]
        assert_in(reader, fresh, "after the last restart")
        checked_acks += len(fresh)
        assert reader.figures().epoch == epoch
        reader.close()
        assert d.stop() == 0, d.fail("bad exit status after SIGTERM")
        d.assert_gone()
    finally:
        for p in ps:
            p.proc.kill()
        d.kill()
        remove_cache(name)
    assert all(e >= rounds for e in errors), f"errors per producer {errors} over {rounds} kills"
    report(checked="daemon SIGKILL + restart under 3 producers: errors while down, success after, the restart "
                   "adopts the segment: every acknowledged put kept, one epoch, readers never reopen",
           events=sum(len(p.acks) for p in ps), faults=rounds, failures=0, acks_checked=checked_acks,
           producer_errors=sum(errors), adoptions=adoptions, epochs=1,
           watchers_past_restart=watched_past_restart, watcher_gaps=watcher_gaps)


def test_acknowledged_puts_survive_sigterm_under_load(name: str, tmp_path: Path, report: Report) -> None:
    """The technique of tests/test_daemon.py's test_acknowledged_writes_survive_sigterm:
    a descriptor of the segment opened before the stop, copied afterwards to a
    name of its own with ``closed`` cleared, and listed."""
    rounds = scaled(2, 20)
    lost = acked_total = 0
    for rnd in range(rounds):
        sock = sock_in(tmp_path, f"s{rnd}")
        stop = tmp_path / f"stop{rnd}"
        copy = unique_name("copy")
        with running(name, sock, tmp_path / f"t{rnd}.log", *SIZES, small=False) as d:
            fd = os.open(seg_path(name), os.O_RDONLY)
            ps: list[Producing] = []
            try:
                ps = producers(sock, stop, 3)
                pump_until(ps, "every producer is acknowledged", lambda p: len(p.acks) >= scaled(150, 1500))
                d.proc.send_signal(signal.SIGTERM)
                assert d.wait() == 0, d.fail("bad exit status")
                before = [p.errors for p in ps]
                pump_until(ps, "every producer sees the daemon gone",
                           lambda p, ps=ps, before=before: p.errors > before[ps.index(p)])
                stop.touch()
                for p in ps:
                    p.finish()
                d.assert_gone()
                _copy_segment(fd, copy)
            finally:
                os.close(fd)
                for p in ps:
                    p.proc.kill()
        try:
            with Reader(copy) as left:
                state = as_dict(left.list())
        finally:
            remove_cache(copy)
        acked = [a for p in ps for a in p.acks]
        missing = [(k, rv) for k, rv in acked if state.get(k) != (k.encode(), rv)]
        assert not missing, f"round {rnd}: {len(missing)} acknowledged puts lost, e.g. {missing[:5]}"
        lost += len(missing)
        acked_total += len(acked)
    report(checked="SIGTERM under 3 producers: every acknowledged put is in the segment at close",
           events=acked_total, faults=rounds, failures=lost)
