"""The etcd mirror's core: etcd's history of one key prefix applied to a
cache, with resource versions every host derives alike.

RVs (docs/design.md, "The etcd source"): event ``i`` (from 0) of etcd
revision ``R`` gets ``R << 16 | i``; "everything up to ``R``" (a listing at
``R``, a progress notification at ``R``) is ``R << 16 | 0xFFFF``.  Two hosts
that mirror the same prefix therefore hold the same state at the same RV,
and ``rv >> 16`` is etcd's revision.

This module decides nothing about connections: ``relist`` and ``apply`` are
called by the loop that owns the etcd client (and its retries); they raise
what the Writer raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from shmcache import CacheCorrupted, Writer
from shmcache._rules import MAX_KEY_BYTES

from ._etcd import KeyValue, WatchEvent, WatchResponse

__all__ = ["INDEX_BITS", "Mirror", "revision_of", "rv_after", "rv_of"]

#: bits of a cache RV below the etcd revision: events of one revision
INDEX_BITS = 16
_LAST = (1 << INDEX_BITS) - 1

log = logging.getLogger("shmcached.mirror")


def rv_of(revision: int, index: int) -> int:
    """The cache RV of event ``index`` (from 0) of etcd revision ``revision``."""
    if not 0 <= index < _LAST:
        raise CacheCorrupted(f"etcd revision {revision} holds more than {_LAST} events of the prefix")
    return revision << INDEX_BITS | index


def rv_after(revision: int) -> int:
    """The cache RV that stands for "every change up to ``revision``"."""
    return revision << INDEX_BITS | _LAST


def revision_of(rv: int) -> int:
    """The etcd revision a cache RV belongs to."""
    return rv >> INDEX_BITS


class Mirror:
    """Applies a prefix's listing and watch messages to ``writer``.

    Keys are the etcd keys without ``prefix`` (with it if ``keep_prefix``),
    decoded as UTF-8; a key that is not UTF-8 (or would be empty, or too
    long for the cache) is skipped, logged once per key and counted in
    ``skipped_keys``.  ``revision`` is the etcd revision the cache holds
    everything up to (0 before the first listing); resume the watch at
    ``revision + 1``.
    """

    def __init__(self, writer: Writer, prefix: bytes, *, keep_prefix: bool = False) -> None:
        self.writer = writer
        self.prefix = prefix
        self.keep_prefix = keep_prefix
        self.revision = 0
        self.skipped_keys = 0
        self._warned: set[bytes] = set()

    def key_of(self, etcd_key: bytes) -> str | None:
        """The cache key of an etcd key, or None (skipped, counted)."""
        raw = etcd_key if self.keep_prefix else etcd_key[len(self.prefix):]
        try:
            key = raw.decode()
        except UnicodeDecodeError:
            key = ""
        if not key or len(raw) > MAX_KEY_BYTES or not etcd_key.startswith(self.prefix):
            self.skipped_keys += 1
            if etcd_key not in self._warned and len(self._warned) < 1000:
                self._warned.add(etcd_key)
                log.warning("skipping etcd key %r: not a cache key (UTF-8, 1 to 1,024 bytes)", etcd_key)
            return None
        return key

    def relist(self, revision: int, kvs: Iterable[KeyValue]) -> int:
        """Replace the cache by the listing of the prefix at ``revision``.
        Each item keeps the RV of its etcd mod_revision (index 0: a listing
        does not tell a key's place in its transaction), so a host that
        listed and one that followed the watch agree on every item's
        revision_of(rv) — and on the whole rv for keys changed alone."""
        items: dict[str, tuple[bytes, int]] = {}
        for kv in kvs:
            key = self.key_of(kv.key)
            if key is not None:
                items[key] = (kv.value, rv_of(kv.mod_revision, 0))
        rv = self.writer.replace([(k, v, item_rv) for k, (v, item_rv) in items.items()],
                                 rv=rv_after(revision))
        self.revision = revision
        return rv

    def apply(self, response: WatchResponse) -> None:
        """Apply one watch message: each revision's events as one batch at
        that revision's RVs and a bookmark at its end; a progress
        notification as a bookmark."""
        batch: list[WatchEvent] = []
        for event in response.events:
            if batch and event.kv.mod_revision != batch[0].kv.mod_revision:
                self._apply_revision(batch)
                batch = []
            batch.append(event)
        if batch:
            self._apply_revision(batch)
        if response.progress and response.revision > self.revision:
            self.writer.bookmark(rv_after(response.revision))
            self.revision = response.revision

    def _apply_revision(self, events: list[WatchEvent]) -> None:
        revision = events[0].kv.mod_revision
        if revision <= self.revision:
            return  # already held: a watch resumed at or before it
        items: list[tuple[str, bytes | None]] = []
        present: dict[str, bool] = {}
        for event in events:
            key = self.key_of(event.kv.key)
            if key is None:
                continue
            if event.type == "DELETE":
                if key not in present:
                    present[key] = self.writer.has(key)
                if not present[key]:
                    continue  # never held (skipped, or deleted twice): nothing to tell readers
                items.append((key, None))
                present[key] = False
            else:
                items.append((key, event.kv.value))
                present[key] = True
        if items:
            rv_of(revision, len(items) - 1)  # the batch fits the revision's RVs
            self.writer.put_many(items, rv=rv_of(revision, 0))
        # every host ends a revision at the same RV, whether it applied the
        # revision's events or listed at it
        self.writer.bookmark(rv_after(revision))
        self.revision = revision
