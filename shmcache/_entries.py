"""A cache's entries in /dev/shm: where they are, how they are opened, created
and removed, and the name lock that serialises the processes that create,
replace or remove them.

Cache ``NAME`` has three entries, each a file of the tmpfs at /dev/shm:

* ``shmcache.NAME`` — the segment (the POSIX shared memory object
  ``/shmcache.NAME``);
* ``sem.shmcache.NAME.lock`` — the writers' semaphore, in the layout of
  glibc's ``sem_open`` (the POSIX named semaphore ``/shmcache.NAME.lock``);
* ``shmcache-lock.NAME`` — the name lock, mode 0600: an ``flock`` on it
  serialises creators of NAME.  Readers cannot open it, so no reader can hold
  up a restart (they could ``flock`` the segment through their read-only
  descriptor).  ``-`` cannot follow ``shmcache`` in a segment's file name
  (a cache name starts with a letter or digit), so it names no segment.

The directory is world-writable (mode 1777), so each entry may have been
made by anybody.  Every open here is ``O_NOFOLLOW``, and what it found is
judged by ``fstat`` of the descriptor opened — never by a path looked up
again — against the trusted owners (_trust.py).  Every create is
``O_CREAT|O_EXCL|O_NOFOLLOW`` at mode 0600, then given its group
(``fchown``), then its final mode (``fchmod``): no moment exists at which a
process outside the final group may open it.  The sticky bit keeps other
users from removing or replacing an entry once it is ours.

Only a creator (holding the name lock) removes entries, and only the ones
whose inode it checked: readers never unlink anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from typing import Any

from ._native import ffi, lib
from ._trust import TrustedOwners, describe_uid
from .exceptions import CacheCorrupted, CacheExists, CacheNotFound, CacheNotTrusted

__all__ = [
    "SHM_DIR",
    "NameLock",
    "create_file",
    "create_semaphore",
    "name_lock_path",
    "open_file",
    "open_semaphore",
    "owner_error",
    "segment_path",
    "semaphore_path",
    "symlink_error",
    "unlink_if",
]

SHM_DIR = "/dev/shm"
SEM_BYTES: int = lib.sc_sem_bytes()

_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC

#: Test hook: called with the path of each file create_file made, before it
#: gets its group and mode (tests/stress/test_trust.py stops a daemon there
#: to show that nobody outside its owner may open the file yet).
after_exclusive_create: Callable[[str], None] | None = None


def segment_path(name: str) -> str:
    """The segment of cache ``name`` (POSIX shared memory ``/shmcache.NAME``)."""
    return f"{SHM_DIR}/shmcache.{name}"


def semaphore_path(name: str) -> str:
    """The writers' semaphore of cache ``name`` (POSIX ``/shmcache.NAME.lock``)."""
    return f"{SHM_DIR}/sem.shmcache.{name}.lock"


def name_lock_path(name: str) -> str:
    """The file whose flock serialises the creators of cache ``name``."""
    return f"{SHM_DIR}/shmcache-lock.{name}"


def owner_error(path: str, name: str) -> CacheNotTrusted:
    """The error for an entry of ``name`` at ``path`` that is not this uid's:
    another user holds the name.  It names that user, and the remedy: every
    entry of the name that is not this uid's, to remove as root."""
    foreign = [p for p in (segment_path(name), semaphore_path(name), name_lock_path(name))
               if _owner_uid(p) not in (None, os.geteuid())]
    if foreign and foreign[0] == segment_path(name):
        path = foreign[0]  # the entry that says most about who holds the name
    uid = _owner_uid(path)
    who = describe_uid(uid) if uid is not None else "another user"
    return CacheNotTrusted(
        f"cache {name!r}: {path} belongs to {who}, not to this process's {describe_uid(os.geteuid())}: "
        f"another user holds the name. If no cache of yours should be there, remove what is not yours "
        f"as root (rm {' '.join(foreign or [path])}) and start again, or use another cache name",
        path=path, owner_uid=-1 if uid is None else uid)


def symlink_error(path: str, name: str) -> CacheNotTrusted:
    """The error for a symbolic link at an entry's path, which no creator
    makes and none follows."""
    return CacheNotTrusted(f"cache {name!r}: {path} is a symbolic link, which shmcache never makes "
                           f"nor follows; remove it (rm {path})", path=path, owner_uid=_owner_uid(path) or -1)


def _owner_uid(path: str) -> int | None:
    try:
        return os.lstat(path).st_uid
    except OSError:
        return None


