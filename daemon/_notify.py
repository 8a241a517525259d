"""The systemd notify protocol (sd_notify(3)), spoken directly: one datagram
of newline-separated KEY=VALUE assignments to $NOTIFY_SOCKET.  Without that
variable (not run by systemd as Type=notify) every call is a no-op."""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        #: seconds between WATCHDOG=1 messages (half of WatchdogSec), or None
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    def send(self, **fields: object) -> None:
        """Send e.g. ``send(READY=1, STATUS="...")``; errors are ignored, as
        sd_notify's are: the service must not fail because its manager went away."""
        if self._sock is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
