"""Who a process is, and whether a recorded process is still alive.

A pid alone names nothing for long: pids are reused, a zombie still "exists",
and a pid recorded by a process in another PID namespace (a container) means
a different process here.  An owner is therefore recorded as

* its pid in its own PID namespace (what ``os.getpid()`` returns there),
* its start time in clock ticks since boot (``starttime``, field 22 of
  /proc/PID/stat), which tells a process from a later one given its pid,
* the inode of its PID namespace, which says where that pid means something,
* a tag of the kernel's boot id: ticks since boot restart at every boot, so
  a record from another boot, wherever it was kept, names no process of this
  one,

and judged dead only when that judgement is sound from where we stand.

Why ticks since boot, and never the wall clock: the start time psutil and
``ps`` show is ``starttime / CLK_TCK + btime``, and the kernel keeps btime as
"now on CLOCK_REALTIME minus time since boot", so every step of the wall
clock (NTP, ``date -s``, a VM resumed) moves the start time of every running
process.  A live owner then looks like a process that started at another
time: its pid reused, so dead, and its lock or cache would be taken from it.
The boot-relative tick count and the boot id do not move with any clock.

One clock does move them: a time namespace (Linux 5.6) has a CLOCK_BOOTTIME
offset, and /proc/PID/stat shows ``starttime`` shifted by the offset of the
*reading* process's time namespace.  Every start time is therefore stored
and compared normalised to the initial time namespace: the ticks as seen,
minus the reader's own boottime offset in ticks.  The kernel truncates the
shifted nanoseconds to ticks and an offset need not be a whole number of
ticks, so two readers in different time namespaces may see the same process
one tick apart; start times are compared with a tolerance of one tick.  A pid
reused within that tick then looks alive, which delays a recovery, but never
makes a live process look dead.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

__all__ = ["BOOT_BITS", "INITIAL_PIDNS", "Liveness", "ProcessIdentity", "START_TICKS_BITS", "judge", "me"]

#: start_ticks is stored masked to this many bits (at 100 Hz, centuries)
START_TICKS_BITS = 40
#: boot is a tag of this many bits of the boot id
BOOT_BITS = 24

_TICKS_MASK = (1 << START_TICKS_BITS) - 1
#: how far apart two readers in different time namespaces may see one start
_TICK_TOLERANCE = 1
_NS_PER_SECOND = 1_000_000_000

#: PROC_PID_INIT_INO: the inode of the initial PID namespace, whose processes
#: see every process of the machine
INITIAL_PIDNS = 0xEFFFFFFC
#: PROC_TIME_INIT_INO: the initial time namespace, whose offsets are zero
_INITIAL_TIMENS = 0xEFFFFFFA
#: PROC_USER_INIT_INO: the initial user namespace, whose capabilities hold over all others
_INITIAL_USERNS = 0xEFFFFFFD
#: PID_MAX_LIMIT: no pid_max goes beyond it, in any namespace
_PID_MAX_LIMIT = 1 << 22
_CAP_SYS_PTRACE = 19


@dataclass(frozen=True)
class ProcessIdentity:
    """Who a process is, across pid reuse, PID namespaces and reboots (see
    docs/design.md, "Who a process is"); a segment's header records its
    creator's."""

    pid: int  # as os.getpid() returns it: the pid in the process's own PID namespace
    start_ticks: int  # starttime, normalised to the initial time namespace, masked to START_TICKS_BITS
    pidns: int  # inode of /proc/self/ns/pid (32-bit), 0 when unknown
    boot: int  # first BOOT_BITS bits of the kernel's boot id


