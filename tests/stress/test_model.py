"""Model-based test: one Writer with a tiny ring against a pure-Python model
of the Kubernetes watch-cache semantics.

The model keeps the store (key -> (value, rv)), the ring's window (the newest
events that fit both ``capacity`` slots and ``arena_bytes`` of key + value
bytes, emptied by ``replace``), and what ``oldest_resource_version`` must be.
After every step a Reader must agree with it on ``get`` of every key,
``list`` with and without prefix, both resource versions, and
``interval(since)`` for every ``since`` from 0 to the current rv + 1 (drained
through a buffer of 1-3 events so that refills happen), including the exact
``ResourceExpired`` condition and message.

``SHMCACHE_STRESS=soak`` runs many more and longer examples.  The machine
runs inside one test, which reports how many examples and steps it ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shmcache import (
    CacheFull,
    Event,
    EventType,
    InvalidKey,
    InvalidResourceVersion,
    Item,
    Reader,
    ResourceExpired,
    ResourceVersionTooLarge,
    Snapshot,
    ValueTooLarge,
    Writer,
)

from .._report import Report
from ..support import leftovers, remove_cache, scaled, unique_name

# A small alphabet so that keys repeat; more keys than max_keys so the store fills.
KEYS = ("a", "a/1", "a/2", "ab", "b", "b/1", "c/é", "c/x", "d", "e")
PREFIXES = ("", "a", "a/", "b", "c/", "z")
MAX_RV = (1 << 63) - 1
BAD_KEYS = ("", "k" * 1025, "é" * 513, "\udc80")  # empty, too long, too long in UTF-8, not UTF-8

keys = st.sampled_from(KEYS)
small_values = st.binary(max_size=64)
big_values = st.binary(min_size=100, max_size=600)
values = st.one_of(small_values, small_values, big_values)


def record_size(key: str, value: bytes) -> int:
    """Bytes a store record takes: 24-byte header, key, value, padded to 8."""
    return (24 + len(key.encode()) + len(value) + 7) & ~7


class Rejected(Exception):
    """The model's verdict: the call must fail with one of ``allowed`` and change nothing."""

    def __init__(self, *allowed: type[BaseException]) -> None:
        super().__init__(allowed)
        self.allowed = allowed


