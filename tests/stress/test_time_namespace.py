"""Process identities across time namespaces, the harder cases.

/proc/PID/stat shows ``starttime`` shifted by the boottime offset of the
*reader's* time namespace (Linux >= 5.6), so shmcache/_owner.py normalises
every start time to the initial time namespace.  tests/test_owner.py covers
a whole-second offset set by ``unshare --time``; here:

* offsets that are not a whole number of ticks, where readers in different
  time namespaces may see one start a tick apart (the one-tick tolerance);
* a process that left its time namespace (unshare(CLONE_NEWTIME) without
  exec), whose /proc/self/timens_offsets shows its children's offsets, not
  its own;
* a time namespace inside a PID namespace whose /proc was not remounted.

The offsets are set through /proc/self/timens_offsets after
unshare(CLONE_NEWTIME) (util-linux takes whole seconds only), which needs
CAP_SYS_TIME: root only, skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import asdict, replace
from typing import Any

import psutil
import pytest

from shmcache._owner import (
    INITIAL_PIDNS,
    START_TICKS_BITS,
    Liveness,
    ProcessIdentity,
    judge,
    me,
)

from ..test_owner import IDENTIFY, Child, own_offset_ticks, stat_fields, unshare_or_skip

MASK = (1 << START_TICKS_BITS) - 1
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: ``HELPER plan``: optionally leaves its time namespace for a new one with
#: the plan's boottime offset (for its children), starts an IDENTIFY child
#: (in that namespace), and reports what it and the child see and judge;
#: after a line on stdin, ends the child and judges it again.
HELPER = """
    import ctypes, json, os, subprocess, sys
    from shmcache._owner import ProcessIdentity, judge, me
    plan = json.loads(sys.argv[1])
    outer = ProcessIdentity(**plan["outer"])
    if plan["unshare"] is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x80) != 0:  # CLONE_NEWTIME
            print(json.dumps({"skip": "unshare(CLONE_NEWTIME): " + os.strerror(ctypes.get_errno())}), flush=True)
            sys.exit(0)
        sec, nsec = plan["unshare"]
        try:
            with open("/proc/self/timens_offsets", "w") as f:
                f.write(f"boottime {sec} {nsec}\\n")
        except PermissionError as err:
            print(json.dumps({"skip": f"setting time namespace offsets: {err}"}), flush=True)
            sys.exit(0)
    with open("/proc/self/stat") as f:
        raw = int(f.read().rpartition(")")[2].split()[19])
    child = subprocess.Popen([sys.executable, "-c", plan["identify"]],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    said = json.loads(child.stdout.readline())
    kid = ProcessIdentity(**said["ident"])
    def ask(ident):
        child.stdin.write(json.dumps(ident.__dict__) + "\\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())["verdict"]
    print(json.dumps({
        "me": me().__dict__, "raw": raw, "self": judge(me()).value, "on_outer": judge(outer).value,
        "child": said, "on_child": judge(kid).value, "child_on_us": ask(me()), "child_on_outer": ask(outer),
        "ns": [os.stat(f"/proc/self/ns/{k}").st_ino for k in ("time", "time_for_children")],
    }), flush=True)
    sys.stdin.readline()
    child.stdin.close()
    child.wait(timeout=60)
    print(json.dumps({"child_after": judge(kid).value}), flush=True)
"""


def helper(*wrapper: str, unshare: tuple[int, int] | None) -> Child:
    plan = {"outer": asdict(me()), "unshare": unshare, "identify": textwrap.dedent(IDENTIFY)}
    return Child([*wrapper, sys.executable, "-c", textwrap.dedent(HELPER), json.dumps(plan)])


def report(child: Child) -> dict[str, Any]:
    said: dict[str, Any] = child.line()
    if "skip" in said:
        pytest.skip(said["skip"])
    return said


def host_pid(under: int, ident: ProcessIdentity) -> int:
    """The pid here of ``under`` or a process below it that has ``ident``'s
    pid in its own PID namespace."""
    top = psutil.Process(under)
    for proc in (top, *top.children(recursive=True)):
        with open(f"/proc/{proc.pid}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
        if int(nspid[-1]) == ident.pid and os.stat(f"/proc/{proc.pid}/ns/pid").st_ino == ident.pidns:
            return proc.pid
    raise AssertionError(f"neither {under} nor a process below it is {ident}")


def near(a: int, b: int) -> bool:
    return min((a - b) & MASK, (b - a) & MASK) <= 1


def check_from_outside(child: Child, said: dict[str, Any], *, exact: bool) -> list[ProcessIdentity]:
    """What the helper and its child saw and judged, checked here: every
    identity is what we see of that process, normalised (exactly, when no
    offset involved splits a tick), and everyone judges everyone alive."""
    helper_ident = ProcessIdentity(**said["me"])
    kid = ProcessIdentity(**said["child"]["ident"])
    for ident in (helper_ident, kid):
        seen = (int(stat_fields(host_pid(child.pid, ident))[19]) - own_offset_ticks()) & MASK
        if exact:
            assert ident.start_ticks == seen, (ident, seen)
        else:
            assert near(ident.start_ticks, seen), (ident, seen)
        assert judge(ident) is Liveness.ALIVE
    assert said["self"] == said["child"]["self"] == "alive"
    assert said["on_outer"] == said["on_child"] == said["child_on_us"] == said["child_on_outer"] == "alive"
    return [helper_ident, kid]


def end(child: Child, idents: list[ProcessIdentity]) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write("done\n")
    child.proc.stdin.flush()
    assert child.line()["child_after"] == "dead"
    kid = idents[1]
    assert judge(kid) is Liveness.DEAD
    child.finish()
    gone = Liveness.DEAD if me().pidns == INITIAL_PIDNS and os.geteuid() == 0 else Liveness.UNKNOWABLE
    for ident in idents:
        assert judge(ident) in (Liveness.DEAD, gone)


@pytest.mark.parametrize("nsec", [0, 1_000_000, 5_000_000, 9_999_999])
def test_an_offset_within_a_tick(nsec: int) -> None:
    """A boottime offset of 100000 s + nsec: the child in that namespace sees
    every start shifted by a fraction of a tick more than whole ticks, and
    the kernel truncates; its view and ours of one start may differ by a
    tick, never more, and no one judges anyone dead."""
    if os.geteuid() != 0:
        pytest.skip("setting a time namespace's offsets needs CAP_SYS_TIME")
    with helper(unshare=(100000, nsec)) as child:
        said = report(child)
        time_ns, for_children = said["ns"]
        assert time_ns != for_children, "the helper left its time namespace (for its children only)"
        idents = check_from_outside(child, said, exact=nsec == 0)
        assert idents[0].start_ticks == (said["raw"] - own_offset_ticks()) & MASK  # its own ns is ours
        kid_raw_here = int(stat_fields(host_pid(child.pid, idents[1]))[19])
        shift = said["child"]["raw_ticks"] - kid_raw_here
        whole = 100000 * CLK_TCK
        assert shift in ((whole,) if nsec == 0 else (whole, whole + 1)), shift
        # a start one tick off our view of it is the tolerance; two ticks is another process
        seen = (kid_raw_here - own_offset_ticks()) & MASK
        for delta, verdict in ((1, Liveness.ALIVE), (-1, Liveness.ALIVE), (2, Liveness.DEAD), (-2, Liveness.DEAD)):
            assert judge(replace(idents[1], start_ticks=(seen + delta) & MASK)) is verdict
        end(child, idents)


def test_a_process_that_left_its_time_namespace() -> None:
    """Inside ``unshare --time --boottime 100000``, the helper unshares a
    second time namespace (offset 7 s) for its children.  Its own offset is
    still 100000 s, though its /proc/self/timens_offsets now says 7: its
    identity must be normalised by the offset its own namespace has."""
    if os.geteuid() != 0:
        pytest.skip("setting a time namespace's offsets needs CAP_SYS_TIME")
    cmd = unshare_or_skip("--time", "--boottime", "100000", "--fork")
    with helper(*cmd, unshare=(7, 0)) as child:
        said = report(child)
        time_ns, for_children = said["ns"]
        assert time_ns != for_children
        idents = check_from_outside(child, said, exact=True)
        # what each saw of itself is its start shifted by its own namespace's offset
        assert said["raw"] - idents[0].start_ticks == 100000 * CLK_TCK
        assert said["child"]["raw_ticks"] - idents[1].start_ticks == 7 * CLK_TCK
        end(child, idents)


def test_a_time_namespace_in_a_pid_namespace_without_its_own_proc() -> None:
    cmd = unshare_or_skip("--pid", "--time", "--boottime", "100000", "--monotonic", "100000", "--fork")
    with helper(*cmd, unshare=None) as child:
        said = report(child)
        idents = check_from_outside(child, said, exact=True)
        assert idents[0].pid == 1 and idents[1].pidns == idents[0].pidns != me().pidns
        end(child, idents)
