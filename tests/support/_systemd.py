"""A fake systemd: the datagram socket it offers a Type=notify service."""

from __future__ import annotations

import os
import socket
import time
from contextlib import suppress

from ._children import START_TIMEOUT


class NotifyListener:
    """The datagram socket systemd offers a Type=notify service.  ``address``
    is the NOTIFY_SOCKET value: a path, or "@name" for an abstract socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        except BaseException:
            self.sock.close()
            raise
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """The next message, as its KEY=VALUE assignments."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no notify message within {timeout} s; so far: {self.seen}") from None
        fields: dict[str, str] = {}
        for line in data.decode().split("\n"):
            key, sep, value = line.partition("=")
            assert sep and key, f"malformed notify line {line!r} in {data!r}"
            fields[key] = value
        self.seen.append(fields)
        return fields

    def until(self, key: str, value: str | None = None, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """Read messages until one carries ``key`` (with ``value``, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; seen: {self.seen}")
            msg = self.next(left)
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            with suppress(FileNotFoundError):
                os.unlink(self.address)
