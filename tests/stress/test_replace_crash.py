"""A writer that dies inside ``replace()`` (the relist a mirror does after
its watch broke) leaves nothing of the half-done relist behind: readers see
the old store, complete, until the new one is complete and switched in
whole; the next writer either abandons a replace that was still being staged
(the old store stands, old watch windows go on) or commits one that was
fully staged (docs/design.md, "replace()").  Never a mixture, never an empty
store that nobody wrote.

The crash points are injected by a Writer subclass in the child that exits
at a chosen step of the real replace(); the kill loop then SIGKILLs a child
that alternates replace() and put_many() at random moments."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from shmcache import Item, Reader, ResourceExpired, Writer

from .._report import Report
from ..support import LineChild, check_value, child, make_value, scaled

GEOMETRY = {"capacity": 32, "arena_bytes": 8192, "max_keys": 512, "store_bytes": 1 << 17}

#: ``CRASHER name point after``: a real Writer.replace() of 40 keys at rv
#: current + 5 that exits with status 3 at ``point``: "staging" after
#: ``after`` steps of staging (1: right after the heap was compacted),
#: "expired" once the old window is expired, "switched" once the new table is
#: active but store_rv not yet set.
CRASHER = """
    import json, os, sys
    from shmcache import Writer
    from tests.support import make_value
    name, point, after = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def crash(where):
        print(json.dumps({"crashed": where}), flush=True)
        os._exit(3)

    class Crashing(Writer):
        steps = 0
        def _check_rc(self, rc, doing):
            super()._check_rc(rc, doing)
            if doing.startswith("staging"):
                self.steps += 1
                if point == "staging" and self.steps == after:
                    crash(f"staging step {self.steps}")
            elif point == "switched":
                crash("switched")
        def _expire_window(self, rv):
            super()._expire_window(rv)
            if point == "expired":
                crash("expired")

    w = Crashing(name, create=False)
    rv = w.resource_version + 5
    w.replace([(f"new/{i}", make_value(f"new/{i}", rv, "n" * (i * 37 % 300))) for i in range(40)], rv=rv)
    print(json.dumps({"completed": rv}), flush=True)
"""

POINTS = {  # point, after -> committed by the next writer?
    "staging-begun": ("staging", 1, False),
    "staging-half": ("staging", 21, False),
    "staging-last": ("staging", 41, False),
    "expired": ("expired", 0, True),
    "switched": ("switched", 0, True),
}


def _old_state(w: Writer) -> list[Item]:
    """rv 1..12: ten keys, two of them rewritten, one deleted."""
    for i in range(10):
        w.put(f"old/{i}", make_value(f"old/{i}", i + 1, "o" * (i * 53 % 400)))
    w.put("old/3", make_value("old/3", 11))
    w.delete("old/5")
    assert w.resource_version == 12
    return sorted([Item(f"old/{i}", make_value(f"old/{i}", i + 1, "o" * (i * 53 % 400)), i + 1)
                   for i in range(10) if i not in (3, 5)] + [Item("old/3", make_value("old/3", 11), 11)])


def _churn(w: Reader, writer: Writer, rounds: int) -> int:
    """Enough puts to wrap the store's heap several times: a heap whose
    head or accounting a recovery got wrong fails here."""
    expect = {item.key: item.value for item in w.list().items}
    for n in range(rounds):
        key = f"churn/{n % 37}"
        expect[key] = make_value(key, n, "c" * (n * 91 % 2000))
        writer.put(key, expect[key])
    snap = w.list()
    assert {i.key: i.value for i in snap.items} == expect
    for key, value in expect.items():
        got = w.get(key)
        assert got is not None and got.value == value, key
    return rounds


@pytest.mark.parametrize("case", POINTS)
def test_crash_inside_replace(name: str, case: str, report: Report) -> None:
    point, after, committed = POINTS[case]
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, **GEOMETRY, lock_timeout=0.3))  # type: ignore[arg-type]
        old = _old_state(w)
        r = stack.enter_context(Reader(name))
        old_window = r.interval(3, buffer_size=2)
        assert old_window.next() is not None  # rv 4, copied before the crash
        with child(CRASHER, name, point, str(after)) as c:
            assert c.next()["crashed"].startswith(point)
            assert c.close() == 3
        new = [Item(f"new/{i}", make_value(f"new/{i}", 17, "n" * (i * 37 % 300)), 17) for i in range(40)]

        # the dead holder still has the lock: what readers see without it
        assert r.get("new/0") is None or committed  # get() sees the old table or, switched, the new
        if committed:
            assert r.resource_version == (17 if point == "switched" else 12)  # rv is published after the expiry
            with pytest.raises(ResourceExpired, match="replace"):
                r.list()
            with pytest.raises(ResourceExpired):  # after what its buffer already held
                for _ in old_window:
                    pass
        else:
            assert r.resource_version == 12
            assert r.list() == (12, old)  # the old store, exactly, while the lock is dead
            assert [e.rv for e in old_window] == list(range(5, 13))

        # the next writer recovers the lock and finishes or abandons the replace
        other = stack.enter_context(Writer(name, create=False, lock_timeout=0.3))
        rv = other.put("after", b"a")
        assert r.figures().lock_recoveries == 1
        if committed:
            assert rv == 18
            assert r.list() == (18, sorted(new + [Item("after", b"a", 18)]))
            with pytest.raises(ResourceExpired):
                r.interval(16)
            assert [e.rv for e in r.interval(17)] == [18]
            assert r.get("old/0") is None and r.get("new/39") == new[39]
        else:
            assert rv == 13
            assert r.list() == (13, sorted(old + [Item("after", b"a", 13)]))
            assert [e.rv for e in old_window.continuation()] == [13]  # the old window goes on
            assert r.get("new/0") is None and r.get("old/0") == old[0]
        for item in r.list().items:
            if item.key != "after":
                check_value(item.key, item.value)
        churned = _churn(r, other, scaled(600, 6000))
    report(checked=f"replace() crashed at {case}: {'committed' if committed else 'abandoned'} by the next "
                   "writer, old state intact until then, heap sound afterwards",
           events=churned + 40, faults=1, failures=0)


# ---- the kill loop ---------------------------------------------------------------

#: ``LOOPER name seed``: from the current state, op after op from the seed
#: (``_ops``), each acknowledged by {"done": n} once it returned.
LOOPER = """
    import json, sys
    from shmcache import Writer
    from tests.stress.test_replace_crash import ops
    name, seed = sys.argv[1], int(sys.argv[2])
    w = Writer(name, create=False, lock_timeout=2.0)
    print(json.dumps({"ready": w.resource_version}), flush=True)
    for n, (kind, items) in enumerate(ops(seed, 10**6), 1):
        if kind == "replace":
            w.replace(items, rv=w.resource_version + 1 + n % 3)
        else:
            w.put_many(items)
        print(json.dumps({"done": n}), flush=True)
