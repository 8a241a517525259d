"""The ``shmcache`` command line, run as a real process (``python -m shmcache``)
against caches created here by a Writer, or owned by a real shmcached."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shmcache import EventType, Reader, Writer

from .support import REPO, LineProcess, python, running, sock_in

TIMEOUT = 60.0  # the longest any command or expected line may take: a hang, not a slow machine


@dataclass
class Result:
    rc: int
    out: str
    err: str
    raw: bytes  # stdout as bytes


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SHMCACHE_NAME", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli(*args: str | bytes, stdin: bytes = b"", env: dict[str, str] | None = None) -> Result:
    """Run ``python -m shmcache ARGS``; its output must be valid UTF-8 (human
    output escapes what is not), except that of ``get --raw``."""
    proc = subprocess.run([sys.executable, "-m", "shmcache", *args], input=stdin,
                          capture_output=True, timeout=TIMEOUT, env=env or _env(), check=False)
    raw_out = "--raw" in args
    return Result(proc.returncode, "" if raw_out else proc.stdout.decode(),
                  proc.stderr.decode(), proc.stdout)


def ok(*args: str | bytes, stdin: bytes = b"") -> Result:
    result = cli(*args, stdin=stdin)
    assert result.rc == 0, f"shmcache {args} exited {result.rc}: {result.err}"
    assert result.err == "", result.err
    return result


def js(*args: str) -> Any:
    return json.loads(ok(*args, "-o", "json").out)


# ---- fixtures ------------------------------------------------------------------


@pytest.fixture
def writer(name: str) -> Iterator[Writer]:
    with Writer(name, capacity=16, arena_bytes=4096, max_keys=64, store_bytes=1 << 16) as w:
        yield w


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: str
    log: Path


@pytest.fixture
def daemon(name: str, tmp_path: Path) -> Iterator[Daemon]:
    """A real shmcached owning cache ``name``, serving (its heartbeat
    written before it answers); SIGTERMed afterwards, and unless the test
    stopped it, checked to exit 0 and leave nothing behind."""
    sock = sock_in(tmp_path, "s")
    with running(name, sock, tmp_path / "shmcached.log", "--heartbeat", "0.2") as d:
        yield Daemon(d.proc, sock, d.log_path)


class Watch(LineProcess):
    """``shmcache watch ...`` running in the background."""

    line_timeout = TIMEOUT

    def __init__(self, *args: str) -> None:
        super().__init__([sys.executable, "-m", "shmcache", "watch", *args], label="watch", env=_env())

    def finish(self, sig: int | None = None) -> int:
        if sig is not None:
            self.proc.send_signal(sig)
        return self.wait(TIMEOUT)

    def close(self) -> None:
        self.kill()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        w.close()


# ---- help and usage ------------------------------------------------------------


def test_help_documents_exit_status_and_formats() -> None:
    out = ok("--help").out
    for text in ("exit status", "0  ok", "1  key not found", "2  usage", "3  cache not found",
                 "4  resource expired", '"value_b64"', "put", "delete", "get", "list", "watch",
                 "status", "demo", "$SHMCACHE_NAME"):
        assert text in out, text
    assert "--direct" in ok("put", "--help").out
    assert "--no-relist" in ok("watch", "--help").out


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["get"],
    ["get", "k", "--bogus"],
    ["watch", "--since", "x"],
    ["watch", "--since", "-1"],
    ["put", "k", "v", "--direct", "--socket", "/tmp/x.sock"],
    ["-o", "yaml", "list"],
    ["--name", "no/slashes", "get", "k"],
    ["get", ""],
    ["put", "k" * 1025, "v"],
    ["get", b"\xff"],
    ["list", "p" * 1025],
    ["demo", "--readers", "0"],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = cli(*args)
    assert result.rc == 2, result
    assert result.out == ""
    assert result.err.strip(), "a usage error says what is wrong"


def test_missing_cache_exits_3(name: str) -> None:
    for args in (["get", "k"], ["list"], ["watch"], ["status"], ["put", "k", "v", "--direct"],
                 ["delete", "k", "--direct"]):
        result = cli("--name", name, *args)
        assert result.rc == 3, (args, result)
        assert name in result.err and result.err.startswith("shmcache: error:"), result.err
    # no cache, so no header naming a daemon's socket: no path is guessed
    result = cli("put", "k", "v", "--name", name)
    assert result.rc == 3 and "cannot find the daemon" in result.err and ".sock" not in result.err, result
    result = cli("put", "k", "v", "--name", name, "--socket", "/nonexistent/dir/s.sock")
    assert result.rc == 3 and "/nonexistent/dir/s.sock" in result.err, result


def test_a_prefix_that_is_not_utf8_is_a_usage_error(name: str) -> None:
    for command in ("list", "watch"):
        result = cli(command, b"\xff", "--name", name)
        assert result.rc == 2 and "not encodable as UTF-8" in result.err, result


def test_put_with_a_socket_and_no_daemon_names_the_socket_not_a_cache(tmp_path: Path) -> None:
    sock = str(tmp_path / "nothing.sock")
    result = cli("put", "k", "v", "--socket", sock)
    assert result.rc == 3, result
    assert f"is shmcached listening on {sock}?" in result.err, result.err
    assert "'default'" not in result.err and "running for cache" not in result.err


def _exit_help(code: int) -> str:
    """The help's description of exit status ``code``, its lines joined."""
    out = ok("--help").out
    section = out[out.index("exit status:"):].splitlines()[1:]
    start = next(i for i, line in enumerate(section) if line.startswith(f"  {code}  "))
    lines = [section[start]]
    lines += [line for line in section[start + 1:] if line.startswith("     ")]
    return " ".join(" ".join(lines).split())


