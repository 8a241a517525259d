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
from ._etcd import EtcdClient
from ._notify import Notifier
from ._upstream import Upstream

__all__ = ["Daemon"]

log = logging.getLogger("shmcached")

_UCRED = struct.Struct("3i")  # pid, uid, gid
READ_CHUNK = 1 << 18
PAUSE_READING_AT = 1 << 20  # reply bytes queued for a client that does not read them
DRAIN_SECONDS = 2.0  # at shutdown, how long clients get to collect their replies


@dataclass
class Client:
    sock: socket.socket
    pid: int
    uid: int
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    partial_since: float | None = None  # when an incomplete frame started waiting
    closing: bool = False  # close once outbuf is sent
    events: int = selectors.EVENT_READ  # what the selector watches for now


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
                                 group=c.group, lock_timeout=c.lock_timeout)
        except (CacheExists, CacheNotTrusted) as err:  # a live owner; another user holds the name
            log.error("%s", err)
            return 1
        except (OSError, ShmCacheError) as err:  # no room in /dev/shm, no permission, ...
            log.error("cannot create cache %r: %s", c.name, err)
            return 1
        try:
            self.listener = self._listen()
        except (OSError, ShmCacheError) as err:
            log.error("cannot serve cache %r: %s", c.name, err)
            self.writer.close()
            return 1
        self.writer.advertise_socket(c.socket)
        self.writer.heartbeat()
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.selector.register(wake_r, selectors.EVENT_READ, "wakeup")
        if c.source == "etcd":
            assert c.etcd_endpoints is not None and c.etcd_prefix is not None
            client = EtcdClient(list(c.etcd_endpoints), ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key)
            self.upstream = Upstream(self.writer, client, c.etcd_prefix.encode(),
                                     keep_prefix=c.etcd_keep_prefix)
            self.upstream.start()
            log.info("mirroring etcd prefix %r from %s", c.etcd_prefix, ", ".join(c.etcd_endpoints))
        if not self.stop_signal:
            log.info("cache %r (epoch %016x) ready: %d events, %d keys; producers on %s",
                     c.name, self.writer._h.epoch, c.capacity, c.max_keys, c.socket)
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
        for client in list(self.clients.values()):
            self._process(client)  # complete frames already received are applied and answered
            client.closing = True
        deadline = time.monotonic() + DRAIN_SECONDS
        while any(c.outbuf for c in self.clients.values()) and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.05):
                pending = self.clients.get(key.fd) if key.data == "client" else None
                if pending is not None and mask & selectors.EVENT_WRITE:
                    self._flush(pending)
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
                        self._flush(client)

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
            client = Client(sock, pid, uid)
            if not self._allowed(pid, uid, gid):
                self.rejected += 1
                log.warning("refused producer pid %d uid %d gid %d: not in allow-uid/allow-gid", pid, uid, gid)
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

    def _allowed(self, pid: int, uid: int, gid: int) -> bool:
        c = self.config
        if uid in c.allow_uid or gid in c.allow_gid:
            return True
        try:  # supplementary groups: a reader that joined the cache's group
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return any(int(g) in c.allow_gid for g in line.split()[1:])
        except (OSError, ValueError):
            pass
        return False

    def _receive(self, client: Client) -> None:
        try:
            data = client.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(client, f"recv: {err}")
            return
        if not data:
            self._drop(client, "closed by the producer")
            return
        client.inbuf += data
        self._process(client)

    def _process(self, client: Client) -> None:
        """Apply every complete frame in the input buffer."""
        buf = client.inbuf
        while len(buf) >= proto.FRAME_HEADER.size and not client.closing:
            (size,) = proto.FRAME_HEADER.unpack_from(buf)
            if size > self.config.max_frame_bytes:
                self.rejected += 1
                self._reply(client, proto.encode_reply(
                    proto.Status.FRAME_TOO_LARGE, 0,
                    f"frame of {size} bytes exceeds max-frame-bytes {self.config.max_frame_bytes}".encode()))
                client.closing = True
                break
            end = proto.FRAME_HEADER.size + size
            if len(buf) < end:
                break
            payload = bytes(buf[proto.FRAME_HEADER.size:end])
            del buf[:end]
            self._reply(client, self._handle(client, payload))
            client.partial_since = None  # a completed frame is progress
        if not buf:
            client.partial_since = None
        elif client.partial_since is None:
            client.partial_since = time.monotonic()
        if client.closing:
            buf.clear()
        self._flush(client)

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

    def _reply(self, client: Client, frame: bytes) -> None:
        client.outbuf += frame

    def _flush(self, client: Client) -> None:
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
                del client.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as err:
                self._drop(client, f"send: {err}")
                return
        if client.closing and not client.outbuf:
            self._drop(client, "protocol error")
            return
        # stop reading from a client that does not read its replies
        want = selectors.EVENT_WRITE if client.outbuf else 0
        if len(client.outbuf) < PAUSE_READING_AT and not client.closing:
            want |= selectors.EVENT_READ
        if want and want != client.events:  # each change is a system call
            if want & ~client.events & selectors.EVENT_READ and client.inbuf:
                client.partial_since = time.monotonic()  # the stall clock restarts with reading
            self.selector.modify(client.sock, want, "client")
            client.events = want

    def _drop_stalled(self, now: float) -> None:
        limit = self.config.client_timeout
        for client in list(self.clients.values()):
            if not client.events & selectors.EVENT_READ:
                continue  # we stopped reading it: not its stall
            if client.partial_since is not None and now - client.partial_since > limit:
                self.rejected += 1
                self._drop(client, f"stalled mid-frame for more than {limit:g} s")

    def _drop(self, client: Client, why: str) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        log.debug("producer pid %d disconnected: %s", client.pid, why)
        self.clients.pop(fd, None)
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self._resume_accepting()  # a descriptor is free again

    # ---- figures ---------------------------------------------------------

    def stats(self) -> dict[str, object]:
        h = self.writer._h
        return {
            "name": self.config.name,
            "epoch": f"{int(h.epoch):016x}",
            "pid": os.getpid(),
            "rv": self.writer.resource_version,
            "events_written": int(h.events_written),
            "events_evicted": int(h.events_evicted),
            "keys": int(h.live_keys),
            "store_bytes": int(h.live_bytes),
            "producers": len(self.clients),
            "requests": self.requests,
            "rejected": self.rejected,
            "events_per_s": round(self.events_per_s, 1),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "source": self.config.source,
            "upstream": self.upstream.state() if self.upstream is not None else None,
        }

    def _status(self) -> str:
        now = time.monotonic()
        written = int(self.writer._h.events_written)
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