@dataclass
class Model:
    """The Kubernetes watch cache semantics, in plain Python."""

    capacity: int
    arena_bytes: int
    max_keys: int
    store_bytes: int
    store: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    rv: int = 0
    window: list[Event] = field(default_factory=list)
    replace_rv: int = 0
    evicted_since_replace: bool = False

    @property
    def max_record(self) -> int:
        return self.store_bytes // 2 // 8 * 8

    @property
    def oldest(self) -> int:
        if self.replace_rv and not self.evicted_since_replace:
            return self.replace_rv + 1
        if self.window:
            return self.window[0].rv
        return 0

    def live_bytes(self) -> int:
        return sum(record_size(k, v) for k, (v, _) in self.store.items())

    def too_large(self, key: str, value: bytes) -> bool:
        return (len(key.encode()) + len(value) > self.arena_bytes
                or record_size(key, value) > self.max_record)

    def bad_rv(self, rv: int | None) -> bool:
        return rv is not None and not self.rv < rv <= MAX_RV

    def full_after_put(self, store_keys: set[str], live_bytes: int, key: str, value: bytes,
                       old: bytes | None) -> bool:
        keys_after = len(store_keys) + (old is None)
        bytes_after = live_bytes - (0 if old is None else record_size(key, old)) + record_size(key, value)
        return keys_after > self.max_keys or bytes_after > self.store_bytes

    # ---- changes: validate completely, then apply ----------------------

    def _publish(self, event_type: EventType, key: str, value: bytes, rv: int) -> None:
        self.window.append(Event(event_type, key, value, rv))
        self.rv = rv
        evicted = False
        while len(self.window) > self.capacity:
            self.window.pop(0)
            evicted = True
        while len(self.window) > 1 and sum(len(e.key.encode()) + len(e.value)
                                           for e in self.window) > self.arena_bytes:
            self.window.pop(0)
            evicted = True
        if evicted:
            self.evicted_since_replace = True

    def _apply(self, key: str, value: bytes | None, rv: int) -> None:
        if value is None:
            old, _ = self.store.pop(key)
            self._publish(EventType.DELETED, key, old, rv)
        else:
            kind = EventType.MODIFIED if key in self.store else EventType.ADDED
            self.store[key] = (value, rv)
            self._publish(kind, key, value, rv)

    def put(self, key: str, value: bytes, rv: int | None = None) -> int:
        errors: list[type[BaseException]] = []
        if self.too_large(key, value):
            errors.append(ValueTooLarge)
        if self.bad_rv(rv):
            errors.append(InvalidResourceVersion)
        old = self.store.get(key)
        if self.full_after_put(set(self.store), self.live_bytes(), key, value,
                               None if old is None else old[0]):
            errors.append(CacheFull)
        if errors:
            raise Rejected(*errors)
        new_rv = self.rv + 1 if rv is None else rv
        self._apply(key, value, new_rv)
        return new_rv

    def delete(self, key: str, rv: int | None = None) -> int:
        errors: list[type[BaseException]] = []
        if self.bad_rv(rv):
            errors.append(InvalidResourceVersion)
        if key not in self.store:
            errors.append(KeyError)
        if errors:
            raise Rejected(*errors)
        new_rv = self.rv + 1 if rv is None else rv
        self._apply(key, None, new_rv)
        return new_rv

    def put_many(self, items: list[tuple[str, bytes | None]]) -> int:
        errors: list[type[BaseException]] = []
        if any(v is not None and self.too_large(k, v) for k, v in items):
            errors.append(ValueTooLarge)
        # the first step that fails, with every earlier step applied
        state = {k: v for k, (v, _) in self.store.items()}
        for key, value in items:
            if value is None:
                if key not in state:
                    errors.append(KeyError)
                    break
                del state[key]
                continue
            live = sum(record_size(k, v) for k, v in state.items())
            if self.full_after_put(set(state), live, key, value, state.get(key)):
                errors.append(CacheFull)
                break
            state[key] = value
        if errors:
            raise Rejected(*errors)
        for key, value in items:
            self._apply(key, value, self.rv + 1)
        return self.rv

    def replace(self, items: list[tuple[str, bytes]], rv: int) -> int:
        errors: list[type[BaseException]] = []
        if len({k for k, _ in items}) != len(items):
            errors.append(InvalidKey)
        if any(self.too_large(k, v) for k, v in items):
            errors.append(ValueTooLarge)
        if len(items) > self.max_keys or sum(record_size(k, v) for k, v in items) > self.store_bytes:
            errors.append(CacheFull)
        if self.bad_rv(rv):
            errors.append(InvalidResourceVersion)
        if errors:
            raise Rejected(*errors)
        self.store = {k: (v, rv) for k, v in items}
        self.rv = rv
        self.window = []
        self.replace_rv = rv
        self.evicted_since_replace = False
        return rv

    # ---- reads ---------------------------------------------------------

    def items(self, prefix: str = "") -> list[Item]:
        return sorted(Item(k, v, rv) for k, (v, rv) in self.store.items() if k.startswith(prefix))

    def interval(self, since: int, prefix: str = "") -> list[Event]:
        """The events interval(since) serves; Rejected(ResourceExpired) when
        too old, Rejected(ResourceVersionTooLarge) when not reached yet."""
        if since == 0:
            return [Event(EventType.ADDED, i.key, i.value, self.rv) for i in self.items(prefix)]
        if since > self.rv:
            raise Rejected(ResourceVersionTooLarge)
        oldest = self.oldest
        if oldest and since < oldest - 1:
            raise Rejected(ResourceExpired)
        return [e for e in self.window if e.rv > since and e.key.startswith(prefix)]

    def interval_start_candidates(self) -> list[int]:
        """since_rv values >= 1 for which interval(since) is valid and serves
        at least two events (all of the window from some event on)."""
        out = []
        for j in range(len(self.window) - 1):
            since = self.window[j - 1].rv if j else self.window[0].rv - 1
            if since >= 1 and not (self.oldest and since < self.oldest - 1):
                out.append(since)
        return out


