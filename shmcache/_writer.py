"""The writer side: create or open a cache read-write and change it under the
writers' lock.

Every mutation is validated completely before anything is written (so an
error changes nothing), then applied by ``sc_apply``: ring publication first,
store second, the ring being the store's write-ahead log for crash recovery.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from . import _codec
from ._entries import (
    NameLock,
    create_semaphore,
    open_semaphore,
    owner_error,
    segment_path,
    semaphore_path,
    symlink_error,
    unlink_if,
)
from ._figures import Figures, read_figures
from ._layout import (
    HEADER_BYTES,
    LAYOUT_VERSION,
    MAGIC,
    Geometry,
    Mapping,
    check_name,
    create_segment,
    creator_of,
    open_segment,
)
from ._lock import WriterLock
from ._native import ffi, lib
from ._owner import Liveness, ProcessIdentity, judge, me
from ._rules import (
    DEFAULT_ARENA_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_KEYS,
    DEFAULT_STORE_BYTES,
    MAX_RV,
    ValueLike,
    as_bytes,
    check_rv,
    check_value_size,
    encode_key,
    record_size,
)
from ._trust import OwnerSpec, TrustedOwners, check_cache_mode, trusted_owners
from .exceptions import (
    CacheClosed,
    CacheCorrupted,
    CacheExists,
    CacheFull,
    CacheNotFound,
    CacheNotTrusted,
    InvalidKey,
    InvalidResourceVersion,
    InvalidSize,
)

__all__ = ["Writer"]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Writer:
    """Writes one cache.  Several writers, in several processes, may write the
    same cache; each mutation happens under the cache's named semaphore.

    ``create=True`` creates the segment (sizes fixed for its lifetime:
    ``capacity`` ring events, ``arena_bytes`` of ring payload, ``max_keys``
    keys whose store records total at most ``store_bytes``) and its
    semaphore, with permission bits ``mode`` (no write bit for group or
    others: readers refuse such a cache) and group ``group`` (a gid; default
    the process's), and makes this writer their *creator*, the only one that
    unlinks them.  If the name exists and its creator is alive →
    CacheExists; if the creator is dead, the stale segment is closed (its
    readers get CacheClosed) and replaced; if another user holds the name →
    CacheNotTrusted naming that user.  ``create=False`` opens an existing
    cache read-write (CacheNotFound if none; CacheNotTrusted unless its
    segment and semaphore belong to a trusted owner, see _trust.py and
    ``owner``).  ``lock_timeout`` (seconds) bounds the wait for a live holder
    of the lock (LockTimeout).  A Writer is safe to share between threads.

    ``adopt=True`` (with ``create=True``): a dead creator's segment of this
    uid, this layout version and exactly the geometry asked for is not
    replaced but *adopted* — same epoch, same resource versions, every item
    kept; its readers go on without noticing.  This writer records itself as
    the creator; a lock the dead process held is recovered, and a change it
    left half-done repaired, by the first operation, as for any writer.
    ``adopted_from`` is then the dead creator's identity (else None).  Any
    other segment is replaced as without ``adopt``.
    """

    def __init__(
        self,
        name: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        arena_bytes: int = DEFAULT_ARENA_BYTES,
        max_keys: int = DEFAULT_MAX_KEYS,
        store_bytes: int = DEFAULT_STORE_BYTES,
        create: bool = True,
        mode: int = 0o640,
        group: int | None = None,
        owner: OwnerSpec | None = None,
        lock_timeout: float = 5.0,
        adopt: bool = False,
    ) -> None:
        self.name = check_name(name)
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)):
            raise TypeError("lock_timeout must be a number of seconds")
        if not 0 < lock_timeout < 1e9:
            raise InvalidSize(f"lock_timeout={lock_timeout} must be > 0 seconds")
        check_cache_mode(mode)
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
            raise TypeError(f"group must be a gid (int >= 0) or None, not {group!r}")
        owners = trusted_owners(owner)
        self._thread_lock = threading.Lock()
        self._closed = False
        self._lock_timeout = float(lock_timeout)
        self.is_creator = create
        #: the dead creator whose segment this writer adopted (``adopt=True``), or None
        self.adopted_from: ProcessIdentity | None = None
        #: the inodes of the segment and semaphore this writer created (None: not the creator)
        self._inodes: tuple[int, int] | None = None
        if create:
            geometry = Geometry.plan(capacity, arena_bytes, max_keys, store_bytes)
            self._map, self._inodes, sem = self._create(geometry, mode, group, adopt)
        else:
            self._map = open_segment(self.name, writable=True, owners=owners)
            try:
                sem = open_semaphore(self.name, owners)
            except BaseException:
                self._map.close()
                raise
        self._lock = WriterLock(self._map, sem, self._lock_timeout)
        self.geometry = self._map.geometry
        self._arena_bytes = self.geometry.arena_bytes
        self._max_record = self.geometry.max_record
        self._h: Any = self._map.header
        self._layout: Any = self._map.layout
        self._rv_p: Any = self._map.field("rv")
        self._lock_state: Any = self._lock.state

    # ---- creation ------------------------------------------------------

    def _create(self, geometry: Geometry, mode: int, group: int | None,
                adopt: bool) -> tuple[Mapping, tuple[int, int], Any]:
        """Under the name lock: adopt a dead creator's segment (``adopt``), or
        retire a dead creator's entries, then create the semaphore, then the
        segment (each 0600, then ``group``, then ``mode``), the header's
        magic last.  (mapping, inodes, semaphore)."""
        lock = NameLock(self.name, self._lock_timeout)
        done = False
        try:
            adoptable = _retire_stale(self.name, geometry if adopt else None)
            if adoptable is not None:
                mapping, seg_inode, self.adopted_from = adoptable
                try:
                    sem, sem_inode = _adopt_semaphore(self.name, mode, group)
                except BaseException:
                    mapping.close()
                    raise
                _record_creator(mapping)
                done = True
                return mapping, (seg_inode, sem_inode), sem
            sem, sem_inode = create_semaphore(self.name, mode=mode, group=group)
            try:
                mapping, seg_inode = create_segment(self.name, geometry, mode=mode, group=group)
                try:
                    _init_header(mapping, geometry)
                except BaseException:
                    mapping.close()
                    unlink_if(segment_path(self.name), seg_inode)
                    raise
            except BaseException:
                lib.sc_sem_close(sem)
                unlink_if(semaphore_path(self.name), sem_inode)
                raise
            done = True
        finally:
            # a failed creation leaves no name lock behind where no cache is
            lock.release(remove=not done and not os.path.lexists(segment_path(self.name)))
        return mapping, (seg_inode, sem_inode), sem

    # ---- properties ----------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest published resource version (0 for a new cache)."""
        self._check_open()
        return int(lib.sc_load_acquire(self._rv_p))

    @property
    def closed(self) -> bool:
        return self._closed

    def figures(self) -> Figures:
        """The cache's figures now, read as a reader reads them: without the
        writers' lock (see Figures for what is consistent).  CacheClosed once
        this writer is closed, or the cache was closed by its owner."""
        self._check_open()
        return read_figures(self.name, self._layout, self.geometry, self._owner_closed)

    def _owner_closed(self) -> CacheClosed:
        if self._closed:  # closed by another thread meanwhile
            return CacheClosed(f"writer of {self.name!r} is closed")
        return CacheClosed(f"cache {self.name!r} was closed by its owner")

    # ---- mutations -----------------------------------------------------

    def put(self, key: str, value: ValueLike, *, rv: int | None = None) -> int:
        """Set ``key`` to ``value``: an ADDED event if the key was absent,
        MODIFIED otherwise.  Returns the event's resource version."""
        raw = encode_key(key)
        data = self._check_value(raw, as_bytes(value))
        want = check_rv(rv)
        g = self.geometry
        with self._thread_lock:
            try:
                self._begin()
                result = lib.sc_put(self._layout, raw, len(raw), data, len(data), want,
                                    g.max_keys, g.store_bytes)
            finally:
                lib.sc_lock_release(self._layout, self._lock_state)  # C directly: see _begin
        return self._result(result, key, rv)

    def delete(self, key: str, *, rv: int | None = None) -> int:
        """Remove ``key`` (KeyError if absent): a DELETED event carrying the
        last value.  Returns the event's resource version."""
        raw = encode_key(key)
        want = check_rv(rv)
        with self._thread_lock:
            try:
                self._begin()
                result = lib.sc_delete(self._layout, raw, len(raw), want)
            finally:
                lib.sc_lock_release(self._layout, self._lock_state)  # C directly: see _begin
        return self._result(result, key, rv)

    def put_many(self, items: Iterable[tuple[str, ValueLike | None]], *, rv: int | None = None) -> int:
        """Apply ``(key, value)`` pairs in order under one lock hold, ``None``
        meaning delete; each gets its own resource version, consecutive from
        ``rv`` if given (it must exceed the current one), else from the
        current + 1 (readers may see a prefix of the batch).  The whole batch
        is validated first: on any error nothing is changed.  Returns the
        last resource version (the current one for an empty batch)."""
        want = check_rv(rv)
        seq = items if isinstance(items, (list, tuple)) else list(items)
        encoded = _codec.encode_batch(seq, self._arena_bytes, self._max_record)
        if isinstance(encoded, int):
            # something the C fast path does not take (a bytearray value, or an
            # error): the reference path accepts it or raises the precise error
            encoded = self._encode_batch(seq)
        blob, ops = encoded
        count = len(ops) // 16  # struct sc_batch_op
        if not count:
            return self.resource_version
        ops_c = ffi.from_buffer("struct sc_batch_op[]", ops)
        failed = ffi.new("uint32_t *")
        g = self.geometry
        with self._thread_lock:
            try:
                self._begin()
                first = self._next_rv(want or None)
                if first + count - 1 > MAX_RV:
                    raise InvalidResourceVersion(
                        f"a batch of {count} events would pass the last resource version {MAX_RV}")
                rc = lib.sc_batch_check(self._layout, blob, len(blob), ops_c, count, g.max_keys,
                                        g.store_bytes, failed)
                if rc != lib.SC_OK:
                    raise self._batch_error(rc, seq[failed[0]][0] if failed[0] < len(seq) else "")
                result = lib.sc_put_many(self._layout, blob, len(blob), ops_c, count, first)
            finally:
                lib.sc_lock_release(self._layout, self._lock_state)  # C directly: see _begin
        return self._result(result, "", None)

    def _encode_batch(self, items: Sequence[object]) -> tuple[bytes, bytes]:
        """The reference of _codec.encode_batch: (blob, ops) of valid items,
        or the error of the first invalid one."""
        parts: list[bytes] = []
        ops = array.array("I")
        for item in items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"put_many items are (key, value) pairs, not {item!r:.60}")
            key, value = item
            raw = encode_key(key)
            parts.append(raw)
            if value is None:
                ops.extend((len(raw), 0, 1, 0))
            else:
                data = self._check_value(raw, as_bytes(value))
                parts.append(data)
                ops.extend((len(raw), len(data), 0, 0))
        return b"".join(parts), ops.tobytes()

    def _batch_error(self, rc: int, key: str) -> Exception:
        g = self.geometry
        if rc == lib.SC_NOTFOUND:
            return KeyError(key)
        if rc == lib.SC_FULL_KEYS:
            return CacheFull(f"the store holds at most {g.max_keys} keys (adding {key!r})")
        if rc == lib.SC_FULL_BYTES:
            return CacheFull(f"the store holds at most {g.store_bytes} record bytes (putting {key!r})")
        if rc == lib.SC_NOMEM:
            return MemoryError("no scratch memory to check a put_many batch")
        return CacheCorrupted(f"cache {self.name!r}: a put_many batch failed its check (code {rc})")

    def has(self, key: str) -> bool:
        """Whether the store holds ``key`` now, as this writer sees it
        (another writer may change that at any moment)."""
        raw = encode_key(key)
        with self._thread_lock:
            try:
                self._begin()  # the writer-side lookup reads the store as only a holder may
                found = lib.sc_store_lookup(self._layout, raw, len(raw)) >= 0
            finally:
                lib.sc_lock_release(self._layout, self._lock_state)  # C directly: see _begin
        return bool(found)

    def bookmark(self, rv: int) -> int:
        """Advance the cache's resource version to ``rv`` without an event:
        nothing changed between the newest event and ``rv`` (an upstream's
        progress notification).  list() is then a snapshot at ``rv``, and
        watches may resume from it.  InvalidResourceVersion unless ``rv`` is
        greater than the current resource version.  Returns ``rv``."""
        if check_rv(rv) == 0:
            raise InvalidResourceVersion("bookmark needs an explicit rv")
        with self._thread_lock:
            try:
                self._begin()
                result = lib.sc_bookmark(self._layout, rv)
            finally:
                lib.sc_lock_release(self._layout, self._lock_state)  # C directly: see _begin
        return self._result(result, "", rv)

    def replace(self, items: Iterable[tuple[str, ValueLike] | tuple[str, ValueLike, int]], *, rv: int) -> int:
        """Make the store exactly ``items`` at resource version ``rv`` (a
        relist, as Kubernetes' Replace) and empty the ring's window: readers
        of the old window get ResourceExpired at their next refill.  Items
        are ``(key, value)``, the item's RV then being ``rv``, or ``(key,
        value, item_rv)`` with 1 <= item_rv <= rv (the RV that last changed
        it upstream, as etcd's mod_revision).  Keys must be unique.  Returns
        ``rv``.

        Atomic for readers and across a crash: the new state is built beside
        the old one, which readers keep seeing until one switch; a writer
        that dies before the new state is complete leaves the old store as it
        was, one that dies after has its replace finished by the next
        writer (docs/design.md, "replace()")."""
        if rv is None:
            raise TypeError("replace() needs an explicit rv")
        want = check_rv(rv)
        batch: dict[bytes, tuple[bytes, int]] = {}
        need_bytes = 0
        for item in items:
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise TypeError(f"replace items are (key, value[, rv]) tuples, not {item!r:.60}")
            key, value = item[0], item[1]
            item_rv = want if len(item) == 2 else check_rv(item[2])
            if not 1 <= item_rv <= want:
                raise InvalidResourceVersion(f"item {key!r}: rv {item_rv} must be in [1, {rv}]")
            raw = encode_key(key)
            if raw in batch:
                raise InvalidKey(f"duplicate key {key!r} in replace()")
            data = self._check_value(raw, as_bytes(value))
            batch[raw] = (data, item_rv)
            need_bytes += record_size(len(raw), len(data))
        g = self.geometry
        if len(batch) > g.max_keys or need_bytes > g.store_bytes:
            raise CacheFull(
                f"replace() needs {len(batch)} keys / {need_bytes} record bytes; "
                f"the store holds {g.max_keys} keys / {g.store_bytes} bytes"
            )
        with self._thread_lock:
            try:
                self._begin()
                new_rv = self._next_rv(rv)
                self._stage(batch, new_rv)
                self._commit_replace()
            finally:
                lib.sc_lock_release(self._layout, self._lock_state)  # C directly: see _begin
        return new_rv

    def _stage(self, batch: dict[bytes, tuple[bytes, int]], rv: int) -> None:
        """Build the new state in the inactive table (op_state REPLACING:
        abandoned if the holder dies); then mark it complete (COMMITTING)."""
        self._check_rc(lib.sc_stage_begin(self._layout, rv), "staging a replace()")
        for raw, (data, item_rv) in batch.items():
            self._check_rc(lib.sc_stage_put(self._layout, raw, len(raw), data, len(data), item_rv),
                           "staging a replace()")
        lib.sc_store_release(self._map.field("op_state"), lib.SC_OP_COMMITTING)

    def _commit_replace(self) -> None:
        """Publish a fully staged replace at rv = op_arg; idempotent, so a
        holder recovering from a crash anywhere in it can run it again.
        Order matters for list() (docs/design.md, "replace()"): the window
        is expired and rv published before the table switch, store_rv last."""
        rv = int(self._h.op_arg)
        self._expire_window(rv)
        lib.sc_store_release(self._rv_p, rv)
        self._check_rc(lib.sc_stage_switch(self._layout), "committing a replace()")
        lib.sc_store_release(self._map.field("store_rv"), rv)
        self._h.op_state = lib.SC_OP_MUTATING  # done: the release marks it idle

    def _check_rc(self, rc: int, doing: str) -> None:
        if rc != lib.SC_OK:
            raise CacheCorrupted(f"cache {self.name!r}: the store's accounting is corrupt {doing} (code {rc})")

    # ---- for the owning daemon -----------------------------------------

    def heartbeat(self) -> None:
        """Record "the owner is alive now" (ms since the epoch) in the header,
        for readers and ``shmcache status``."""
        self._check_open()
        lib.sc_store_release(self._map.field("heartbeat_ms"), _now_ms())

    def advertise_socket(self, path: str) -> None:
        """Record the producer socket's path in the header, so that clients
        given only the cache's name find it (at most 255 UTF-8 bytes)."""
        self._check_open()
        raw = path.encode()
        if len(raw) > 255:
            raise InvalidSize(f"socket path is {len(raw)} bytes; at most 255 fit the header")
        ffi.memmove(self._h.socket_path, raw + b"\0" * (256 - len(raw)), 256)

    # ---- lifecycle -----------------------------------------------------

    def close(self, *, unlink: bool | None = None) -> None:
        """Detach.  The creator (by default) also closes the cache for its
        readers (they get CacheClosed) and unlinks the segment and the
        semaphore — only if the name still names its own segment."""
        with self._thread_lock:
            if self._closed:
                return
            self._closed = True
            if unlink is None:
                unlink = self.is_creator
            if unlink:
                self._h.closed = 1
                lib.sc_notify(self._layout)
                if self._inodes is not None:
                    self._remove_entries(*self._inodes)
            self._lock.close()
            self._map.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"rv={self.resource_version}"
        return f"<shmcache.Writer {self.name!r} {state}>"

    # ---- internals -----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosed(f"writer of {self.name!r} is closed")

    def _remove_entries(self, segment_inode: int, semaphore_inode: int) -> None:
        """Unlink the segment and semaphore this writer created, if the name
        still names them (a creator that judged us dead may have replaced
        them), under the name lock; then the name lock file, if no segment
        is left.  Without the name lock within the lock timeout, nothing is
        removed: the next creator retires what is left."""
        try:
            lock = NameLock(self.name, self._lock_timeout)
        except (CacheExists, CacheNotTrusted, OSError):
            return
        try:
            unlink_if(segment_path(self.name), segment_inode)
            unlink_if(semaphore_path(self.name), semaphore_inode)
        finally:
            lock.release(remove=not os.path.lexists(segment_path(self.name)))

    def _check_value(self, raw: bytes, data: bytes) -> bytes:
        check_value_size(raw, data, self._arena_bytes, self._max_record)
        return data

    def _begin(self) -> None:
        """Take the writers' lock (the caller holds the thread lock, and
        calls ``sc_lock_release`` in a ``finally`` around this and the
        change: the lock knows in C memory whether it is held, and a direct
        C call is where CPython cannot raise a signal handler's exception
        before the callee runs — a Python function's entry is) and repair
        what a dead holder left half-done.  A repair that fails or is
        interrupted leaves op_state not idle (BROKEN, or the replace still
        to finish), so the next holder repairs again."""
        self._check_open()
        if self._h.closed:
            raise CacheClosed(f"cache {self.name!r} was closed by its owner")
        if self._lock.acquire():
            self._repair()
            self._lock.repaired()

    def _result(self, result: int, key: str, rv: int | None) -> int:
        if result > 0:
            return result
        code = -result
        g = self.geometry
        if code == lib.SC_NOTFOUND:
            raise KeyError(key)
        if code == lib.SC_BAD_RV:
            if rv is None:
                raise InvalidResourceVersion(f"resource versions are exhausted (the last is {MAX_RV})")
            raise InvalidResourceVersion(
                f"rv {rv} must be greater than the current resource version {self.resource_version}"
            )
        if code == lib.SC_FULL_KEYS:
            raise CacheFull(f"the store holds at most {g.max_keys} keys")
        if code == lib.SC_FULL_BYTES:
            raise CacheFull(f"the store holds at most {g.store_bytes} record bytes")
        raise CacheCorrupted(f"cache {self.name!r}: the store rejected a validated change (code {code})")

    def _next_rv(self, rv: int | None) -> int:
        """The rv of the next event (the lock is held)."""
        current = int(self._h.rv)
        wanted = check_rv(rv)
        if not wanted:
            if current >= MAX_RV:
                raise InvalidResourceVersion(f"resource versions are exhausted (the last is {MAX_RV})")
            return current + 1
        if wanted <= current:
            raise InvalidResourceVersion(
                f"rv {rv} must be greater than the current resource version {current}")
        return wanted

    def _expire_window(self, rv: int) -> None:
        lib.sc_expire_window(self._layout, rv)

    def _repair(self) -> None:
        """Finish or roll back what a dead lock holder (or an exception in
        replace()) left half-done."""
        h = self._h
        if h.op_state == lib.SC_OP_REPLACING:  # the old store stands
            lib.sc_stage_abandon(self._layout)
        elif h.op_state == lib.SC_OP_COMMITTING:  # the new one is complete
            self._commit_replace()
        else:
            rc = lib.sc_recount(self._layout)
            if rc == lib.SC_OK:
                rc = lib.sc_replay(self._layout)
            if rc != lib.SC_OK:
                raise CacheCorrupted(f"cache {self.name!r} cannot be repaired (code {rc})")


