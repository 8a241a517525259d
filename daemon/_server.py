"""The daemon: owns one cache and serves producers on a Unix socket.

One thread, one ``selectors`` loop: the listening socket, a self-pipe for
signals, and every producer connection.  Requests are applied to the cache
through a ``shmcache.Writer`` as they complete, in arrival order per
connection, and answered in that order; a reply is sent only after its change
is published, so an acknowledged write is in the segment.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import selectors
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

from shmcache import CacheExists, CacheNotTrusted, ShmCacheError, Writer
from shmcache import _protocol as proto

from ._config import Config
from ._etcd import EtcdClient, message_limit
from ._notify import Notifier
from ._upstream import Upstream

__all__ = ["Daemon"]

log = logging.getLogger("shmcached")

_UCRED = struct.Struct("3i")  # pid, uid, gid
#: Linux >= 4.13; the socket module of Python 3.11 does not name it
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: CPython's getsockopt() takes at most 1,024 bytes: 256 supplementary groups
PEERGROUPS_BYTES = 1024
DRAIN_SECONDS = 2.0  # at shutdown, how long clients get to collect their replies

# The memory bound of docs/protocol.md ("Limits") is made of these: a
# connection buffers at most CLIENT_ALLOWANCE bytes of input of its own, a
# frame larger than that is buffered only once its size is reserved from
# --max-buffered-bytes, and no further frame of a connection is applied while
# REPLY_HIGH_WATER bytes of its replies are unsent (so a connection holds at
# most that plus one reply, whose error text is cut at MAX_ERROR_TEXT).  The
# docs count 64 KiB a connection: these, its own objects and allocator slack.
CLIENT_ALLOWANCE = 32 << 10
REPLY_HIGH_WATER = 16 << 10
MAX_ERROR_TEXT = 2048


@dataclass(eq=False)
class Client:
    sock: socket.socket
    pid: int
    uid: int
    may_choose_rv: bool = False  # --allow-rv-uid, root or the daemon's uid
    inbuf: bytearray = field(default_factory=bytearray)  # at most CLIENT_ALLOWANCE bytes
    outbuf: bytearray = field(default_factory=bytearray)
    # A frame over CLIENT_ALLOWANCE: its payload, received straight into a
    # buffer of exactly its size once the size is reserved (inbuf is empty
    # meanwhile), and how much of it has arrived.  An anonymous mapping: its
    # pages are allocated as the payload arrives, not zeroed at admission.
    large: mmap.mmap | None = None
    large_filled: int = 0
    reserved: int = 0  # bytes of --max-buffered-bytes held for ``large``
    wants: int = 0  # while waiting for the budget: the payload size to reserve
    partial_since: float | None = None  # since when an incomplete frame waits while we read it
    closing: bool = False  # apply nothing more, close once outbuf is sent (protocol error, end of stream)
    events: int = selectors.EVENT_READ  # what the selector watches for now (0: unregistered)


def _check_socket_directory(path: str) -> None:
    """OSError unless the directory of ``path`` is owned by this uid or root
    and writable by no one else."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as err:
        raise OSError(err.errno, f"{path}: its directory {directory}: {err.strerror}") from err
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise OSError(errno.EPERM, f"the socket's directory {directory} (owner uid {st.st_uid}, mode "
                                   f"{stat.S_IMODE(st.st_mode):04o}) may be written by others, who could "
                                   f"take the socket's path: use a directory only this user can write")