class WatchCacheMachine(RuleBasedStateMachine):
    """Drives one Writer and checks one Reader against the Model.  The
    class-level counters add up what the runs of this process did."""

    examples = 0  # machines built: one per example Hypothesis runs
    steps = 0  # rules run (the initialize rule included), each followed by the invariants
    applied = 0  # changes the model accepted and the writer applied alike
    rejected = 0  # changes the model refused and the writer refused alike

    def __init__(self) -> None:
        super().__init__()
        WatchCacheMachine.examples += 1
        self.name = unique_name("model")
        self.writer: Writer | None = None
        self.reader: Reader | None = None
        self.model = Model(3, 512, 8, 4096)

    # ---- setup ---------------------------------------------------------

    @initialize(capacity=st.integers(3, 6), arena_bytes=st.sampled_from((256, 512)),
                max_keys=st.sampled_from((6, 8)), store_bytes=st.sampled_from((1024, 4096)))
    def create(self, capacity: int, arena_bytes: int, max_keys: int, store_bytes: int) -> None:
        self.model = Model(capacity, arena_bytes, max_keys, store_bytes)
        self.writer = Writer(self.name, capacity=capacity, arena_bytes=arena_bytes,
                             max_keys=max_keys, store_bytes=store_bytes)
        self.reader = Reader(self.name)

    def teardown(self) -> None:
        try:
            if self.reader is not None:
                self.reader.close()
            if self.writer is not None:
                self.writer.close()  # the creator unlinks
        finally:
            remove_cache(self.name)
        assert not leftovers(self.name), f"left in /dev/shm: {leftovers(self.name)}"

    @property
    def w(self) -> Writer:
        assert self.writer is not None
        return self.writer

    @property
    def r(self) -> Reader:
        assert self.reader is not None
        return self.reader

    def expect(self, model_call: object, writer_call: object) -> None:
        """Run the model's verdict and the writer's call and compare: the same
        rv, or an allowed exception from the writer and no change at all."""
        assert callable(model_call) and callable(writer_call)
        before = (self.model.rv, self.model.oldest, self.model.items())
        try:
            want = model_call()
        except Rejected as rejected:
            with pytest.raises(rejected.allowed) as err:
                writer_call()
            assert (self.model.rv, self.model.oldest, self.model.items()) == before
            event(f"rejected: {err.type.__name__}")
            WatchCacheMachine.rejected += 1
            return
        got = writer_call()
        assert got == want
        event("applied")
        WatchCacheMachine.applied += 1
        if self.model.replace_rv and not self.model.evicted_since_replace:
            event("state: replaced, nothing evicted since")

    # ---- rules: changes ------------------------------------------------

    @rule(key=keys, value=values)
    def put(self, key: str, value: bytes) -> None:
        self.expect(lambda: self.model.put(key, value), lambda: self.w.put(key, value))

    @rule(key=keys, value=st.binary(min_size=450, max_size=700))
    def put_too_large(self, key: str, value: bytes) -> None:
        self.expect(lambda: self.model.put(key, value), lambda: self.w.put(key, value))

    @rule(key=keys, value=small_values, delta=st.integers(-3, 5))
    def put_explicit_rv(self, key: str, value: bytes, delta: int) -> None:
        rv = self.model.rv + delta
        self.expect(lambda: self.model.put(key, value, rv), lambda: self.w.put(key, value, rv=rv))

    @rule(key=keys)
    def delete(self, key: str) -> None:
        self.expect(lambda: self.model.delete(key), lambda: self.w.delete(key))

    @precondition(lambda self: bool(self.model.store))
    @rule(data=st.data(), delta=st.integers(-2, 4))
    def delete_present_explicit_rv(self, data: st.DataObject, delta: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.store)))
        rv = self.model.rv + delta
        self.expect(lambda: self.model.delete(key, rv), lambda: self.w.delete(key, rv=rv))

    @rule(items=st.lists(st.tuples(keys, st.one_of(st.none(), small_values, big_values)), max_size=5))
    def put_many(self, items: list[tuple[str, bytes | None]]) -> None:
        self.expect(lambda: self.model.put_many(items), lambda: self.w.put_many(items))

    @precondition(lambda self: bool(self.model.store))
    @rule(data=st.data())
    def put_many_deleting_everything(self, data: st.DataObject) -> None:
        """Deletes of every present key, then maybe once more (KeyError)."""
        present = sorted(self.model.store)
        items: list[tuple[str, bytes | None]] = [(k, None) for k in present]
        if data.draw(st.booleans()):
            items.insert(data.draw(st.integers(1, len(items))), (data.draw(st.sampled_from(present)), None))
        self.expect(lambda: self.model.put_many(items), lambda: self.w.put_many(items))

    @rule(items=st.dictionaries(keys, st.one_of(small_values, big_values), max_size=9),
          delta=st.integers(-1, 5))
    def replace(self, items: dict[str, bytes], delta: int) -> None:
        pairs = list(items.items())
        rv = self.model.rv + delta
        self.expect(lambda: self.model.replace(pairs, rv), lambda: self.w.replace(pairs, rv=rv))

    @precondition(lambda self: bool(self.model.store))
    @rule(data=st.data())
    def replace_duplicate_key(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.store)))
        pairs = [(key, b"1"), (key, b"2")]
        rv = self.model.rv + 1
        self.expect(lambda: self.model.replace(pairs, rv), lambda: self.w.replace(pairs, rv=rv))

    @rule(which=st.integers(0, len(BAD_KEYS) - 1), value=small_values)
    def invalid_key(self, which: int, value: bytes) -> None:
        bad = BAD_KEYS[which]
        before = (self.model.rv, self.model.items())
        with pytest.raises(InvalidKey):
            self.w.put(bad, value)
        with pytest.raises(InvalidKey):
            self.w.put_many([(KEYS[0], b"x"), (bad, value)])
        assert (self.model.rv, self.model.items()) == before

    @rule(data=st.data())
    def watch_agrees(self, data: st.DataObject) -> None:
        """watch(since, timeout=0) serves what interval(since) serves, then stops."""
        since = data.draw(st.integers(0, self.model.rv + 1))
        prefix = data.draw(st.sampled_from(PREFIXES))
        buffer_size = data.draw(st.integers(1, 3))
        try:
            want = self.model.interval(since, prefix)
        except Rejected as no:
            with pytest.raises(no.allowed):
                list(self.r.watch(since, prefix=prefix, timeout=0, buffer_size=buffer_size))
            return
        assert list(self.r.watch(since, prefix=prefix, timeout=0, buffer_size=buffer_size)) == want

    @rule()
    def reopen_reader(self) -> None:
        self.r.close()
        self.reader = Reader(self.name)

    # ---- rules: an interval overtaken by the writer --------------------

    @precondition(lambda self: bool(self.model.interval_start_candidates()))
    @rule(data=st.data())
    def interval_invalidated(self, data: st.DataObject) -> None:
        """An interval that served one event, then lost the rest of its
        window to eviction: its already-buffered events are still served, and
        the refill raises ResourceExpired."""
        model = self.model
        since = data.draw(st.sampled_from(model.interval_start_candidates()))
        expected = model.interval(since)
        buffer_size = data.draw(st.integers(1, min(2, len(expected) - 1)))
        interval = self.r.interval(since, buffer_size=buffer_size)
        assert interval.next() == expected[0]
        # capacity changes that leave the store's size alone evict the whole old window
        key = next(iter(model.store), KEYS[0])
        value = model.store[key][0] if key in model.store else b""
        for _ in range(model.capacity):
            self.expect(lambda: model.put(key, value), lambda: self.w.put(key, value))
        for buffered in expected[1:buffer_size]:
            assert interval.next() == buffered
        with pytest.raises(ResourceExpired) as err:
            interval.next()
        last = expected[buffer_size - 1].rv
        assert str(err.value) == f"too old resource version: {last} ({model.oldest - 1})"
        assert err.value.requested_rv == last and err.value.oldest_rv == model.oldest
        event(f"interval invalidated, buffer_size={buffer_size}")

    # ---- invariants ----------------------------------------------------

    @invariant()
    def count_step(self) -> None:
        """Not a check: Hypothesis runs the invariants after every step (from
        the initialize rule on), so this counts the steps."""
        WatchCacheMachine.steps += 1

    @invariant()
    def resource_versions_agree(self) -> None:
        if self.writer is None:
            return
        assert self.w.resource_version == self.model.rv
        assert self.r.resource_version == self.model.rv
        assert self.r.oldest_resource_version == self.model.oldest

    @invariant()
    def store_agrees(self) -> None:
        if self.writer is None:
            return
        for key in KEYS:
            want = self.model.store.get(key)
            assert self.r.get(key) == (None if want is None else Item(key, *want))
        for prefix in PREFIXES:
            assert self.r.list(prefix) == Snapshot(self.model.rv, self.model.items(prefix))

    @invariant()
    def intervals_agree(self) -> None:
        if self.writer is None:
            return
        model = self.model
        for since in range(model.rv + 2):
            prefix = PREFIXES[since % len(PREFIXES)] if since % 4 == 3 else ""
            buffer_size = since % 3 + 1
            try:
                want = model.interval(since, prefix)
            except Rejected as no:
                if no.allowed == (ResourceVersionTooLarge,):
                    with pytest.raises(ResourceVersionTooLarge, match=f"too large resource version: {since} "):
                        self.r.interval(since, prefix=prefix, buffer_size=buffer_size)
                    continue
                with pytest.raises(ResourceExpired) as err:
                    self.r.interval(since, prefix=prefix, buffer_size=buffer_size)
                oldest = model.oldest
                assert str(err.value) == f"too old resource version: {since} ({oldest - 1})"
                assert err.value.requested_rv == since and err.value.oldest_rv == oldest
                continue
            interval = self.r.interval(since, prefix=prefix, buffer_size=buffer_size)
            got = []
            while (served := interval.next()) is not None:
                got.append(served)
                assert len(got) <= len(want), f"interval({since}) serves too much: {got}"
            assert got == want, f"interval({since}, prefix={prefix!r})"
            assert interval.next() is None
            assert interval.resource_version == (model.rv if since == 0 else since)
        event(f"rv reached: {min(model.rv // 25 * 25, 200)}+")
        event(f"window: {len(model.window)} events")


SETTINGS = settings(
    max_examples=scaled(200, 2000),
    stateful_step_count=scaled(30, 80),
    deadline=None,
    # no "explain" phase: it re-runs a failing example ~100 times, slowly
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


#: typed here: hypothesis annotates run_state_machine_as_test in some
#: releases and not in others, and mypy runs against whichever is installed
run_machine: Callable[..., None] = run_state_machine_as_test


def test_watch_cache_model(report: Report) -> None:
    """The state machine, run as one test (what ``WatchCacheMachine.TestCase``
    would run), and its figures reported whether it passes or fails."""
    machine = WatchCacheMachine
    machine.examples = machine.steps = machine.applied = machine.rejected = 0
    failed = True
    try:
        run_machine(machine, settings=SETTINGS)
        failed = False
    finally:
        report(checked="a Writer with a tiny ring against a model of the watch-cache semantics: after every "
                       "step get, list (with prefixes), both rvs and interval(since) for every since agree",
               events=machine.steps, faults=0, failures=int(failed), examples=machine.examples,
               steps=machine.steps, applied=machine.applied, rejected=machine.rejected,
               max_examples=SETTINGS.max_examples, stateful_step_count=SETTINGS.stateful_step_count)