# ---- creation helpers ------------------------------------------------------


def _record_creator(mapping: Mapping) -> None:
    """Make this process the segment's recorded creator (at creation, and
    when adopting: readers read these fields only to tell whether the owner
    lives, so a reader that sees old and new fields mixed for an instant
    judges a dead or a live process, never a torn value)."""
    h: Any = mapping.header
    ident = me()
    h.creator_pid = ident.pid
    h.creator_start_ticks = ident.start_ticks
    h.creator_pidns = ident.pidns
    h.creator_boot = ident.boot


def _init_header(mapping: Mapping, g: Geometry) -> None:
    h: Any = mapping.header
    _record_creator(mapping)
    h.layout_version = LAYOUT_VERSION
    h.header_bytes = ffi.sizeof("struct sc_header")
    h.total_bytes = g.total_bytes
    h.epoch = secrets.randbits(64) | 1
    h.capacity = g.capacity
    h.arena_bytes = g.arena_bytes
    h.max_keys = g.max_keys
    h.store_bytes = g.store_bytes
    h.index_slots = g.index_slots
    h.heap_bytes = g.heap_bytes
    h.slots_offset = g.slots_offset
    h.arena_offset = g.arena_offset
    h.index_offset = list(g.index_offsets)
    h.heap_offset = g.heap_offset
    h.hash_seed = secrets.randbits(64)
    h.created_ms = _now_ms()
    mapping.layout.hash_seed = h.hash_seed
    lib.sc_store_release(mapping.field("magic"), MAGIC)


