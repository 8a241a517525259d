"""The access model, checked with real processes of other users: the test
runs as root and forks children that drop to another uid/gid (``setgroups``,
``setgid``, ``setuid``; the ids need no /etc/passwd entry).

* A user outside the cache's group opens nothing: not the segment (Reader,
  Writer), not the semaphore, not the producer socket (its file mode), and
  unlinks nothing.
* A member of the cache's group (by a supplementary group or by its primary
  gid) reads: get/list/watch see the daemon's data, new events included,
  through a read-only mapping (``r--s`` in /proc/self/maps; a store into it
  is SIGSEGV and changes no byte).  It cannot open the cache read-write, take
  the writers' semaphore or unlink anything.  It may connect to the socket
  (mode 0660); whether it may *produce* is the daemon's SO_PEERCRED decision
  (``--allow-uid``/``--allow-gid``).
* Only the owner's uid writes (Writer(create=False), the semaphore) and
  unlinks; /dev/shm is sticky, so nobody else may remove the entries.
* A reader never unlinks anything, however it ends (close(), exit, SIGKILL
  mid-wait or mid-copy), even as root, who could: segment and semaphore keep
  their inodes and the daemon keeps serving other readers.
* A cache created with mode 0600 is closed to its group.

Each denial is checked for its exact exception type (builtin PermissionError
naming the cache for the library's own calls; posix_ipc.PermissionsError for
raw posix_ipc calls; DaemonUnavailable caused by PermissionError for a
Producer refused by the socket's file mode; ProtocolError FORBIDDEN for one
refused by peer credentials), and every refused attempt is checked to have
changed nothing: the segment's bytes (the daemon's heartbeat is set to an
hour, so nothing else writes the header), its inode, the resource version.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

from shmcache import Item, Producer, Reader, Writer

from .._report import Report
from ..support import FORBIDDEN, IO_TIMEOUT, WATCHER, LineChild, child, running, wait_for
from ..test_daemon import open_dir  # noqa: F401  (the fixture: a socket directory anybody may traverse)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to become other uids and gids in child processes")

#: the cache's group (``--group``), and the uid/gid of the non-root owner
GROUP = 40123
OWNER = 40123
QUIET = ("--heartbeat", "3600")  # no header write after start: refused attempts must change no byte


@dataclass(frozen=True)
class Identity:
    """Who a child becomes: uid, primary gid, supplementary groups."""

    label: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def argv(self) -> tuple[str, str, str]:
        return str(self.uid), str(self.gid), json.dumps(list(self.groups))


NOBODY = Identity("nobody", 65534, 65534)
STRANGER = Identity("stranger", 40126, 40126)
MEMBER_SUPPLEMENTARY = Identity("supplementary", 40124, 40124, (GROUP,))
MEMBER_PRIMARY = Identity("primary", 40125, GROUP)
OWNER_UID = Identity("owner", OWNER, OWNER)

OUTSIDERS = [pytest.param(who, id=who.label) for who in (NOBODY, STRANGER)]
MEMBERS = [pytest.param(who, id=who.label) for who in (MEMBER_SUPPLEMENTARY, MEMBER_PRIMARY)]

#: ``ACTOR uid gid groups name socket actions``: becomes uid/gid/groups, prints
#: {"ids": [...]}, then runs each action ``[verb, *args]`` and prints
#: {"action": "verb:arg...", "ok": result} or {"action": ..., "error": type
#: name, "message", "cause", "status"}, then {"end": 1}.  ``watch`` prints
#: {"watching": rv} once its Reader is open; ``poke`` prints {"poking": rv}
#: and then stores into the Reader's mapping (it should die of SIGSEGV).
ACTOR = """
    import ctypes, json, os, socket, sys
    import posix_ipc
    import shmcache
    from shmcache._native import ffi

    # everything is imported above, as root: the interpreter's own files need
    # not be readable by the uid it becomes (here they live under /root, 0700)
    uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    name, sock, actions = sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    PATHS = {"segment": "/dev/shm/shmcache." + name,
             "semaphore": "/dev/shm/sem.shmcache." + name + ".lock"}

    def say(**fields):
        print(json.dumps(fields), flush=True)

    def mapped():
        with open("/proc/self/maps") as f:
            return [line.split()[1] for line in f if line.split()[-1] == PATHS["segment"]]

    def read():
        with shmcache.Reader(name) as r:
            snap = r.list()
            gets = [r.get(i.key) for i in snap.items]
            return {"rv": snap.rv, "epoch": r.epoch, "maps": mapped(),
                    "items": [[i.key, i.value.hex(), i.rv] for i in snap.items],
                    "gets": [None if g is None else [g.key, g.value.hex(), g.rv] for g in gets]}

    def watch(count, timeout):
        with shmcache.Reader(name) as r:
            since = r.resource_version
            say(watching=since, maps=mapped())
            got = []
            for ev in r.watch(since, timeout=timeout):
                got.append([ev.type.name, ev.key, ev.value.hex(), ev.rv])
                if len(got) >= count:
                    break
            return got

    def write():
        with shmcache.Writer(name, create=False, lock_timeout=5) as w:
            return w.put("written-by-%d" % uid, b"w")

    def create():
        with shmcache.Writer(name, capacity=64, arena_bytes=65536, max_keys=256, store_bytes=65536) as w:
            return w.resource_version

    def lock():
        sem = posix_ipc.Semaphore("/shmcache." + name + ".lock")
        try:
            return sem.value
        finally:
            sem.close()

    def open_(which, how):
        os.close(os.open(PATHS[which], os.O_RDWR if how == "rw" else os.O_RDONLY))
        return how

    def unlink(which):
        if which == "segment":
            posix_ipc.unlink_shared_memory("/shmcache." + name)
        else:
            posix_ipc.unlink_semaphore("/shmcache." + name + ".lock")
        return which

    def remove(which):
        os.unlink(PATHS[which])
        return which

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(sock)
            return "connected"
        finally:
            s.close()

    def produce(target):
        with shmcache.Producer(sock if target == "socket" else name, timeout=10) as p:
            return p.put("from-%d" % uid, b"p")

    def poke():
        r = shmcache.Reader(name)
        addr = int(ffi.cast("uintptr_t", r._map._buf)) + ffi.offsetof("struct sc_header", "rv")
        say(poking=r.resource_version, maps=mapped())
        ctypes.memset(addr, 0xFF, 8)
        return "stored into a read-only mapping"

    ACTIONS = {"read": read, "watch": watch, "write": write, "create": create, "lock": lock,
               "open": open_, "unlink": unlink, "remove": remove, "connect": connect,
               "produce": produce, "poke": poke}
    say(ids=[os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())])
    for verb, *args in actions:
        key = ":".join([verb, *map(str, args)])
        try:
            say(action=key, ok=ACTIONS[verb](*args))
        except Exception as err:
            cause = err.__cause__
            say(action=key, error=type(err).__name__, message=str(err),
                cause=None if cause is None else type(cause).__name__,
                status=getattr(err, "status", None))
    say(end=1)
