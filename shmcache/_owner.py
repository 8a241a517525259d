"""Who a process is, and whether a recorded process is still alive.

A pid alone names nothing for long: pids are reused, a zombie still "exists",
and a pid recorded by a process in another PID namespace (a container) means
a different process here.  An owner is therefore recorded as (pid, start
time, PID namespace, boot), and judged dead only when that judgement is
sound from where we stand.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from functools import cache

import psutil

__all__ = ["Liveness", "ProcessIdentity", "judge", "me"]


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_ms: int  # process start time, milliseconds since the Unix epoch
    pidns: int  # inode of /proc/self/ns/pid (0 when unknown)
    boot: int  # first 8 bytes of the kernel's boot id


def _start_ms(pid: int) -> int:
    return round(psutil.Process(pid).create_time() * 1000)


def _own_start_ms() -> int:
    """This process's start time, computed as psutil computes any process's
    (start ticks since boot / CLK_TCK + boot time) but from /proc/self, which
    stays right in a PID namespace whose /proc was not remounted."""
    with open("/proc/self/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = int(fields[19])  # field 22, starttime; the split starts at field 3
    return round((ticks / os.sysconf("SC_CLK_TCK") + psutil.boot_time()) * 1000)


@cache
def _boot() -> int:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return int(f.read().strip().replace("-", "")[:16], 16)


@cache
def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_me: dict[int, ProcessIdentity] = {}


def me() -> ProcessIdentity:
    """This process (recomputed after a fork)."""
    pid = os.getpid()
    ident = _me.get(pid)
    if ident is None:
        ident = _me[pid] = ProcessIdentity(pid, _own_start_ms(), _pidns(), _boot())
    return ident


class Liveness(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWABLE = "unknowable"  # a PID namespace we cannot see into: never judged dead

#: PROC_PID_INIT_INO: the inode of the initial PID namespace, whose processes
#: see every process of the machine
INITIAL_PIDNS = 0xEFFFFFFC


def judge(owner: ProcessIdentity) -> Liveness:
    """Is the recorded process alive?

    DEAD only when certain: a different boot, or no process with that pid
    in its namespace, a zombie, or a process with that pid that started at
    another time (the pid was reused).  For another PID namespace the pid is
    looked up there (see ``_judge_elsewhere``); a namespace we cannot see
    into is UNKNOWABLE, which callers treat as alive.
    """
    here = me()
    if owner.pid <= 0:
        return Liveness.DEAD  # never recorded: its process died before writing it
    if owner.boot != here.boot:
        return Liveness.DEAD  # shared memory outlived no reboot; this record did
    if owner.pidns != here.pidns:
        return _judge_elsewhere(owner, here)
    try:
        proc = psutil.Process(owner.pid)
        started = round(proc.create_time() * 1000)
        status = proc.status()
    except psutil.NoSuchProcess:
        return Liveness.DEAD
    except psutil.AccessDenied:
        return Liveness.ALIVE
    if started != owner.start_ms or status == psutil.STATUS_ZOMBIE or status == psutil.STATUS_DEAD:
        return Liveness.DEAD
    return Liveness.ALIVE


def _judge_elsewhere(owner: ProcessIdentity, here: ProcessIdentity) -> Liveness:
    """Judge a process of another PID namespace, as seen from ours.

    A namespace nested below ours (a container's, seen from the host) is
    visible: its processes are ours too, each with its pid there as the last
    field of ``NSpid:`` in /proc/PID/status.  The owner is alive iff a process
    in its namespace has its pid there and its start time (start times do not
    depend on the namespace).  If no process at all is in that namespace, it
    is gone — but we can only know that when we see every process: from the
    initial namespace and with every /proc entry readable.
    """
    hidden = False
    in_namespace = False
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
            if len(nspid) == 1:
                continue  # a process of our own namespace, not of the owner's
            try:
                if os.stat(f"/proc/{pid}/ns/pid").st_ino != owner.pidns:
                    continue
            except PermissionError:
                hidden = True  # nested, but whose namespace we may not know
                continue
            in_namespace = True
            if int(nspid[-1]) != owner.pid:
                continue
            proc = psutil.Process(int(pid))
            started = round(proc.create_time() * 1000)
            zombie = proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess, StopIteration):
            continue  # gone while we looked
        except (PermissionError, psutil.AccessDenied):
            hidden = True
            continue
        return Liveness.DEAD if zombie or started != owner.start_ms else Liveness.ALIVE
    if not hidden and (in_namespace or here.pidns == INITIAL_PIDNS):
        return Liveness.DEAD
    return Liveness.UNKNOWABLE
