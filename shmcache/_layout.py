"""The segment's byte layout, and one process's mapping of it.

docs/design.md draws the layout; the C struct ``sc_header`` in
native/shmcache.h is its single definition.  This module plans the geometry
of a new segment, validates the geometry of an existing one (a reader trusts
nothing it maps), and maps segments; _entries.py opens and creates their
files, and is the one place that turns OSErrors from opening them into
shmcache errors.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from dataclasses import dataclass
from typing import Any

from ._entries import create_file, open_file, segment_path
from ._native import ffi, lib
from ._owner import ProcessIdentity
from ._trust import TrustedOwners
from .exceptions import CacheCorrupted, CacheNotFound, InvalidName, InvalidSize

__all__ = [
    "HEADER_BYTES",
    "LAYOUT_VERSION",
    "MAGIC",
    "Geometry",
    "Mapping",
    "check_name",
    "creator_of",
    "create_segment",
    "open_segment",
]

MAGIC = int.from_bytes(b"SHMCACHE", "little")
LAYOUT_VERSION = 2
HEADER_BYTES = ffi.sizeof("struct sc_header")
SLOT_BYTES = ffi.sizeof("struct sc_slot")
INDEX_ENTRY_BYTES = ffi.sizeof("struct sc_index_entry")
PAGE = mmap.PAGESIZE

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")

# Bounds on the geometry: far beyond real use, small enough that no sum of
# them overflows 64 bits or the machine's address space.
MAX_CAPACITY = 1 << 26
MAX_ARENA_BYTES = 1 << 40
MAX_KEYS = 1 << 26
MAX_STORE_BYTES = 1 << 40
MIN_ARENA_BYTES = 64
MIN_STORE_BYTES = 256


def check_name(name: object) -> str:
    """Return ``name`` if it can name a cache, else raise InvalidName/TypeError.

    A name is 1-200 characters of ``A-Z a-z 0-9 _ . -``, not starting with
    ``.``, ``_`` or ``-``: it becomes part of file names in /dev/shm.
    """
    if not isinstance(name, str):
        raise TypeError(f"cache name must be str, not {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise InvalidName(
            f"invalid cache name {name!r}: use 1-200 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return name


def creator_of(header: Any) -> ProcessIdentity:
    """The identity of the process that created the segment, as its header
    (a ``struct sc_header`` cdata, or a copy of one) records it."""
    return ProcessIdentity(int(header.creator_pid), int(header.creator_start_ticks),
                           int(header.creator_pidns), int(header.creator_boot))


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """Sizes and offsets of one segment; all in bytes unless named otherwise.

    ``capacity`` ring slots, a ring arena of ``arena_bytes``, a store of at
    most ``max_keys`` keys whose records (24-byte header + key + value,
    padded to 8) add up to at most ``store_bytes``, kept in a heap of
    ``2 * store_bytes`` so the log cleaner always finds room.
    """

    capacity: int
    arena_bytes: int
    max_keys: int
    store_bytes: int
    index_slots: int
    heap_bytes: int
    slots_offset: int
    arena_offset: int
    index_offsets: tuple[int, int]
    heap_offset: int
    total_bytes: int

    @property
    def max_record(self) -> int:
        """The largest store record accepted (half the store budget)."""
        return self.store_bytes // 2 // 8 * 8

    @classmethod
    def plan(cls, capacity: int, arena_bytes: int, max_keys: int, store_bytes: int) -> Geometry:
        """Lay out a new segment; InvalidSize for arguments out of range."""
        for label, value, low, high in (
            ("capacity", capacity, 1, MAX_CAPACITY),
            ("arena_bytes", arena_bytes, MIN_ARENA_BYTES, MAX_ARENA_BYTES),
            ("max_keys", max_keys, 1, MAX_KEYS),
            ("store_bytes", store_bytes, MIN_STORE_BYTES, MAX_STORE_BYTES),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be int, not {type(value).__name__}")
            if not low <= value <= high:
                raise InvalidSize(f"{label}={value} is out of range [{low}, {high}]")
        store_bytes = _align(store_bytes, 8)
        index_slots = max(8, 1 << (2 * max_keys - 1).bit_length())
        slots_offset = HEADER_BYTES
        arena_offset = _align(slots_offset + capacity * SLOT_BYTES, 64)
        index0 = _align(arena_offset + arena_bytes, 64)
        index1 = index0 + index_slots * INDEX_ENTRY_BYTES
        heap_offset = _align(index1 + index_slots * INDEX_ENTRY_BYTES, PAGE)
        heap_bytes = 2 * store_bytes
        total = _align(heap_offset + heap_bytes, PAGE)
        return cls(capacity, arena_bytes, max_keys, store_bytes, index_slots, heap_bytes,
                   slots_offset, arena_offset, (index0, index1), heap_offset, total)

    @classmethod
    def from_header(cls, header: Any, file_bytes: int) -> Geometry:
        """Rebuild the geometry from a mapped header and check that it is the
        one :meth:`plan` would make, fits the file, and overlaps nothing.
        CacheCorrupted otherwise: after this, every offset C computes from
        the geometry stays inside the mapping."""
        if header.magic != MAGIC:
            raise CacheCorrupted(f"bad magic {header.magic:#x}: not a shmcache segment")
        if header.layout_version != LAYOUT_VERSION or header.header_bytes != HEADER_BYTES:
            raise CacheCorrupted(
                f"layout version {header.layout_version} (header {header.header_bytes} bytes); "
                f"this library reads version {LAYOUT_VERSION}"
            )
        try:
            expect = cls.plan(int(header.capacity), int(header.arena_bytes),
                              int(header.max_keys), int(header.store_bytes))
        except (InvalidSize, TypeError) as err:
            raise CacheCorrupted(f"impossible geometry in header: {err}") from err
        seen = (header.index_slots, header.heap_bytes, header.slots_offset, header.arena_offset,
                header.index_offset[0], header.index_offset[1], header.heap_offset,
                header.total_bytes, header.store_bytes)
        planned = (expect.index_slots, expect.heap_bytes, expect.slots_offset,
                   expect.arena_offset, expect.index_offsets[0], expect.index_offsets[1],
                   expect.heap_offset, expect.total_bytes, expect.store_bytes)
        if seen != planned:
            raise CacheCorrupted("header geometry is inconsistent with its own sizes")
        if expect.total_bytes != file_bytes:
            raise CacheCorrupted(
                f"segment is {file_bytes} bytes but its header says {expect.total_bytes}"
            )
        return expect


class Mapping:
    """One process's mapping of a segment: the mmap, the cffi view that keeps
    the buffer export alive, and the ``sc_layout`` handed to C.

    Read-only mappings (readers) use PROT_READ on an O_RDONLY descriptor, so
    the process physically cannot write the cache.
    """

    def __init__(self, fd: int, geometry: Geometry, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self._mm = mmap.mmap(fd, geometry.total_bytes, flags=mmap.MAP_SHARED, prot=prot)
        except OSError as err:
            if err.errno == errno.EINVAL:  # a length the segment cannot have
                raise CacheCorrupted(f"cannot map the segment: {err}") from err
            # out of address space or of mappings (vm.max_map_count): this
            # process's limits, not the cache's fault
            raise OSError(err.errno, f"cannot map the segment's {geometry.total_bytes} bytes: "
                                     f"{err.strerror}") from err
        self.geometry = geometry
        self.writable = writable
        # ffi.cast of a from_buffer result does not keep the export alive:
        # hold this object for as long as the mapping is used.
        self._buf = ffi.from_buffer("uint8_t[]", self._mm)
        self.header: Any = ffi.cast("struct sc_header *", self._buf)
        lay = ffi.new("struct sc_layout *")
        lay.base = self._buf
        lay.total_bytes = geometry.total_bytes
        lay.capacity = geometry.capacity
        lay.arena_bytes = geometry.arena_bytes
        lay.index_slots = geometry.index_slots
        lay.heap_bytes = geometry.heap_bytes
        lay.max_record = geometry.max_record
        lay.slots_offset = geometry.slots_offset
        lay.arena_offset = geometry.arena_offset
        lay.index_offset = list(geometry.index_offsets)
        lay.heap_offset = geometry.heap_offset
        lay.hash_seed = self.header.hash_seed
        self.layout: Any = lay

    def field(self, name: str) -> Any:
        """Address of a 64-bit header field, for the sc_* atomics."""
        return ffi.addressof(self.header[0], name)

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def close(self) -> None:
        """Unmap.  Every cffi pointer into the mapping is dead afterwards."""
        if self._mm.closed:
            return
        # other threads of this process may be inside the mapping (a watch
        # asleep on its futex): stop them and wait until they are out
        lib.sc_detach(self.layout)
        self.header = None
        self.layout = None
        ffi.release(self._buf)
        self._mm.close()


def _allocate(fd: int, name: str, size: int) -> None:
    """Back every page of the new segment now.  A tmpfs file is sparse: were
    its pages left to be allocated on first touch, a full /dev/shm (or a
    memory cgroup at its limit) would strike the writer with SIGBUS in the
    middle of a publish, lock held, instead of failing here, before anything
    is visible."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise
        raise OSError(err.errno, f"cache {name!r}: no room in /dev/shm for its {size} bytes "
                                 f"({err.strerror}); free space or choose a smaller geometry") from err