def _retire_stale(name: str, adopt: Geometry | None) -> tuple[Mapping, int, ProcessIdentity] | None:
    """Under the name lock, clear the way for a new segment of ``name``:
    CacheExists if a live creator owns the one there; the owner error if
    another user's entry is there; with ``adopt``, a dead creator's segment
    of exactly that geometry is returned mapped read-write, with its inode
    and that creator, for the caller to adopt; else close the stale segment
    (its readers get CacheClosed) and unlink it and any semaphore left."""
    path = segment_path(name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise symlink_error(path, name) from err
        if err.errno in (errno.EACCES, errno.EPERM):
            raise owner_error(path, name) from err
        raise
    if fd >= 0:
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
                raise owner_error(path, name)
            creator = _read_creator(fd, path)
            verdict = judge(creator)
            if verdict is not Liveness.DEAD:
                where = " (in another PID namespace)" if verdict is Liveness.UNKNOWABLE else ""
                raise CacheExists(f"cache {name!r} is owned by live pid {creator.pid}{where}")
            mapping = _adoptable(fd, adopt) if adopt is not None else None
            if mapping is not None:
                return mapping, st.st_ino, creator
            _close_segment(fd)
            unlink_if(path, st.st_ino)
        finally:
            os.close(fd)
    sem = semaphore_path(name)
    try:
        if os.lstat(sem).st_uid != os.geteuid():
            raise owner_error(sem, name)
        os.unlink(sem)  # the dead creator's, or left by one that died before its segment
    except FileNotFoundError:
        pass
    return None


def _adoptable(fd: int, geometry: Geometry) -> Mapping | None:
    """The segment of ``fd`` mapped read-write if a new writer can take it
    over as it is: initialised, not closed, this layout version and exactly
    ``geometry``; else None (it is replaced)."""
    size = os.fstat(fd).st_size
    if size < HEADER_BYTES:
        return None
    with mmap.mmap(fd, HEADER_BYTES, prot=mmap.PROT_READ) as mm:
        view = ffi.from_buffer("uint8_t[]", mm)
        try:
            h: Any = ffi.cast("struct sc_header *", view)
            if lib.sc_load_acquire(ffi.addressof(h[0], "magic")) != MAGIC or h.closed:
                return None
            try:
                found = Geometry.from_header(h, size)
            except CacheCorrupted:
                return None
        finally:
            ffi.release(view)
    return Mapping(fd, geometry, writable=True) if found == geometry else None


def _adopt_semaphore(name: str, mode: int, group: int | None) -> tuple[Any, int]:
    """The adopted segment's semaphore, mapped, and its inode (the caller
    holds the name lock: the path stays this file); a new one if it is gone."""
    try:
        sem = open_semaphore(name, TrustedOwners(frozenset({os.geteuid()})))
    except CacheNotFound:
        return create_semaphore(name, mode=mode, group=group)
    try:
        return sem, os.lstat(semaphore_path(name)).st_ino
    except BaseException:
        lib.sc_sem_close(sem)
        raise


def _read_creator(fd: int, path: str) -> ProcessIdentity:
    """The creator recorded in the segment's header.  The caller holds the
    name lock, which its creator held until the header was complete: a
    segment without a creator was left by one that died before writing it."""
    if os.fstat(fd).st_size >= ffi.sizeof("struct sc_header"):
        with mmap.mmap(fd, ffi.sizeof("struct sc_header"), prot=mmap.PROT_READ) as mm:
            view = ffi.from_buffer("uint8_t[]", mm)
            h: Any = ffi.cast("struct sc_header *", view)
            magic = lib.sc_load_acquire(ffi.addressof(h[0], "magic"))
            ident = creator_of(h)
            ffi.release(view)
        if magic not in (0, MAGIC):
            raise CacheCorrupted(f"{path} is not a shmcache segment; remove it by hand")
        if ident.pid:
            return ident
    return ProcessIdentity(0, 0, me().pidns, me().boot)


def _close_segment(fd: int) -> None:
    """Set the stale segment's closed flag and wake its readers."""
    size = os.fstat(fd).st_size
    if size < ffi.sizeof("struct sc_header"):
        return
    with mmap.mmap(fd, ffi.sizeof("struct sc_header")) as mm:
        view = ffi.from_buffer("uint8_t[]", mm)
        h: Any = ffi.cast("struct sc_header *", view)
        h.closed = 1
        lay = ffi.new("struct sc_layout *")
        lay.base = view
        lib.sc_notify(lay)
        ffi.release(view)
