"""Process identity and liveness (shmcache/_owner.py).

A process is (pid, start ticks since boot, PID namespace, boot) and is
judged DEAD only when that is certain.  Besides the plain cases, the
regressions: a wall-clock step must not make a live process look dead (the
start time is not derived from the wall clock), nor must a PID namespace
whose /proc was not remounted, nor a time namespace (whose boottime offset
/proc adds to every start time the reader sees).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
import psutil._pslinux
import pytest

from shmcache import _owner
from shmcache._owner import (
    BOOT_BITS,
    INITIAL_PIDNS,
    START_TICKS_BITS,
    Liveness,
    ProcessIdentity,
    judge,
    me,
)

from .support import LineProcess

LINE_TIMEOUT = 60.0  # the longest any expected line may take: a hang, not a slow machine
EXIT_TIMEOUT = 60.0
MASK = (1 << START_TICKS_BITS) - 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: A process that prints its own identity (and what it saw raw) as JSON, then
#: judges each identity it reads from stdin, one per line, until EOF.
IDENTIFY = """
    import json, os, sys
    from shmcache._owner import ProcessIdentity, judge, me
    with open("/proc/self/stat") as f:
        raw = int(f.read().rpartition(")")[2].split()[19])
    ident = me()
    print(json.dumps({"ident": ident.__dict__, "raw_ticks": raw, "getpid": os.getpid(),
                      "self": judge(ident).value}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"verdict": judge(ProcessIdentity(**json.loads(line))).value}), flush=True)
"""


def stat_fields(pid: int | str) -> list[str]:
    """Fields 3 on of /proc/PID/stat, read independently of shmcache."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def own_offset_ticks() -> int:
    """This process's boottime offset in ticks, read independently of shmcache."""
    try:
        with open("/proc/self/timens_offsets") as f:
            for line in f:
                name, sec, nsec = line.split()
                if name == "boottime":
                    return round((int(sec) * 10**9 + int(nsec)) * CLK_TCK / 10**9)
    except FileNotFoundError:
        pass
    return 0


def state_of(pid: int) -> str | None:
    try:
        return stat_fields(pid)[0]
    except FileNotFoundError:
        return None


class Child(LineProcess):
    """A subprocess in its own session whose stdout lines are JSON; killed
    with its whole process group, and waited for, when the ``with`` block
    ends."""

    line_timeout = LINE_TIMEOUT

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        super().__init__(argv, label=str(argv[:3]), env=os.environ, stdin=True, session=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    def line(self, timeout: float | None = None) -> Any:
        return json.loads(super().line(timeout))

    def identity(self) -> tuple[ProcessIdentity, dict[str, Any]]:
        """The identity an IDENTIFY child printed, and all it printed."""
        said = self.line()
        return ProcessIdentity(**said["ident"]), said

    def ask(self, ident: ProcessIdentity) -> Liveness:
        """An IDENTIFY child's verdict on ``ident``."""
        self.send(json.dumps(asdict(ident)) + "\n")
        return Liveness(self.line()["verdict"])

    def exit_without_reaping(self) -> None:
        """Let the child end (stdin closed) and wait until it is a zombie."""
        self.release()
        deadline = time.monotonic() + EXIT_TIMEOUT
        while state_of(self.pid) != "Z":
            assert time.monotonic() < deadline, f"pid {self.pid} did not exit"
            time.sleep(0.01)

    def finish(self) -> int:
        """Close stdin, reap the child, return its exit status."""
        self.release()
        code = self.wait(EXIT_TIMEOUT)
        assert code == 0, f"{self.argv[:3]} exited {code}; stderr: {self.stderr}"
        return code


def identify(*wrapper: str) -> Child:
    """An IDENTIFY child, run under ``wrapper`` (e.g. unshare ...)."""
    return Child([*wrapper, sys.executable, "-c", textwrap.dedent(IDENTIFY)])


def unshare_or_skip(*options: str) -> list[str]:
    """``unshare OPTIONS``, or skip when it is missing or not permitted here."""
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("unshare (util-linux) is not installed")
    cmd = [exe, *options, "--kill-child"]
    probe = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare {' '.join(options)} is not permitted here (euid {os.geteuid()}): "
                    f"{probe.stderr.strip()}")
    return cmd