"""


# ---- helpers -------------------------------------------------------------------


def seg_path(name: str) -> str:
    return f"/dev/shm/shmcache.{name}"


def sem_path(name: str) -> str:
    return f"/dev/shm/sem.shmcache.{name}.lock"


def entries(name: str) -> tuple[int, int]:
    """The inodes of the segment and the semaphore (FileNotFoundError if gone)."""
    return os.stat(seg_path(name)).st_ino, os.stat(sem_path(name)).st_ino


class Verdicts:
    """The access model's expectations, collected so that a test reports
    every violation (and its figures) before it fails on them."""

    def __init__(self) -> None:
        self.checked = 0
        self.violations: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        self.checked += 1
        if not ok:
            self.violations.append(what)

    def denied(self, outcomes: dict[str, dict[str, Any]], action: str, error: str, *,
               cause: str | None = None, status: int | None = None, mentions: str = "") -> None:
        """``action`` failed with exactly ``error`` (and that cause, status,
        text in its message)."""
        got = outcomes.get(action, {"missing": True})
        ok = (got.get("error") == error and (cause is None or got.get("cause") == cause)
              and (status is None or got.get("status") == status)
              and mentions.lower() in str(got.get("message", "")).lower())
        self.expect(ok, f"{action}: expected {error}"
                        f"{f' caused by {cause}' if cause else ''}{f' status {status}' if status else ''}"
                        f"{f' mentioning {mentions!r}' if mentions else ''}, got {got}")

    def allowed(self, outcomes: dict[str, dict[str, Any]], action: str) -> Any:
        got = outcomes.get(action, {"missing": True})
        self.expect("ok" in got, f"{action}: expected success, got {got}")
        return got.get("ok")

    def failed(self) -> str:
        return "access model violated:\n  " + "\n  ".join(self.violations)


def check_ids(c: LineChild, who: Identity) -> None:
    """The child really became ``who`` (the premise of every verdict)."""
    ids = c.next()["ids"]
    assert ids == [who.uid, who.uid, who.gid, who.gid, sorted(who.groups)], \
        f"the child did not become {who}: {ids}; stderr:\n{c.stderr}"


def act(who: Identity, name: str, sock: str, actions: list[list[Any]]) -> dict[str, dict[str, Any]]:
    """Run ``actions`` as ``who`` in a child; each outcome by its action key
    (``verb:arg:...``)."""
    with child(ACTOR, *who.argv(), name, sock, json.dumps(actions)) as c:
        check_ids(c, who)
        lines, _ = c.until_end()
        rc = c.close()
        assert rc == 0, f"actor as {who} exited {rc}; stderr:\n{c.stderr}"
    return {line["action"]: line for line in lines}


def fill(name: str, sock: str) -> tuple[int, list[Item]]:
    """Publish a few items through the daemon, as root; (rv, items)."""
    with Producer(sock) as p:
        p.put("pods/a", b"alpha")
        p.put("pods/b", b"\x00\xff")
        rv = p.put_many([("pods/c", b"gamma"), ("pods/a", b"alpha-2"), ("pods/b", None)])
    with Reader(name) as r:
        snap = r.list()
    assert snap.rv == rv
    return rv, snap.items


def as_rows(items: list[Item]) -> list[list[Any]]:
    return [[i.key, i.value.hex(), i.rv] for i in items]


def unchanged(v: Verdicts, name: str, sock: str, before: bytes, inodes: tuple[int, int], rv: int) -> None:
    """Nothing the refused attempts did reached the cache."""
    v.expect(Path(seg_path(name)).read_bytes() == before, "the segment's bytes changed")
    try:
        now = entries(name)
    except FileNotFoundError as err:
        v.expect(False, f"an entry was removed: {err}")
    else:
        v.expect(now == inodes, f"segment/semaphore inodes {inodes} -> {now}")
    with Producer(sock) as p:
        v.expect(p.ping() == rv, f"resource version {rv} -> {p.ping()}")


def in_futex_wait(pid: int) -> bool:
    """Is the (single-threaded) process ``pid`` asleep in a futex wait?"""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "futex" in f.read()
    except OSError:
        return False


# ---- (a) outsiders ---------------------------------------------------------------


@pytest.mark.parametrize("who", OUTSIDERS)
def test_outsider_opens_nothing(name: str, tmp_path: Path, open_dir: Path, who: Identity,
                                report: Report) -> None:
    """A uid that is neither the owner nor in the cache's group: Reader and
    Writer raise PermissionError naming the cache (a clear error, not a
    crash), creating over the live cache too; os.open of segment and
    semaphore and posix_ipc's semaphore open fail; the socket (0660, group
    GROUP) refuses the connection by its file mode, so a Producer raises
    DaemonUnavailable caused by PermissionError and the daemon never sees
    the peer (its refusal counter stays 0); nothing can be unlinked.  No byte
    of the cache changes."""
    sock = str(open_dir / "d.sock")
    v = Verdicts()
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), *QUIET):
        rv, _ = fill(name, sock)
        before, inodes = Path(seg_path(name)).read_bytes(), entries(name)
        out = act(who, name, sock, [
            ["read"], ["write"], ["create"], ["open", "segment", "r"], ["open", "semaphore", "r"], ["lock"],
            ["connect"], ["produce", "socket"], ["produce", "name"],
            ["unlink", "segment"], ["unlink", "semaphore"], ["remove", "segment"], ["remove", "semaphore"],
        ])
        v.denied(out, "read", "PermissionError", mentions=name)
        v.denied(out, "write", "PermissionError", mentions=name)
        v.denied(out, "create", "CacheNotTrusted", mentions=name)
        v.denied(out, "open:segment:r", "PermissionError")
        v.denied(out, "open:semaphore:r", "PermissionError")
        v.denied(out, "lock", "PermissionsError")
        v.denied(out, "connect", "PermissionError")
        v.denied(out, "produce:socket", "DaemonUnavailable", cause="PermissionError", mentions="permission denied")
        # by name: the header is unreadable, so the default path is tried, and the error says why
        v.denied(out, "produce:name", "DaemonUnavailable", mentions="permission denied")
        for which in ("segment", "semaphore"):
            v.denied(out, f"unlink:{which}", "PermissionsError")
            v.denied(out, f"remove:{which}", "PermissionError")
        unchanged(v, name, sock, before, inodes, rv)
        with Producer(sock) as p:
            rejected = p.stats()["rejected"]
        v.expect(rejected == 0, f"the daemon saw {rejected} refused peers: the file mode should have stopped them")
    report(checked=f"outsider uid {who.uid}: no open, create, connect, produce or unlink; no byte changed",
           events=rv, faults=len(out), failures=len(v.violations), checks=v.checked, uid=who.uid)
    assert not v.violations, v.failed()


# ---- (b) group members -------------------------------------------------------------


@pytest.mark.parametrize("who", MEMBERS)
def test_group_member_reads_and_watches(name: str, tmp_path: Path, open_dir: Path, who: Identity,
                                        report: Report) -> None:
    """A member of the cache's group (supplementary or primary) opens a
    Reader: list() and get() equal root's view of the daemon's data, its
    mapping of the segment is read-only shared (``r--s``), and watch() from
    the RV it opened at delivers exactly the events the daemon publishes
    afterwards (put, modify, delete, a batch)."""
    sock = str(open_dir / "d.sock")
    v = Verdicts()
    published: list[list[Any]] = []
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP)):
        rv, items = fill(name, sock)
        with child(ACTOR, *who.argv(), name, sock, json.dumps([["read"], ["watch", 6, 20.0]])) as c:
            check_ids(c, who)
            got = c.next()
            v.expect(got.get("ok", {}).get("items") == as_rows(items), f"list as member: {got}; root: {items}")
            v.expect(got.get("ok", {}).get("gets") == as_rows(items), f"get as member: {got}")
            v.expect(got.get("ok", {}).get("rv") == rv, f"rv as member: {got}")
            v.expect(got.get("ok", {}).get("maps") == ["r--s"], f"mapping of the segment: {got}")
            watching = c.next()
            v.expect(watching.get("watching") == rv and watching.get("maps") == ["r--s"], f"watch start: {watching}")
            with Producer(sock) as p:
                p.put("pods/d", b"delta")
                p.put("pods/a", b"alpha-3")
                p.delete("pods/c")
                p.put_many([("pods/e", b"\x01"), ("pods/f", b""), ("pods/d", None)])
            with Reader(name) as r:
                published = [[ev.type.name, ev.key, ev.value.hex(), ev.rv] for ev in r.interval(rv)]
            watched = c.next()
            v.expect(watched.get("ok") == published, f"watched {watched}; published {published}")
            c.until_end()
            rc = c.close()
            v.expect(rc == 0, f"member reader exited {rc}: {c.stderr}")
    report(checked=f"group member ({who.label}) reads list/get equal to root's, watches every later event, "
                   "maps r--s", events=rv + len(published), faults=0, failures=len(v.violations),
           checks=v.checked, watched=len(published))
    assert len(published) == 6, published
    assert not v.violations, v.failed()


@pytest.mark.parametrize("who", MEMBERS)
def test_group_member_cannot_write_or_unlink(name: str, tmp_path: Path, open_dir: Path, who: Identity,
                                             report: Report) -> None:
    """A member may open segment and semaphore read-only (the group's r
    bit: the control that makes the refusals below about writing), but
    Writer(create=False) and Writer(create=True) over the live cache raise
    PermissionError naming the cache, os.open(O_RDWR) of either fails, the
    writers' semaphore cannot be opened, and neither entry can be unlinked
    (posix_ipc or os.unlink in the sticky /dev/shm).  The segment's bytes,
    inodes and RV are unchanged."""
    sock = str(open_dir / "d.sock")
    v = Verdicts()
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), *QUIET):
        rv, _ = fill(name, sock)
        before, inodes = Path(seg_path(name)).read_bytes(), entries(name)
        out = act(who, name, sock, [
            ["open", "segment", "r"], ["open", "semaphore", "r"],
            ["write"], ["create"], ["open", "segment", "rw"], ["open", "semaphore", "rw"], ["lock"],
            ["unlink", "segment"], ["unlink", "semaphore"], ["remove", "segment"], ["remove", "semaphore"],
        ])
        v.allowed(out, "open:segment:r")
        v.allowed(out, "open:semaphore:r")
        v.denied(out, "write", "PermissionError", mentions=name)
        v.denied(out, "create", "CacheNotTrusted", mentions=name)
        v.denied(out, "open:segment:rw", "PermissionError")
        v.denied(out, "open:semaphore:rw", "PermissionError")
        v.denied(out, "lock", "PermissionsError")
        for which in ("segment", "semaphore"):
            v.denied(out, f"unlink:{which}", "PermissionsError")
            v.denied(out, f"remove:{which}", "PermissionError")
        unchanged(v, name, sock, before, inodes, rv)
    report(checked=f"group member ({who.label}): no Writer, no rw open, no semaphore, no unlink; no byte changed",
           events=rv, faults=len(out) - 2, failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


@pytest.mark.parametrize("who", MEMBERS)
def test_group_member_store_into_mapping_is_sigsegv(name: str, tmp_path: Path, open_dir: Path,
                                                    who: Identity, report: Report) -> None:
    """A member's Reader maps the segment ``r--s``; a raw store into it (the
    header's rv) kills the process with SIGSEGV before anything is written:
    the segment's bytes are unchanged and the daemon keeps serving."""
    sock = str(open_dir / "d.sock")
    v = Verdicts()
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), *QUIET):
        rv, _ = fill(name, sock)
        before, inodes = Path(seg_path(name)).read_bytes(), entries(name)
        with child(ACTOR, *who.argv(), name, sock, json.dumps([["poke"]])) as c:
            check_ids(c, who)
            poking = c.next()
            v.expect(poking.get("poking") == rv and poking.get("maps") == ["r--s"], f"before the store: {poking}")
            rc = c.close()
            rest = [c.lines.get_nowait() for _ in range(c.lines.qsize())]
        v.expect(rc == -signal.SIGSEGV, f"exit status {rc}, not SIGSEGV; stderr:\n{c.stderr}")
        v.expect(rest == [None], f"the child went on after the store: {rest}")
        unchanged(v, name, sock, before, inodes, rv)
        with Producer(sock) as p:
            after = p.put("pods/after", b"x")
        v.expect(after == rv + 1, f"the daemon's next put got rv {after}")
    report(checked=f"group member ({who.label}) storing into its mapping dies of SIGSEGV, no byte changed",
           events=rv + 1, faults=1, failures=len(v.violations), checks=v.checked, exit_status=rc)
    assert not v.violations, v.failed()


