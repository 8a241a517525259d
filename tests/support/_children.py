"""The one line-pumping child-process runner, and what the tests run in it:
``tests._children`` functions (:func:`spawn`), ``python -c`` scripts that
print JSON lines (:func:`child`), and the ``shmcache`` command (the CLI
tests' ``watch``).

Each child's stdout lines arrive on a queue, read by a thread (so a test can
wait for a line with a deadline, and a child never blocks on a full pipe);
its stderr is collected for the failure messages.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import IO, Any

import psutil

from ._names import REPO, SOAK

LINE_TIMEOUT = 60.0  # the longest any expected line may take: a hang, not a slow machine
EXIT_TIMEOUT = 300.0 if SOAK else 120.0
START_TIMEOUT = 20.0  # a JSON-line child's first words, and a daemon's start
STOP_TIMEOUT = 20.0  # a JSON-line child's exit once told to stop

CHILD_CODE = "import sys; from tests._children import main; main(sys.argv[1:])"


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the repository importable, then ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def python(code: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    """Start ``python -c code args...`` with the repository importable."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=python_env(),
        text=True,
        **popen,
    )


class LineProcess:
    """A child process whose stdout lines arrive on a queue and whose stderr
    is collected.  ``label`` names it in failure messages."""

    line_timeout = LINE_TIMEOUT

    def __init__(self, argv: Sequence[str], *, label: str, env: Mapping[str, str] | None = None,
                 stdin: bool = False, stdout: IO[str] | None = None, session: bool = False) -> None:
        """``stdin``: a pipe (:meth:`send`, :meth:`release`), else
        /dev/null; ``stdout``: a file to send stdout to instead (no lines
        arrive then); ``session``: the child leads a session of its own, and
        :meth:`kill` kills its whole process group."""
        self.label = label
        self._session = session
        self.proc = subprocess.Popen(
            list(argv), env=python_env() if env is None else dict(env), text=True,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=subprocess.PIPE, start_new_session=session,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[str] = []
        self._threads: list[threading.Thread] = []
        if self.proc.stdout is not None:
            self._pump(self.proc.stdout, self.lines.put, end=True)
        assert self.proc.stderr is not None
        self._pump(self.proc.stderr, self._err.append, end=False)

    def _pump(self, stream: IO[str], sink: Callable[[Any], None], end: bool) -> None:
        def run() -> None:
            with suppress(OSError, ValueError):  # the stream closed under the thread
                for line in stream:
                    sink(line.rstrip("\n"))
            if end:
                sink(None)

        thread = threading.Thread(target=run, name=f"pump-{self.pid}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def stderr(self) -> str:
        return "\n".join(self._err)

    def line(self, timeout: float | None = None) -> str:
        """The next stdout line (AssertionError if none comes in time, or
        the child ends first)."""
        timeout = self.line_timeout if timeout is None else timeout
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.label} {self.pid} printed nothing for {timeout} s; stderr:\n{self.stderr}"
            ) from None
        if got is None:
            self.lines.put(None)  # every later call sees the end too
            try:
                rc: int | None = self.proc.wait(timeout=LINE_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = None
            self._join()
            raise AssertionError(f"{self.label} {self.pid} ended (rc {rc}); stderr:\n{self.stderr}")
        return got

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def release(self) -> None:
        """Close stdin: the child sees EOF."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with suppress(OSError):  # unsent bytes to a child that is gone
                self.proc.stdin.close()

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Reap the child; its return code."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.label} {self.pid} still runs after {timeout} s; stderr:\n{self.stderr}"
            ) from None
        self._join()
        return rc

    def rest(self) -> list[str]:
        """The stdout lines not read yet, once the child has exited."""
        assert self.proc.returncode is not None, "rest() is for a child that exited"
        self._join()
        lines = []
        while not self.lines.empty():
            got = self.lines.get_nowait()
            if got is not None:
                lines.append(got)
        return lines

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)

    def kill(self) -> None:
        """Kill the child if it still runs, reap it and close its pipes."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                (os.killpg if self._session else os.kill)(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=LINE_TIMEOUT)
        if self._session:
            with suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # whatever of its group outlived it
        self._join()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with suppress(OSError):  # stdin's unsent bytes to a child that is gone
                    stream.close()


class Child(LineProcess):
    """A ``tests._children`` function running in its own process."""

    def __init__(self, func: str, kwargs: dict[str, Any], *, stdin: bool,
                 stdout: IO[str] | None) -> None:
        self.func = func
        super().__init__([sys.executable, "-c", CHILD_CODE, func, json.dumps(kwargs)],
                         label=f"{func} child", stdin=stdin, stdout=stdout)

    def expect(self, first_word: str) -> str:
        got = self.line()
        assert got.split(" ", 1)[0] == first_word, f"{self.func} child said {got!r}, not {first_word!r}"
        return got

    def finish(self, timeout: float = EXIT_TIMEOUT) -> list[str]:
        """Wait for a successful exit; the stdout lines not read yet."""
        rc = self.wait(timeout)
        assert rc == 0, f"{self.func} child {self.pid} exited with {rc}; stderr:\n{self.stderr}"
        return self.rest()

    def result(self, timeout: float = EXIT_TIMEOUT) -> dict[str, Any]:
        """The JSON summary a successful child prints last."""
        rest = self.finish(timeout)
        assert rest, f"{self.func} child printed no summary; stderr:\n{self.stderr}"
        out: dict[str, Any] = json.loads(rest[-1])
        return out

    def close(self) -> None:
        self.kill()


@contextmanager
def spawn(func: str, kwargs: dict[str, Any], *, stdin: bool = False,
          stdout: IO[str] | None = None) -> Iterator[Child]:
    """Run ``tests._children.<func>(**kwargs)`` in a child; it is killed and
    reaped on the way out, whatever happened."""
    c = Child(func, kwargs, stdin=stdin, stdout=stdout)
    try:
        yield c
    finally:
        c.close()


class LineChild(LineProcess):
    """``python -c code args`` whose stdout lines are JSON."""

    line_timeout = START_TIMEOUT

    def __init__(self, code: str, *args: str, env: Mapping[str, str] | None = None,
                 held: bool = False) -> None:
        """``held``: the child's stdin is a pipe that stays open until
        :meth:`release` (a child that waits for its EOF waits until then);
        otherwise /dev/null."""
        super().__init__([sys.executable, "-c", textwrap.dedent(code), *args], label="child",
                         env=python_env(env), stdin=held)

    def next(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.line(timeout))
        return out

    def until_end(self, timeout: float = STOP_TIMEOUT) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages up to the last one, which carries "end"; and that one."""
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while True:
            msg = self.next(max(0.0, deadline - time.monotonic()))
            if "end" in msg:
                return got, msg
            got.append(msg)

    def close(self, timeout: float = STOP_TIMEOUT) -> int:
        """Release stdin and reap (killing the child if it still runs after
        ``timeout``); the exit status."""
        self.release()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        self.kill()
        return rc


@contextmanager
def child(code: str, *args: str, env: Mapping[str, str] | None = None, held: bool = False) -> Iterator[LineChild]:
    c = LineChild(code, *args, env=env, held=held)
    try:
        yield c
    finally:
        c.kill()


#: ``WATCHER name since_rv timeout``: prints {"ready": epoch}, then one line
#: per event, then {"end": "CacheClosed" | "timeout" | "ResourceExpired"}.
WATCHER = """
    import json, sys
    from shmcache import CacheClosed, Reader, ResourceExpired
    name, since, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    reader = Reader(name)
    print(json.dumps({"ready": reader.epoch}), flush=True)
    try:
        for ev in reader.watch(since, timeout=timeout):
            print(json.dumps({"type": ev.type.name, "key": ev.key, "value": ev.value.hex(),
                              "rv": ev.rv}), flush=True)
        end = "timeout"
    except CacheClosed:
        end = "CacheClosed"
    except ResourceExpired:
        end = "ResourceExpired"
    print(json.dumps({"end": end}), flush=True)
"""


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


def wait_for(predicate: Callable[[], object], what: str, timeout: float = START_TIMEOUT,
             step: float = 0.02) -> None:
    """Poll ``predicate()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)
