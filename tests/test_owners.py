"""Whom a process trusts (shmcache/_trust.py) and what it checks before it
believes a cache's files (shmcache/_entries.py): the parts that one uid can
show.  The attacks by other uids are tests/stress/test_trust.py."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import Any

import pytest

from shmcache import (
    CacheCorrupted,
    CacheNotTrusted,
    InvalidOwner,
    InvalidSize,
    Reader,
    Writer,
)
from shmcache._cli import main as cli_main
from shmcache._entries import name_lock_path as lock
from shmcache._entries import segment_path as seg
from shmcache._entries import semaphore_path as sem
from shmcache._trust import trusted_owners

SMALL: dict[str, Any] = {"capacity": 16, "arena_bytes": 4096, "max_keys": 16, "store_bytes": 4096}


# ---- the trusted set ----------------------------------------------------------------


def test_default_owners_are_root_myself_and_the_service_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMCACHE_OWNER", raising=False)
    expected = {0, os.geteuid()}
    try:
        expected.add(pwd.getpwnam("shmcache").pw_uid)
    except KeyError:
        pass
    assert trusted_owners().uids == expected


def test_owner_and_environment_name_users_by_name_or_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMCACHE_OWNER", " 4242 , 0")
    assert trusted_owners().uids == {0, os.geteuid(), 4242}
    assert trusted_owners(5151).uids == {0, os.geteuid(), 5151}  # owner= replaces the environment's
    assert trusted_owners(["root", "77"]).uids == {0, os.geteuid(), 77}


@pytest.mark.parametrize(("owner", "error"), [
    ("no-such-user-here", InvalidOwner), (-1, InvalidOwner), (1 << 32, InvalidOwner),
    (True, TypeError), (1.5, TypeError), ([None], TypeError),
])
def test_bad_owner_is_a_clear_error(owner: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        trusted_owners(owner)  # type: ignore[arg-type]


def test_bad_environment_owner_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMCACHE_OWNER", "no-such-user-here")
    with pytest.raises(InvalidOwner, match="no-such-user-here"):
        Reader("whatever")


# ---- what readers and writers refuse ---------------------------------------------------


@pytest.mark.parametrize(("mode", "who"), [(0o660, "its group"), (0o606, "anyone"), (0o666, "anyone")])
def test_segment_writable_by_others_is_not_trusted(name: str, mode: int, who: str) -> None:
    """A segment of a trusted owner that others may write could hold
    anything: Reader and Writer(create=False) refuse it, and say why."""
    with Writer(name, **SMALL) as w:
        w.put("a", b"1")
        os.chmod(seg(name), mode)
        with pytest.raises(CacheNotTrusted, match=f"writable by {who}") as caught:
            Reader(name)
        assert caught.value.path == seg(name) and caught.value.owner_uid == os.geteuid()
        with pytest.raises(CacheNotTrusted, match=f"writable by {who}"):
            Writer(name, create=False)
        os.chmod(seg(name), 0o640)
        with Reader(name) as r:  # the control: the same segment, only the mode differs
            assert r.get("a") is not None


def test_semaphore_of_another_uid_or_writable_by_others_is_not_trusted(name: str) -> None:
    """Writer(create=False) checks the semaphore as it checks the segment:
    another (untrusted) uid's semaphore, or one others may write, is
    refused; a file of the wrong size is not a semaphore."""
    with Writer(name, **SMALL):
        os.chown(sem(name), 40126, -1)
        with pytest.raises(CacheNotTrusted, match="uid 40126"):
            Writer(name, create=False, owner=[])
        os.chown(sem(name), os.geteuid(), -1)
        os.chmod(sem(name), 0o662)
        with pytest.raises(CacheNotTrusted, match="writable by anyone"):
            Writer(name, create=False)
        os.chmod(sem(name), 0o640)
        with Writer(name, create=False) as other:
            assert other.put("b", b"2") == 1


def test_semaphore_of_the_wrong_size_is_corrupt(name: str) -> None:
    with Writer(name, **SMALL):
        size = os.stat(sem(name)).st_size
        os.truncate(sem(name), size + 8)
        with pytest.raises(CacheCorrupted, match="not a semaphore"):
            Writer(name, create=False)
        os.truncate(sem(name), size)


def test_symlink_at_the_segment_path_is_not_followed(name: str, tmp_path: Path) -> None:
    """A symlink named like a cache, pointing at a real segment: readers do
    not follow it (O_NOFOLLOW) and say so."""
    other = name + "-target"
    with Writer(other, **SMALL):
        os.symlink(seg(other), seg(name))
        try:
            with pytest.raises(CacheNotTrusted, match="symbolic link"):
                Reader(name)
            with pytest.raises(CacheNotTrusted, match="symbolic link"):
                Writer(name, **SMALL)  # nor does a creator replace it
        finally:
            os.unlink(seg(name))


@pytest.mark.parametrize("mode", [0o660, 0o662, 0o666, 0o620])
def test_writer_refuses_modes_that_let_others_write(name: str, mode: int) -> None:
    with pytest.raises(InvalidSize, match="write"):
        Writer(name, mode=mode, **SMALL)
    assert not [e for e in os.listdir("/dev/shm") if name in e]


def test_writer_group_must_be_a_gid(name: str) -> None:
    with pytest.raises(TypeError, match="gid"):
        Writer(name, group="wheel", **SMALL)  # type: ignore[arg-type]


# ---- the entries a creator makes and removes -------------------------------------------


def test_creator_makes_three_entries_and_removes_all(name: str) -> None:
    """Segment and semaphore at the requested mode, the name lock 0600;
    after close() none is left."""
    with Writer(name, mode=0o600, **SMALL):
        for path, mode in ((seg(name), 0o600), (sem(name), 0o600), (lock(name), 0o600)):
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, os.geteuid()), path
    assert not [e for e in os.listdir("/dev/shm") if name in e]


def test_failed_creation_leaves_nothing(name: str) -> None:
    """A creation that fails after the name lock (here: a group this
    process cannot give, when not root; a geometry error before anything)
    leaves no entry behind."""
    with pytest.raises(InvalidSize):
        Writer(name, capacity=0)
    if os.geteuid() != 0:
        with pytest.raises(PermissionError, match="group"):
            Writer(name, group=0 if os.getgid() != 0 else 1, **SMALL)
    assert not [e for e in os.listdir("/dev/shm") if name in e]


def test_name_lock_of_another_uid_is_reported(name: str) -> None:
    """Another uid's file at the name lock's path: creating the cache fails
    with CacheNotTrusted naming that uid and the remedy, and the file is
    left as it was."""
    fd = os.open(lock(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        os.chown(lock(name), 40126, 40126)
    except PermissionError:
        pytest.skip("needs root to give a file to another uid")
    with pytest.raises(CacheNotTrusted, match=f"uid 40126.*rm {lock(name)}"):
        Writer(name, **SMALL)
    assert [e for e in os.listdir("/dev/shm") if name in e] == [os.path.basename(lock(name))]


# ---- status prints what a segment holds, escaped ----------------------------------------


def test_status_escapes_the_recorded_socket_path(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket path with terminal escapes in a (trusted) header: ``status``
    shows it escaped, never the raw control characters."""
    with Writer(name, **SMALL) as w:
        w.advertise_socket("/run/\x1b]0;owned\x07\x1b[2J/d.sock")
        assert cli_main(["--name", name, "status"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "d.sock" in out