@contextmanager
def reaped_pid() -> Iterator[int]:
    """The pid of a process that has ended and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=EXIT_TIMEOUT) == 0
    yield proc.pid


# --- who we are -------------------------------------------------------------------------------


def test_me_is_this_process() -> None:
    ident = me()
    assert ident.pid == os.getpid()
    assert ident.start_ticks == (int(stat_fields("self")[19]) - own_offset_ticks()) & MASK
    assert ident.pidns == os.stat("/proc/self/ns/pid").st_ino
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert ident.boot == int(f.read().replace("-", "")[:BOOT_BITS // 4], 16)
    assert 0 <= ident.boot < 1 << BOOT_BITS
    assert me() is ident  # per-process constant: computed once


def test_me_is_recomputed_after_fork() -> None:
    parent = me()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns about forking a process with threads (xdist's);
        # the child only computes and writes, then _exits
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child = me()
            seen = (int(stat_fields("self")[19]) - own_offset_ticks()) & MASK
            ok = child.pid == os.getpid() and child.start_ticks == seen and judge(parent) is Liveness.ALIVE
            os.write(write_end, json.dumps({"ident": asdict(child), "ok": ok}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as f:
            said = json.loads(f.read())
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert said["ok"], said
    child = ProcessIdentity(**said["ident"])
    assert child.pid == pid != parent.pid
    assert (child.pidns, child.boot) == (parent.pidns, parent.boot)
    assert me() == parent


# --- judging processes of our own namespace ------------------------------------------------------


def test_judge_me_is_alive() -> None:
    assert judge(me()) is Liveness.ALIVE


def test_a_child_is_alive_while_it_runs_and_dead_once_reaped() -> None:
    with identify() as child:
        ident, said = child.identity()
        assert said["self"] == "alive"
        assert ident.pid == child.pid == said["getpid"]
        assert ident.start_ticks == int(stat_fields(child.pid)[19]) & MASK
        assert judge(ident) is Liveness.ALIVE
        assert child.ask(me()) is Liveness.ALIVE  # and the child judges us alive
        child.finish()
        assert judge(ident) is Liveness.DEAD


def test_a_zombie_is_dead() -> None:
    with identify() as child:
        ident, _ = child.identity()
        child.exit_without_reaping()
        assert judge(ident) is Liveness.DEAD
        child.finish()


def test_a_process_whose_main_thread_exited_is_alive() -> None:
    """/proc/PID/stat shows a process as a zombie as soon as its main thread
    has exited, even while its other threads run on."""
    code = """
        import ctypes, json, sys, threading
        from shmcache._owner import judge, me
        def run():
            with open("/proc/self/stat") as f:
                while f.read().rpartition(")")[2].split()[0] != "Z":
                    f.seek(0)
            print(json.dumps({"ident": me().__dict__, "self": judge(me()).value}), flush=True)
            sys.stdin.read()
        threading.Thread(target=run).start()
        ctypes.CDLL(None).pthread_exit(None)
    """
    with Child([sys.executable, "-c", textwrap.dedent(code)]) as child:
        ident, said = child.identity()
        assert state_of(child.pid) == "Z"
        assert said["self"] == "alive"
        assert judge(ident) is Liveness.ALIVE
        child.finish()
        assert judge(ident) is Liveness.DEAD


def test_a_reused_pid_is_dead() -> None:
    """The pid of a live process, recorded with another start time: the
    process that recorded it is gone and the pid is someone else's now."""
    with identify() as child:
        ident, _ = child.identity()
        for delta in (2, -2, 100, 1 << 30, 1 << (START_TICKS_BITS - 1)):
            reused = replace(ident, start_ticks=(ident.start_ticks + delta) & MASK)
            assert judge(reused) is Liveness.DEAD, delta
        # within a tick: indistinguishable from a reader in another time namespace
        for delta in (1, -1):
            assert judge(replace(ident, start_ticks=(ident.start_ticks + delta) & MASK)) is Liveness.ALIVE
        child.finish()


