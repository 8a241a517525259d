"""shmcached --source etcd: a real daemon process mirroring a real etcd's
prefix into its cache, refusing local writes, riding out etcd's death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon._etcd import message_limit
from shmcache import Item, Producer, ProtocolError, Reader, ResourceExpired

from ._etcd import EtcdServer, dead_endpoint
from ._fakehttp import Handler, Peer, fake_server
from .support import Daemon, daemon_env, running, unique_name

DEADLINE = 30.0


def eventually(what: str, check: Callable[[], Any]) -> Any:
    """check()'s first truthy value, within DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        time.sleep(0.05)


@contextmanager
def mirroring(etcd: EtcdServer, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    with mirroring_url(etcd.url, tmp_path, *extra, env=env) as d:
        yield d


@contextmanager
def mirroring_url(url: str, tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    name = unique_name("etcd")
    with running(name, str(tmp_path / "d.sock"), tmp_path / "d.log", "--source", "etcd",
                 "--etcd-endpoints", url, "--etcd-prefix", "/app/", *extra, env=env) as d:
        yield d


def listed(d: Daemon, key: str) -> tuple[str, str]:
    """(cache name, socket) of ``d`` once its first listing holds ``key``."""
    assert d.name is not None and d.socket is not None
    name = d.name
    eventually("the listing", lambda: get(name, key))
    return name, d.socket


def get(name: str, key: str) -> Item | None:
    with Reader(name) as r:
        return r.get(key)


def test_the_daemon_mirrors_the_prefix_and_refuses_local_writes(etcd: EtcdServer, tmp_path: Path) -> None:
    etcd.put(b"/app/a", b"1")
    etcd.put(b"/elsewhere", b"x")
    with mirroring(etcd, tmp_path) as d:
        assert d.name is not None and d.socket is not None
        eventually("the listing", lambda: get(d.name, "a"))  # type: ignore[arg-type]
        rev = etcd.put(b"/app/b", b"2")
        item = eventually("a live put", lambda: get(d.name, "b"))  # type: ignore[arg-type]
        assert item.value == b"2" and item.rv >> 16 == rev
        assert get(d.name, "elsewhere") is None
        with Producer(d.socket) as p:
            with pytest.raises(ProtocolError, match="mirrors an etcd prefix"):
                p.put("local", b"no")
            up = eventually("the upstream connected", lambda: p.stats()["upstream"]["connected"] and p.stats())
            assert up["source"] == "etcd" and up["upstream"]["revision"] >= rev
        assert get(d.name, "local") is None


@pytest.mark.parametrize("where", ["flag", "environment", "file"])
def test_local_writes_when_allowed(etcd: EtcdServer, tmp_path: Path, where: str) -> None:
    """--allow-local-writes is a flag; SHMCACHED_ALLOW_LOCAL_WRITES=true and
    allow_local_writes = true in the TOML file say the same."""
    (tmp_path / "d.toml").write_text("allow_local_writes = true\n")
    extra = {"flag": ["--allow-local-writes"], "environment": [],
             "file": ["--config", str(tmp_path / "d.toml")]}[where]
    env = {"SHMCACHED_ALLOW_LOCAL_WRITES": "true"} if where == "environment" else None
    with mirroring(etcd, tmp_path, *extra, env=env) as d:
        assert d.name is not None and d.socket is not None
        with Producer(d.socket) as p:
            assert p.put("local", b"yes") > 0


def test_keep_prefix_flag(etcd: EtcdServer, tmp_path: Path) -> None:
    etcd.put(b"/app/kept", b"1")
    with mirroring(etcd, tmp_path, "--etcd-keep-prefix") as d:
        name, _ = listed(d, "/app/kept")
        assert get(name, "kept") is None


def test_etcd_dies_and_comes_back_without_a_gap(etcd: EtcdServer, tmp_path: Path) -> None:
    etcd.put(b"/app/k", b"0")
    with mirroring(etcd, tmp_path) as d:
        name, sock = listed(d, "k")
        with Reader(name) as r:
            since = r.resource_version
            for i in range(1, 6):
                etcd.put(b"/app/k", str(i).encode())
            eventually("five puts", lambda: get(name, "k") == Item("k", b"5", get(name, "k").rv))  # type: ignore[union-attr]
            etcd.kill()
            with Producer(sock) as p:
                state = eventually("the upstream marked disconnected",
                                   lambda: (not p.stats()["upstream"]["connected"]) and p.stats())
                assert state["upstream"]["disconnected_since"]
                shown = subprocess.run([sys.executable, "-m", "shmcache", "--name", name, "status"],
                                       capture_output=True, text=True, timeout=60)
                assert "upstream:   etcd, disconnected since" in shown.stdout, shown.stdout + shown.stderr
                assert get(name, "k") is not None  # the last state is still served
                etcd.start()
                for i in range(6, 11):
                    etcd.put(b"/app/k", str(i).encode())
                eventually("the puts after the restart", lambda: get(name, "k") is not None
                           and get(name, "k").value == b"10")  # type: ignore[union-attr]
                assert p.stats()["upstream"]["connected"]
            values = [e.value for e in r.interval(since)]
            assert values == [str(i).encode() for i in range(1, 11)]  # every change, in order, once


def test_bad_etcd_configuration_is_refused(tmp_path: Path) -> None:
    for args, message in ((["--source", "etcd", "--etcd-prefix", "/a/"], "--etcd-endpoints"),
                          (["--source", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379"], "--etcd-prefix"),
                          (["--source", "etcd", "--etcd-endpoints", "ftp://x", "--etcd-prefix", "/a/"], "ftp://x"),
                          (["--source", "nope"], "--source")):
        done = subprocess.run([sys.executable, "-m", "shmcached", "--name", unique_name("bad"), *args],
                              capture_output=True, text=True, timeout=60, env=daemon_env(None))
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)


def test_two_daemons_reach_the_same_state_at_the_same_rv(etcd: EtcdServer, tmp_path: Path) -> None:
    # two cache names stand for two hosts; one follows from early on, the
    # other lists late: at the same RV they hold identical list()s
    etcd.put(b"/app/a", b"1")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with mirroring(etcd, tmp_path / "one") as first:
        assert first.name is not None
        one = first.name
        eventually("the first listing", lambda: get(one, "a"))
        etcd.put(b"/app/b", b"2")
        etcd.delete(b"/app/a")
        etcd.put(b"/app/c", b"3")
        last = etcd.put(b"/app/b", b"22")
        with mirroring(etcd, tmp_path / "two") as second:
            assert second.name is not None
            two = second.name
            with Reader(one) as r1, Reader(two) as r2:
                eventually("both at the last revision",
                           lambda: r1.resource_version >> 16 >= last and r2.resource_version >> 16 >= last)
                # progress notifications keep both moving: compare at one RV
                snaps = eventually("one RV on both", lambda: (lambda a, b: a.rv == b.rv and (a, b))(
                    r1.list(), r2.list()))
                assert snaps[0] == snaps[1]
                assert [(i.key, i.value) for i in snaps[0].items] == [("b", b"22"), ("c", b"3")]


def test_compaction_while_the_daemon_is_away(etcd: EtcdServer, tmp_path: Path) -> None:
    etcd.put(b"/app/k", b"0")
    with mirroring(etcd, tmp_path) as d:
        name, sock = listed(d, "k")
        with Reader(name) as r, Producer(sock) as p:
            watcher = r.interval(r.resource_version)
            assert list(watcher) == []
            etcd.kill()
            eventually("the upstream marked disconnected", lambda: not p.stats()["upstream"]["connected"])
            os.kill(d.pid, signal.SIGSTOP)  # it cannot reconnect before the compaction
            try:
                etcd.start()
                etcd.put(b"/app/k", b"1")
                last = etcd.put(b"/app/k", b"2")
                etcd.compact(last)
            finally:
                os.kill(d.pid, signal.SIGCONT)
            eventually("the relisted value", lambda: get(name, "k") is not None
                       and get(name, "k").value == b"2")  # type: ignore[union-attr]
            assert p.stats()["upstream"]["relists"] >= 2
            with pytest.raises(ResourceExpired):
                list(watcher.continuation())  # never a silent gap: the reader relists
            assert r.list().rv >> 16 >= last


def test_the_daemon_fails_over_to_a_live_endpoint(etcd: EtcdServer, tmp_path: Path) -> None:
    etcd.put(b"/app/a", b"1")
    with dead_endpoint() as dead:
        name = unique_name("etcd")
        with running(name, str(tmp_path / "d.sock"), tmp_path / "d.log", "--source", "etcd",
                     "--etcd-endpoints", f"{dead},{etcd.url}", "--etcd-prefix", "/app/") as d:
            listed(d, "a")
            etcd.put(b"/app/b", b"2")
            eventually("a put through the second endpoint", lambda: get(name, "b"))


def test_the_daemon_reads_etcd_answers_only_up_to_what_its_cache_can_hold(tmp_path: Path) -> None:
    """The daemon bounds its etcd client by its own geometry
    (``message_limit`` of a 1 MiB store: about 1.5 MiB): an endpoint that
    answers every call with 8 MiB is refused at the answer's length — the
    log names exactly that limit, where the client's default (for a cache
    of the default size, about 104 MiB) would have read all 8 MiB — and the
    daemon keeps serving its (empty) cache.  What the endpoint managed to
    send is not a measure of what was read: the kernel's socket buffers on
    both sides take megabytes on their own."""
    huge = 8 << 20

    def flood(peer: Peer) -> None:
        peer.head(200, Content_Type="application/json", Content_Length=huge)
        peer.stream(huge, chunked=False)

    routes: dict[str, Handler] = {path: flood for path in ("/v3/kv/range", "/v3/maintenance/status", "/v3/watch")}
    limit = message_limit(1 << 20, 256, len(b"/app/"))  # tests/support SMALL
    assert limit < huge
    with fake_server(routes) as server:
        with mirroring_url(server.url, tmp_path) as d:
            eventually("the refusal in the log", lambda: f"over the limit of {limit}" in d.output)
            assert d.socket is not None
            assert f"an answer of {huge} bytes, over the limit of {limit}" in d.output, d.output
            with Producer(d.socket) as p:
                assert p.ping() == 0
