"""Child processes for the cross-process tests (tests/test_crossprocess.py,
tests/stress/test_writer_crash.py, tests/stress/test_wrap_single.py): each
runs a ``tests._children`` function, whose stdout lines arrive on a queue.

Timeouts follow the SHMCACHE_STRESS environment variable (see
``tests.helpers.scaled``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import psutil

from shmcache import Item, Reader, Writer

from . import helpers
from ._children import check_value

CHILD_CODE = "import sys; from tests._children import main; main(sys.argv[1:])"
LINE_TIMEOUT = 60.0  # the longest any expected line may take: a hang, not a slow machine
EXIT_TIMEOUT = 300.0 if helpers.SOAK else 120.0


class Child:
    """A ``tests._children`` function running in its own process.  Its stdout
    lines arrive on a queue (read by a thread), its stderr is collected."""

    def __init__(self, func: str, kwargs: dict[str, Any], *, stdin: bool,
                 stdout: IO[str] | None) -> None:
        self.func = func
        self.proc = helpers.python(
            CHILD_CODE, func, json.dumps(kwargs),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads: list[threading.Thread] = []
        if self.proc.stdout is not None:
            self._pump(self.proc.stdout, self._lines.put, end=True)
        assert self.proc.stderr is not None
        self._pump(self.proc.stderr, self._stderr.append, end=False)

    def _pump(self, stream: IO[str], sink: Callable[[str | None], None] | Callable[[str], None],
              end: bool) -> None:
        def run() -> None:
            try:
                for line in stream:
                    sink(line.rstrip("\n"))
            except (OSError, ValueError):
                pass
            if end:
                sink(None)  # type: ignore[arg-type]

        thread = threading.Thread(target=run, name=f"pump-{self.func}-{self.pid}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)

    def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next stdout line (AssertionError if none comes in time)."""
        try:
            got = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.func} child {self.pid} printed nothing for {timeout} s; stderr:\n{self.stderr}"
            ) from None
        if got is None:
            self._lines.put(None)
            self.proc.wait(timeout=LINE_TIMEOUT)
            self._join()
            raise AssertionError(
                f"{self.func} child {self.pid} ended (rc {self.proc.returncode}); stderr:\n{self.stderr}"
            )
        return got

    def expect(self, first_word: str) -> str:
        got = self.line()
        assert got.split(" ", 1)[0] == first_word, f"{self.func} child said {got!r}, not {first_word!r}"
        return got

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Reap the child; its return code."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.func} child {self.pid} still runs after {timeout} s; stderr:\n{self.stderr}"
            ) from None
        self._join()
        return rc

    def finish(self, timeout: float = EXIT_TIMEOUT) -> list[str]:
        """Wait for a successful exit; the stdout lines not read yet."""
        rc = self.wait(timeout)
        assert rc == 0, f"{self.func} child {self.pid} exited with {rc}; stderr:\n{self.stderr}"
        return self.rest()

    def rest(self) -> list[str]:
        """The stdout lines not read yet, once the child has exited."""
        assert self.proc.returncode is not None, "rest() is for a child that exited"
        self._join()
        lines = []
        while not self._lines.empty():
            got = self._lines.get_nowait()
            if got is not None:
                lines.append(got)
        return lines

    def result(self, timeout: float = EXIT_TIMEOUT) -> dict[str, Any]:
        """The JSON summary a successful child prints last."""
        rest = self.finish(timeout)
        assert rest, f"{self.func} child printed no summary; stderr:\n{self.stderr}"
        out: dict[str, Any] = json.loads(rest[-1])
        return out

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)

    def close(self) -> None:
        """Kill the child if it still runs, reap it and close its pipes."""
        if self.proc.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=LINE_TIMEOUT)
        self._join()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def spawn(func: str, kwargs: dict[str, Any], *, stdin: bool = False,
          stdout: IO[str] | None = None) -> Iterator[Child]:
    """Run ``tests._children.<func>(**kwargs)`` in a child; it is killed and
    reaped on the way out, whatever happened."""
    child = Child(func, kwargs, stdin=stdin, stdout=stdout)
    try:
        yield child
    finally:
        child.close()


def wait_status(pid: int, status: str, timeout: float = LINE_TIMEOUT) -> None:
    """Wait until process ``pid`` is in ``status`` (psutil.STATUS_*)."""
    deadline = time.monotonic() + timeout
    seen: str | None = None
    while time.monotonic() < deadline:
        try:
            seen = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            seen = "gone"
        if seen == status:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} is {seen!r}, not {status!r}, after {timeout} s")


def small_writer(name: str, *, capacity: int = 16, arena_bytes: int = 4096, max_keys: int = 64,
                 store_bytes: int = 1 << 16, lock_timeout: float = 5.0) -> Writer:
    return Writer(name, capacity=capacity, arena_bytes=arena_bytes, max_keys=max_keys,
                  store_bytes=store_bytes, lock_timeout=lock_timeout)


def lock_recoveries(reader: Reader) -> int:
    return int(reader.header_copy().lock_recoveries)


def check_intact(items: list[Item]) -> None:
    for item in items:
        check_value(item.key, item.value)
