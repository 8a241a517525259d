# Generated from native/shmcache.h by native/gen_native_stub.py: do not edit.
from typing import Any, Final, TypeAlias

# cffi's pointers and structs (ffi.new, ffi.from_buffer, bytes for a const
# uint8_t *): cffi ships no types, so the stub checks names, arity and integers.
CData: TypeAlias = Any

class _Lib:
    SC_ADDED: Final[int]
    SC_MODIFIED: Final[int]
    SC_DELETED: Final[int]
    SC_OK: Final[int]
    SC_NOTFOUND: Final[int]
    SC_RETRY: Final[int]
    SC_NOSPACE: Final[int]
    SC_CORRUPT: Final[int]
    SC_NOMEM: Final[int]
    SC_CLOSED: Final[int]
    SC_MAX_KEY_BYTES: Final[int]
    SC_WAIT_PASSED: Final[int]
    SC_WAIT_CLOSED: Final[int]
    SC_WAIT_TIMEOUT: Final[int]
    SC_WAIT_INTERRUPTED: Final[int]
    SC_RECORD_HEADER_BYTES: Final[int]
    SC_SCAN_ITEM_HEADER_BYTES: Final[int]
    SC_OP_IDLE: Final[int]
    SC_OP_MUTATING: Final[int]
    SC_OP_REPLACING: Final[int]
    SC_OP_BROKEN: Final[int]
    SC_OP_COMMITTING: Final[int]
    SC_FULL_KEYS: Final[int]
    SC_FULL_BYTES: Final[int]
    SC_BAD_RV: Final[int]
    SC_APPLY_RING: Final[int]
    SC_APPLY_STORE_RV: Final[int]
    SC_LOCK_ACQUIRED: Final[int]
    SC_LOCK_REPAIR: Final[int]
    SC_LOCK_TIMEOUT: Final[int]
    SC_LOCK_INTERRUPTED: Final[int]
    SC_LOCK_VOID: Final[int]
    SC_LOCK_ERROR: Final[int]
    def sc_load_acquire(self, addr: CData, /) -> int: ...
    def sc_store_release(self, addr: CData, value: int, /) -> None: ...
    def sc_fetch_add(self, addr: CData, delta: int, /) -> int: ...
    def sc_fence_release(self, /) -> None: ...
    def sc_wait_past(self, L: CData, position: int, last_rv: int, timeout_ns: int, /) -> int: ...
    def sc_wait_change(self, L: CData, seq: int, timeout_ns: int, /) -> int: ...
    def sc_notify(self, L: CData, /) -> None: ...
    def sc_store_lookup(self, L: CData, key: CData, key_len: int, /) -> int: ...
    def sc_record_size(self, key_len: int, value_len: int, /) -> int: ...
    def sc_apply(
        self,
        L: CData,
        type: int,
        key: CData,
        key_len: int,
        value: CData,
        value_len: int,
        rv: int,
        flags: int,
        /,
    ) -> int: ...
    def sc_put(
        self,
        L: CData,
        key: CData,
        key_len: int,
        value: CData,
        value_len: int,
        rv: int,
        max_keys: int,
        store_bytes: int,
        /,
    ) -> int: ...
    def sc_delete(self, L: CData, key: CData, key_len: int, rv: int, /) -> int: ...
    def sc_put_many(
        self,
        L: CData,
        blob: CData,
        blob_len: int,
        ops: CData,
        count: int,
        first_rv: int,
        /,
    ) -> int: ...
    def sc_bookmark(self, L: CData, rv: int, /) -> int: ...
    def sc_batch_check(
        self,
        L: CData,
        blob: CData,
        blob_len: int,
        ops: CData,
        count: int,
        max_keys: int,
        store_bytes: int,
        out_index: CData,
        /,
    ) -> int: ...
    def sc_sem_bytes(self, /) -> int: ...
    def sc_sem_map(self, fd: int, /) -> CData: ...
    def sc_sem_init(self, sem: CData, /) -> int: ...
    def sc_sem_close(self, sem: CData, /) -> None: ...
    def sc_sem_post(self, sem: CData, /) -> int: ...
    def sc_lock_acquire(self, L: CData, S: CData, timeout_ns: int, /) -> int: ...
    def sc_lock_repaired(self, L: CData, S: CData, /) -> None: ...
    def sc_lock_release(self, L: CData, S: CData, /) -> int: ...
    def sc_lock_word(self, L: CData, out: CData, /) -> None: ...
    def sc_lock_take_back(self, L: CData, sem: CData, word0: int, word1: int, /) -> int: ...
    def sc_lock_abandon(self, L: CData, sem: CData, seq: int, /) -> int: ...
    def sc_test_set_claim_pause_fd(self, fd: int, /) -> None: ...
    def sc_stage_begin(self, L: CData, rv: int, /) -> int: ...
    def sc_stage_put(
        self,
        L: CData,
        key: CData,
        key_len: int,
        value: CData,
        value_len: int,
        rv: int,
        /,
    ) -> int: ...
    def sc_stage_abandon(self, L: CData, /) -> None: ...
    def sc_expire_window(self, L: CData, rv: int, /) -> None: ...
    def sc_stage_switch(self, L: CData, /) -> int: ...
    def sc_recount(self, L: CData, /) -> int: ...
    def sc_replay(self, L: CData, /) -> int: ...
    def sc_ring_window(self, L: CData, out: CData, /) -> int: ...
    def sc_ring_find(
        self,
        L: CData,
        start: int,
        end: int,
        since_rv: int,
        out_index: CData,
        out_start: CData,
        /,
    ) -> int: ...
    def sc_ring_copy(
        self,
        L: CData,
        from_: int,
        end: int,
        max_events: int,
        prefix: CData,
        prefix_len: int,
        meta: CData,
        data: CData,
        data_cap: int,
        out: CData,
        /,
    ) -> int: ...
    def sc_store_get(
        self,
        L: CData,
        key: CData,
        key_len: int,
        out: CData,
        out_cap: int,
        out_value_len: CData,
        out_rv: CData,
        out_seen: CData,
        /,
    ) -> int: ...
    def sc_store_scan(
        self,
        L: CData,
        gen: int,
        cursor: CData,
        prefix: CData,
        prefix_len: int,
        out: CData,
        out_cap: int,
        out_used: CData,
        out_count: CData,
        /,
    ) -> int: ...
    def sc_test_set_scan_pause_fd(self, fd: int, /) -> None: ...
    def sc_header_load(self, L: CData, offset: int, out: CData, /) -> int: ...
    def sc_header_copy(self, L: CData, out: CData, /) -> int: ...
    def sc_newest_rv(self, L: CData, out: CData, /) -> int: ...
    def sc_ring_usage(self, L: CData, out: CData, /) -> int: ...
    def sc_detach(self, L: CData, /) -> None: ...

lib: _Lib
ffi: Any
