"""``shmcached``: parse the configuration, set up logging, run the daemon."""

from __future__ import annotations

import logging
import os
import sys

from ._config import ConfigError, parse
from ._server import Daemon

__all__ = ["main"]

# syslog priorities, which journald reads from a "<N>" line prefix
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<6>message``: journald stamps time and level itself."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s shmcached %(levelname)s %(message)s"))
    root = logging.getLogger("shmcached")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 after a clean stop, 1 if the cache could not be served
    (a live owner, a busy socket), 2 for a bad configuration."""
    try:
        config = parse(argv)
    except ConfigError as err:
        print(f"shmcached: error: {err}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    return Daemon(config).run()