def test_start_ticks_compare_with_a_tolerance_of_one_tick_across_the_wrap() -> None:
    same = _owner._same_start
    assert same(5, 5) and same(5, 6) and same(6, 5)
    assert not same(5, 7) and not same(7, 5)
    assert same(0, MASK) and same(MASK, 0)
    assert not same(1, MASK) and not same(MASK, 1) and not same(0, MASK - 1)


def test_another_boot_is_dead() -> None:
    ident = me()
    other = replace(ident, boot=(ident.boot + 1) % (1 << BOOT_BITS))
    assert judge(other) is Liveness.DEAD


def test_a_pid_never_recorded_is_dead() -> None:
    ident = me()
    assert judge(replace(ident, pid=0)) is Liveness.DEAD
    assert judge(replace(ident, pid=-1)) is Liveness.DEAD
    assert judge(ProcessIdentity(0, 0, ident.pidns, ident.boot)) is Liveness.DEAD


def test_a_pid_that_does_not_exist_is_dead() -> None:
    with reaped_pid() as pid:
        if os.path.exists(f"/proc/{pid}"):
            pytest.skip(f"pid {pid} was reused at once")
        assert judge(replace(me(), pid=pid)) is Liveness.DEAD
    assert judge(replace(me(), pid=1 << 22)) is Liveness.DEAD  # beyond any pid_max
    assert judge(replace(me(), pid=(1 << 31) + 5)) is Liveness.DEAD


# --- a wall-clock step ---------------------------------------------------------------------------


