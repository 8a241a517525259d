"""The tests' side of the checksummed values (shmcache/_checked.py): made
the same way as the demo's, verified with an AssertionError that shows the
value."""

from __future__ import annotations

from collections.abc import Iterable

from shmcache import Item
from shmcache._checked import make_value, value_seq

__all__ = ["check_intact", "check_value", "make_value"]


def check_value(key: str, value: bytes) -> int:
    """The sequence number in an intact value of ``key``; AssertionError if
    the value is torn, foreign or not ours."""
    seq = value_seq(key, value)
    if seq is None:
        raise AssertionError(f"value of {key!r} is not intact: {value[:120]!r}")
    return seq


def check_intact(items: Iterable[Item]) -> None:
    for item in items:
        check_value(item.key, item.value)
