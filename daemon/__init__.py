"""shmcached: the daemon that owns one shmcache cache.

It creates the shared memory segment, serves producers on a Unix socket
(docs/protocol.md), keeps a heartbeat in the segment's header, speaks
systemd's notify protocol, and on SIGTERM/SIGINT answers what it received,
closes the cache for its readers and removes segment, semaphore and socket.
"""

from ._config import Config, ConfigError, parse
from ._main import main
from ._server import Daemon

__all__ = ["Config", "ConfigError", "Daemon", "main", "parse"]