def test_a_wall_clock_step_changes_no_identity_and_kills_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated as the kernel shows it: a step of CLOCK_REALTIME moves btime
    (so psutil's boot_time() and every create_time()), and time.time jumps.
    The old identity (start ms = ticks / CLK_TCK + btime) judged every live
    process dead after a one-second step."""
    with identify() as child:
        ident, _ = child.identity()
        before = me()
        created = psutil.Process().create_time()
        real_btime = psutil.boot_time()
        real_time, real_time_ns = time.time, time.time_ns
        step = 3 * 3600 + 0.25
        monkeypatch.setattr(psutil, "boot_time", lambda: real_btime + 1.0)
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_btime + 1.0)
        monkeypatch.setattr(time, "time", lambda: real_time() + step)
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + int(step * 1e9))
        # the step is in effect: psutil's start time of this process moved
        assert psutil.Process().create_time() == pytest.approx(created + 1.0, abs=0.02)
        assert judge(me()) is Liveness.ALIVE
        assert judge(before) is Liveness.ALIVE
        assert judge(ident) is Liveness.ALIVE
        monkeypatch.setattr(_owner, "_here", None)  # computed afresh, as by a new process
        assert me() == before
        assert judge(ident) is Liveness.ALIVE
        child.finish()
        assert judge(ident) is Liveness.DEAD


# --- /proc hiding processes ----------------------------------------------------------------------


def _hide(monkeypatch: pytest.MonkeyPatch, pid: int, err: type[OSError]) -> None:
    """Make /proc/PID/stat of ``pid`` unreadable to _owner, as hidepid does."""
    read_stat = _owner._read_stat

    def hidden(p: int | str) -> tuple[str, int]:
        if str(p) == str(pid):
            raise err(f"/proc/{p}/stat")
        return read_stat(p)

    monkeypatch.setattr(_owner, "_read_stat", hidden)


def test_a_process_hidden_by_proc_is_alive_while_kill_finds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with identify() as child:
        ident, _ = child.identity()
        _hide(monkeypatch, child.pid, FileNotFoundError)
        assert judge(ident) is Liveness.ALIVE  # kill(pid, 0) succeeds: we may signal it
        real_kill = os.kill

        def kill_denied(pid: int, sig: int) -> None:
            if sig == 0 and pid == child.pid:
                raise PermissionError(f"kill({pid}, 0)")
            real_kill(pid, sig)

        monkeypatch.setattr(os, "kill", kill_denied)
        assert judge(ident) is Liveness.ALIVE  # EPERM: it exists, another user's
        monkeypatch.setattr(os, "kill", real_kill)
        child.finish()
        assert judge(ident) is Liveness.DEAD  # kill(pid, 0): ESRCH


def test_an_unreadable_stat_is_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    with identify() as child:
        ident, _ = child.identity()
        _hide(monkeypatch, child.pid, PermissionError)
        assert judge(ident) is Liveness.ALIVE
        child.finish()


# --- another PID namespace, and ours seen through an ancestor's /proc ----------------------------


def test_an_unknown_namespace_is_unknowable() -> None:
    assert judge(replace(me(), pidns=0)) is Liveness.UNKNOWABLE


def test_a_namespace_no_process_is_in_is_dead_from_the_initial_one() -> None:
    here = me()
    if here.pidns != INITIAL_PIDNS or os.geteuid() != 0:
        pytest.skip("only the initial PID namespace, as root, sees every process")
    with identify() as child:
        ident, _ = child.identity()
        assert judge(replace(ident, pidns=12345)) is Liveness.DEAD
        child.finish()


def _deny_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the PID namespace of every other process unreadable to _owner,
    as it is to a user other than theirs (a ptrace access check)."""
    ns_inode = _owner._ns_inode

    def denied(pid: int | str, kind: str) -> int:
        if pid != "self" and int(pid) != os.getpid():
            raise PermissionError(f"/proc/{pid}/ns/{kind}")
        return ns_inode(pid, kind)

    monkeypatch.setattr(_owner, "_ns_inode", denied)


def test_a_proc_that_may_hide_processes_leaves_an_unmatched_namespace_unknowable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc mounted with hidepid=invisible leaves out whom we may not
    ptrace: that no process of a namespace shows is no proof it is empty."""
    monkeypatch.setattr(_owner, "_here", replace(_owner._current(), proc_may_hide=True))
    assert judge(replace(me(), pidns=12345)) is Liveness.UNKNOWABLE
    assert judge(me()) is Liveness.ALIVE


@pytest.mark.parametrize(("options", "hides"), [
    ("rw", False), ("rw,hidepid=noaccess", False), ("rw,hidepid=1", False),
    ("rw,hidepid=invisible", True), ("rw,hidepid=2,gid=5", True), ("rw,hidepid=ptraceable", True),
    ("rw,hidepid=4", True),
])
def test_which_proc_mounts_may_hide_processes(options: str, hides: bool, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /proc rw,relatime shared:13 - proc proc rw\n"
                         "23 22 0:40 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw\n"
                         f"35 22 0:41 / /proc rw,relatime - proc proc {options}\n")
    read_status_field = _owner._read_status_field

    def no_caps(pid: int | str, key: bytes) -> list[bytes] | None:
        return [b"0000000000000000"] if key == b"CapEff:" else read_status_field(pid, key)

    monkeypatch.setattr(_owner, "_read_status_field", no_caps)
    assert _owner._proc_may_hide(str(mountinfo)) is hides
    monkeypatch.setattr(_owner, "_read_status_field", read_status_field)
    with open("/proc/self/status") as f:
        cap_eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    if cap_eff >> 19 & 1 and os.stat("/proc/self/ns/user").st_ino == 0xEFFFFFFD:
        # CAP_SYS_PTRACE over every user namespace: we may see every process
        assert _owner._proc_may_hide(str(mountinfo)) is False


PIDNS_CHILD = """
    import json, subprocess, sys
    from shmcache._owner import Liveness, ProcessIdentity, judge, me
    grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[1]],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    said = json.loads(grandchild.stdout.readline())
    ident = ProcessIdentity(**said["ident"])
    with open("/proc/self/status") as f:
        nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
    print(json.dumps({"ident": ident.__dict__, "grandchild_self": said["self"], "me": me().__dict__,
                      "judge_me": judge(me()).value, "alive": judge(ident).value, "nspid": nspid,
                      "reused": judge(ProcessIdentity(ident.pid, ident.start_ticks + 50, ident.pidns,
                                                      ident.boot)).value}), flush=True)
    sys.stdin.readline()  # the test has judged it from outside
    grandchild.stdin.close()
    grandchild.wait(timeout=60)
    print(json.dumps({"dead": judge(ident).value}), flush=True)
    sys.stdin.readline()
