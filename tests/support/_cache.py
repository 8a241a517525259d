"""Caches the cross-process tests build directly: a small Writer, and the
figures they read back."""

from __future__ import annotations

from shmcache import Reader, Writer


def small_writer(name: str, *, capacity: int = 16, arena_bytes: int = 4096, max_keys: int = 64,
                 store_bytes: int = 1 << 16, lock_timeout: float = 5.0) -> Writer:
    return Writer(name, capacity=capacity, arena_bytes=arena_bytes, max_keys=max_keys,
                  store_bytes=store_bytes, lock_timeout=lock_timeout)


def lock_recoveries(reader: Reader) -> int:
    return reader.figures().lock_recoveries
