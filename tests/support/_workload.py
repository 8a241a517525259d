"""Deterministic workloads that both the child processes (tests/_children.py)
and the tests recompute, the model of every event and state they produce,
and checks of a sequence of events against it.

Values are ``KEY|SEQ|PAD|CRC32`` (see ``_values``), so every event and item
can be checked on its own, whatever the resource version the writer gave it.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from shmcache import Event, EventType, Item, Reader

from ._values import make_value

Batch = list[tuple[str, bytes | None]]
State = dict[str, tuple[bytes, int]]  # key -> (value, rv of its last change)

# ---- deterministic workload and its model ------------------------------------


@dataclass(frozen=True)
class Workload:
    """A seeded sequence of writer calls.  Batch 0 is one put of the seed key,
    written by the test (rv 1); a single writer with automatic resource
    versions then applies the rest, so event i (1-based) has rv i.

    Value sizes alternate in phases of ``phase`` events between small (the
    ring's slots run out first) and big (its arena runs out first)."""

    seed: int
    events: int
    keys: int = 64
    prefixes: tuple[str, ...] = ("a/", "b/", "c/")
    small_pad: int = 8
    big_pad: int = 300
    phase: int = 400
    deletes: bool = True

    def batches(self) -> list[Batch]:
        rng = random.Random(self.seed)
        live: set[str] = {"seed/0"}
        out: list[Batch] = [[("seed/0", make_value("seed/0", 1, "s"))]]
        seq = 1
        while seq < self.events:
            n = 1 if rng.random() < 0.75 else rng.randint(2, 5)
            batch: Batch = []
            for _ in range(min(n, self.events - seq)):
                seq += 1
                key = f"{rng.choice(self.prefixes)}{rng.randrange(self.keys)}"
                if self.deletes and key in live and rng.random() < 0.25:
                    batch.append((key, None))
                    live.discard(key)
                else:
                    big = (seq // self.phase) % 2 == 1
                    pad = "x" * rng.randint(0, self.big_pad if big else self.small_pad)
                    batch.append((key, make_value(key, seq, pad)))
                    live.add(key)
            out.append(batch)
        return out


class Model:
    """Every event of a workload, by rv, and the state at any rv."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.events: list[Event] = []
        self.key_rvs: dict[str, list[int]] = {}
        self._prefix_rvs: dict[str, list[int]] = {}
        state: dict[str, bytes] = {}
        for batch in batches:
            for key, value in batch:
                rv = len(self.events) + 1
                if value is None:
                    self.events.append(Event(EventType.DELETED, key, state.pop(key), rv))
                else:
                    kind = EventType.MODIFIED if key in state else EventType.ADDED
                    state[key] = value
                    self.events.append(Event(kind, key, value, rv))
                self.key_rvs.setdefault(key, []).append(rv)

    @property
    def last_rv(self) -> int:
        return len(self.events)

    def event(self, rv: int) -> Event:
        return self.events[rv - 1]

    def prefix_rvs(self, prefix: str) -> list[int]:
        rvs = self._prefix_rvs.get(prefix)
        if rvs is None:
            rvs = self._prefix_rvs[prefix] = [e.rv for e in self.events if e.key.startswith(prefix)]
        return rvs

    def next_rv(self, prefix: str, after: int) -> int | None:
        """The rv of the first event of ``prefix`` after ``after``, or None."""
        rvs = self.prefix_rvs(prefix)
        i = bisect_right(rvs, after)
        return rvs[i] if i < len(rvs) else None

    def key_event_at(self, key: str, rv: int) -> Event | None:
        """The key's last event with an rv <= ``rv``."""
        rvs = self.key_rvs.get(key, [])
        i = bisect_right(rvs, rv)
        return self.event(rvs[i - 1]) if i else None


class Cursor:
    """The model's state at an rv, advanced incrementally (cheap when the
    rvs asked for never go backwards, as a reader's snapshots do)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.rv = 0
        self.state: State = {}

    def at(self, rv: int) -> State:
        assert 0 <= rv <= self.model.last_rv, f"rv {rv} is beyond the workload's {self.model.last_rv}"
        if rv < self.rv:
            self.rv, self.state = 0, {}
        while self.rv < rv:
            self.rv += 1
            e = self.model.event(self.rv)
            if e.type is EventType.DELETED:
                del self.state[e.key]
            else:
                self.state[e.key] = (e.value, e.rv)
        return self.state

    def items(self, rv: int, prefix: str = "") -> list[Item]:
        return sorted(Item(k, v, r) for k, (v, r) in self.at(rv).items() if k.startswith(prefix))


def replay(events: Sequence[Event], state: State | None = None) -> State:
    """Apply events in order, checking each one's type against the state:
    ADDED only for an absent key, MODIFIED for a present one, DELETED for a
    present one and carrying its last value."""
    state = {} if state is None else dict(state)
    for e in events:
        old = state.get(e.key)
        if e.type is EventType.DELETED:
            assert old is not None, f"{e} deletes an absent key"
            assert e.value == old[0], f"{e} does not carry the last value {old[0]!r}"
            del state[e.key]
        else:
            want = EventType.MODIFIED if old is not None else EventType.ADDED
            assert e.type is want, f"{e} should be {want.name}"
            state[e.key] = (e.value, e.rv)
    return state


def ring_events(reader: Reader, since_rv: int) -> list[Event]:
    """Every event after ``since_rv`` (>= 1) now in the ring, in order."""
    assert since_rv >= 1, "interval(0) is a snapshot, not events"
    return list(reader.interval(since_rv, buffer_size=997))