"""


def test_a_pid_namespace_without_its_own_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``unshare --pid --fork`` without --mount-proc: /proc is the outer
    namespace's, in which the grandchild's pid (2 or so) names another
    process; the old code judged the live grandchild by that one: dead."""
    cmd = unshare_or_skip("--pid", "--fork")
    with Child([*cmd, sys.executable, "-c", textwrap.dedent(PIDNS_CHILD), textwrap.dedent(IDENTIFY)]) as child:
        said = child.line()
        ident = ProcessIdentity(**said["ident"])
        inner = ProcessIdentity(**said["me"])
        assert len(said["nspid"]) == 2, "/proc is the outer namespace's"
        assert inner.pid == 1 and inner.pidns != me().pidns
        assert ident.pidns == inner.pidns and ident.pid > 1
        assert said["grandchild_self"] == "alive"
        assert said["judge_me"] == "alive"
        assert said["alive"] == "alive"
        assert said["reused"] == "dead"
        # from outside: the namespace is nested below ours
        assert judge(ident) is Liveness.ALIVE
        assert judge(inner) is Liveness.ALIVE
        assert child.proc.stdin is not None
        child.proc.stdin.write("judged\n")
        child.proc.stdin.flush()
        assert child.line()["dead"] == "dead"
        assert judge(ident) is Liveness.DEAD  # we saw pid 1 of its namespace, and not it
        assert judge(inner) is Liveness.ALIVE
        with monkeypatch.context() as m:
            _deny_namespaces(m)  # whose namespace its process is in, we may not know
            assert judge(ident) is Liveness.UNKNOWABLE
        child.finish()
        # no process is left in that namespace: only who sees every process knows
        seen_all = me().pidns == INITIAL_PIDNS and os.geteuid() == 0
        for gone in (inner, ident):
            assert judge(gone) is (Liveness.DEAD if seen_all else Liveness.UNKNOWABLE)


# --- a time namespace ----------------------------------------------------------------------------


BOOTTIME_OFFSET = 100000  # seconds


def test_a_time_namespace_shifts_no_identity() -> None:
    """/proc/PID/stat shows starttime shifted by the reader's boottime
    offset; identities are normalised to the initial time namespace."""
    cmd = unshare_or_skip("--time", "--boottime", str(BOOTTIME_OFFSET), "--monotonic", str(BOOTTIME_OFFSET),
                          "--fork")
    with identify(*cmd) as child:
        ident, said = child.identity()
        outside = int(stat_fields(ident.pid)[19])
        assert said["raw_ticks"] - outside == BOOTTIME_OFFSET * CLK_TCK - own_offset_ticks()
        assert ident.start_ticks == (outside - own_offset_ticks()) & MASK
        assert said["self"] == "alive"
        assert judge(ident) is Liveness.ALIVE
        assert child.ask(me()) is Liveness.ALIVE  # and the reverse
        with reaped_pid() as pid:
            gone = replace(me(), pid=pid)
            assert child.ask(gone) is Liveness.DEAD
            assert child.ask(replace(ident, start_ticks=ident.start_ticks + 2)) is Liveness.DEAD
        child.finish()
        assert judge(ident) is Liveness.DEAD
