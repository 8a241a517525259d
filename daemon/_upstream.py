"""The daemon's etcd source: a thread that lists the prefix into the cache
and follows it, reconnecting with backoff, relisting after a compaction.

The cache keeps serving its last state while etcd is away; ``state()``
says since when it is disconnected.  Never a silent gap: a resume after a
reconnect starts at the revision after the last one applied, and one that
etcd has compacted meanwhile becomes a relist (readers of the old window get
ResourceExpired, as from Kubernetes).
"""

from __future__ import annotations

import logging
import threading
import time

from shmcache import CacheClosed, Writer

from ._etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdTooLarge,
    EtcdUnavailable,
    Watch,
)
from ._mirror import Mirror

__all__ = ["Upstream"]

log = logging.getLogger("shmcached.upstream")

#: the server's progress notifications come every 10 min by default; a
#: watch silent for this long is presumed broken and reopened
IDLE_TIMEOUT = 660.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class Upstream(threading.Thread):
    """Mirrors ``prefix`` of ``client``'s etcd into ``writer``."""

    def __init__(self, writer: Writer, client: EtcdClient, prefix: bytes, *, keep_prefix: bool,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        super().__init__(name="etcd-upstream", daemon=True)
        self.client = client
        self.mirror = Mirror(writer, prefix, keep_prefix=keep_prefix)
        self.idle_timeout = idle_timeout
        self._stopping = threading.Event()
        self._watch_lock = threading.Lock()
        self._watch: Watch | None = None
        self.connected = False
        self.disconnected_since: float | None = None  # None: connected, or never yet
        self.last_error = ""
        self.relists = 0
        self.reconnects = 0

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end, break its current watch, and wait for it."""
        self._stopping.set()
        with self._watch_lock:
            watch = self._watch
        if watch is not None:
            watch.close()
        self.join(timeout)

    def state(self) -> dict[str, object]:
        since = self.disconnected_since
        return {
            "connected": self.connected,
            "disconnected_since": None if since is None else time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "revision": self.mirror.revision,
            "relists": self.relists,
            "reconnects": self.reconnects,
            "skipped_keys": self.mirror.skipped_keys,
            "last_error": self.last_error,
        }

    def run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                if self.mirror.revision == 0:
                    self._relist()
                self._follow()
                backoff = BACKOFF_FIRST
            except EtcdCompacted as err:
                log.warning("etcd compacted past revision %d (%s): listing the prefix again",
                            self.mirror.revision, err)
                try:
                    self._relist()
                except EtcdError as again:
                    self._lost(again)
            except (EtcdUnavailable, EtcdError) as err:
                self._lost(err)
                self._stopping.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            except CacheClosed:
                return  # the daemon is shutting down
            except Exception:  # a bug must not end mirroring silently: log, back off, retry
                log.exception("etcd mirror failed; retrying")
                self._stopping.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def _relist(self) -> None:
        revision, kvs = self.client.range_prefix(self.mirror.prefix)
        self.mirror.relist(revision, kvs)
        self.relists += 1
        log.info("listed %d keys of %r at etcd revision %d", len(kvs), self.mirror.prefix, revision)

    def _follow(self) -> None:
        watch = self.client.watch(self.mirror.prefix, self.mirror.revision + 1,
                                  idle_timeout=self.idle_timeout)
        with self._watch_lock:
            self._watch = watch
        try:
            if self._stopping.is_set():
                return
            if not self.connected:
                if self.disconnected_since is not None:
                    self.reconnects += 1
                log.info("following etcd from revision %d", self.mirror.revision + 1)
            self.connected, self.disconnected_since = True, None
            try:
                for response in watch:
                    self.mirror.apply(response)
                    if self._stopping.is_set():
                        return
            except EtcdTooLarge as err:
                # Resuming would meet the same message again: etcd batches up
                # to 1,000 revisions into one while catching a watch up, so it
                # can outgrow the limit while every revision fits the cache.
                # A listing at the current revision is bounded by the cache.
                log.warning("%s: listing the prefix again instead", err)
            else:
                if not self._stopping.is_set():
                    raise EtcdUnavailable("the watch ended")
                return
        finally:
            with self._watch_lock:
                self._watch = None
            watch.close()
        if not self._stopping.is_set():  # only after a message too large: the watch is closed by now
            self._relist()

    def _lost(self, err: BaseException) -> None:
        if self._stopping.is_set():
            return
        if self.disconnected_since is None:
            self.disconnected_since = time.time()
            log.warning("upstream etcd unavailable: %s", err)
        self.connected = False
        self.last_error = str(err)