class Daemon:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.selector = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.stop_signal = 0
        self.requests = self.rejected = 0
        self.accepting = True  # False while accept() fails (EMFILE...): see _pause_accepting
        self.accept_failing = False  # since the last accept() that worked: log an episode once
        self.started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)
        self.events_per_s = 0.0
        self.upstream: Upstream | None = None  # the etcd source's thread, if any
        # Root and the daemon's own uid could write the segment directly:
        # they always produce, choose RVs, and are not held to a uid's share
        # of the connections.
        self.trusted_uids = frozenset({0, os.geteuid()})
        self.rv_uids = self.trusted_uids | set(config.allow_rv_uid)
        self.uid_clients: dict[int, int] = {}  # connections per uid
        self.uid_refused: set[int] = set()  # uids at --max-clients-per-uid: logged once per episode
        self.reserved = 0  # bytes of --max-buffered-bytes held by large frames
        self.uid_reserved: dict[int, int] = {}
        self.waiting: dict[Client, None] = {}  # clients paused until their frame's size fits, oldest first
        self.stopping = False  # shutting down: no more reading, buffered frames still answered
        self.peergroups = True  # False once the kernel turned SO_PEERGROUPS down (Linux < 4.13)

    # ---- lifecycle -------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the process exit status."""
        # Handlers first: a signal during startup must still end in a clean
        # shutdown, not in a killed process that leaves the segment behind.
        wake_r, self._wake_w = socket.socketpair()
        wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._serve(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wake_r.close()
            self._wake_w.close()

    def _serve(self, wake_r: socket.socket) -> int:
        c = self.config
        try:
            self.writer = Writer(c.name, capacity=c.capacity, arena_bytes=c.arena_bytes,
                                 max_keys=c.max_keys, store_bytes=c.store_bytes, mode=c.mode,
                                 group=c.group, lock_timeout=c.lock_timeout, adopt=True)
        except (CacheExists, CacheNotTrusted) as err:  # a live owner; another user holds the name
            log.error("%s", err)
            return 1
        except (OSError, ShmCacheError) as err:  # no room in /dev/shm, no permission, ...
            log.error("cannot create cache %r: %s", c.name, err)
            return 1
        left_by = self.writer.adopted_from
        if left_by is not None:
            figures = self.writer.figures()
            log.info("adopted cache %r at rv %d (epoch %016x, left by pid %d, dead)",
                     c.name, figures.rv, figures.epoch, left_by.pid)
        try:
            self.listener = self._listen()
        except (OSError, ShmCacheError) as err:
            log.error("cannot serve cache %r: %s", c.name, err)
            # an adopted cache holds what producers were told is written: leave
            # it for the next start, as the dead daemon did
            self.writer.close(unlink=left_by is None)
            return 1
        self.writer.advertise_socket(c.socket)
        self.writer.heartbeat()
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.selector.register(wake_r, selectors.EVENT_READ, "wakeup")
        if c.source == "etcd":
            assert c.etcd_endpoints is not None and c.etcd_prefix is not None
            prefix = c.etcd_prefix.encode()
            # no answer that fits this cache is larger, so none is read whole beyond that
            client = EtcdClient(list(c.etcd_endpoints), ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key,
                                max_message_bytes=message_limit(c.store_bytes, c.max_keys, len(prefix)),
                                max_message_kvs=c.max_keys)
            self.upstream = Upstream(self.writer, client, prefix, keep_prefix=c.etcd_keep_prefix)
            self.upstream.start()
            log.info("mirroring etcd prefix %r from %s", c.etcd_prefix, ", ".join(c.etcd_endpoints))
        if not self.stop_signal:
            log.info("cache %r (epoch %016x) ready: %d events, %d keys; producers on %s",
                     c.name, self.writer.figures().epoch, c.capacity, c.max_keys, c.socket)
            self.notifier.send(READY=1, MAINPID=os.getpid(), STATUS=self._status())
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def _listen(self) -> socket.socket:
        """Listen on the configured path.  Its directory must be writable by
        nobody but this uid (or root): in one that others may write, anyone
        could take the path first, or swap the socket for their own.  The
        socket file is made 0600 by bind (umask), then given its group, then
        its mode: no moment exists at which a process outside the group may
        connect."""
        path = self.config.socket
        _check_socket_directory(path)
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket of ours; not replacing it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a dead daemon's socket
            else:
                raise OSError(errno.EADDRINUSE, f"a live process already listens on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(umask)
            # the directory is ours alone, so the path stays our socket; no
            # symlink is followed all the same
            if self.config.group is not None:
                os.chown(path, -1, self.config.group, follow_symlinks=False)
            os.chmod(path, self.config.socket_mode)
            sock.listen(128)
        except OSError as err:
            sock.close()
            raise OSError(err.errno, f"{path}: {err.strerror}") from err
        sock.setblocking(False)
        return sock

    def _shutdown(self) -> None:
        """Stop accepting, answer what was received, close the cache."""
        self.notifier.send(STOPPING=1, STATUS="stopping")
        log.info("stopping (%s)", signal.Signals(self.stop_signal).name if self.stop_signal else "loop ended")
        if self.accepting:
            self.selector.unregister(self.listener)
        self.listener.close()
        try:
            if os.path.exists(self.config.socket):
                os.unlink(self.config.socket)
        except OSError as err:
            log.warning("cannot remove %s: %s", self.config.socket, err)
        # Complete frames already received are applied and answered, a reply
        # high-water mark's worth at a time, as the clients read.
        self.stopping = True
        for client in list(self.clients.values()):
            self._pump(client)
        deadline = time.monotonic() + DRAIN_SECONDS
        while any(c.outbuf for c in self.clients.values()) and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.05):
                pending = self.clients.get(key.fd) if key.data == "client" else None
                if pending is not None and mask & selectors.EVENT_WRITE:
                    self._pump(pending)
        for client in list(self.clients.values()):
            self._drop(client, "shutdown")
        if self.upstream is not None:
            self.upstream.stop()
        rv = self.writer.resource_version
        self.writer.close()  # closed flag, futex wake, unlink of segment and semaphore
        log.info("cache %r closed at rv %d after %d requests", self.config.name, rv, self.requests)

    # ---- the loop --------------------------------------------------------

    def _loop(self) -> None:
        c = self.config
        next_beat = time.monotonic()
        watchdog = self.notifier.watchdog_interval
        next_watchdog = time.monotonic() if watchdog else float("inf")
        while not self.stop_signal:
            now = time.monotonic()
            if now >= next_beat:
                self.writer.heartbeat()
                self._drop_stalled(now)
                self._resume_accepting()
                self.notifier.send(STATUS=self._status())
                next_beat = now + c.heartbeat
            if now >= next_watchdog:
                self.notifier.send(WATCHDOG=1)
                next_watchdog = now + (watchdog or 0)
            timeout = max(0.0, min(next_beat, next_watchdog) - time.monotonic())
            for key, mask in self.selector.select(timeout):
                if key.data == "listener":
                    self._accept()
                elif key.data == "wakeup":
                    try:
                        key.fileobj.recv(4096)  # type: ignore[union-attr]
                    except BlockingIOError:
                        pass
                else:
                    client = self.clients.get(key.fd)
                    if client is None:
                        continue
                    if mask & selectors.EVENT_READ:
                        self._receive(client)
                    if mask & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                        self._pump(client)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: keep serving the others
                self._pause_accepting(err)
                return
            self.accept_failing = False
            sock.setblocking(False)
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            groups = self._peer_groups(sock, pid)
            client = Client(sock, pid, uid, may_choose_rv=uid in self.rv_uids)
            if not self._allowed(uid, gid, groups):
                self.rejected += 1
                log.warning("refused producer pid %d uid %d gid %d groups %s: not root, the daemon's uid, "
                            "in allow-uid or a member of allow-gid", pid, uid, gid, list(groups))
                self._reply(client, proto.encode_reply(proto.Status.FORBIDDEN, 0, b"uid/gid not allowed"))
                try:
                    sock.send(bytes(client.outbuf))
                except OSError:
                    pass
                sock.close()
                continue
            if len(self.clients) >= self.config.max_clients:
                log.warning("refused producer pid %d: %d clients already", pid, len(self.clients))
                sock.close()
                continue
            count = self.uid_clients.get(uid, 0)
            if count >= self.config.max_clients_per_uid and uid not in self.trusted_uids:
                self.rejected += 1
                if uid not in self.uid_refused:  # a flood of connects must not flood the log
                    self.uid_refused.add(uid)
                    log.warning("refusing producers of uid %d: %d connections already (max-clients-per-uid); "
                                "logged once until one of them closes", uid, count)
                sock.close()
                continue
            self.uid_clients[uid] = count + 1
            self.clients[sock.fileno()] = client
            self.selector.register(sock, selectors.EVENT_READ, "client")
            log.debug("producer pid %d uid %d connected", pid, uid)

    def _pause_accepting(self, err: OSError) -> None:
        """accept() failed (out of file descriptors, most likely).  The
        waiting connection keeps the listener readable, so retrying at once
        would spin and flood the log: stop watching the listener until a
        client leaves or the next heartbeat.  Waiting producers stay in the
        backlog until then, or until their own timeout."""
        if self.accepting:
            self.accepting = False
            self.selector.unregister(self.listener)
        if not self.accept_failing:
            self.accept_failing = True
            log.warning("accept failed: %s; retrying when a producer disconnects and at each heartbeat "
                        "(%d clients); logged once until an accept succeeds", err, len(self.clients))

    def _resume_accepting(self) -> None:
        if not self.accepting:
            self.accepting = True
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")

    def _peer_groups(self, sock: socket.socket, pid: int) -> tuple[int, ...]:
        """The peer's supplementary groups as they were at its connect(),
        from the socket (SO_PEERGROUPS), like its uid and gid (SO_PEERCRED):
        neither what the peer does afterwards nor a reuse of its pid changes
        the verdict.  Only a kernel without SO_PEERGROUPS (Linux < 4.13)
        makes the daemon read /proc/PID/status instead, at accept time."""
        if self.peergroups:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_BYTES)
            except OSError as err:
                if err.errno != errno.ENOPROTOOPT:
                    # ERANGE: more groups than CPython can fetch.  Least
                    # privilege: judged by its uid and primary gid alone.
                    log.warning("producer pid %d: supplementary groups unreadable (%s); judged by its uid "
                                "and primary gid only", pid,
                                "more than 256" if err.errno == errno.ERANGE else err)
                    return ()
                self.peergroups = False
                log.warning("this kernel has no SO_PEERGROUPS (Linux < 4.13): producers' supplementary groups "
                            "are read from /proc/PID/status when they are accepted, not as of their connect()")
            else:
                return struct.unpack(f"={len(raw) // 4}I", raw[:len(raw) // 4 * 4])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return tuple(int(g) for g in line.split()[1:])
        except (OSError, ValueError):
            pass
        return ()

    def _allowed(self, uid: int, gid: int, groups: tuple[int, ...]) -> bool:
        c = self.config
        return (uid in self.trusted_uids or uid in c.allow_uid
                or gid in c.allow_gid or any(g in c.allow_gid for g in groups))

    # ---- a connection's input, budget and replies --------------------------

    def _may_read(self, client: Client) -> bool:
        if client.closing or client.wants or self.stopping or len(client.outbuf) >= REPLY_HIGH_WATER:
            return False
        if client.large is not None:
            return client.large_filled < len(client.large)
        return len(client.inbuf) < CLIENT_ALLOWANCE

    def _receive(self, client: Client) -> None:
        if not self._may_read(client):
            return  # paused since the selector reported it
        try:
            if client.large is not None:
                n = client.sock.recv_into(memoryview(client.large)[client.large_filled:])
                client.large_filled += n
            else:
                data = client.sock.recv(CLIENT_ALLOWANCE - len(client.inbuf))
                client.inbuf += data
                n = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(client, f"recv: {err}")
            return
        if not n:
            # Every complete frame it sent has been applied (else we would
            # not be reading it): send what is left of their replies, then close.
            client.closing = True
            self._pump(client)
            return
        self._pump(client)

    def _pump(self, client: Client) -> None:
        """Apply what the client sent, as far as its unsent replies allow;
        send what its socket takes; watch it for what it may do next."""
        while True:
            self._apply(client)
            if not client.outbuf:
                break
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self._drop(client, f"send: {err}")
                return
            del client.outbuf[:sent]
            if len(client.outbuf) >= REPLY_HIGH_WATER or not self._frame_ready(client):
                break
        if client.closing and not client.outbuf:
            self._drop(client, "closed after its last reply")
            return
        self._watch(client)

    def _frame_ready(self, client: Client) -> bool:
        """Could _apply make progress on what is buffered?"""
        if client.closing or client.wants:
            return False
        if client.large is not None:
            return client.large_filled == len(client.large)
        buf = client.inbuf
        if len(buf) < proto.FRAME_HEADER.size:
            return False
        size: int = proto.FRAME_HEADER.unpack_from(buf)[0]
        end = proto.FRAME_HEADER.size + size
        return size > self.config.max_frame_bytes or end > CLIENT_ALLOWANCE or end <= len(buf)

    def _apply(self, client: Client) -> None:
        """Apply the complete frames received, in order, while fewer than
        REPLY_HIGH_WATER bytes of replies wait to be sent."""
        header = proto.FRAME_HEADER.size
        while not client.closing and not client.wants and len(client.outbuf) < REPLY_HIGH_WATER:
            if client.large is not None:
                if client.large_filled < len(client.large):
                    break
                payload = client.large[:]
                client.large = None  # unmapped: the copy is what is applied
            else:
                buf = client.inbuf
                if len(buf) < header:
                    break
                (size,) = proto.FRAME_HEADER.unpack_from(buf)
                if size > self.config.max_frame_bytes:
                    self.rejected += 1
                    self._reply(client, proto.encode_reply(
                        proto.Status.FRAME_TOO_LARGE, 0,
                        f"frame of {size} bytes exceeds max-frame-bytes {self.config.max_frame_bytes}".encode()))
                    client.closing = True
                    break
                end = header + size
                if end > CLIENT_ALLOWANCE:
                    if not self._reserve(client, size):
                        break  # paused until its size fits in the budget
                    continue
                if len(buf) < end:
                    break
                with memoryview(buf) as view:
                    payload = bytes(view[header:end])
                del buf[:end]
            self._reply(client, self._handle(client, payload))
            del payload
            self._release(client)  # held until now: it covered the payload being applied
            client.partial_since = None  # a completed frame is progress
        if client.closing:
            client.inbuf.clear()
            client.large = None
            self._unwait(client)
            self._release(client)
        if not client.inbuf and client.large is None:
            client.partial_since = None
        elif client.partial_since is None:
            client.partial_since = time.monotonic()

    def _reserve(self, client: Client, size: int) -> bool:
        """Reserve ``size`` bytes of --max-buffered-bytes for the client's
        next frame, now if they fit and no other client waits ahead of it;
        else queue the client (it is not read meanwhile).  True if reserved."""
        client.wants = size
        self.waiting[client] = None
        self._admit()
        return not client.wants

    def _admit(self) -> None:
        """Grant waiting clients their reservations while they fit.  Fair
        among uids: the waiter whose uid holds the least goes first (the
        oldest among equals), so one uid's flood of large frames delays
        another uid's only until the reservations in force end (a stalled
        one within --client-timeout), not until the whole flood is through;
        no waiter is passed over for a smaller one behind it, so none starves."""
        budget = self.config.max_buffered_bytes
        while self.waiting and not self.stopping:  # stopping: nobody is read again
            nxt = min(self.waiting, key=lambda w: self.uid_reserved.get(w.uid, 0))
            if self.reserved + nxt.wants > budget:
                return
            del self.waiting[nxt]
            size, nxt.wants = nxt.wants, 0
            self.reserved += size
            self.uid_reserved[nxt.uid] = self.uid_reserved.get(nxt.uid, 0) + size
            nxt.reserved = size
            # The frame's payload goes straight into a buffer of its size; what
            # arrived of it so far moves there from the small input buffer.
            large = mmap.mmap(-1, size)
            got = len(nxt.inbuf) - proto.FRAME_HEADER.size
            large[:got] = nxt.inbuf[proto.FRAME_HEADER.size:]
            nxt.large, nxt.large_filled, nxt.inbuf = large, got, bytearray()
            self._watch(nxt)  # read again: its stall clock restarts

    def _release(self, client: Client) -> None:
        if client.reserved:
            self.reserved -= client.reserved
            left = self.uid_reserved.get(client.uid, 0) - client.reserved
            if left > 0:
                self.uid_reserved[client.uid] = left
            else:
                self.uid_reserved.pop(client.uid, None)
            client.reserved = 0
            self._admit()

    def _unwait(self, client: Client) -> None:
        if client.wants:
            self.waiting.pop(client, None)
            client.wants = 0

    def _watch(self, client: Client) -> None:
        """Register the client for what it may do now: send (unsent replies),
        receive (room in its buffer, not paused).  Unregistered if neither."""
        want = selectors.EVENT_WRITE if client.outbuf else 0
        if self._may_read(client):
            want |= selectors.EVENT_READ
        if want == client.events:  # each change is a system call
            return
        if want & ~client.events & selectors.EVENT_READ and (client.inbuf or client.large is not None):
            client.partial_since = time.monotonic()  # the stall clock restarts when we read again
        if not want:
            self.selector.unregister(client.sock)
        elif not client.events:
            self.selector.register(client.sock, want, "client")
        else:
            self.selector.modify(client.sock, want, "client")
        client.events = want

    def _handle(self, client: Client, payload: bytes) -> bytes:
        self.requests += 1
        try:
            request = proto.decode_request(payload)
        except proto.BadFrame as err:
            self.rejected += 1
            if err.status == proto.Status.BAD_FRAME:
                client.closing = True
            log.debug("producer pid %d: %s", client.pid, err)
            return proto.encode_reply(err.status, 0, str(err).encode())
        w = self.writer
        try:
            if request.op == proto.Op.PING:
                return proto.encode_reply(proto.Status.OK, w.resource_version)
            if request.op == proto.Op.STATS:
                return proto.encode_reply(proto.Status.OK, w.resource_version,
                                          json.dumps(self.stats()).encode())
            if self.config.source != "local" and not self.config.allow_local_writes:
                self.rejected += 1
                return proto.encode_reply(proto.Status.READ_ONLY, 0,
                                          b"this cache mirrors an etcd prefix: write to etcd "
                                          b"(or start shmcached with --allow-local-writes)")
            rv = request.rv or None
            if rv is not None:
                refusal = self._rv_refusal(client, rv)
                if refusal is not None:
                    self.rejected += 1
                    return proto.encode_reply(proto.Status.INVALID_RV, 0, refusal.encode())
            if request.op == proto.Op.PUT:
                key, value = request.items[0]
                assert value is not None
                return proto.encode_reply(proto.Status.OK, w.put(key, value, rv=rv))
            if request.op == proto.Op.DELETE:
                return proto.encode_reply(proto.Status.OK, w.delete(request.items[0][0], rv=rv))
            return proto.encode_reply(proto.Status.OK, w.put_many(request.items))
        except (ShmCacheError, KeyError, ValueError, TypeError) as err:
            self.rejected += 1
            return proto.error_reply(err)

    def _rv_refusal(self, client: Client, rv: int) -> str | None:
        """Why an explicit ``rv`` is refused before the writer sees it, if it
        is.  Resource versions only grow and end at 2**63 - 1: one far jump
        would leave every producer without any, until a restart."""
        if not client.may_choose_rv:
            return (f"uid {client.uid} may not choose resource versions (root, the daemon's uid and "
                    f"--allow-rv-uid may): send rv 0 to get the next one")
        current = self.writer.resource_version
        if rv > current + self.config.max_rv_jump:
            return f"rv {rv} is more than --max-rv-jump {self.config.max_rv_jump} past the current rv {current}"
        return None

    def _reply(self, client: Client, frame: bytes) -> None:
        head = proto.FRAME_HEADER.size + proto.REPLY.size
        if len(frame) > head + MAX_ERROR_TEXT and frame[proto.FRAME_HEADER.size] != proto.Status.OK:
            # an error's text is cut so that one reply stays small (the memory bound)
            text = frame[head:head + MAX_ERROR_TEXT].decode("utf-8", "ignore").encode()
            frame = proto.encode_reply(proto.Status(frame[proto.FRAME_HEADER.size]), 0, text)
        client.outbuf += frame

    def _drop_stalled(self, now: float) -> None:
        limit = self.config.client_timeout
        for client in list(self.clients.values()):
            if not client.events & selectors.EVENT_READ:
                continue  # we stopped reading it (budget, unsent replies): not its stall
            if client.partial_since is not None and now - client.partial_since > limit:
                self.rejected += 1
                self._drop(client, f"stalled mid-frame for more than {limit:g} s")

    def _drop(self, client: Client, why: str) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        log.debug("producer pid %d disconnected: %s", client.pid, why)
        self.clients.pop(fd, None)
        self._unwait(client)
        client.large = None
        self._release(client)  # may admit a waiting client
        left = self.uid_clients.get(client.uid, 0) - 1
        if left > 0:
            self.uid_clients[client.uid] = left
        else:
            self.uid_clients.pop(client.uid, None)
        self.uid_refused.discard(client.uid)
        if client.events:
            try:
                self.selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.events = 0
        client.sock.close()
        self._resume_accepting()  # a descriptor is free again

    # ---- figures ---------------------------------------------------------

    def stats(self) -> dict[str, object]:
        f = self.writer.figures()
        return {
            "name": self.config.name,
            "epoch": f"{f.epoch:016x}",
            "pid": os.getpid(),
            "rv": f.rv,
            "events_written": f.events_written,
            "events_evicted": f.events_evicted,
            "keys": f.store.keys,
            "store_bytes": f.store.bytes,
            "producers": len(self.clients),
            "buffered_bytes": self.reserved,
            "waiting_for_buffer": len(self.waiting),
            "requests": self.requests,
            "rejected": self.rejected,
            "events_per_s": round(self.events_per_s, 1),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "source": self.config.source,
            "upstream": self.upstream.state() if self.upstream is not None else None,
            # the limits a Producer checks before sending (docs/protocol.md, "Frames")
            "max_frame_bytes": self.config.max_frame_bytes,
            "arena_bytes": self.writer.geometry.arena_bytes,
            "max_record_bytes": self.writer.geometry.max_record,
        }

    def _status(self) -> str:
        now = time.monotonic()
        written = self.writer.figures().events_written
        then, before = self._rate_mark
        if now > then:
            self.events_per_s = (written - before) / (now - then)
        self._rate_mark = (now, written)
        text = (f"rv {self.writer.resource_version}, {self.events_per_s:.0f} events/s, "
                f"{len(self.clients)} producers")
        up = self.upstream
        if up is not None:
            since = up.state()["disconnected_since"]
            text += (f"; etcd revision {up.mirror.revision}" if up.connected
                     else f"; upstream disconnected since {since}" if since else "; upstream connecting")
        return text