"""


def ops(seed: int, count: int) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """The looper's deterministic operations: replaces of 50-300 keys (big
    enough that a kill often lands inside one) and small put_many batches."""
    rng = random.Random(seed)
    for n in range(count):
        if rng.random() < 0.5:
            keys = rng.sample(range(400), rng.randrange(50, 300))
            yield "replace", [(f"k{k}", make_value(f"k{k}", n, "r" * rng.randrange(120))) for k in keys]
        else:
            yield "put_many", [(f"k{k}", make_value(f"k{k}", n, "p" * rng.randrange(120)))
                               for k in rng.sample(range(400), rng.randrange(1, 8))]


def _apply(state: dict[str, bytes], kind: str, items: list[tuple[str, bytes]]) -> dict[str, bytes]:
    if kind == "replace":
        return dict(items)
    out = dict(state)
    out.update(items)
    return out


@contextmanager
def _looper(name: str, seed: int) -> Iterator[LineChild]:
    with child(LOOPER, name, str(seed)) as c:
        c.next()  # ready
        yield c


def test_writers_killed_in_replace_and_put_many_loops(name: str, report: Report) -> None:
    """Round after round, a writer alternating replace() and put_many() is
    SIGKILLed at a random moment.  After each kill, before and after the
    next writer recovers, list() is exactly the state after the last
    acknowledged operation or after the one in flight — never a partly
    replaced store."""
    rounds = scaled(40, 1000)
    rng = random.Random(11)
    found = {"idle": 0, "staging": 0, "committing": 0, "other": 0}
    checked = 0
    with ExitStack() as stack:
        w = stack.enter_context(Writer(name, **GEOMETRY, lock_timeout=0.3))  # type: ignore[arg-type]
        r = stack.enter_context(Reader(name))
        state: dict[str, bytes] = {}
        for n in range(rounds):
            seed = rng.randrange(1 << 30)
            with _looper(name, seed) as c:
                time.sleep(rng.uniform(0.0, 0.08))
                c.kill()
                done = 0
                while not c.lines.empty():
                    line = c.lines.get_nowait()
                    if line is not None:
                        done = max(done, json.loads(line).get("done", 0))
            plan = list(ops(seed, done + 1))
            states = [state]
            for kind, items in plan:
                states.append(_apply(states[-1], kind, items))
            # a put_many is one event per item, not a transaction: a kill
            # inside it may leave any prefix of it published
            kind, items = plan[done]
            allowed = [states[done], states[done + 1]] + (
                [_apply(states[done], kind, items[:k]) for k in range(1, len(items))]
                if kind == "put_many" else [])
            op_state = int(r.header_copy().op_state)
            found[{0: "idle", 1: "idle", 2: "staging", 4: "committing"}.get(op_state, "other")] += 1
            if op_state != 4:  # committing: list() waits for the next writer
                seen = {i.key: i.value for i in r.list().items}
                assert seen in allowed, f"round {n}: list() is neither state {done} nor {done + 1}"
            w.put("cont", make_value("cont", n))
            snap = r.list()
            seen = {i.key: i.value for i in snap.items if i.key != "cont"}
            assert seen in allowed, f"round {n}: after recovery list() is neither state {done} nor {done + 1}"
            for item in snap.items:
                check_value(item.key, item.value)
            checked += len(snap.items)
            state = seen
            w.delete("cont")
        recoveries = r.figures().lock_recoveries
    report(checked="writers SIGKILLed in replace()/put_many() loops: list() is always a whole state, "
                   "before and after recovery",
           events=checked, faults=rounds, failures=0, lock_recoveries=recoveries, **{f"killed_{k}": v
                                                                                       for k, v in found.items()})
    assert found["other"] == 0
