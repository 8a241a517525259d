"""Where the repository is, how big the stress-like tests run, and cache
names unique to one test: made, cleaned up, and looked for in /dev/shm."""

from __future__ import annotations

import itertools
import os
import secrets
from pathlib import Path

_counter = itertools.count()

REPO = Path(__file__).resolve().parent.parent.parent

#: The size knob of the stress-like tests: ``ci`` (default: the whole suite
#: within minutes on 2 cores) or ``soak`` (the full figures).
STRESS = os.environ.get("SHMCACHE_STRESS", "ci")
if STRESS not in ("ci", "soak"):
    raise ValueError(f"SHMCACHE_STRESS={STRESS!r}: use 'ci' or 'soak'")
SOAK = STRESS == "soak"


def scaled(ci: int, soak: int) -> int:
    """The figure for the current SHMCACHE_STRESS level."""
    return soak if SOAK else ci


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


def seg_path(name: str) -> str:
    return f"/dev/shm/shmcache.{name}"