def open_segment(name: str, *, writable: bool, owners: TrustedOwners) -> Mapping:
    """Map the existing cache ``name``.

    CacheNotFound if it does not exist (or its creator has not finished
    initialising it); CacheNotTrusted if its file is not one of ``owners``'
    that only they may write; CacheCorrupted if it is not a segment this
    library can read safely.
    """
    fd = open_file(segment_path(name), name, writable=writable, owners=owners)
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise CacheCorrupted(f"segment is {size} bytes, shorter than its header")
        with mmap.mmap(fd, HEADER_BYTES, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as hm:
            view = ffi.from_buffer("uint8_t[]", hm)
            try:
                header = ffi.cast("struct sc_header *", view)
                if lib.sc_load_acquire(ffi.addressof(header[0], "magic")) == 0:
                    raise CacheNotFound(f"cache {name!r} is still being created")
                geometry = Geometry.from_header(header, size)
            finally:
                ffi.release(view)
        return Mapping(fd, geometry, writable)
    finally:
        os.close(fd)


def create_segment(name: str, geometry: Geometry, *, mode: int, group: int | None) -> tuple[Mapping, int]:
    """Create cache ``name``'s segment exclusively (FileExistsError if the
    name is taken by this uid, the owner error if by another) with an
    all-zero content, every page allocated; (its mapping, its inode).  The
    caller holds the name lock, initialises the header and store-releases
    ``magic`` last."""
    path = segment_path(name)
    fd = create_file(path, name, mode=mode, group=group, size=0)
    try:
        os.ftruncate(fd, geometry.total_bytes)
        _allocate(fd, name, geometry.total_bytes)
        return Mapping(fd, geometry, writable=True), os.fstat(fd).st_ino
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
