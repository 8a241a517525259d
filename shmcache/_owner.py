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
        ident = _me[pid] = ProcessIdentity(pid, _start_ms(pid), _pidns(), _boot())
    return ident


class Liveness(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWABLE = "unknowable"  # another PID namespace: never judged dead


def judge(owner: ProcessIdentity) -> Liveness:
    """Is the recorded process alive?

    DEAD only when certain: a different boot, or (same boot and PID
    namespace) no process with that pid, a zombie, or a process with that pid
    that started at another time (the pid was reused).  Another namespace is
    UNKNOWABLE and callers treat it as alive.
    """
    here = me()
    if owner.pid <= 0:
        return Liveness.DEAD  # never recorded: its process died before writing it
    if owner.boot != here.boot:
        return Liveness.DEAD  # shared memory outlived no reboot; this record did
    if owner.pidns != here.pidns:
        return Liveness.UNKNOWABLE
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
