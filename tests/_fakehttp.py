"""A hostile HTTP/1.1 peer for the etcd client's tests: a socket server on
127.0.0.1 whose answer to each path is a test's function writing raw bytes
(a Content-Length it never honours, a chunked body that never ends, a watch
line that never closes), counting what the client actually took.

Nothing here speaks etcd beyond the few JSON messages the tests need; the
point is what a real etcd never sends.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

#: a block the answers are written from: the same object each time, so that
#: the server's own allocations do not show in the client's memory peak
BLOCK = b"x" * (1 << 16)
IO_TIMEOUT = 10.0  # a client that neither reads nor closes for this long ends the answer
JOIN_TIMEOUT = 30.0


class Peer:
    """One accepted connection: the request's path and body, and what the
    answer managed to send before the client stopped reading."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.sent = 0
        self.path = ""
        self.body = b""
        self.received = b""  # every byte of the request, parsed or not

    def send(self, data: bytes) -> None:
        """Send all of ``data``; OSError when the client has gone."""
        if self.stop.is_set():
            raise ConnectionAbortedError("the fake server is shutting down")
        self.sock.sendall(data)
        self.sent += len(data)

    def head(self, status: int = 200, **headers: str | int) -> None:
        lines = [f"HTTP/1.1 {status} Fake"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def chunk(self, data: bytes) -> None:
        self.send(b"%x\r\n" % len(data))
        self.send(data)
        self.send(b"\r\n")

    def answer(self, body: bytes, status: int = 200) -> None:
        """A well-formed answer with a Content-Length."""
        self.head(status, Content_Type="application/json", Content_Length=len(body))
        self.send(body)

    def stream(self, total: int, *, chunked: bool) -> None:
        """``total`` bytes of BLOCK, as chunks or as raw body bytes."""
        left = total
        while left > 0:
            n = min(left, len(BLOCK))
            block = BLOCK if n == len(BLOCK) else BLOCK[:n]
            if chunked:
                self.chunk(block)
            else:
                self.send(block)
            left -= n

    def _read_request(self) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            more = self.sock.recv(65536)
            if not more:
                return False
            data += more
            self.received += more
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split(" ")
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            return False  # not HTTP (a TLS handshake, say): nothing is answered
        self.path = request[1]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(rest) < length:
            more = self.sock.recv(65536)
            if not more:
                return False
            rest += more
            self.received += more
        self.body = rest[:length]
        return True


Handler = Callable[[Peer], None]


class FakeServer:
    """Serves each connection's one request with ``routes[path]`` (404
    otherwise), then closes it.  ``peers`` holds every connection served."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.peers: list[Peer] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._threads: list[threading.Thread] = []  # one per connection
        self.errors: list[BaseException] = []  # failures of the server itself, not of the client

    @property
    def sent(self) -> int:
        """Bytes the clients took, over all connections."""
        return sum(p.sent for p in self.peers)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(IO_TIMEOUT)
            peer = Peer(sock, self._stop)
            self.peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(peer,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, peer: Peer) -> None:
        try:
            if peer._read_request():
                route = self.routes.get(peer.path)
                if route is None:
                    peer.answer(b"404 page not found\n", 404)
                else:
                    route(peer)
        except OSError:
            pass  # the client closed the connection: what these tests are about
        except BaseException as err:  # noqa: BLE001 (a bug of the fake: reported by fake_server)
            self.errors.append(err)
        finally:
            with suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)
            peer.sock.close()

    def start(self) -> None:
        self._acceptor.start()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(JOIN_TIMEOUT)  # no connection is added after this
        self._listener.close()
        for peer in self.peers:
            with suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)
        for thread in [self._acceptor, *self._threads]:
            thread.join(JOIN_TIMEOUT)
            assert not thread.is_alive(), "a fake server thread did not end"


@contextmanager
def fake_server(routes: dict[str, Handler]) -> Iterator[FakeServer]:
    server = FakeServer(routes)
    server.start()
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, f"the fake server failed: {server.errors!r}"