def open_file(path: str, name: str, *, writable: bool, owners: TrustedOwners) -> int:
    """A descriptor of the existing entry ``path`` of cache ``name``, opened
    without following a symlink and checked against ``owners``.
    CacheNotFound if it does not exist, PermissionError if the file's mode
    keeps us out, CacheNotTrusted if it is not what ``owners`` trust."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | _OPEN)
    except FileNotFoundError as err:
        raise CacheNotFound(f"no cache named {name!r} ({path})") from err
    except PermissionError as err:
        raise PermissionError(err.errno, f"cache {name!r}: permission denied ({path})") from err
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise symlink_error(path, name) from err
        raise
    try:
        owners.check_file(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(path: str, name: str, *, mode: int, group: int | None, size: int) -> int:
    """Create ``path`` exclusively at mode 0600, give it ``group``, then
    ``mode``, then ``size`` bytes; its descriptor.  If the path exists:
    FileExistsError if it is this uid's, else the owner_error."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN, 0o600)
    except FileExistsError:
        if _is_mine(path):
            raise
        raise owner_error(path, name) from None
    try:
        if after_exclusive_create is not None:
            after_exclusive_create(path)
        if group is not None:
            try:
                os.fchown(fd, -1, group)
            except PermissionError as err:
                raise PermissionError(err.errno, f"cache {name!r}: cannot give {path} to group {group} "
                                                 f"(not a member of it): {err.strerror}") from err
        os.fchmod(fd, mode)  # exactly, whatever the umask
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    return fd


def open_semaphore(name: str, owners: TrustedOwners) -> Any:
    """Map cache ``name``'s writers' semaphore (a ``sem_t *`` for the sc_lock
    calls; ``lib.sc_sem_close`` unmaps it), after checking its file."""
    path = semaphore_path(name)
    try:
        fd = open_file(path, name, writable=True, owners=owners)
    except CacheNotFound as err:
        raise CacheNotFound(f"cache {name!r} has no writers' semaphore ({path})") from err
    try:
        if os.fstat(fd).st_size != SEM_BYTES:
            raise CacheCorrupted(f"{path} is not a semaphore ({os.fstat(fd).st_size} bytes)")
        return _map_semaphore(fd, path)
    finally:
        os.close(fd)


def create_semaphore(name: str, *, mode: int, group: int | None) -> tuple[Any, int]:
    """Create cache ``name``'s writers' semaphore with count 1; (its mapping,
    its inode).  The caller holds the name lock and removed any old one."""
    path = semaphore_path(name)
    fd = create_file(path, name, mode=mode, group=group, size=SEM_BYTES)
    try:
        sem = _map_semaphore(fd, path)
        rc = lib.sc_sem_init(sem)
        if rc:
            lib.sc_sem_close(sem)
            raise OSError(rc, f"cannot initialise the semaphore {path}: {os.strerror(rc)}")
        return sem, os.fstat(fd).st_ino
    except BaseException:
        _unlink_quietly(path)
        raise
    finally:
        os.close(fd)


def _map_semaphore(fd: int, path: str) -> Any:
    sem = lib.sc_sem_map(fd)
    if sem == ffi.NULL:
        err = ffi.errno
        raise OSError(err, f"cannot map the semaphore {path}: {os.strerror(err)}")
    return sem


def unlink_if(path: str, inode: int) -> bool:
    """Remove ``path`` if it is still the file ``inode`` (another creator may
    have replaced it meanwhile); whether it was removed.  The caller holds
    the name lock, so nobody who respects it replaces the file between the
    check and the unlink."""
    try:
        if os.lstat(path).st_ino != inode:
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _is_mine(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except FileNotFoundError:
        return True  # gone meanwhile: the caller retries


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class NameLock:
    """An exclusive ``flock`` on cache ``name``'s name lock file, for
    creating, replacing or removing its entries.

    The file is created on demand (mode 0600, this uid's; another user's
    file there is an owner_error) and removed by ``release(remove=True)``
    while still held.  A process that waited on a file removed meanwhile
    finds the path no longer names its file, and starts over on the new one.
    CacheExists if the lock stays taken for ``timeout`` seconds."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.path = name_lock_path(name)
        self._fd = self._acquire(timeout)

    def _acquire(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _OPEN, 0o600)
            except PermissionError as err:  # fs.protected_regular: another user's file
                raise owner_error(self.path, self.name) from err
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise symlink_error(self.path, self.name) from err
                raise
            try:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid():
                    raise owner_error(self.path, self.name)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise CacheExists(f"cache {self.name!r} is being created or removed by another "
                                              f"process (its name lock {self.path} stayed taken)") from None
                        time.sleep(0.005)
                try:
                    if os.lstat(self.path).st_ino == st.st_ino:
                        return fd
                except FileNotFoundError:
                    pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # removed or replaced while we waited: take the new one

    def release(self, *, remove: bool = False) -> None:
        """Give the lock up; with ``remove``, first delete the file (the
        cache's last entry, when its creator closes it)."""
        if self._fd < 0:
            return
        try:
            if remove:
                unlink_if(self.path, os.fstat(self._fd).st_ino)
        finally:
            os.close(self._fd)  # also drops the flock
            self._fd = -1

    def __enter__(self) -> NameLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
