"""The processes of the fan-out and latency scenarios: a pool of one writer
and its readers, reused run after run, and the bodies they run for
shmcache and each peer.

Workers are started with the ``spawn`` method, never forked: the peers'
clients run threads (zmq's I/O thread, mp.Queue's feeder) that a fork would
copy in an undefined state.  The parent hands each worker its part of a run
on the worker's task queue; every worker reports on one queue, each message
tagged with the run's id: ``ready`` once connected, then ``done`` with its
timings or ``error`` with the reason.  The writer publishes only after the
parent, having seen every reader ready, sends it ``go``.  Peer modules are
imported inside the bodies, so a missing peer fails only its own runs.

Every wait in a worker is bounded by ``Job.wait_s``: a lost event makes a
reader time out and report an error, never hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import os
import queue
import random
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeAlias

__all__ = [
    "BATCH",
    "KEYS",
    "READ_COUNT",
    "ChildFailed",
    "Job",
    "Pool",
    "Pools",
    "close_queues",
    "drop_stream",
    "spawn_context",
]

#: events per put_many() / Redis pipeline / faster-fifo put_many()
BATCH = 100
#: the zmq slow-joiner probe: one byte, shorter than any real message (which
#: starts with an 8-byte index), so a subscriber can tell them apart
PROBE = b"P"
#: events per XREAD / faster-fifo get_many()
READ_COUNT = 1000
KEYS = 1000
#: a fan-out value starts with its event index
INDEX = struct.Struct("<Q")
#: a latency value starts with its sequence number and send time (ns)
STAMP = struct.Struct("<QQ")

if TYPE_CHECKING:
    Report: TypeAlias = multiprocessing.queues.Queue[Any]


class ChildFailed(Exception):
    """A worker reported an error, died, or did not answer in time."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What the workers of one run need to know (pickled to each of them)."""

    system: str
    events: int            # fan-out: published events; latency: samples + warm-up
    value_bytes: int
    readers: int = 1
    cache: str = ""        # shmcache: the cache's name
    address: str = ""      # pyzmq: the ipc:// endpoint; redis: the socket path
    stream: str = ""       # redis: the stream's key
    wait_s: float = 60.0   # the bound of every single wait in a worker
    buffer_size: int = 100  # shmcache watch() buffer: its default
    rate: float = 0.0      # latency: events/s
    warmup: int = 0        # latency: leading samples the reader discards
    since_rv: int = 0      # shmcache fan-out: the rv after the writer's warm-up lap


def spawn_context() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


def key_of(i: int) -> str:
    return f"k{i % KEYS}"


# ---- the worker pool ---------------------------------------------------------


@dataclasses.dataclass
class Channels:
    """What a worker must inherit at its spawn, as multiprocessing queues
    cannot be handed over later: one queue per reader for each queue peer,
    and the zmq handshake's acknowledgements."""

    queues: dict[str, list[Any]]
    acks: Any


class Run:
    """One worker's view of the run it takes part in: its role, and the
    messages it owes the parent, tagged with the run's id."""

    def __init__(self, who: str, run_id: int, index: int, chan: Channels, tasks: Any,
                 report: Any) -> None:
        self.who = who
        self.run_id = run_id
        self.index = index
        self.chan = chan
        self._tasks = tasks
        self._report = report

    def queue(self, system: str, index: int) -> Any:
        return self.chan.queues[system][index]

    def ready(self) -> None:
        self._report.put(("ready", self.run_id, self.who, None))

    def done(self, payload: object) -> None:
        self._report.put(("done", self.run_id, self.who, payload))

    def error(self, text: str) -> None:
        self._report.put(("error", self.run_id, self.who, text))

    def await_go(self, timeout: float) -> None:
        """The writer's start signal: every reader is connected."""
        try:
            msg = self._tasks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no start signal within {timeout} s") from None
        if msg != ("go", self.run_id):
            raise RuntimeError(f"expected the start of run {self.run_id}, got {msg!r:.80}")


