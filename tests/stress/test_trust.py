"""Attacks by other local users on a cache's name, its daemon's socket and
its restarts, each run with real processes of separate uids (the test runs
as root; children drop to other uids as in tests/stress/test_access.py).

* **Squatting.** An attacker (uid STRANGER, in no group) creates
  ``/dev/shm/shmcache.NAME`` first — a real segment with fake data, its
  header's creator forged to pid 1 and its ``socket_path`` to the
  attacker's own listener — or only the semaphore, or only the name lock,
  before the daemon's first start or in a restart gap.  The daemon exits 1
  with one line naming the attacker's uid and the remedy (never a
  traceback); readers, ``shmcache status`` and producers refuse the segment
  (CacheNotTrusted naming the uid) and the attacker's listener receives not
  one connection.
* **Interception.** With the daemon down, an attacker listens where older
  versions guessed the socket (``/tmp/shmcache.NAME.sock``): a producer by
  name never connects there, one given that path explicitly checks the peer
  (SO_PEERCRED) and sends nothing; the daemon refuses to guess a /tmp path
  and to listen in a directory others may write.
* **Restart.** A reader in the cache's group holds ``flock`` on its
  read-only descriptor of the segment while the daemon is SIGKILLed: the
  restarted daemon adopts it and serves at once, since creators serialise on
  a name lock readers cannot open.
* **Creation order.** A daemon stopped (test hook) right after creating
  each file: the file is 0600 and its owner's, so a member of the daemon's
  primary group — not of ``--group`` — cannot open it; after the start,
  ``--group`` members read and others do not.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from shmcache import CacheClosed, CacheNotTrusted, DaemonUnavailable, Producer, Reader

from .._report import Report
from ..support import START_TIMEOUT, Daemon, LineChild, child, daemon_env, running, wait_for
from ..test_daemon import open_dir  # noqa: F401  (the fixture: a socket directory anybody may traverse)
from .test_access import (
    ACTOR,
    GROUP,
    MEMBER_SUPPLEMENTARY,
    OWNER,
    STRANGER,
    Identity,
    Verdicts,
    act,
    check_ids,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to become other uids and gids in child processes")

#: ``SQUATTER uid gid name listen_path what``: becomes uid/gid (no groups) and
#: squats cache ``name``: ``segment`` (a Writer's real segment holding
#: config/db-host = db.attacker.example, made mode 0666, its header's creator
#: forged to pid 1 and its socket_path to ``listen_path``), ``semaphore`` (a
#: POSIX semaphore of the cache's name, 0666), ``lock`` (the name lock file)
#: or ``nothing``.  It listens at ``listen_path`` (unless "-"), answering
#: every frame OK at rv 4242 as a daemon would, and prints {"ready": 1}; on
#: stdin's EOF it prints {"connections": n, "bytes": n} and exits (0), its
#: squatted entries left behind, as a squatter's would be.
SQUATTER = """
    import json, os, select, socket, struct, sys
    import posix_ipc
    import shmcache
    from shmcache._native import ffi

    uid, gid, name, listen_path, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if what == "segment":
        w = shmcache.Writer(name, capacity=64, arena_bytes=65536, max_keys=256, store_bytes=65536)
        w.put("config/db-host", b"db.attacker.example")
        w.advertise_socket(listen_path)
        with open("/proc/1/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        w._h.creator_pid = 1
        w._h.creator_start_ticks = ticks
        os.chmod("/dev/shm/shmcache." + name, 0o666)
        w._lock.close()  # keep the segment: no close(), which would unlink it
    elif what == "semaphore":
        posix_ipc.Semaphore("/shmcache." + name + ".lock", posix_ipc.O_CREX, mode=0o666).close()
    elif what == "lock":
        os.close(os.open("/dev/shm/shmcache-lock." + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666))
    listener = None
    if listen_path != "-":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(listen_path)
        os.chmod(listen_path, 0o777)
        listener.listen(16)
    print(json.dumps({"ready": 1}), flush=True)
    connections = received = 0
    peers = []
    watched = [sys.stdin] + ([listener] if listener else [])
    ending = False
    while True:
        # after stdin's EOF, whatever is already queued still counts
        ready, _, _ = select.select(watched + peers, [], [], 0.2 if ending else None)
        if ending and not ready:
            break
        if sys.stdin in ready:
            if not sys.stdin.readline():
                ending = True
                watched.remove(sys.stdin)
        for s in ready:
            if s is listener:
                peer, _ = listener.accept()
                connections += 1
                peers.append(peer)
            elif s in peers:
                data = s.recv(65536)
                if not data:
                    peers.remove(s)
                    s.close()
                    continue
                received += len(data)
                s.sendall(struct.pack("!IBQ", 9, 0, 4242))  # "applied at rv 4242"
    print(json.dumps({"connections": connections, "bytes": received}), flush=True)
"""


def squat(name: str, listen_path: str, what: str, who: Identity = STRANGER) -> AbstractContextManager[LineChild]:
    """The squatter child (print {"ready"} first; release() for its figures)."""
    return child(SQUATTER, str(who.uid), str(who.gid), name, listen_path, what, held=True)


def attacker_dir(tmp: Path) -> Path:
    """A directory the attacker owns, for its listener."""
    path = Path(os.path.join("/tmp", f"attacker-{os.getpid()}-{time.monotonic_ns()}"))
    path.mkdir(mode=0o755)
    os.chown(path, STRANGER.uid, STRANGER.gid)
    return path


def start_refused(name: str, sock: str, log: Path, *args: str, env: dict[str, str] | None = None,
                  command: list[str] | None = None) -> tuple[int, str]:
    """Run shmcached, which should refuse to start: (exit status, output)."""
    d = Daemon.start(name, sock, log, *args, env=env, command=command)
    rc = d.wait(START_TIMEOUT)
    return rc, d.output


def refusal_line(v: Verdicts, rc: int, output: str, uid: int, path: str) -> None:
    """Exit status 1 and one line naming ``uid`` and the remedy (rm of ``path``)."""
    lines = [line for line in output.splitlines() if line.strip()]
    v.expect(rc == 1, f"daemon exit status {rc}, not 1; output:\n{output}")
    v.expect("Traceback" not in output, f"the daemon died with a traceback:\n{output}")
    v.expect(len(lines) == 1, f"{len(lines)} lines instead of one:\n{output}")
    remedy = output.partition("(rm ")[2].partition(")")[0].split()
    v.expect(f"uid {uid}" in output and path in remedy,
             f"the refusal does not name uid {uid} and the remedy (rm ... {path}):\n{output}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True, text=True,
                          timeout=60, env=daemon_env())


def remove_squat(name: str) -> None:
    for path in (f"/dev/shm/shmcache.{name}", f"/dev/shm/sem.shmcache.{name}.lock",
                 f"/dev/shm/shmcache-lock.{name}"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# ---- squatting ----------------------------------------------------------------------


@pytest.mark.parametrize("alive", [True, False], ids=["squatter-alive", "squatter-dead"])
def test_squatted_segment_is_refused_by_everyone(name: str, tmp_path: Path, open_dir: Path, alive: bool,
                                                 report: Report) -> None:
    """A squatter's segment (fake data, creator forged to pid 1, socket_path
    forged to its listener, mode 0666), alive or gone: the daemon exits 1
    with one line naming the squatter's uid and the remedy; a root Reader
    and a group member's Reader raise CacheNotTrusted naming the uid;
    ``shmcache status``, ``get``, ``put`` (by name and ``--direct``) fail
    naming it and print none of the fake data; a Producer by name raises
    CacheNotTrusted; the squatter's listener gets no connection.  Once the
    entry is removed, the daemon starts and serves."""
    v = Verdicts()
    lair = attacker_dir(tmp_path)
    listen = str(lair / "evil.sock")
    seg = f"/dev/shm/shmcache.{name}"
    try:
        with squat(name, listen, "segment") as s:
            s.next()
            if not alive:
                s.release()
                squatter = s.next()
            rc, out = start_refused(name, str(open_dir / "d.sock"), tmp_path / "d.log")
            refusal_line(v, rc, out, STRANGER.uid, seg)
            try:
                Reader(name).close()
                v.expect(False, "root's Reader opened the squatted segment")
            except CacheNotTrusted as err:
                v.expect(f"uid {STRANGER.uid}" in str(err) and err.owner_uid == STRANGER.uid, f"{err}")
            member = act(MEMBER_SUPPLEMENTARY, name, "/nonexistent", [["read"], ["produce", "name"]])
            v.denied(member, "read", "CacheNotTrusted", mentions=f"uid {STRANGER.uid}")
            v.denied(member, "produce:name", "CacheNotTrusted", mentions=f"uid {STRANGER.uid}")
            try:
                Producer(name, timeout=5).close()
                v.expect(False, "a Producer by name connected to the squatter")
            except CacheNotTrusted as err:
                v.expect(f"uid {STRANGER.uid}" in str(err), f"{err}")
            for args in (["status"], ["get", "config/db-host"], ["put", "secret/api-token", "hunter2"],
                         ["put", "--direct", "secret/api-token", "hunter2"]):
                done = cli("--name", name, *args)
                v.expect(done.returncode == 1 and f"uid {STRANGER.uid}" in done.stderr
                         and "attacker" not in done.stdout + done.stderr and "evil.sock" not in done.stdout,
                         f"shmcache {' '.join(args)}: rc {done.returncode}, {done.stdout!r} {done.stderr!r}")
            if alive:
                s.release()
                squatter = s.next()
            v.expect(squatter == {"connections": 0, "bytes": 0}, f"the squatter's listener saw {squatter}")
            s.close()
        remove_squat(name)  # the remedy the refusal names
        with running(name, str(open_dir / "d.sock"), tmp_path / "d2.log") as d, Producer(name) as p:
            rv = p.put("config/db-host", b"db.example")
            with Reader(name) as r:
                got = r.get("config/db-host")
                v.expect(got is not None and got.value == b"db.example", f"the real daemon's data: {got}")
            v.expect(d.proc.poll() is None, "daemon died")
    finally:
        remove_squat(name)
        for entry in lair.iterdir():
            entry.unlink()
        lair.rmdir()
    report(checked=f"squatted segment ({'squatter alive' if alive else 'squatter gone'}): daemon exits 1 "
                   "naming the uid, readers/status/get/put/producers refuse, the squatter receives nothing",
           events=rv, faults=1, failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


@pytest.mark.parametrize("what", ["semaphore", "lock"])
def test_squatted_semaphore_or_name_lock_is_reported(name: str, tmp_path: Path, open_dir: Path, what: str,
                                                     report: Report) -> None:
    """Only the semaphore (0666) or only the name lock file is squatted: the
    daemon exits 1 with one line naming the squatter's uid and that path —
    no posix_ipc traceback — and leaves nothing of its own behind."""
    v = Verdicts()
    path = f"/dev/shm/sem.shmcache.{name}.lock" if what == "semaphore" else f"/dev/shm/shmcache-lock.{name}"
    try:
        with squat(name, "-", what) as s:
            s.next()
            s.release()
            s.next()
            s.close()
        rc, out = start_refused(name, str(open_dir / "d.sock"), tmp_path / "d.log")
        refusal_line(v, rc, out, STRANGER.uid, path)
        left = sorted(e for e in os.listdir("/dev/shm") if name in e)
        v.expect(left == [os.path.basename(path)], f"/dev/shm holds {left}")
    finally:
        remove_squat(name)
    report(checked=f"squatted {what}: daemon exits 1 with one line naming the uid, no traceback",
           events=0, faults=1, failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


def test_squat_in_a_restart_gap(name: str, tmp_path: Path, open_dir: Path, report: Report) -> None:
    """The daemon stops cleanly (its entries are unlinked); the squatter
    takes the name.  A reader of the old cache gets CacheClosed and, when it
    reopens as README says, CacheNotTrusted — never the squatter's data; the
    restarted daemon exits 1 naming the squatter."""
    v = Verdicts()
    sock = str(open_dir / "d.sock")
    with running(name, sock, tmp_path / "d.log") as d, Producer(sock) as p:
        rv = p.put("config/db-host", b"db.example")
        reader = Reader(name)
        d.stop()
    try:
        with squat(name, "-", "segment") as s:
            s.next()
            try:
                reader.get("config/db-host")
                v.expect(False, "the old reader went on after the clean stop")
            except CacheClosed:
                pass
            reader.close()
            try:
                with Reader(name) as again:
                    v.expect(False, f"the reopened reader read {again.get('config/db-host')}")
            except CacheNotTrusted as err:
                v.expect(err.owner_uid == STRANGER.uid, f"{err}")
            rc, out = start_refused(name, sock, tmp_path / "d2.log")
            refusal_line(v, rc, out, STRANGER.uid, f"/dev/shm/shmcache.{name}")
            s.release()
            s.next()
            s.close()
    finally:
        remove_squat(name)
    report(checked="squat in a clean restart's gap: old readers CacheClosed, reopen CacheNotTrusted, "
                   "the restart exits 1 naming the squatter", events=rv, faults=1,
           failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


# ---- the producers' socket -------------------------------------------------------------


def test_producers_never_reach_an_impersonator(name: str, tmp_path: Path, report: Report) -> None:
    """With no daemon (and no cache), the squatter listens at the path older
    versions guessed, /tmp/shmcache.NAME.sock: a Producer by name raises
    DaemonUnavailable without connecting anywhere; one given that path
    raises CacheNotTrusted after connecting, having sent no byte; the
    squatter saw one connection and zero bytes.  A daemon with neither
    RUNTIME_DIRECTORY nor XDG_RUNTIME_DIR nor --socket exits 2 naming
    --socket; one told to listen in a directory others may write (/tmp)
    exits 1 saying so."""
    v = Verdicts()
    guessed = f"/tmp/shmcache.{name}.sock"
    try:
        with squat(name, guessed, "nothing") as s:
            s.next()
            try:
                Producer(name, timeout=5).close()
                v.expect(False, "a Producer by name connected with no cache")
            except DaemonUnavailable as err:
                v.expect(guessed not in str(err), f"{err}")
            try:
                with Producer(guessed, timeout=5) as p:
                    p.put("secret/api-token", b"hunter2")
                v.expect(False, "a Producer wrote to the impersonator")
            except CacheNotTrusted as err:
                v.expect(err.owner_uid == STRANGER.uid and f"uid {STRANGER.uid}" in str(err), f"{err}")
            s.release()
            seen = s.next()
            v.expect(seen == {"connections": 1, "bytes": 0}, f"the impersonator saw {seen}")
            s.close()
        d = Daemon(["--name", name], tmp_path / "d.log", name=name)
        rc = d.wait(START_TIMEOUT)
        v.expect(rc == 2 and "--socket" in d.output and "RUNTIME_DIRECTORY" in d.output,
                 f"a daemon without a socket directory: rc {rc}, {d.output}")
        d = Daemon(["--name", name, "--socket", f"/tmp/{name}.sock"], tmp_path / "d2.log", name=name)
        rc = d.wait(START_TIMEOUT)
        v.expect(rc == 1 and "may be written by others" in d.output and "Traceback" not in d.output,
                 f"a daemon told to listen in /tmp: rc {rc}, {d.output}")
        v.expect(not [e for e in os.listdir("/dev/shm") if name in e], "the refused daemon left entries")
    finally:
        if os.path.exists(guessed):
            os.unlink(guessed)
        remove_squat(name)
    report(checked="no producer reaches a listener at a guessed or given path that is not a trusted "
                   "daemon; the daemon refuses /tmp", events=0, faults=3, failures=len(v.violations),
           checks=v.checked)
    assert not v.violations, v.failed()


# ---- restarts --------------------------------------------------------------------------

#: ``HOLDER uid gid groups name``: becomes the reader, opens the segment
#: read-only and holds an exclusive flock on it, tries the name lock file
#: too, prints {"holding": ino, "name_lock": outcome}, then waits for stdin's EOF.
HOLDER = """
    import fcntl, json, os, sys
    uid, gid, groups, name = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    fd = os.open("/dev/shm/shmcache." + name, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        lock_fd = os.open("/dev/shm/shmcache-lock." + name, os.O_RDONLY)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        outcome = "held"
    except OSError as err:
        outcome = type(err).__name__
    print(json.dumps({"holding": os.fstat(fd).st_ino, "name_lock": outcome}), flush=True)
    sys.stdin.read()
"""


def test_a_reader_cannot_hold_up_a_restart(name: str, tmp_path: Path, open_dir: Path, report: Report) -> None:
    """A member of the cache's group flocks the segment through its
    read-only descriptor (and cannot open the name lock at all); the daemon
    is SIGKILLed; the restarted daemon adopts the segment and serves
    although the flock is still held."""
    v = Verdicts()
    sock = str(open_dir / "d.sock")
    who = MEMBER_SUPPLEMENTARY
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP)) as d:
        with Producer(sock) as p:
            p.put("a", b"1")
        with child(HOLDER, *who.argv(), name, held=True) as h:
            held = h.next()
            v.expect(held["name_lock"] == "PermissionError", f"the reader and the name lock: {held}")
            d.stop(signal.SIGKILL)
            os.unlink(sock)
            started = time.monotonic()
            with running(name, sock, tmp_path / "d2.log", "--group", str(GROUP)) as again:
                took = time.monotonic() - started
                v.expect(os.stat(f"/dev/shm/shmcache.{name}").st_ino == held["holding"], "not adopted")
                with Producer(sock) as p:
                    v.expect(p.put("b", b"2") == 2, "the adopted cache's next put")
                v.expect(h.proc.poll() is None, "the holder ended")
                v.expect(again.proc.poll() is None, "the restarted daemon died")
    report(checked="a group member's flock on the segment does not hold up a restart (an adoption) after SIGKILL",
           events=2, faults=1, failures=len(v.violations), checks=v.checked, restart_s=round(took, 2))
    assert not v.violations, v.failed()


# ---- creation order -------------------------------------------------------------------


def fifo_line(path: Path, d: Daemon) -> str:
    """A line from the FIFO ``path`` that the daemon writes; AssertionError
    (not a hang) if it exits or stays silent."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        got = b""
        deadline = time.monotonic() + START_TIMEOUT
        while not got.endswith(b"\n"):
            if d.proc.poll() is not None or time.monotonic() > deadline:
                raise d.fail("never stopped after creating a file")
            try:
                got += os.read(fd, 4096)
            except BlockingIOError:
                pass
            time.sleep(0.01)
        return got.decode().strip()
    finally:
        os.close(fd)


def fifo_send(path: Path, d: Daemon) -> None:
    """One byte into the FIFO the paused daemon waits on."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: it has not opened its end yet
            if d.proc.poll() is not None or time.monotonic() > deadline:
                raise d.fail("never waited to go on") from None
            time.sleep(0.01)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


#: the daemon's primary group in test_no_window_before_the_group_and_mode (not GROUP)
OWNER_PRIMARY_GID = 40127

#: run shmcached as OWNER (primary gid OWNER_PRIMARY_GID, member of GROUP), stopping after each file it
#: creates: the path goes to the FIFO argv[1]; it goes on after a byte from the FIFO argv[2]
PAUSING_OWNER = [sys.executable, "-c", f"""
import os, shutil, sys
import shmcache._entries as entries, shmcached
out_fifo, in_fifo = sys.argv[1], sys.argv[2]
def pause(path):
    with open(out_fifo, "w") as f:
        f.write(path + "\\n")
    with open(in_fifo) as f:
        f.read(1)
entries.after_exclusive_create = pause
os.setgroups([{GROUP}]); os.setgid({OWNER_PRIMARY_GID}); os.setuid({OWNER})
sys.exit(shmcached.main(sys.argv[3:]))
"""]


def test_no_window_before_the_group_and_mode(name: str, tmp_path: Path, open_dir: Path, report: Report) -> None:
    """The daemon (uid OWNER, primary group OWNER_PRIMARY_GID, ``--group
    GROUP``) is stopped right after it creates the semaphore and the
    segment: each is mode 0600, owned by OWNER and its primary group, and a
    member of that group (who could open a 0640 file of that group) cannot
    open it.  After the start both are OWNER:GROUP 0640: a GROUP member
    reads, the primary-group member does not."""
    v = Verdicts()
    os.chown(open_dir, OWNER, OWNER_PRIMARY_GID)
    owner_group_member = Identity("owner-group", 40128, 40128, (OWNER_PRIMARY_GID,))
    fifos = [open_dir / "out", open_dir / "in"]
    for fifo in fifos:
        os.mkfifo(fifo, 0o600)
        os.chown(fifo, OWNER, OWNER_PRIMARY_GID)
    sock = str(open_dir / "d.sock")
    command = [*PAUSING_OWNER, str(fifos[0]), str(fifos[1])]
    d = Daemon.start(name, sock, tmp_path / "d.log", "--group", str(GROUP), command=command)
    try:
        seen = []
        for _ in range(2):
            path = fifo_line(fifos[0], d)
            st = os.stat(path)
            seen.append(os.path.basename(path))
            v.expect((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, OWNER, OWNER_PRIMARY_GID),
                     f"{path} at creation: mode {stat.S_IMODE(st.st_mode):o} {st.st_uid}:{st.st_gid}")
            which = "semaphore" if "sem." in path else "segment"
            out = act(owner_group_member, name, sock, [["open", which, "r"]])
            v.denied(out, f"open:{which}:r", "PermissionError")
            fifo_send(fifos[1], d)
        v.expect(seen == [f"sem.shmcache.{name}.lock", f"shmcache.{name}"], f"created in order {seen}")
        wait_for(lambda: os.path.exists(sock), "the daemon never listened")
        for path in (f"/dev/shm/shmcache.{name}", f"/dev/shm/sem.shmcache.{name}.lock"):
            st = os.stat(path)
            v.expect((stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, GROUP), f"{path} after the start")
        env = {"SHMCACHE_OWNER": str(OWNER)}
        with child(ACTOR, *owner_group_member.argv(), name, sock, json.dumps([["read"]]), env=env) as c:
            check_ids(c, owner_group_member)
            got = c.next()
            v.expect(got.get("error") == "PermissionError", f"OWNER-group member after the start: {got}")
        with child(ACTOR, *MEMBER_SUPPLEMENTARY.argv(), name, sock, json.dumps([["read"]]), env=env) as c:
            check_ids(c, MEMBER_SUPPLEMENTARY)
            got = c.next()
            v.expect("ok" in got, f"GROUP member after the start: {got}")
        rc = d.stop()
        v.expect(rc == 0, f"exit status {rc}: {d.output}")
    finally:
        d.kill()
        remove_squat(name)
    report(checked="semaphore and segment are 0600 and the owner's until group and mode are set; "
                   "then only --group members read", events=0, faults=2, failures=len(v.violations),
           checks=v.checked)
    assert not v.violations, v.failed()