# imported before giving up root: the interpreter's own files may be out of nobody's reach
AS_NOBODY = """
import os, sys
from shmcache._cli import main
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def _cli_as_nobody(*args: str) -> Result:
    proc = subprocess.run([sys.executable, "-c", AS_NOBODY, *args], capture_output=True,
                          timeout=TIMEOUT, env=_env(), check=False)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), proc.stdout)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anybody may traverse (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="shmcache-cli-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_permission_denied_on_the_socket_exits_as_the_help_says(open_dir: Path, tmp_path: Path) -> None:
    assert "permission denied" in _exit_help(1) and "socket" in _exit_help(1)
    assert "permission" not in _exit_help(3)
    sock = open_dir / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(sock))
        listener.listen()
        if os.geteuid() == 0:  # root connects whatever the mode: ask as nobody
            sock.chmod(0o660)
            result = _cli_as_nobody("put", "k", "v", "--socket", str(sock))
            expected = "mode 0660, owner root, group root: only root and members of group root may connect"
        else:
            sock.chmod(0)
            result = cli("put", "k", "v", "--socket", str(sock))
            expected = "mode 0000"
        assert result.rc == 1, result
        assert f"may not connect to the daemon at {sock}: permission denied" in result.err, result.err
        assert expected in result.err and "--group" in result.err, result.err
        assert "running" not in result.err and "listening" not in result.err
        if os.geteuid() == 0:  # a directory on the way that nobody may search
            hidden = tmp_path / "s.sock"
            listener2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with listener2:
                listener2.bind(str(hidden))
                listener2.listen()
                result = _cli_as_nobody("delete", "k", "--socket", str(hidden))
            assert result.rc == 1 and "a directory above the socket may not be searched" in result.err, result


# ---- get, put, delete, list against a Writer -----------------------------------


def test_direct_put_get_delete_human(name: str, writer: Writer) -> None:
    assert ok("put", "pods/a", "hello world", "--name", name, "--direct").out == "pods/a set at rv 1\n"
    with Reader(name) as reader:
        item = reader.get("pods/a")
        assert item is not None and item.value == b"hello world"
    lines = ok("get", "pods/a", "--name", name).out.splitlines()
    assert lines[0].split() == ["KEY", "RV", "VALUE"]
    assert lines[1].split(None, 2) == ["pods/a", "1", "hello world"]
    assert ok("--name", name, "put", "pods/a", "v2", "--direct").out == "pods/a set at rv 2\n"
    assert ok("--name", name, "delete", "pods/a", "--direct").out == "pods/a deleted at rv 3\n"
    for args in (["get", "pods/a"], ["delete", "pods/a", "--direct"]):
        result = cli("--name", name, *args)
        assert result.rc == 1, result
        assert result.out == "" and "key not found: pods/a" in result.err
    assert writer.resource_version == 3


def test_direct_writes_json_and_explicit_rv(name: str, writer: Writer) -> None:
    assert js("put", "k", "v", "--name", name, "--direct", "--rv", "10") == {"op": "put", "key": "k", "rv": 10}
    assert js("get", "k", "--name", name) == {"key": "k", "rv": 10, "value": "v"}
    result = cli("put", "k", "w", "--name", name, "--direct", "--rv", "5")
    assert result.rc == 1 and "greater than the current resource version 10" in result.err
    assert js("delete", "k", "--name", name, "--direct") == {"op": "delete", "key": "k", "rv": 11}
    assert writer.resource_version == 11


def test_name_from_environment_and_before_the_command(name: str, writer: Writer) -> None:
    writer.put("k", b"v")
    result = cli("get", "k", "-o", "json", env=_env(SHMCACHE_NAME=name))
    assert result.rc == 0 and json.loads(result.out)["value"] == "v", result
    assert json.loads(ok("--name", name, "-o", "json", "get", "k").out)["rv"] == 1
    # --name after the command wins over the one before it
    assert cli("--name", "no-such-cache-here", "get", "k", "--name", name).rc == 0


def test_list_human_and_json(name: str, writer: Writer) -> None:
    writer.put_many([("pods/b", b"2"), ("pods/a", b"1"), ("svc/x", b"3"), ("pods/c", b"gone")])
    writer.delete("pods/c")
    lines = ok("list", "--name", name).out.splitlines()
    assert [line.split() for line in lines] == [
        ["KEY", "RV", "VALUE"], ["pods/a", "2", "1"], ["pods/b", "1", "2"], ["svc/x", "3", "3"]]
    assert [line.split() for line in ok("list", "pods/", "--name", name).out.splitlines()[1:]] == [
        ["pods/a", "2", "1"], ["pods/b", "1", "2"]]
    assert js("list", "pods/", "--name", name) == {
        "rv": 5, "items": [{"key": "pods/a", "rv": 2, "value": "1"},
                           {"key": "pods/b", "rv": 1, "value": "2"}]}
    empty = cli("list", "nothing/", "--name", name)
    assert empty.rc == 0 and empty.out == "" and "no keys" in empty.err and "rv 5" in empty.err
    assert js("list", "nothing/", "--name", name) == {"rv": 5, "items": []}


def test_values_that_are_not_utf8(name: str, writer: Writer) -> None:
    binary = b"\xff\x00a\n\x1b[31m"
    writer.put("bin", binary)
    writer.put("text", "é ok C:\\dir".encode())
    writer.put("ctl\tkey", "line1\nline2 \u202e".encode())
    human = {line.split()[0]: line for line in ok("list", "--name", name).out.splitlines()[1:]}
    assert human["bin"].endswith(" \\xff\\x00a\\n\\x1b[31m")
    assert human["text"].endswith(" é ok C:\\dir")  # printable UTF-8 is shown as it is
    assert human["ctl\\tkey"].endswith(" line1\\nline2 \\u202e")
    assert "\x1b" not in ok("get", "bin", "--name", name).out
    got = js("get", "bin", "--name", name)
    assert "value" not in got and base64.b64decode(got["value_b64"]) == binary
    assert js("get", "text", "--name", name)["value"] == "é ok C:\\dir"
    items = {i["key"]: i for i in js("list", "--name", name)["items"]}
    assert base64.b64decode(items["bin"]["value_b64"]) == binary
    assert items["ctl\tkey"]["value"] == "line1\nline2 \u202e"
    assert cli("get", "bin", "--raw", "--name", name).raw == binary
    # writes: VALUE "-" reads stdin as bytes; an argument's own bytes are kept
    ok("put", "stdin", "-", "--name", name, "--direct", stdin=binary + b"\xfe")
    ok("put", "arg", b"\xfe\xfd", "--name", name, "--direct")
    with Reader(name) as reader:
        stdin_item, arg_item = reader.get("stdin"), reader.get("arg")
    assert stdin_item is not None and stdin_item.value == binary + b"\xfe"
    assert arg_item is not None and arg_item.value == b"\xfe\xfd"


# ---- watch ---------------------------------------------------------------------


def test_watch_lists_then_streams_until_ctrl_c(name: str, writer: Writer, watches: list[Watch]) -> None:
    writer.put("pods/a", b"1")
    writer.put("svc/z", b"not under the prefix")
    w = Watch("pods/", "--name", name)
    watches.append(w)
    assert w.line().split() == ["ADDED", "pods/a", "2", "1"]  # the snapshot's rv
    writer.put("pods/a", b"2")
    writer.put("svc/z", b"ignored")
    writer.put("pods/b", b"\xff")
    writer.delete("pods/a")
    assert [w.line().split() for _ in range(3)] == [
        ["MODIFIED", "pods/a", "3", "2"], ["ADDED", "pods/b", "5", "\\xff"], ["DELETED", "pods/a", "6", "2"]]
    assert w.finish(signal.SIGINT) == 0
    assert w.stderr == "", "Ctrl-C ends a watch quietly"


def test_watch_json_since(name: str, writer: Writer, watches: list[Watch]) -> None:
    writer.put("a", b"old")
    rv = writer.put("b", b"old")
    w = Watch("--name", name, "--since", str(rv), "-o", "json")
    watches.append(w)
    writer.put("a", b"new")
    writer.put("c", b"\x00\xff")
    writer.delete("b")
    events = [json.loads(w.line()) for _ in range(3)]
    assert events == [
        {"type": "MODIFIED", "key": "a", "rv": 3, "value": "new"},
        {"type": "ADDED", "key": "c", "rv": 4, "value_b64": base64.b64encode(b"\x00\xff").decode()},
        {"type": "DELETED", "key": "b", "rv": 5, "value": "old"},
    ]
    assert w.finish(signal.SIGINT) == 0
    assert w.stderr == ""


def test_watch_too_old_rv_exits_4_with_no_relist(name: str) -> None:
    with Writer(name, capacity=4, arena_bytes=4096, max_keys=64, store_bytes=1 << 16) as w:
        for i in range(10):
            w.put(f"k{i % 3}", b"v%d" % i)
        with Reader(name) as reader:
            assert reader.oldest_resource_version > 2
        result = cli("watch", "--since", "1", "--no-relist", "--name", name)
        assert result.rc == 4, result
        assert result.out == ""
        assert "too old resource version: 1" in result.err


def test_watch_relists_after_expiry(name: str) -> None:
    with Writer(name, capacity=4, arena_bytes=4096, max_keys=64, store_bytes=1 << 16) as w:
        for i in range(10):
            w.put(f"k{i % 3}", b"v%d" % i)
        result = cli("watch", "--since", "1", "--timeout", "0.2", "-o", "json", "--name", name)
        assert result.rc == 0, result
        assert "too old resource version: 1" in result.err and "listing again" in result.err
        events = [json.loads(line) for line in result.out.splitlines()]
        # the consumer's state at --since is unknown here: the marker says "replace it"
        assert events == [{"type": "RELIST", "rv": 10}] + [
            {"type": "ADDED", "key": k, "rv": 10, "value": v}
            for k, v in (("k0", "v9"), ("k1", "v7"), ("k2", "v8"))]


def _stopped(pid: int) -> None:
    """Wait until process ``pid`` is stopped (SIGSTOP delivered)."""
    deadline = time.monotonic() + TIMEOUT
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)


@pytest.mark.parametrize("output", ["json", "human"])
def test_a_relist_reports_the_keys_deleted_during_the_gap(name: str, watches: list[Watch],
                                                          output: str) -> None:
    with Writer(name, capacity=4, arena_bytes=4096, max_keys=64, store_bytes=1 << 16) as w:
        w.put_many([("a", b"1"), ("b", b"2"), ("c", b"3")])  # rv 3
        watch = Watch("--name", name, "-o", output)
        watches.append(watch)
        first = [watch.line() for _ in range(3)]
        # stopped, it misses more events than the ring holds: b's deletion among them
        watch.proc.send_signal(signal.SIGSTOP)
        _stopped(watch.proc.pid)
        w.delete("b")
        for i in range(8):
            w.put("c", b"c%d" % i)
        rv = w.put("d", b"4")
        assert rv - 3 > 4  # more events since the watch's rv 3 than the ring holds
        watch.proc.send_signal(signal.SIGCONT)
        relisted = [watch.line() for _ in range(5)]
        w.put("e", b"5")
        after = watch.line()
    assert watch.finish() == 3  # the Writer closed the cache
    assert "listing again" in watch.stderr
    if output == "json":
        assert [json.loads(line) for line in first] == [
            {"type": "ADDED", "key": k, "rv": 3, "value": v} for k, v in (("a", "1"), ("b", "2"), ("c", "3"))]
        assert [json.loads(line) for line in relisted] == [
            {"type": "RELIST", "rv": rv},
            {"type": "DELETED", "key": "b", "rv": rv, "value": "2"},  # its last value printed
            {"type": "ADDED", "key": "a", "rv": rv, "value": "1"},
            {"type": "ADDED", "key": "c", "rv": rv, "value": "c7"},
            {"type": "ADDED", "key": "d", "rv": rv, "value": "4"}]
        assert json.loads(after) == {"type": "ADDED", "key": "e", "rv": rv + 1, "value": "5"}
    else:
        assert [line.split() for line in first] == [["ADDED", k, "3", v] for k, v in (("a", "1"), ("b", "2"), ("c", "3"))]
        assert relisted[0].startswith(f"RELIST   listed again at rv {rv}")
        assert [line.split() for line in relisted[1:]] == [
            ["DELETED", "b", str(rv), "2"], ["ADDED", "a", str(rv), "1"],
            ["ADDED", "c", str(rv), "c7"], ["ADDED", "d", str(rv), "4"]]
        assert after.split() == ["ADDED", "e", str(rv + 1), "5"]


def test_watch_help_documents_the_relist_and_the_lists_rv() -> None:
    text = " ".join(ok("watch", "--help").out.split())
    assert '{"type": "RELIST", "rv": N}' in text and "DELETED event at rv N" in text
    assert "carry the list's resource version, not each item's (Kubernetes' rule)" in text
    assert '{"type": "RELIST", "rv"}' in " ".join(ok("--help").out.split())


def test_watch_exits_3_when_the_cache_closes(name: str, watches: list[Watch]) -> None:
    with Writer(name, capacity=16, arena_bytes=4096, max_keys=64, store_bytes=1 << 16) as w:
        w.put("k", b"v")
        watch = Watch("--name", name, "-o", "json")
        watches.append(watch)
        assert json.loads(watch.line())["type"] == EventType.ADDED.name
    assert watch.finish() == 3
    assert "closed" in watch.stderr


@pytest.mark.parametrize("command", ["list", "watch"])
def test_a_reader_of_the_output_that_goes_away_is_no_error(name: str, writer: Writer,
                                                            command: str) -> None:
    writer.put("k", b"v")
    proc = subprocess.Popen([sys.executable, "-m", "shmcache", command, "--name", name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    assert proc.stdout is not None
    proc.stdout.close()  # before the command writes a byte: its first write fails
    _, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, err) == (0, b"")


# ---- status --------------------------------------------------------------------


def test_status_of_a_writer_owned_cache(name: str, writer: Writer) -> None:
    writer.put_many([("a", b"12345"), ("b", b"x"), ("a", None)])
    with Reader(name):
        s = js("status", "--name", name)
    assert s["name"] == name and s["path"] == f"/dev/shm/shmcache.{name}"
    assert s["epoch"] == f"{writer.figures().epoch:016x}"
    assert s["owner"] == {"pid": os.getpid(), "name": s["owner"]["name"], "liveness": "alive", "alive": True,
                          "state": "sleeping"}  # this process, waiting for the command's
    assert s["heartbeat_age"] is None and s["socket"] is None
    assert (s["rv"], s["oldest_rv"]) == (3, 1)
    assert s["ring"] == {"events": 3, "capacity": 16, "bytes": 1 + 5 + 1 + 1 + 1 + 5, "arena_bytes": 4096}
    assert s["store"]["keys"] == 1 and s["store"]["max_keys"] == 64
    assert 0 < s["store"]["bytes"] <= s["store"]["store_bytes"]
    assert (s["events_written"], s["events_evicted"]) == (3, 0)
    me = [p for p in s["processes"] if p["pid"] == os.getpid()]
    assert len(me) == 1 and me[0]["mode"] == "rw" and me[0]["mappings"] == 2  # Writer + Reader
    human = ok("status", "--name", name).out
    assert f"pid {os.getpid()}" in human and "alive" in human and "3 of 16 events" in human
    assert "never (no daemon" in human


def test_status_shows_a_dead_owner(name: str) -> None:
    child = python(
        """
        import sys, time, shmcache
        w = shmcache.Writer(sys.argv[1], capacity=8, arena_bytes=4096, max_keys=8, store_bytes=1 << 16)
        w.put("k", b"v")
        print("ready", flush=True)
        time.sleep(600)
        """, name, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        child.kill()
        child.wait(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=TIMEOUT)
        if child.stdout is not None:
            child.stdout.close()
    s = js("status", "--name", name)
    assert s["owner"]["pid"] == child.pid
    assert s["owner"]["liveness"] == "dead" and s["owner"]["alive"] is False
    assert s["rv"] == 1 and all(p["pid"] != child.pid for p in s["processes"])
    assert "dead" in ok("status", "--name", name).out


# ---- against a real daemon -----------------------------------------------------


def test_writes_through_the_daemon(name: str, daemon: Daemon) -> None:
    assert ok("put", "a", "1", "--name", name).out == "a set at rv 1\n"  # socket from the header
    assert js("put", "b", "-", "--name", name, "--socket", daemon.socket) == {"op": "put", "key": "b", "rv": 2}
    ok("put", "c", "-", "--name", name, stdin=b"\xff\xfe")
    assert ok("delete", "a", "--name", name).out == "a deleted at rv 4\n"
    assert js("list", "--name", name) == {"rv": 4, "items": [
        {"key": "b", "rv": 2, "value": ""}, {"key": "c", "rv": 3, "value_b64": "//4="}]}
    result = cli("delete", "a", "--name", name)
    assert result.rc == 1 and "key not found: a" in result.err
    result = cli("put", "big", "-", "--name", name, stdin=b"x" * 70_000)  # the arena is 65536 bytes
    assert result.rc == 1 and "arena" in result.err, result
    result = cli("put", "a", "1", "--rv", "2", "--name", name)
    assert result.rc == 1 and "greater than" in result.err


def test_status_with_a_daemon(name: str, daemon: Daemon) -> None:
    ok("put", "a", "1", "--name", name)
    with Reader(name):
        s = js("status", "--name", name)
        human = ok("status", "--name", name).out
    assert s["owner"]["pid"] == daemon.proc.pid and s["owner"]["alive"] is True
    assert s["heartbeat_age"] is not None and s["heartbeat_age"] >= 0
    assert s["socket"] == daemon.socket
    assert s["ring"]["capacity"] == 64 and s["store"]["max_keys"] == 256 and s["rv"] == 1
    modes = {p["pid"]: p["mode"] for p in s["processes"]}
    assert modes.get(daemon.proc.pid) == "rw", s["processes"]
    assert modes.get(os.getpid()) == "ro", s["processes"]
    assert f"pid {daemon.proc.pid}" in human and "s ago" in human and daemon.socket in human


def test_watch_sees_the_daemons_writes_and_its_shutdown(name: str, daemon: Daemon,
                                                         watches: list[Watch]) -> None:
    w = Watch("--name", name, "--since", "0", "-o", "json")
    watches.append(w)
    ok("put", "a", "1", "--name", name)
    assert json.loads(w.line()) == {"type": "ADDED", "key": "a", "rv": 1, "value": "1"}
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=TIMEOUT) == 0
    assert w.finish() == 3  # the cache was closed by its owner
    assert "closed" in w.stderr


# ---- demo ----------------------------------------------------------------------


def test_demo_direct(name: str) -> None:
    out = ok("demo", "--direct", "--name", name, "--events", "3000", "--readers", "1", "--capacity", "64").out
    assert "reader 0: " in out and "0 bad; final list() at rv 3002: 1002 keys" in out
    assert out.endswith("all checks held\n")


def test_demo_with_a_daemon(name: str) -> None:
    out = ok("demo", "--name", name, "--events", "3000", "--readers", "2",
             "--producers", "2", "--batch", "16", "--capacity", "64").out
    assert f"owns cache {name!r}" in out
    assert "producer 0: 1,500 events" in out and "producer 1: 1,500 events" in out
    assert out.count("0 bad; final list()") == 2
    assert "exit status 0; segment, semaphore and socket removed" in out
    assert out.endswith("all checks held\n")


@pytest.mark.parametrize("how", ["direct", "daemon"])
def test_demo_json_is_one_summary_object(name: str, how: str) -> None:
    args = ["demo", "--name", name, "--events", "2000", "--readers", "2", "--capacity", "64", "-o", "json"]
    summary = json.loads(ok(*args, *(["--direct"] if how == "direct" else ["--producers", "2"])).out)
    assert summary["ok"] is True and summary["demo"] == how and summary["name"] == name
    assert summary["events"] == 2000 and summary["errors"] == []
    assert summary["seconds"] >= 0 and summary["events_per_s"] >= 0
    assert [r["index"] for r in summary["readers"]] == [0, 1]
    for reader in summary["readers"]:
        assert reader["bad"] == 0 and reader["final_keys"] == 1002
        assert reader["final_rv"] == 2002  # the start key, the events, the stop key
    if how == "daemon":
        assert [p["events"] for p in summary["producers"]] == [1000, 1000]
        assert summary["daemon"]["exit_status"] == 0 and summary["daemon"]["left_behind"] == []
        assert summary["daemon"]["rv"] == 2002
    else:
        assert summary["last_rv"] == 2002


def test_demo_rejects_an_invalid_name_before_starting_anything() -> None:
    result = cli("demo", "--name", "no/slashes", "-o", "json")
    assert result.rc == 2 and result.out == "" and "name" in result.err, result
