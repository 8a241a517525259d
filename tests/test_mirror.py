"""daemon/_mirror.py with a real etcd: a prefix listed and followed into a
cache, etcd's revisions mapped to the same cache RVs on every host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from daemon._etcd import EtcdClient, EtcdCompacted
from daemon._mirror import Mirror, revision_of, rv_after, rv_of
from shmcache import EventType, Item, Reader, ResourceExpired, Writer

from ._etcd import PROGRESS_INTERVAL, EtcdServer
from .support import remove_cache, unique_name

PREFIX = b"/app/"
DEADLINE = 30.0


@contextmanager
def mirrored(etcd: EtcdServer, *, keep_prefix: bool = False) -> Iterator[tuple[Mirror, EtcdClient, Reader]]:
    name = unique_name("mirror")
    try:
        with Writer(name, capacity=256, arena_bytes=1 << 16, max_keys=256, store_bytes=1 << 16) as w, \
                Reader(name) as r:
            yield Mirror(w, PREFIX, keep_prefix=keep_prefix), EtcdClient([etcd.url], timeout=10.0), r
    finally:
        remove_cache(name)


def follow(mirror: Mirror, client: EtcdClient, until_revision: int) -> None:
    """Apply watch messages until the mirror holds everything up to until_revision."""
    with client.watch(PREFIX, mirror.revision + 1, idle_timeout=20 * PROGRESS_INTERVAL) as watch:
        for response in watch:
            mirror.apply(response)
            if mirror.revision >= until_revision:
                return
    raise AssertionError(f"the watch ended at revision {mirror.revision}, before {until_revision}")


def test_relist_then_follow_puts_deletes_and_transactions(etcd: EtcdServer) -> None:
    etcd.put(b"/app/a", b"1")
    etcd.put(b"/app/b", b"2")
    etcd.put(b"/other", b"x")
    with mirrored(etcd) as (m, client, r):
        revision, kvs = client.range_prefix(PREFIX)
        assert m.relist(revision, kvs) == rv_after(revision)
        snap = r.list()
        assert snap.rv == rv_after(revision) and revision_of(snap.rv) == revision
        assert [(i.key, i.value) for i in snap.items] == [("a", b"1"), ("b", b"2")]
        put_rev = etcd.put(b"/app/c", b"3")
        del_rev = etcd.delete(b"/app/a")
        txn_rev = etcd.txn([(b"/app/d", b"4"), (b"/app/b", b"22")], [b"/app/c"])
        follow(m, client, txn_rev)
        events = [(e.type, e.key, e.value, e.rv) for e in r.interval(snap.rv)]
        assert events == [
            (EventType.ADDED, "c", b"3", rv_of(put_rev, 0)),
            (EventType.DELETED, "a", b"1", rv_of(del_rev, 0)),
            (EventType.ADDED, "d", b"4", rv_of(txn_rev, 0)),  # one transaction: one revision,
            (EventType.MODIFIED, "b", b"22", rv_of(txn_rev, 1)),  # RVs in operation order
            (EventType.DELETED, "c", b"3", rv_of(txn_rev, 2)),
        ]
        assert r.resource_version == rv_after(txn_rev)
        assert r.list() == (rv_after(txn_rev), [Item("b", b"22", rv_of(txn_rev, 1)),
                                                  Item("d", b"4", rv_of(txn_rev, 0))])


def test_progress_notifications_advance_an_idle_cache(etcd: EtcdServer) -> None:
    etcd.put(b"/app/a", b"1")
    with mirrored(etcd) as (m, client, r):
        m.relist(*client.range_prefix(PREFIX))
        before = r.resource_version
        outside = etcd.put(b"/elsewhere", b"x")  # moves etcd's revision, not the prefix
        follow(m, client, outside)
        assert r.resource_version == rv_after(outside) > before
        assert list(r.interval(before)) == []  # a bookmark, no event
        assert r.list().rv == rv_after(outside)


def test_two_hosts_hold_the_same_state_at_the_same_rv(etcd: EtcdServer) -> None:
    etcd.put(b"/app/a", b"1")
    first = etcd.txn([(b"/app/b", b"2"), (b"/app/c", b"3")])
    with mirrored(etcd) as (early, client, r1):
        early.relist(*client.range_prefix(PREFIX, revision=first - 1))  # listed before the txn
        last = etcd.txn([(b"/app/a", b"11")], [b"/app/b"])
        etcd.put(b"/app/e", b"5")
        last = etcd.put(b"/app/a", b"111")
        follow(early, client, last)
        with mirrored(etcd) as (late, client2, r2):
            late.relist(*client2.range_prefix(PREFIX))  # listed after everything
            one, two = r1.list(), r2.list()
            assert one.rv == two.rv == rv_after(last)
            assert [(i.key, i.value) for i in one.items] == [(i.key, i.value) for i in two.items]
            assert [(i.key, i.value) for i in one.items] == [("a", b"111"), ("c", b"3"), ("e", b"5")]


def test_two_hosts_hold_the_same_item_rvs(etcd: EtcdServer) -> None:
    # keys changed alone: identical list() on both hosts, item RVs included;
    # keys of one multi-key transaction: the same etcd revision, not the same
    # place inside it (a listing cannot tell a key's place in its transaction)
    etcd.put(b"/app/a", b"1")
    with mirrored(etcd) as (early, client, r1):
        early.relist(*client.range_prefix(PREFIX))
        etcd.put(b"/app/b", b"2")
        etcd.delete(b"/app/a")
        last = etcd.put(b"/app/c", b"3")
        follow(early, client, last)
        with mirrored(etcd) as (late, client2, r2):
            late.relist(*client2.range_prefix(PREFIX))
            assert r1.list() == r2.list()
            assert [revision_of(i.rv) for i in r2.list().items] == [last - 2, last]
            txn = etcd.txn([(b"/app/x", b"x"), (b"/app/y", b"y")])
            follow(early, client, txn)
        with mirrored(etcd) as (late, client3, r3):
            late.relist(*client3.range_prefix(PREFIX))
            one, two = r1.list(), r3.list()
            assert one.rv == two.rv and [(i.key, i.value) for i in one.items] == [(i.key, i.value) for i in two.items]
            assert [revision_of(i.rv) for i in one.items] == [revision_of(i.rv) for i in two.items]
            assert {i.key: i.rv for i in one.items}["y"] == rv_of(txn, 1)  # its place in the transaction
            assert {i.key: i.rv for i in two.items}["y"] == rv_of(txn, 0)  # unknown to a listing


def test_keys_that_are_not_cache_keys_are_skipped_and_counted(etcd: EtcdServer) -> None:
    etcd.put(b"/app/\xff\xfe", b"bad")
    etcd.put(b"/app/ok", b"1")
    with mirrored(etcd) as (m, client, r):
        m.relist(*client.range_prefix(PREFIX))
        assert m.skipped_keys == 1
        assert [i.key for i in r.list().items] == ["ok"]
        rev = etcd.txn([(b"/app/\xc3", b"bad too"), (b"/app/ok2", b"2")])
        gone = etcd.delete(b"/app/\xff\xfe")  # a delete of a key never held: nothing to tell readers
        follow(m, client, gone)
        assert m.skipped_keys == 3
        assert [(e.key, e.rv) for e in r.interval(rv_after(rev - 1))] == [("ok2", rv_of(rev, 0))]
        assert r.resource_version == rv_after(gone)


def test_keep_prefix(etcd: EtcdServer) -> None:
    etcd.put(b"/app/a", b"1")
    with mirrored(etcd, keep_prefix=True) as (m, client, r):
        m.relist(*client.range_prefix(PREFIX))
        assert [i.key for i in r.list().items] == ["/app/a"]


def test_compaction_while_away_means_a_relist_and_expired_watchers(etcd: EtcdServer) -> None:
    etcd.put(b"/app/a", b"1")
    with mirrored(etcd) as (m, client, r):
        m.relist(*client.range_prefix(PREFIX))
        old = r.resource_version
        watcher = r.interval(old)  # a reader following the cache
        b_rev = etcd.put(b"/app/b", b"2")
        last = etcd.put(b"/app/a", b"11")
        etcd.compact(last)
        with pytest.raises(EtcdCompacted):
            follow(m, client, last)  # the mirror was away: its resume revision is gone
        m.relist(*client.range_prefix(PREFIX))
        assert m.revision == last
        assert r.list() == (rv_after(last), [Item("a", b"11", rv_of(last, 0)), Item("b", b"2", rv_of(b_rev, 0))])
        with pytest.raises(ResourceExpired):
            list(watcher.continuation())  # readers relist, as from Kubernetes' 410
        with pytest.raises(ResourceExpired):
            r.interval(old)