@pytest.mark.parametrize(("allow", "served"), [
    pytest.param((), False, id="default-allow-lists"),
    pytest.param(("--allow-gid", str(GROUP)), True, id="allow-gid-group"),
    pytest.param(("--allow-uid", str(MEMBER_SUPPLEMENTARY.uid)), True, id="allow-uid-member"),
    pytest.param(("--allow-uid", "0,1", "--allow-gid", "1"), False, id="allow-others"),
])
def test_group_member_produces_only_if_peer_credentials_allow(
        name: str, tmp_path: Path, open_dir: Path, allow: tuple[str, ...], served: bool,
        report: Report) -> None:
    """The socket's file mode (0660, group GROUP) lets a group member
    connect whatever the allow-lists; the daemon then decides by SO_PEERCRED
    and SO_PEERGROUPS.  With the defaults (nobody but root and the daemon's
    uid, although GROUP owns the socket and the segment) or lists without
    the member, Producer.put raises ProtocolError(FORBIDDEN) and nothing is
    written; with --allow-gid GROUP (a supplementary group) or --allow-uid
    of the member, the put is served and readers see it."""
    who = MEMBER_SUPPLEMENTARY
    sock = str(open_dir / "d.sock")
    v = Verdicts()
    with running(name, sock, tmp_path / "d.log", "--group", str(GROUP), *allow):
        rv, _ = fill(name, sock)
        out = act(who, name, sock, [["connect"], ["produce", "name"]])
        v.allowed(out, "connect")
        with Reader(name) as r, Producer(sock) as p:
            item = r.get(f"from-{who.uid}")
            figures = p.stats()
            if served:
                v.expect(out["produce:name"].get("ok") == rv + 1, f"member's put: {out['produce:name']}")
                v.expect(item == Item(f"from-{who.uid}", b"p", rv + 1), f"readers see {item}")
            else:
                v.denied(out, "produce:name", "ProtocolError", status=FORBIDDEN)
                v.expect(item is None and r.resource_version == rv, f"a refused put left {item}")
                v.expect(figures["rejected"] >= 1, f"the daemon counted no refusal: {figures}")
    report(checked=f"group member connects by file mode; produce {'served' if served else 'FORBIDDEN'} "
                   f"with {' '.join(allow) or 'default allow-lists'}",
           events=rv + served, faults=0 if served else 1, failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


# ---- (c) the owner -------------------------------------------------------------------

#: run shmcached (argv after the code) as uid/gid OWNER with no supplementary group; it is
#: imported first, as root: the interpreter's own files need not be readable by OWNER
#: (shutil: argparse imports it only when it formats, which is after the switch)
AS_OWNER = [sys.executable, "-c",
            f"import os, shutil, sys, shmcached; os.setgroups([]); os.setgid({OWNER}); os.setuid({OWNER}); "
            "sys.exit(shmcached.main())"]


def test_only_the_owner_writes_and_unlinks(name: str, tmp_path: Path, open_dir: Path, report: Report,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon runs as a service user (uid/gid OWNER, mode 0640): the
    segment is OWNER's.  Another process of that uid opens it read-write,
    takes the writers' semaphore and publishes (readers see it), and may
    produce (the daemon's own uid is allowed); a member of OWNER's group is
    refused all of that.  Then the owner's process unlinks segment and
    semaphore, the member having failed to; the daemon still stops cleanly."""
    os.chown(open_dir, OWNER, OWNER)  # the service's runtime directory
    monkeypatch.setenv("SHMCACHE_OWNER", str(OWNER))  # this process and its children trust the service user
    sock = str(open_dir / "d.sock")
    member = Identity("owner-group", 40124, 40124, (OWNER,))
    v = Verdicts()
    with running(name, sock, tmp_path / "d.log", command=AS_OWNER) as d:
        st = os.stat(seg_path(name))
        v.expect((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OWNER, OWNER, 0o640),
                 f"segment owned {st.st_uid}:{st.st_gid} mode {stat.S_IMODE(st.st_mode):o}")
        v.expect(os.stat(f"/proc/{d.pid}").st_uid == OWNER, "the daemon does not run as OWNER")
        rv, _ = fill(name, sock)
        refused = act(member, name, sock, [["read"], ["write"], ["lock"], ["unlink", "segment"],
                                           ["unlink", "semaphore"], ["remove", "segment"]])
        v.allowed(refused, "read")
        v.denied(refused, "write", "PermissionError", mentions=name)
        v.denied(refused, "lock", "PermissionsError")
        v.denied(refused, "unlink:segment", "PermissionsError")
        v.denied(refused, "unlink:semaphore", "PermissionsError")
        v.denied(refused, "remove:segment", "PermissionError")
        out = act(OWNER_UID, name, sock, [["write"], ["lock"], ["open", "segment", "rw"], ["produce", "socket"]])
        v.expect(out["write"].get("ok") == rv + 1, f"owner's Writer put: {out['write']}")
        v.expect(out["lock"].get("ok") == 1, f"owner's semaphore: {out['lock']}")
        v.allowed(out, "open:segment:rw")
        v.expect(out["produce:socket"].get("ok") == rv + 2, f"owner's Producer put: {out['produce:socket']}")
        with Reader(name) as r:
            v.expect(r.get(f"written-by-{OWNER}") == Item(f"written-by-{OWNER}", b"w", rv + 1),
                     "readers do not see the owner's write")
        gone = act(OWNER_UID, name, sock, [["unlink", "segment"], ["unlink", "semaphore"]])
        v.allowed(gone, "unlink:segment")
        v.allowed(gone, "unlink:semaphore")
        v.expect(not os.path.exists(seg_path(name)) and not os.path.exists(sem_path(name)),
                 "the owner's unlink left entries in /dev/shm")
    report(checked="only the owner's uid writes, takes the semaphore and unlinks; its group only reads",
           events=rv + 2, faults=5, failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


# ---- (e) mode 0600 -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640], ids=["0600", "0640"])
def test_mode_decides_whether_the_group_reads(name: str, mode: int, report: Report) -> None:
    """Writer(mode=...) creates segment and semaphore with exactly that mode;
    with both chowned to GROUP, a member's Reader raises PermissionError
    naming the cache under 0600, and reads the items under 0640 (the control:
    same group, same cache, only the mode differs)."""
    v = Verdicts()
    w = Writer(name, capacity=64, arena_bytes=65536, max_keys=256, store_bytes=65536, mode=mode)
    try:
        rv = w.put_many([("a", b"1"), ("b", b"2")])
        for path in (seg_path(name), sem_path(name)):
            v.expect(stat.S_IMODE(os.stat(path).st_mode) == mode, f"{path} mode {os.stat(path).st_mode:o}")
            os.chown(path, -1, GROUP)
        out = act(MEMBER_SUPPLEMENTARY, name, "/nonexistent", [["read"]])
        if mode == 0o600:
            v.denied(out, "read", "PermissionError", mentions=name)
        else:
            v.expect(out["read"].get("ok", {}).get("items") == [["a", "31", 1], ["b", "32", 2]], f"{out}")
        v.expect(w.resource_version == rv, "the cache changed")
    finally:
        w.close()
    report(checked=f"mode {mode:04o}: group member {'refused' if mode == 0o600 else 'reads'}",
           events=rv, faults=int(mode == 0o600), failures=len(v.violations), checks=v.checked)
    assert not v.violations, v.failed()


# ---- (d) readers never unlink ----------------------------------------------------------

#: ``ENDING name how``: a root reader that lists, prints {"ready": rv}, then
#: ``close`` (close() and exit 0), ``exit`` (exit 0 without close) or
#: ``spin`` (list/get/interval forever, to be SIGKILLed mid-copy).
ENDING = """
    import json, sys
    from shmcache import Reader
    name, how = sys.argv[1:3]
    r = Reader(name)
    rv = r.list().rv
    print(json.dumps({"ready": rv}), flush=True)
    if how == "close":
        r.close()
    while how == "spin":
        r.list()
        r.get("pods/a")
        for ev in r.interval(max(r.oldest_resource_version - 1, 1), buffer_size=1):
            pass
"""


def test_readers_never_unlink(name: str, tmp_path: Path, open_dir: Path, report: Report) -> None:
    """Readers end in every way — close(), a with block, dropped for the
    garbage collector, a process that closes and exits, one that exits
    without close, one SIGKILLed blocked in watch() on the futex, one
    SIGKILLed mid-copy — all as root, who *could* unlink.  After each:
    segment and semaphore are still there with the same inodes and modes,
    the semaphore's count is 1 (readers never touch it), and the daemon
    keeps serving: a put reaches a reader opened before all this (by
    watch) and a fresh one."""
    sock = str(open_dir / "d.sock")
    v = Verdicts()
    endings: list[str] = []
    with running(name, sock, tmp_path / "d.log") as d, Producer(sock) as p, Reader(name) as survivor:
        inodes = entries(name)
        modes = [stat.S_IMODE(os.stat(path).st_mode) for path in (seg_path(name), sem_path(name))]
        last = survivor.resource_version

        def still_served(ending: str) -> None:
            nonlocal last
            endings.append(ending)
            try:
                now = entries(name)
            except FileNotFoundError as err:
                v.expect(False, f"after {ending}: an entry is gone ({err})")
                return
            v.expect(now == inodes, f"after {ending}: inodes {inodes} -> {now}")
            v.expect([stat.S_IMODE(os.stat(path).st_mode) for path in (seg_path(name), sem_path(name))] == modes,
                     f"after {ending}: modes changed")
            sem = posix_ipc.Semaphore(f"/shmcache.{name}.lock")
            try:
                v.expect(sem.value == 1, f"after {ending}: semaphore count {sem.value}")
            finally:
                sem.close()
            rv = p.put("pods/a", ending.encode())
            seen = next(iter(survivor.watch(last, timeout=IO_TIMEOUT)), None)
            v.expect(seen is not None and (seen.key, seen.value, seen.rv) == ("pods/a", ending.encode(), rv),
                     f"after {ending}: the surviving reader got {seen}, not rv {rv}")
            with Reader(name) as fresh:
                v.expect(fresh.get("pods/a") == Item("pods/a", ending.encode(), rv), f"after {ending}: fresh reader")
            last = rv

        r = Reader(name)
        r.list()
        r.close()
        still_served("close()")
        with Reader(name) as r:
            r.get("pods/a")
        still_served("with block")
        r = Reader(name)
        r.list()
        del r
        gc.collect()
        still_served("dropped without close")
        for how in ("close", "exit"):
            with child(ENDING, name, how) as c:
                c.next()
                rc = c.close()
            v.expect(rc == 0, f"reader process ({how}) exited {rc}: {c.stderr}")
            still_served(f"process {how}")
        with child(WATCHER, name, str(last), "60") as c:
            c.next()
            wait_for(lambda: in_futex_wait(c.proc.pid), "the watcher never blocked on the futex")
            c.kill()
            v.expect(c.proc.returncode == -signal.SIGKILL, f"watcher rc {c.proc.returncode}")
        still_served("SIGKILL in watch()")
        with child(ENDING, name, "spin") as c:
            c.next()
            time.sleep(0.2)  # let it copy for a while; the kill lands wherever it is
            c.kill()
            v.expect(c.proc.returncode == -signal.SIGKILL, f"spinner rc {c.proc.returncode}")
        still_served("SIGKILL mid-copy")
        v.expect(d.proc.poll() is None, "the daemon died")
    report(checked="no reader ending (close, gc, exit, SIGKILL in wait or copy) unlinks or disturbs anything",
           events=len(endings), faults=2, failures=len(v.violations), checks=v.checked, endings=len(endings))
    assert not v.violations, v.failed()
