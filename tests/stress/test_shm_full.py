"""A full /dev/shm, the first thing an operator's host runs into: a tmpfs
file is sparse, so a segment whose pages were left to be allocated on first
touch would kill its writer with SIGBUS in the middle of a publish, the lock
held.  The segment is therefore fully allocated when it is created
(docs/design.md, "Segment creation"): a cache that does not fit fails to be
created with a clear OSError and leaves nothing behind, and a cache that was
created keeps working when something else fills /dev/shm afterwards.

Each case runs in its own mount namespace (``unshare --mount``) with a small
tmpfs over /dev/shm, so filling it touches nothing outside the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .._report import Report
from ..support import REPO, scaled

TMPFS_BYTES = 4 << 20

#: ``SCENARIO socket_dir events``, run as root in a private mount namespace
#: whose /dev/shm is a fresh TMPFS_BYTES tmpfs; prints one JSON object.
SCENARIO = """
    import errno, json, os, subprocess, sys
    from shmcache import Reader, Writer
    from tests.support import check_value, make_value
    sock_dir, events = sys.argv[1], int(sys.argv[2])
    out = {}

    # 1. a cache larger than the free space: a clear error, nothing created
    try:
        Writer("toobig", capacity=4096, arena_bytes=2 << 20, max_keys=1024, store_bytes=1 << 20)
    except OSError as err:
        out["toobig"] = [err.errno, str(err)]
    out["left_after_toobig"] = sorted(os.listdir("/dev/shm"))

    # 2. the daemon asked for more than there is: exit 1 with one line
    d = subprocess.run([sys.executable, "-m", "shmcached", "--name", "dtoobig",
                        "--socket", os.path.join(sock_dir, "d.sock"), "--store-bytes", str(8 << 20)],
                       capture_output=True, text=True, timeout=60)
    out["daemon"] = [d.returncode, d.stderr.strip().splitlines()]
    out["left_after_daemon"] = sorted(os.listdir("/dev/shm"))

    # 3. a cache that fits, then another process fills /dev/shm to its last page
    w = Writer("fits", capacity=64, arena_bytes=1 << 16, max_keys=256, store_bytes=1 << 16)
    fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_WRONLY, 0o600)
    filled, chunk = 0, b"\\xff" * 65536
    while True:
        try:
            filled += os.write(fd, chunk if len(chunk) > 4096 else chunk[:4096])
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            if len(chunk) == 4096:
                break
            chunk = chunk[:4096]
    os.close(fd)
    out["filled"] = filled
    # the store's heap wraps and is cleaned, the ring wraps, all in the
    # pages allocated up front
    for i in range(events):
        key = f"k{i % 200}"
        assert w.put(key, make_value(key, i + 1, "p" * (i % 300))) == i + 1
    with Reader("fits") as r:
        snap = r.list()
        for item in snap.items:
            check_value(item.key, item.value)
        out["fits"] = [snap.rv, len(snap.items)]
    w.close()
    os.unlink("/dev/shm/filler")
    out["left_at_end"] = sorted(os.listdir("/dev/shm"))
    print(json.dumps(out), flush=True)
"""


def _private_shm(tmpfs_bytes: int) -> list[str]:
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("unshare (util-linux) is not installed")
    cmd = [exe, "--mount", "sh", "-c",
           f'mount -t tmpfs -o size={tmpfs_bytes},mode=1777 tmpfs /dev/shm && exec "$0" "$@"']
    probe = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        if "ermission denied" in probe.stderr or "not permitted" in probe.stderr or os.geteuid() != 0:
            pytest.skip(f"a private mount namespace needs privilege here: {probe.stderr.strip()}")
        raise AssertionError(f"unshare --mount failed: {probe.stderr}")
    return cmd


def test_full_dev_shm_fails_creation_cleanly_and_spares_live_caches(tmp_path: Path, report: Report) -> None:
    cmd = _private_shm(TMPFS_BYTES)
    events = scaled(20_000, 500_000)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([*cmd, sys.executable, "-c", textwrap.dedent(SCENARIO), str(tmp_path), str(events)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, f"rc={done.returncode} (-7 would be SIGBUS)\n{done.stderr}"
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    rc, lines = out["daemon"]
    report(checked="segments that do not fit a full /dev/shm: OSError ENOSPC, nothing left, daemon exits 1; "
                   "a live cache keeps publishing after /dev/shm is filled",
           events=out["fits"][0], faults=2, failures=0, tmpfs_bytes=TMPFS_BYTES, filled_bytes=out["filled"])
    errno_, message = out["toobig"]
    assert errno_ == 28 and "no room in /dev/shm" in message and "'toobig'" in message, out["toobig"]
    assert out["left_after_toobig"] == []
    assert rc == 1 and len(lines) == 1 and "no room in /dev/shm" in lines[0], out["daemon"]
    assert out["left_after_daemon"] == []
    assert out["filled"] > 0
    assert out["fits"] == [events, 200]
    assert out["left_at_end"] == []
