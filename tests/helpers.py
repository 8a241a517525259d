"""Shared test helpers: unique cache names and their cleanup, child processes."""

from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

_counter = itertools.count()

#: The size knob of the stress-like tests: ``ci`` (default: the whole suite
#: within minutes on 2 cores) or ``soak`` (the full figures).
STRESS = os.environ.get("SHMCACHE_STRESS", "ci")
if STRESS not in ("ci", "soak"):
    raise ValueError(f"SHMCACHE_STRESS={STRESS!r}: use 'ci' or 'soak'")
SOAK = STRESS == "soak"


def scaled(ci: int, soak: int) -> int:
    """The figure for the current SHMCACHE_STRESS level."""
    return soak if SOAK else ci
REPO = Path(__file__).resolve().parent.parent


#: Set by tests/conftest.py in the controlling pytest process and inherited
#: by its xdist workers: every name of one session carries it, so the end of
#: the session can find whatever any test left in /dev/shm.
SESSION_VARIABLE = "SHMCACHE_TEST_SESSION"


def unique_name(tag: str = "t") -> str:
    """A cache name no other test (in any xdist worker) uses."""
    session = os.environ.get(SESSION_VARIABLE, "s")
    return f"{tag}-{session}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(3)}"


def remove_cache(name: str) -> bool:
    """Unlink whatever cache ``name`` left in /dev/shm (segment, semaphore,
    name lock); True if anything was there."""
    found = False
    for path in (f"/dev/shm/shmcache.{name}", f"/dev/shm/sem.shmcache.{name}.lock",
                 f"/dev/shm/shmcache-lock.{name}"):
        try:
            os.unlink(path)
            found = True
        except FileNotFoundError:
            pass
    return found


def leftovers(name: str) -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if name in f)


def python(code: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    """Start ``python -c code args...`` with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        text=True,
        **popen,
    )