def _worker(index: int, tasks: Any, report: Any, chan: Channels) -> None:
    """A pool worker: runs the bodies it is sent until it gets None."""
    bodies: dict[str, Callable[[Run, Job], None]] = {
        "fanout_writer": fanout_writer, "fanout_reader": fanout_reader,
        "latency_writer": latency_writer, "latency_reader": latency_reader,
    }
    while True:
        task = tasks.get()
        if task is None:
            return
        body, run_id, who, job = task
        run = Run(who, run_id, index, chan, tasks, report)
        try:
            bodies[body](run, job)
        except Exception as err:  # noqa: BLE001 -- any failure is the parent's to report
            run.error(f"{type(err).__name__}: {err}")


class Pool:
    """``readers`` reader workers and one writer, spawned once and reused
    run after run: spawning and importing costs ~0.3 s of CPU per process,
    which would otherwise dwarf the short runs.  Discard it (``close()``)
    after a failed run; its queues may hold leftovers."""

    def __init__(self, ctx: multiprocessing.context.SpawnContext, readers: int,
                 faster_fifo_bytes: int | None) -> None:
        self._closed = False
        self.readers = readers
        self.report: Report = ctx.Queue()
        queues: dict[str, list[Any]] = {"mp.Queue": [ctx.Queue() for _ in range(readers)]}
        if faster_fifo_bytes is not None:
            import faster_fifo

            queues["faster-fifo"] = [faster_fifo.Queue(max_size_bytes=faster_fifo_bytes)
                                     for _ in range(readers)]
        self.chan = Channels(queues, ctx.Queue())
        self._tasks: list[Report] = [ctx.Queue() for _ in range(readers + 1)]
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._next_run = 0
        try:
            for i in range(readers + 1):
                proc = ctx.Process(target=_worker, args=(i, self._tasks[i], self.report, self.chan),
                                   name=f"bench-worker{i}", daemon=True)
                proc.start()
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise

    def start(self, body: str, job: Job, readers: int) -> int:
        """Hand ``job`` to ``readers`` reader workers (``<body>_reader``)
        and the writer (``<body>_writer``); the run's id."""
        if readers > self.readers:
            raise ValueError(f"{readers} readers, the pool has {self.readers}")
        self._next_run += 1
        run_id = self._next_run
        self._whos = [f"reader{i}" for i in range(readers)] + ["writer"]
        for i in range(readers):
            self._tasks[i].put((f"{body}_reader", run_id, f"reader{i}", job))
        self._tasks[-1].put((f"{body}_writer", run_id, "writer", job))
        return run_id

    def go(self, run_id: int) -> None:
        self._tasks[-1].put(("go", run_id))

    def wait(self, run_id: int, kind: str, timeout: float) -> dict[str, Any]:
        """Wait until every worker of the run reported ``kind`` ("ready" or
        "done"): their payloads by name.  ChildFailed on an error report, a
        dead worker, or the timeout."""
        pending = set(self._whos)
        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"timeout after {timeout:.0f} s waiting for {kind} of "
                                  f"{', '.join(sorted(pending))}")
            try:
                status, rid, who, payload = self.report.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead:
                    codes = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead)
                    raise ChildFailed(f"worker died: {codes}") from None
                continue
            if rid != run_id:
                continue
            if status == "error":
                raise ChildFailed(f"{who}: {payload}")
            if status == kind and who in pending:
                pending.discard(who)
                got[who] = payload
        return got

    def close(self) -> None:
        """Stop the workers (politely, then not), close every queue."""
        if self._closed:
            return
        self._closed = True
        for tasks, proc in zip(self._tasks, self._procs):
            if proc.exitcode is None:
                with contextlib.suppress(OSError, ValueError):
                    tasks.put(None)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.exitcode is None:
                proc.terminate()
                proc.join(5)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
            with contextlib.suppress(ValueError):
                proc.close()
        close_queues([self.report, self.chan.acks, *self._tasks])
        for qs in self.chan.queues.values():
            close_queues(qs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Pools:
    """The scenario's pool, made on first use and made afresh after a failed
    run (``discard()``), which may leave a queue with leftovers or a worker
    stuck; as a context manager, discarded at the scenario's end."""

    def __init__(self, ctx: multiprocessing.context.SpawnContext, readers: int,
                 faster_fifo_bytes: int | None) -> None:
        self._args = (ctx, readers, faster_fifo_bytes)
        self._pool: Pool | None = None

    def get(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(*self._args)
        return self._pool

    def discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class _Sequence(Exception):
    """A reader got an event out of order, twice, or not at all."""


def _check(got: int, expected: int) -> None:
    raise _Sequence(f"event {got} arrived where {expected} was due")


def close_queues(queues: Sequence[Any]) -> None:
    """Close the parent's ends of queues it only handed to children."""
    for q in queues:
        q.close()
        if hasattr(q, "cancel_join_thread"):  # mp.Queue: the parent never put, nothing to flush
            q.cancel_join_thread()


def drop_stream(sock: str, stream: str) -> None:
    """Delete a run's Redis stream: the server lives for the whole scenario."""
    import redis

    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis(unix_socket_path=sock)
        try:
            client.delete(stream)
        finally:
            client.close()


# ---- fan-out: the writer ----------------------------------------------------


def _fanout_values(job: Job) -> list[bytes]:
    pad = b"v" * (job.value_bytes - INDEX.size)
    return [INDEX.pack(i) + pad for i in range(job.events)]


def _peer_messages(job: Job) -> list[bytes]:
    """One bytes message per event for the queue peers: the value (index
    first) followed by the key, so a peer carries what a shmcache event
    carries in its cheapest form, a single buffer."""
    pad = b"v" * (job.value_bytes - INDEX.size)
    return [INDEX.pack(i) + pad + key_of(i).encode() for i in range(job.events)]


def fanout_writer(run: Run, job: Job) -> None:
    """Publish job.events events after the start signal; report the
    perf_counter_ns() of the first publish and after the last one."""
    try:
        publish, finish = _fanout_publisher(run, job)
        try:
            t0 = time.perf_counter_ns()
            publish()
            t1 = time.perf_counter_ns()
            run.done((t0, t1))
        finally:
            finish()
    finally:
        gc.unfreeze()


def _ready_frozen(run: Run) -> None:
    """Report ready with the prebuilt events out of the collector's sight:
    its passes over hundreds of thousands of them would be charged to
    whichever system happens to be publishing."""
    gc.collect()
    gc.freeze()
    run.ready()


def _nothing() -> None:
    pass


def _fanout_publisher(run: Run, job: Job) -> tuple[Callable[[], None], Callable[[], None]]:
    """Set up the system's publisher and report ready; after the start
    signal (and, for zmq, the subscription handshake) return (publish
    everything, clean up)."""
    n = job.events
    system = job.system
    if system in ("shmcache", "shmcache put()"):
        from shmcache import Writer

        values = _fanout_values(job)
        keys = [key_of(i) for i in range(n)]
        w = Writer(job.cache, create=False)
        try:
            batches = [list(zip(keys[i:i + BATCH], values[i:i + BATCH])) for i in range(0, n, BATCH)]
            # One untimed lap through the ring first: a fresh segment's pages
            # are mapped into this process on first write, a page fault per
            # 4 KiB (a third of the writer's speed at 16 KiB values), which a
            # long-running cache pays once.  The readers start after it.
            for batch in batches[:job.since_rv // BATCH]:
                w.put_many(batch)
            if w.resource_version != job.since_rv:
                raise RuntimeError(f"warm-up ended at rv {w.resource_version}, not {job.since_rv}")
            _ready_frozen(run)
            run.await_go(job.wait_s)
        except BaseException:
            w.close()
            raise
        if system == "shmcache":
            def publish() -> None:
                put_many = w.put_many
                for batch in batches:
                    put_many(batch)
        else:
            def publish() -> None:
                put = w.put
                for key, value in zip(keys, values):
                    put(key, value)
        return publish, w.close

    if system in ("mp.Queue", "faster-fifo"):
        msgs = _peer_messages(job)
        queues = run.chan.queues[system][:job.readers]
        _ready_frozen(run)
        run.await_go(job.wait_s)
        if system == "mp.Queue":
            # the queues' feeder threads keep flushing after publish()
            # returns: the writer's figure is that of its put() calls
            def publish() -> None:
                puts = [q.put for q in queues]
                for m in msgs:
                    for put in puts:
                        put(m)
        else:
            chunks = [msgs[i:i + BATCH] for i in range(0, n, BATCH)]
            wait_s = job.wait_s

            def publish() -> None:
                puts = [q.put_many for q in queues]
                for chunk in chunks:
                    for put_many in puts:
                        put_many(chunk, block=True, timeout=wait_s)
        return publish, _nothing

    if system == "pyzmq":
        msgs = _peer_messages(job)
        pub, finish = _zmq_publisher(run, job, lambda: _ready_frozen(run))

        def publish() -> None:
            send = pub.send
            for m in msgs:
                send(m)
        return publish, finish

    if system == "redis":
        import redis

        values = _fanout_values(job)
        keys_b = [key_of(i).encode() for i in range(n)]
        client = redis.Redis(unix_socket_path=job.address)
        try:
            client.ping()
            _ready_frozen(run)
            run.await_go(job.wait_s)
        except BaseException:
            client.close()
            raise
        stream = job.stream

        def publish() -> None:
            pipe = client.pipeline(transaction=False)
            xadd = pipe.xadd
            for i in range(0, n, BATCH):
                for key, value in zip(keys_b[i:i + BATCH], values[i:i + BATCH]):
                    xadd(stream, {key: value})
                pipe.execute()
        return publish, client.close

    raise ValueError(f"unknown system {system!r}")


def _zmq_publisher(run: Run, job: Job, ready: Callable[[], None]) -> tuple[Any, Callable[[], None]]:
    """A PUB socket bound to job.address that drops nothing (no high-water
    mark), once every subscriber acknowledged a probe after the go; and the
    function that closes it (delivering what is queued, bounded by wait_s)."""
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)

    def finish() -> None:
        pub.close()
        ctx.term()
    try:
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.setsockopt(zmq.LINGER, int(job.wait_s * 1000))
        pub.bind(job.address)
        ready()
        run.await_go(job.wait_s)
        _await_subscribers(pub, run.chan.acks, job)
    except BaseException:
        pub.setsockopt(zmq.LINGER, 0)
        finish()
        raise
    return pub, finish


def _await_subscribers(pub: Any, acks: Any, job: Job) -> None:
    """The slow-joiner handshake: a zmq SUB receives only what is published
    after its subscription reached the PUB, which connect() does not wait
    for.  Probe until every reader said it received one."""
    seen: set[int] = set()
    deadline = time.monotonic() + job.wait_s
    while len(seen) < job.readers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {job.readers} subscribers joined in {job.wait_s} s")
        pub.send(PROBE)
        try:
            seen.add(acks.get(timeout=0.002))
            while True:
                seen.add(acks.get_nowait())
        except queue.Empty:
            pass


# ---- fan-out: a reader ------------------------------------------------------


def fanout_reader(run: Run, job: Job) -> None:
    """Receive every event, in order, touching each payload (its index);
    report the perf_counter_ns() of the last one."""
    consume = _fanout_consumer(run, job)
    run.done(consume())


def _zmq_subscriber(job: Job) -> tuple[Any, Any]:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.RCVTIMEO, int(job.wait_s * 1000))
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(job.address)
    return ctx, sub


def _skip_probes(recv: Callable[[], bytes], acks: Any, index: int) -> bytes:
    """Acknowledge the first probe; the first real message."""
    m = recv()
    while m != PROBE:
        m = recv()
    acks.put(index)
    while m == PROBE:  # the writer probes until every reader answered
        m = recv()
    return m


def _redis_reader(run: Run, job: Job) -> tuple[Any, str]:
    """A connected client (checked with PING) and the stream, then ready."""
    import redis

    client = redis.Redis(unix_socket_path=job.address)
    client.ping()
    run.ready()
    return client, job.stream


def _fanout_consumer(run: Run, job: Job) -> Callable[[], int]:
    n = job.events
    unpack = INDEX.unpack_from
    wait_s = job.wait_s
    system = job.system
    if system in ("shmcache", "shmcache put()"):
        from shmcache import Reader

        r = Reader(job.cache)
        since = job.since_rv
        deadline = time.monotonic() + wait_s
        while r.resource_version < since:  # the writer's warm-up lap
            if time.monotonic() > deadline:
                r.close()
                raise TimeoutError(f"the writer's warm-up did not reach rv {since} in {wait_s} s")
            time.sleep(0.005)
        run.ready()

        def consume() -> int:
            # watch_batches(): a list per refill, looped over here the way the
            # Redis and faster-fifo readers loop over their batches
            expected = 0
            try:
                for batch in r.watch_batches(since, timeout=wait_s, buffer_size=job.buffer_size):
                    for ev in batch:
                        got = unpack(ev.value)[0]
                        if got != expected:
                            _check(got, expected)
                        expected += 1
                    if expected >= n:
                        if expected > n:
                            raise _Sequence(f"{expected} events arrived where {n} were published")
                        return time.perf_counter_ns()
            finally:
                r.close()
            raise _Sequence(f"watch() ended after {expected} of {n} events (no event for {wait_s} s)")
        return consume

    if system == "mp.Queue":
        q = run.queue(system, run.index)
        run.ready()

        def consume() -> int:
            get = q.get
            for expected in range(n):
                got = unpack(get(timeout=wait_s))[0]
                if got != expected:
                    _check(got, expected)
            return time.perf_counter_ns()
        return consume

    if system == "faster-fifo":
        q = run.queue(system, run.index)
        run.ready()

        def consume() -> int:
            get_many = q.get_many
            expected = 0
            while expected < n:
                # never more than this run's events: the queue outlives the run
                batch = get_many(block=True, timeout=wait_s,
                                 max_messages_to_get=min(READ_COUNT, n - expected))
                for m in batch:
                    got = unpack(m)[0]
                    if got != expected:
                        _check(got, expected)
                    expected += 1
            return time.perf_counter_ns()
        return consume

    if system == "pyzmq":
        ctx, sub = _zmq_subscriber(job)
        run.ready()

        def consume() -> int:
            try:
                recv = sub.recv
                got = unpack(_skip_probes(recv, run.chan.acks, run.index))[0]
                if got != 0:
                    _check(got, 0)
                for expected in range(1, n):
                    got = unpack(recv())[0]
                    if got != expected:
                        _check(got, expected)
                return time.perf_counter_ns()
            finally:
                sub.close()
                ctx.term()
        return consume

    if system == "redis":
        client, stream = _redis_reader(run, job)

        def consume() -> int:
            last: bytes | str = "0-0"
            expected = 0
            block_ms = int(wait_s * 1000)
            xread = client.xread
            try:
                while expected < n:
                    reply: Any = xread({stream: last}, count=READ_COUNT, block=block_ms)
                    if not reply:
                        raise _Sequence(f"XREAD got nothing for {wait_s} s after {expected} of {n} events")
                    entries = reply[0][1]
                    for _id, fields in entries:
                        for value in fields.values():
                            got = unpack(value)[0]
                            if got != expected:
                                _check(got, expected)
                            expected += 1
                    last = entries[-1][0]
                if expected != n:
                    raise _Sequence(f"{expected} events arrived where {n} were published")
                return time.perf_counter_ns()
            finally:
                client.close()
        return consume

    raise ValueError(f"unknown system {system!r}")


# ---- latency ----------------------------------------------------------------


def latency_writer(run: Run, job: Job) -> None:
    """Publish job.events events one at a time at job.rate events/s, each
    stamped with perf_counter_ns() just before the publish call."""
    send, finish = _latency_sender(run, job)
    try:
        pad = b"v" * (job.value_bytes - STAMP.size)
        pack = STAMP.pack
        clock = time.perf_counter_ns
        gap_ns = 1e9 / job.rate
        # jittered gaps (mean 1/rate): a fixed period could lock onto the
        # phase of some periodic activity on the machine
        rng = random.Random(job.events)
        due = time.perf_counter_ns()
        for seq in range(job.events):
            due += int(gap_ns * rng.uniform(0.75, 1.25))
            delay = due - clock()
            if delay > 0:
                time.sleep(delay / 1e9)
            send(pack(seq, clock()) + pad)
        run.done(None)
    finally:
        finish()


def _latency_sender(run: Run, job: Job) -> tuple[Callable[[bytes], object], Callable[[], None]]:
    system = job.system
    if system == "shmcache":
        from shmcache import Writer

        w = Writer(job.cache, create=False)
        try:
            run.ready()
            run.await_go(job.wait_s)
        except BaseException:
            w.close()
            raise
        put = w.put

        def send(value: bytes) -> object:
            return put("lat", value)
        return send, w.close

    if system in ("mp.Queue", "faster-fifo"):
        q = run.queue(system, 0)
        run.ready()
        run.await_go(job.wait_s)
        return q.put, _nothing

    if system == "pyzmq":
        pub, finish = _zmq_publisher(run, job, run.ready)
        return pub.send, finish

    if system == "pipe":
        # O_RDWR: opening a FIFO this way never blocks on the other end
        fd = os.open(job.address, os.O_RDWR)
        run.ready()
        run.await_go(job.wait_s)

        def send_bytes(value: bytes) -> object:
            return os.write(fd, value)  # <= PIPE_BUF: one atomic write
        return send_bytes, lambda: os.close(fd)

    if system == "redis":
        import redis

        client = redis.Redis(unix_socket_path=job.address)
        try:
            client.ping()
            run.ready()
            run.await_go(job.wait_s)
        except BaseException:
            client.close()
            raise
        stream = job.stream

        def send(value: bytes) -> object:
            return client.xadd(stream, {b"lat": value})
        return send, client.close

    raise ValueError(f"unknown system {system!r}")


def latency_reader(run: Run, job: Job) -> None:
    """Block for each event; on receipt, perf_counter_ns() minus the stamp.
    Reports the latencies (ns) after the warm-up."""
    receive = _latency_receiver(run, job)
    run.done(receive()[job.warmup:])


def _latency_receiver(run: Run, job: Job) -> Callable[[], list[int]]:
    n = job.events
    unpack = STAMP.unpack_from
    clock = time.perf_counter_ns
    wait_s = job.wait_s
    system = job.system

    def check(seq: int, expected: int) -> None:
        if seq != expected:
            _check(seq, expected)

    if system == "shmcache":
        from shmcache import Reader

        r = Reader(job.cache)
        since = r.resource_version
        run.ready()

        def receive() -> list[int]:
            lat: list[int] = []
            try:
                for ev in r.watch(since, timeout=wait_s):
                    t = clock()
                    seq, sent = unpack(ev.value)
                    check(seq, len(lat))
                    lat.append(t - sent)
                    if len(lat) == n:
                        return lat
            finally:
                r.close()
            raise _Sequence(f"watch() ended after {len(lat)} of {n} events (no event for {wait_s} s)")
        return receive

    if system in ("mp.Queue", "faster-fifo"):
        q = run.queue(system, 0)
        run.ready()

        def receive() -> list[int]:
            lat: list[int] = []
            get = q.get
            for expected in range(n):
                m = get(timeout=wait_s)
                t = clock()
                seq, sent = unpack(m)
                check(seq, expected)
                lat.append(t - sent)
            return lat
        return receive

    if system == "pipe":
        fd = os.open(job.address, os.O_RDWR)
        run.ready()
        size = job.value_bytes

        def receive() -> list[int]:
            lat: list[int] = []
            read = os.read
            try:
                for expected in range(n):
                    # writes of `size` bytes are atomic, so each read returns one
                    m = read(fd, size)
                    t = clock()
                    if len(m) != size:
                        raise _Sequence(f"a read of {len(m)} bytes where messages are {size}")
                    seq, sent = unpack(m)
                    check(seq, expected)
                    lat.append(t - sent)
                return lat
            finally:
                os.close(fd)
        return receive

    if system == "pyzmq":
        ctx, sub = _zmq_subscriber(job)
        run.ready()

        def receive() -> list[int]:
            lat: list[int] = []
            try:
                recv = sub.recv
                m = _skip_probes(recv, run.chan.acks, 0)
                while True:
                    t = clock()
                    seq, sent = unpack(m)
                    check(seq, len(lat))
                    lat.append(t - sent)
                    if len(lat) == n:
                        return lat
                    m = recv()
            finally:
                sub.close()
                ctx.term()
        return receive

    if system == "redis":
        client, stream = _redis_reader(run, job)

        def receive() -> list[int]:
            lat: list[int] = []
            last: bytes | str = "0-0"
            block_ms = int(wait_s * 1000)
            xread = client.xread
            try:
                while len(lat) < n:
                    reply: Any = xread({stream: last}, count=100, block=block_ms)
                    t = clock()
                    if not reply:
                        raise _Sequence(f"XREAD got nothing for {wait_s} s after {len(lat)} of {n} events")
                    entries = reply[0][1]
                    for _id, fields in entries:
                        seq, sent = unpack(fields[b"lat"])
                        check(seq, len(lat))
                        lat.append(t - sent)
                    last = entries[-1][0]
                return lat
            finally:
                client.close()
        return receive

    raise ValueError(f"unknown system {system!r}")