class Liveness(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWABLE = "unknowable"  # a PID namespace we cannot see into: never judged dead


def _read_stat(pid: int | str) -> tuple[str, int]:
    """(state, starttime as this process sees it) of /proc/PID/stat.

    The only reader of /proc/PID/stat, so that tests can stand in for a /proc
    that hides a process.  The fields are split after the last ')': the comm
    field before it may hold spaces and parentheses.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return fields[0].decode("ascii"), int(fields[19])  # fields 3 and 22


def _read_status_field(pid: int | str, key: bytes) -> list[bytes] | None:
    """The values of one line of /proc/PID/status (None when it has none)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(key):
                return line[len(key):].split()
    return None


def _nspid(pid: int | str) -> tuple[int, ...] | None:
    """The pid in each PID namespace from that of the /proc mount down to
    the process's own (None on kernels before 4.1, which do not say)."""
    values = _read_status_field(pid, b"NSpid:")
    return None if values is None else tuple(int(v) for v in values)


def _boot_tag() -> int:
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_hex = f.read().strip().replace("-", "")
    return int(boot_hex, 16) >> (len(boot_hex) * 4 - BOOT_BITS)


def _ns_inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def _proc_may_hide(mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether /proc may leave processes out of its listing altogether.

    Mounted with hidepid=invisible (2) or ptraceable (4), /proc lists only
    the processes we may ptrace: an owner missing from it may be alive.
    Holding CAP_SYS_PTRACE in the initial user namespace, we may ptrace all.
    (hidepid=noaccess lists every process and refuses to open its files,
    which a scan notices.)
    """
    options: list[str] | None = None
    try:
        with open(mountinfo) as f:
            for line in f:
                mount, sep, fs = line.partition(" - ")
                if sep and mount.split()[4] == "/proc":
                    fs_type, _, super_options = fs.split()[:3]
                    options = super_options.split(",") if fs_type == "proc" else None  # the last one shows
    except OSError:
        return True
    if options is None:
        return True
    if not {"hidepid=2", "hidepid=invisible", "hidepid=4", "hidepid=ptraceable"} & set(options):
        return False
    try:
        cap_eff = _read_status_field("self", b"CapEff:")
        return not (cap_eff is not None and int(cap_eff[0], 16) >> _CAP_SYS_PTRACE & 1
                    and _ns_inode("self", "user") == _INITIAL_USERNS)
    except OSError:
        return True


def _boottime_offset_ns(time_ino: int | None) -> int:
    """The CLOCK_BOOTTIME offset of this process's time namespace.

    /proc/PID/timens_offsets shows the offsets of the namespace the process's
    children will be in, which is its own except between an
    unshare(CLONE_NEWTIME) and the next exec.  Then the offsets of our own
    namespace are those some other process shows for its children: one that
    did not unshare, our parent as a rule.
    """
    if time_ino is None or time_ino == _INITIAL_TIMENS:
        return 0  # no time namespaces (kernel or config), or the initial one
    if _ns_inode("self", "time_for_children") == time_ino:
        return _parse_offsets("self")
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            if _ns_inode(pid, "time_for_children") == time_ino:
                return _parse_offsets(pid)
        except OSError:
            continue  # gone, or not ours to look into
    raise RuntimeError(
        "shmcache: this process left its time namespace (unshare(CLONE_NEWTIME) without exec) and no "
        "process shows that namespace's offsets, so its start time cannot be normalised; a start time "
        "off by the offset would let other processes judge it dead")


def _parse_offsets(pid: int | str) -> int:
    try:
        with open(f"/proc/{pid}/timens_offsets", "rb") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == b"boottime":
                    return int(fields[1]) * _NS_PER_SECOND + int(fields[2])
    except FileNotFoundError:
        pass  # a kernel without time namespaces shifts nothing
    return 0


@dataclass(frozen=True)
class _Here:
    """What judging takes from this process; recomputed after a fork (the
    child may be in its parent's PID and time namespaces for children)."""

    ident: ProcessIdentity
    offset_ticks: int  # our boottime offset, in ticks: what /proc adds to every starttime we read
    nspid: tuple[int, ...] | None  # our NSpid; one field iff /proc shows our own PID namespace
    proc_may_hide: bool  # whether /proc may leave out processes that we may not see

    @property
    def proc_is_ours(self) -> bool:
        return self.nspid is not None and len(self.nspid) == 1

    @property
    def proc_is_initial(self) -> bool:
        """Does /proc show every process of the machine?"""
        return self.proc_is_ours and self.ident.pidns == INITIAL_PIDNS

    def normalise(self, ticks_seen: int) -> int:
        return (ticks_seen - self.offset_ticks) & _TICKS_MASK


_boot: int | None = None  # the same in every process of this boot
_clk_tck: int | None = None
_here: _Here | None = None


def _current() -> _Here:
    global _boot, _clk_tck, _here
    pid = os.getpid()
    here = _here
    if here is not None and here.ident.pid == pid:
        return here
    if _boot is None:
        _boot = _boot_tag()
    if _clk_tck is None:
        _clk_tck = os.sysconf("SC_CLK_TCK")
    try:
        pidns = _ns_inode("self", "pid")
    except OSError:
        pidns = 0
    try:
        time_ino: int | None = _ns_inode("self", "time")
    except FileNotFoundError:
        time_ino = None
    offset_ns = _boottime_offset_ns(time_ino)
    # round to the nearest tick in integers: an offset in ns times CLK_TCK outgrows a float's precision
    offset_ticks = (2 * offset_ns * _clk_tck + _NS_PER_SECOND) // (2 * _NS_PER_SECOND)
    _, ticks_seen = _read_stat("self")  # /proc/self is right even where /proc is an ancestor namespace's
    start = (ticks_seen - offset_ticks) & _TICKS_MASK
    here = _Here(ProcessIdentity(pid, start, pidns, _boot), offset_ticks, _nspid("self"), _proc_may_hide())
    _here = here
    return here


def _forget() -> None:
    global _here
    _here = None


# the pid alone misses a fork by a pid 1 into a new PID namespace: the child is pid 1 too
os.register_at_fork(after_in_child=_forget)


def me() -> ProcessIdentity:
    """This process (recomputed after a fork)."""
    return _current().ident


def _same_start(a: int, b: int) -> bool:
    diff = (a - b) & _TICKS_MASK
    return diff <= _TICK_TOLERANCE or diff >= _TICKS_MASK + 1 - _TICK_TOLERANCE


def _verdict(here: _Here, owner: ProcessIdentity, pid: int | str, state: str, ticks_seen: int) -> Liveness:
    """The owner's verdict, given the stat of the process that has its pid."""
    if not _same_start(here.normalise(ticks_seen), owner.start_ticks):
        return Liveness.DEAD  # the pid was reused
    if state == "X" or (state == "Z" and not _other_threads_live(pid)):
        return Liveness.DEAD
    return Liveness.ALIVE


def _other_threads_live(pid: int | str) -> bool:
    """Whether a process shown as a zombie still runs: /proc/PID/stat shows
    the state of the thread group leader, a zombie as soon as the main thread
    has exited even while other threads run on."""
    try:
        threads = _read_status_field(pid, b"Threads:")
    except (FileNotFoundError, ProcessLookupError):
        return False  # reaped meanwhile
    except OSError:
        return True  # we cannot tell: not dead for certain
    return threads is None or int(threads[0]) > 1


def judge(owner: ProcessIdentity) -> Liveness:
    """Is the recorded process alive?

    DEAD only when certain: a different boot, or no process with that pid
    in its namespace, a zombie, or a process with that pid that started at
    another time (the pid was reused).  Where /proc shows our own PID
    namespace, a pid of ours is looked up directly; otherwise (the owner is in
    another namespace, or our /proc is an ancestor namespace's, as after
    ``unshare --pid`` without remounting it) it is looked for by its pid in
    its namespace (see ``_judge_by_scan``).  A namespace we cannot see into
    is UNKNOWABLE, which callers treat as alive.
    """
    here = _current()
    if owner.pid <= 0:
        return Liveness.DEAD  # never recorded: its process died before writing it
    if owner.pid >= _PID_MAX_LIMIT:
        return Liveness.DEAD  # no process has such a pid (and kill() would overflow on it)
    if owner.boot != here.ident.boot:
        return Liveness.DEAD  # its ticks count from another boot: no process of this one
    if owner.pidns == here.ident.pidns and here.proc_is_ours:
        return _judge_directly(owner, here)
    return _judge_by_scan(owner, here)


def _pid_exists(pid: int) -> bool:
    """Whether our PID namespace has a process (zombies included) with that
    pid: kill() looks it up there, whatever /proc shows or hides."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _judge_directly(owner: ProcessIdentity, here: _Here) -> Liveness:
    try:
        state, ticks_seen = _read_stat(owner.pid)
    except (FileNotFoundError, ProcessLookupError):
        # /proc hides it (hidepid), or it has just started with that pid: its start is not ours to see
        return Liveness.ALIVE if _pid_exists(owner.pid) else Liveness.DEAD
    except PermissionError:
        return Liveness.ALIVE
    except OSError:
        return Liveness.UNKNOWABLE
    return _verdict(here, owner, owner.pid, state, ticks_seen)


def _judge_by_scan(owner: ProcessIdentity, here: _Here) -> Liveness:
    """Judge a process by its pid in its namespace, as /proc shows it.

    Every process in /proc has its pid in each namespace from /proc's down to
    its own in ``NSpid:``, the last being that in its own, whose inode is
    that of /proc/PID/ns/pid.  That covers a namespace nested below ours (a
    container's seen from the host) and our own seen through an ancestor's
    /proc.  The owner is alive iff a process in its namespace has its pid and
    its start time.  If none has, it is gone — but we can only know that
    when we see every process of its namespace: when we saw one of them (a
    namespace's processes are all visible wherever one is) or see every
    process of the machine, and no /proc entry was hidden from us.
    """
    if owner.pidns == 0:
        return Liveness.UNKNOWABLE  # recorded where its namespace was unknown: no process can be matched
    ours = owner.pidns == here.ident.pidns
    if ours and not _pid_exists(owner.pid):
        return Liveness.DEAD  # certain, and no scan
    # a process of the owner's namespace has as many NSpid fields as any other process of it
    depth = len(here.nspid) if ours and here.nspid is not None else None
    hidden = here.proc_may_hide
    in_namespace = False
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            nspid = _nspid(pid)
            if nspid is None:
                hidden = True  # a kernel that does not say
                continue
            if depth is not None and len(nspid) != depth:
                continue
            if here.proc_is_ours and len(nspid) == 1:
                continue  # a process of our own namespace, and the owner's is another
            try:
                if _ns_inode(pid, "pid") != owner.pidns:
                    continue
            except PermissionError:
                hidden = True  # in a namespace we may not know
                continue
            in_namespace = True
            if nspid[-1] != owner.pid:
                continue
            state, ticks_seen = _read_stat(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone while we looked
        except PermissionError:
            hidden = True
            continue
        return _verdict(here, owner, pid, state, ticks_seen)
    if ours:
        # it existed before the scan: gone since, or left out of /proc
        return Liveness.ALIVE if _pid_exists(owner.pid) else Liveness.DEAD
    if not hidden and (in_namespace or here.proc_is_initial):
        return Liveness.DEAD
    return Liveness.UNKNOWABLE
