"""Inspecting a cache from outside it: what ``shmcache status`` reports.

The cache's figures (``Reader.figures()``), whether the process that owns
the segment still lives, which processes map it, and the upstream state its
daemon reports; all as JSON-ready dicts.
Nothing here prints: the command line formats what it gets.
"""

from __future__ import annotations

import os
from typing import Any

import psutil

from ._entries import segment_path
from ._owner import Liveness, ProcessIdentity, judge
from ._producer import Producer
from ._reader import Reader
from ._trust import OwnerSpec
from .exceptions import ShmCacheError

__all__ = ["mapping_processes", "owner_status", "status_of", "upstream_of"]


def mapping_processes(name: str) -> tuple[list[dict[str, Any]], int]:
    """The processes (other than this one) that map cache ``name``'s segment:
    [{"pid", "name", "mode": "ro"|"rw", "mappings"}], and how many processes
    could not be inspected (another user's, without privileges)."""
    try:
        st = os.stat(segment_path(name))
    except FileNotFoundError:
        return [], 0
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}".encode()
    inode = str(st.st_ino).encode()
    needle = (segment_path(name)).encode()
    found: list[dict[str, Any]] = []
    uninspected = 0
    me = os.getpid()
    for proc in psutil.process_iter(["name"]):
        if proc.pid == me:
            continue
        try:
            with open(f"/proc/{proc.pid}/maps", "rb") as f:
                maps = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        except OSError:
            uninspected += 1
            continue
        if needle not in maps:
            continue
        writable = False
        count = 0
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            # address perms offset dev inode path: the same inode, not an
            # older segment of that name (shown "(deleted)") still mapped
            if len(fields) == 6 and fields[4] == inode and fields[3].lower() == device \
                    and fields[5].startswith(needle):
                count += 1
                writable = writable or fields[1][1:2] == b"w"
        if count:
            found.append({"pid": proc.pid, "name": proc.info.get("name") or "?",
                          "mode": "rw" if writable else "ro", "mappings": count})
    found.sort(key=lambda p: int(p["pid"]))
    return found, uninspected


def owner_status(owner: ProcessIdentity) -> dict[str, Any]:
    """Whether the process a header records as the owner lives:
    {"pid", "name", "liveness", "state", "alive"}; "alive" is None when it
    cannot be known (a PID namespace this process cannot see into)."""
    liveness = judge(owner)
    owner_name = owner_state = None
    if liveness is Liveness.ALIVE:
        try:
            proc = psutil.Process(owner.pid)
            owner_name, owner_state = proc.name(), proc.status()  # "stopped": SIGSTOPped
        except psutil.Error:
            pass
    return {
        "pid": owner.pid,
        "name": owner_name,
        "liveness": liveness.value,
        "state": owner_state,
        "alive": None if liveness is Liveness.UNKNOWABLE else liveness is Liveness.ALIVE,
    }


def status_of(name: str, trust: OwnerSpec | None = None) -> dict[str, Any]:
    """Everything ``shmcache status`` reports, as one JSON-ready dict; only
    from a segment of an owner ``trust`` names (CacheNotTrusted otherwise)."""
    with Reader(name, owner=trust) as reader:
        f = reader.figures()
    status: dict[str, Any] = {
        "name": name,
        "path": segment_path(name),
        "epoch": f"{f.epoch:016x}",
        "created": f.created,
        "owner": owner_status(f.owner),
        "heartbeat_age": None if f.heartbeat_age is None else round(f.heartbeat_age, 3),
        "socket": f.socket_path or None,
        "rv": f.rv,
        "oldest_rv": f.oldest_rv,
        "ring": {"events": f.ring.events, "capacity": f.ring.capacity,
                 "bytes": f.ring.bytes, "arena_bytes": f.ring.arena_bytes},
        "store": {"keys": f.store.keys, "max_keys": f.store.max_keys,
                  "bytes": f.store.bytes, "store_bytes": f.store.store_bytes},
        "events_written": f.events_written,
        "events_evicted": f.events_evicted,
    }
    status["upstream"] = upstream_of(status["socket"], trust)
    processes, uninspected = mapping_processes(name)
    status["processes"] = processes
    status["uninspected_processes"] = uninspected
    return status


def upstream_of(socket_path: str | None, owner: OwnerSpec | None) -> dict[str, Any] | None:
    """The daemon's upstream state (an etcd source), from its STATS; None if
    it has none or cannot be asked (no daemon, no permission, not trusted)."""
    if not socket_path:
        return None
    try:
        with Producer(socket_path, timeout=2.0, owner=owner) as p:
            upstream: dict[str, Any] | None = p.stats().get("upstream")
    except (ShmCacheError, OSError, ValueError):
        return None
    return upstream
