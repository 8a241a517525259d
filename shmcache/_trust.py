"""Whom a process trusts to own a cache: the uids whose segment, semaphore
and daemon socket it accepts.

/dev/shm is world-writable and cache names are predictable, so any local
user can create ``shmcache.NAME`` before its rightful owner does, fill it
with data of their choosing and forge every byte of its header.  What no
other user can forge is a file's owner as the kernel reports it for the
descriptor actually opened (``fstat``), and a socket peer's uid
(``SO_PEERCRED``).  So every party checks those against the set defined here
before it believes a byte (docs/design.md, "Trust").

The trusted owners are root (who can read and change any process anyway),
the process's own effective uid, and the ``shmcache`` system user that the
systemd unit runs the daemon as (if that user exists; looked up once per
process).  ``owner=`` arguments,
``--owner`` and the ``SHMCACHE_OWNER`` environment variable (comma-separated
user names or uids) replace the ``shmcache`` user by the owners named; root
and the own uid stay trusted.
"""

from __future__ import annotations

import functools
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .exceptions import CacheNotTrusted, InvalidOwner, InvalidSize

__all__ = ["ENV_OWNER", "SERVICE_USER", "OwnerSpec", "TrustedOwners", "check_cache_mode", "describe_uid",
           "trusted_owners"]

#: the system user of systemd/shmcached@.service (systemd/shmcache.sysusers.conf)
SERVICE_USER = "shmcache"
#: comma-separated user names or uids: the owners trusted when ``owner`` is not given
ENV_OWNER = "SHMCACHE_OWNER"

OwnerSpec = int | str | Iterable[int | str]

#: the permission bits that let others than the owner write a file: a
#: segment or semaphore with any of them is not trusted
OTHERS_WRITE = 0o022


def check_cache_mode(mode: int) -> int:
    """``mode`` if a cache may be created with it (permission bits, no write
    bit for group or others: readers would refuse the cache); InvalidSize
    otherwise."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise InvalidSize(f"mode={mode!r} must be permission bits, e.g. 0o640")
    if mode & OTHERS_WRITE:
        raise InvalidSize(f"mode={mode:#o} lets others than the owner write the cache, and readers "
                          f"refuse such a segment: use e.g. 0o640 or 0o600")
    return mode


def describe_uid(uid: int) -> str:
    """``uid 1000 (alice)``, or ``uid 1000`` for a uid without a user name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _uid_of(item: int | str) -> int:
    if isinstance(item, bool):
        raise TypeError("owner must be a user name or a uid, not bool")
    if isinstance(item, int):
        if not 0 <= item < 1 << 32:
            raise InvalidOwner(f"owner uid {item} is out of range")
        return item
    if not isinstance(item, str):
        raise TypeError(f"owner must be a user name or a uid, not {type(item).__name__}")
    text = item.strip()
    if text.isdigit():
        return _uid_of(int(text))
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise InvalidOwner(f"owner {item!r}: no such user") from None


@dataclass(frozen=True)
class TrustedOwners:
    """A set of uids, and the checks of files and peers against it."""

    uids: frozenset[int]

    def __contains__(self, uid: object) -> bool:
        return uid in self.uids

    def __str__(self) -> str:
        return ", ".join(describe_uid(uid) for uid in sorted(self.uids))

    def check_file(self, st: os.stat_result, path: str) -> None:
        """CacheNotTrusted unless ``st`` (fstat of the descriptor opened for
        ``path``) is a regular file of a trusted owner that nobody else may
        write: a group- or world-writable segment or semaphore could have
        been changed by anyone in that group, or anyone at all."""
        if not stat.S_ISREG(st.st_mode):
            raise CacheNotTrusted(f"{path} is not a regular file", path=path, owner_uid=st.st_uid)
        if st.st_uid not in self.uids:
            raise CacheNotTrusted(
                f"{path} belongs to {describe_uid(st.st_uid)}, whom this process does not trust "
                f"(it trusts {self}); if that is the cache's rightful owner, pass owner= "
                f"(--owner, or {ENV_OWNER}=...)", path=path, owner_uid=st.st_uid)
        if st.st_mode & OTHERS_WRITE:
            raise CacheNotTrusted(
                f"{path} (of {describe_uid(st.st_uid)}) is writable by "
                f"{'anyone' if st.st_mode & 0o002 else 'its group'} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): its content cannot be trusted",
                path=path, owner_uid=st.st_uid)

    def check_peer(self, uid: int, pid: int, path: str) -> None:
        """CacheNotTrusted unless the process listening at ``path``
        (SO_PEERCRED: ``uid``, ``pid``) runs as a trusted owner."""
        if uid not in self.uids:
            raise CacheNotTrusted(
                f"the process listening at {path} (pid {pid}) runs as {describe_uid(uid)}, "
                f"whom this process does not trust (it trusts {self}); nothing was sent. "
                f"If that is the daemon's rightful user, pass owner= (--owner, or {ENV_OWNER}=...)",
                path=path, owner_uid=uid)


@functools.cache
def _service_uid() -> int | None:
    # looked up once per process: every Reader, Writer and Producer asks, and
    # a user database lookup may be a file read or a network call (NSS)
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        return None


def trusted_owners(owner: OwnerSpec | None = None) -> TrustedOwners:
    """Root, this process's effective uid, and ``owner`` (a user name, a uid,
    or several of them); without ``owner``, those of ``$SHMCACHE_OWNER``, else
    the ``shmcache`` system user if it exists.  InvalidOwner for a user that
    does not exist, TypeError for something that is not a name or uid."""
    uids = {0, os.geteuid()}
    if owner is None:
        env = os.environ.get(ENV_OWNER, "").strip()
        if env:
            owner = [part for part in env.split(",") if part.strip()]
        else:
            service = _service_uid()
            if service is not None:
                uids.add(service)
            return TrustedOwners(frozenset(uids))
    items: Iterable[int | str] = [owner] if isinstance(owner, (int, str)) else owner
    for item in items:
        uids.add(_uid_of(item))
    return TrustedOwners(frozenset(uids))
