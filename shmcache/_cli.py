"""The ``shmcache`` command line: its arguments, its output and its exit status.

Reading (``get``, ``list``, ``watch``, ``status``) maps the segment read-only,
exactly as a ``Reader``; writing (``put``, ``delete``) goes through the owning
daemon's socket (a ``Producer``) unless ``--direct`` asks for a ``Writer``.
What ``status`` reports is gathered by ``_inspect``, the demos run in
``_demo``: this module parses, formats and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import base64
import enum
import grp
import json
import os
import pwd
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from ._demo import run_daemon_demo, run_direct_demo
from ._events import Event, EventType, Item
from ._inspect import status_of
from ._layout import check_name
from ._producer import Producer, socket_path_of
from ._reader import Reader
from ._rules import encode_key, encode_prefix
from ._trust import trusted_owners
from ._writer import Writer
from .exceptions import (
    CacheClosed,
    CacheNotFound,
    DaemonUnavailable,
    InvalidKey,
    InvalidName,
    ResourceExpired,
    ShmCacheError,
)

__all__ = ["main"]


class Exit(enum.IntEnum):
    """The exit statuses; EXIT_HELP says when each one is returned."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    EXPIRED = 4


# the one description of each code: the help prints these, and each handler
# returns the code whose description fits what happened
EXIT_HELP = {
    Exit.OK: "ok (watch: also after Ctrl-C or --timeout)",
    Exit.FAILED: "key not found (get or delete of a missing key), or any other error\n"
                 "(a full cache, a value too large, a refused request, permission\n"
                 "denied: a segment or a daemon's socket this user may not use)",
    Exit.USAGE: "usage or configuration error (bad arguments, an invalid name or key)",
    Exit.UNAVAILABLE: "cache not found or closed by its owner, or no daemon on the socket",
    Exit.EXPIRED: "resource expired: watch --no-relist fell behind the ring (or list was\n"
                  "outrun by writers 8 times in a row)",
}

DESCRIPTION = """\
A node-local watch cache in POSIX shared memory: read, write, watch and
inspect one cache.  Reads map the segment read-only (no daemon needed);
writes go through the owning daemon's socket (shmcached), or straight into
the segment with --direct."""

EPILOG = """\
every command takes --name NAME (default: $SHMCACHE_NAME, else "default";
demo: a new demo-PID cache) and -o/--output human|json, before or after the
command's name.

output (-o json: for scripts; human: the default):
  get, list      json: {"rv": SNAPSHOT_RV, "items": [{"key", "rv", VALUE}, ...]}
                 (get: the one item {"key", "rv", VALUE}); human: a table
  watch          json: one object per line {"type", "key", "rv", VALUE};
                 human: one line per event: TYPE KEY RV VALUE; after a relist
                 first {"type": "RELIST", "rv"} (human: a RELIST line), see
                 shmcache watch --help
  put, delete    json: {"op", "key", "rv"}; human: one line
  status         json: one object; human: one field per line
  demo           json: one object, its figures: {"ok", "demo", "name", "events",
                 "seconds", "events_per_s", "readers": [...], ...}; human: a
                 line per step
  VALUE is "value": TEXT when the value is valid UTF-8, else "value_b64":
  BASE64 of its bytes.  Human output shows printable UTF-8 as it is and
  escapes any other value: \\xNN for a byte that is not UTF-8, \\n \\t \\r,
  \\xNN \\uNNNN for other unprintable characters, \\\\ for a backslash; use
  -o json (or get --raw) for exact bytes.  Errors go to stderr, one line.

exit status:
""" + "\n".join(f"  {int(code)}  " + text.replace("\n", "\n     ") for code, text in EXIT_HELP.items())


# ---- showing values ------------------------------------------------------------

_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}


def show(data: bytes) -> str:
    """``data`` for a terminal: printable UTF-8 as it is, anything else with
    backslash escapes (see the epilog)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        pass
    else:
        if text.isprintable():
            return text
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def show_key(key: str) -> str:
    return key if key.isprintable() else show(key.encode())


def json_value(value: bytes) -> dict[str, str]:
    """{"value": text} for UTF-8, else {"value_b64": base64}."""
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value_b64": base64.b64encode(value).decode("ascii")}


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=True)


def _item_json(item: Item) -> dict[str, Any]:
    return {"key": item.key, "rv": item.rv, **json_value(item.value)}


def _event_json(event: Event) -> dict[str, Any]:
    return {"type": event.type.name, "key": event.key, "rv": event.rv, **json_value(event.value)}


def _event_line(event: Event) -> str:
    return f"{event.type.name:<8} {show_key(event.key)} {event.rv} {show(event.value)}"


def _table(rows: list[list[str]], out: TextIO) -> None:
    """Columns padded to their widest cell; the last column unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        line = "  ".join([*cells, row[-1]])
        print(line if row[-1] else line.rstrip(), file=out)


# ---- errors --------------------------------------------------------------------


class Failure(Exception):
    """A reported failure: its message goes to stderr, its code is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _error(message: str) -> None:
    print(f"shmcache: error: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """Whoever read our output went away (``watch | head``): not an error;
    point stdout at /dev/null so that the flush at exit fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _run(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call the command's handler; map every expected exception to its exit status."""
    try:
        return handler(args)
    except Failure as err:
        _error(str(err))
        return err.code
    except (InvalidName, InvalidKey) as err:
        _error(str(err))
        return Exit.USAGE
    except DaemonUnavailable as err:
        if isinstance(err.__cause__, PermissionError):  # a daemon may well run: not ours to use
            _error(str(err))
            return Exit.FAILED
        _error(f"{err} ({_daemon_hint(args)} --direct writes the segment without it)")
        return Exit.UNAVAILABLE
    except (CacheNotFound, CacheClosed) as err:
        _error(str(err))
        return Exit.UNAVAILABLE
    except ResourceExpired as err:
        _error(str(err))
        return Exit.EXPIRED
    except BrokenPipeError:
        _silence_stdout()
        return Exit.OK
    except (ShmCacheError, OSError) as err:
        _error(str(err) or type(err).__name__)
        return Exit.FAILED
    except KeyboardInterrupt:
        return 130


def _daemon_hint(args: argparse.Namespace) -> str:
    socket_path = getattr(args, "socket", None)
    if socket_path:  # the cache's name played no part: naming it would mislead
        return f"is shmcached listening on {socket_path}?"
    return f"is shmcached running for cache {args.name!r}?"


# ---- writes --------------------------------------------------------------------


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _who_may_connect(path: str) -> str:
    """Why connect(2) to the socket at ``path`` was refused, in terms of its
    owner, group and mode: connecting takes write permission on the socket,
    and search permission on each directory above it."""
    me = f"this is user {_user(os.getuid())}"
    try:
        st = os.stat(path)
    except PermissionError:
        return f"a directory above the socket may not be searched ({me})"
    except OSError:
        return "the socket's mode and group decide who may connect"
    mode = stat.S_IMODE(st.st_mode)
    user, group = _user(st.st_uid), _group(st.st_gid)
    if mode & stat.S_IWOTH:  # then not the mode: a security module, say
        return f"the socket (mode {mode:04o}) lets anyone connect, yet {me} was refused"
    who = ["root"]
    if mode & stat.S_IWUSR and st.st_uid != 0:
        who.append(f"user {user}")
    if mode & stat.S_IWGRP:
        who.append(f"members of group {group}")
    allowed = who[0] if len(who) == 1 else ", ".join(who[:-1]) + " and " + who[-1]
    return (f"the socket is mode {mode:04o}, owner {user}, group {group}: only {allowed} may "
            f"connect ({me}; shmcached --group and --socket-mode set the socket's group and mode)")


def _connect(path: str, args: argparse.Namespace) -> Producer:
    try:
        return Producer(path, owner=args.owner)
    except DaemonUnavailable as err:
        if isinstance(err.__cause__, PermissionError):
            raise Failure(f"may not connect to the daemon at {path}: permission denied; "
                          f"{_who_may_connect(path)}", Exit.FAILED) from err
        raise


@contextmanager
def _writer(args: argparse.Namespace) -> Iterator[Writer | Producer]:
    if args.direct:
        target: Writer | Producer = Writer(args.name, create=False, owner=args.owner)
    elif args.socket:
        target = _connect(args.socket if "/" in args.socket else os.path.join(".", args.socket), args)
    else:
        # resolved here, not by Producer(name), so that a refusal can name the socket
        target = _connect(socket_path_of(check_name(args.name), trusted_owners(args.owner)), args)
    try:
        yield target
    finally:
        target.close()


def cmd_put(args: argparse.Namespace) -> int:
    key: str = args.key
    encode_key(key)  # a bad key is a usage error, whatever the cache's state
    if args.value == "-":
        value = sys.stdin.buffer.read()
    else:
        value = os.fsencode(args.value)  # the argument's bytes, even if not UTF-8
    with _writer(args) as w:
        rv = w.put(key, value, rv=args.rv)
    if args.output == "json":
        print(_dumps({"op": "put", "key": key, "rv": rv}))
    else:
        print(f"{show_key(key)} set at rv {rv}")
    return Exit.OK


def cmd_delete(args: argparse.Namespace) -> int:
    key: str = args.key
    encode_key(key)
    with _writer(args) as w:
        try:
            rv = w.delete(key, rv=args.rv)
        except KeyError:
            raise Failure(f"key not found: {key}", Exit.FAILED) from None
    if args.output == "json":
        print(_dumps({"op": "delete", "key": key, "rv": rv}))
    else:
        print(f"{show_key(key)} deleted at rv {rv}")
    return Exit.OK


# ---- reads ---------------------------------------------------------------------


def _print_items(items: list[Item]) -> None:
    rows = [["KEY", "RV", "VALUE"]]
    rows += [[show_key(i.key), str(i.rv), show(i.value)] for i in items]
    _table(rows, sys.stdout)


def cmd_get(args: argparse.Namespace) -> int:
    key: str = args.key
    encode_key(key)
    with Reader(args.name, owner=args.owner) as reader:
        item = reader.get(key)
    if item is None:
        raise Failure(f"key not found: {key}", Exit.FAILED)
    if args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(item.value)
        sys.stdout.buffer.flush()
    elif args.output == "json":
        print(_dumps(_item_json(item)))
    else:
        _print_items([item])
    return Exit.OK


def _check_prefix(prefix: str) -> None:
    """A bad prefix (an argument that was not UTF-8, say) is a usage error,
    whatever the cache's state."""
    encode_prefix(prefix)


def cmd_list(args: argparse.Namespace) -> int:
    _check_prefix(args.prefix)
    with Reader(args.name, owner=args.owner) as reader:
        snapshot = reader.list(args.prefix)
    if args.output == "json":
        print(_dumps({"rv": snapshot.rv, "items": [_item_json(i) for i in snapshot.items]}))
    elif snapshot.items:
        _print_items(snapshot.items)
    else:
        print(f"no keys{f' under {show_key(args.prefix)!r}' if args.prefix else ''} "
              f"at rv {snapshot.rv}", file=sys.stderr)
    return Exit.OK


class _WatchOutput:
    """The events of a watch on stdout, and what a consumer that applies
    them in order holds: each key printed and not deleted since, with its
    last value.  A relist prints a RELIST marker, a DELETED event for each
    key so held that the new list lacks (deleted during the gap, whose
    events were lost), then the new list: a consumer that only applies
    events ends up exact, one that replaces its state at the marker too."""

    def __init__(self, json_out: bool) -> None:
        self.json_out = json_out
        self.held: dict[str, bytes] = {}

    def event(self, event: Event) -> None:
        self._line(_dumps(_event_json(event)) if self.json_out else _event_line(event))
        if event.type is EventType.DELETED:
            self.held.pop(event.key, None)
        else:
            self.held[event.key] = event.value

    def relist(self, reader: Reader, prefix: str) -> int:
        """List again; the new list's resource version, to watch from."""
        snapshot = reader.list(prefix)
        rv = snapshot.rv
        if self.json_out:
            self._line(_dumps({"type": "RELIST", "rv": rv}))
        else:
            self._line(f"{'RELIST':<8} listed again at rv {rv}: what follows replaces what came before")
        listed = {item.key for item in snapshot.items}
        for key in sorted(self.held.keys() - listed):
            self.event(Event(EventType.DELETED, key, self.held[key], rv))
        for item in snapshot.items:  # at the list's rv, as the first list's items
            self.event(Event(EventType.ADDED, item.key, item.value, rv))
        return rv

    @staticmethod
    def _line(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def cmd_watch(args: argparse.Namespace) -> int:
    _check_prefix(args.prefix)
    since: int = args.since
    out = _WatchOutput(args.output == "json")
    relist = False
    try:
        with Reader(args.name, owner=args.owner) as reader:
            while True:
                try:
                    if relist:
                        since = out.relist(reader, args.prefix)
                        relist = False
                    for event in reader.watch(since, prefix=args.prefix, timeout=args.timeout):
                        out.event(event)
                        since = event.rv
                    return Exit.OK  # --timeout passed without an event
                except ResourceExpired as err:
                    if args.no_relist:
                        raise Failure(f"{err}; list again, or watch without --no-relist",
                                      Exit.EXPIRED) from None
                    print(f"shmcache: {err}: listing again", file=sys.stderr)
                    relist = True
    except KeyboardInterrupt:
        return Exit.OK


# ---- status ----------------------------------------------------------------


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _fill(part: int, whole: int, unit: str) -> str:
    return f"{part} of {whole} {unit} ({100 * part / whole:.0f}%)" if whole else f"{part} {unit}"


def _upstream_text(up: dict[str, Any]) -> str:
    if up["connected"]:
        text = f"etcd, following revision {up['revision']}"
    elif up["disconnected_since"]:
        text = f"etcd, disconnected since {up['disconnected_since']} ({up['last_error']}); serving revision {up['revision']}"
    else:
        text = "etcd, connecting"
    if up["skipped_keys"]:
        text += f"; {up['skipped_keys']} keys skipped (not UTF-8)"
    return text


def _print_status(s: dict[str, Any]) -> None:
    owner = s["owner"]
    created = datetime.fromtimestamp(s["created"], UTC).astimezone()
    who = f"pid {owner['pid']}" + (f" ({show_key(owner['name'])})" if owner["name"] else "")
    beat = s["heartbeat_age"]
    ring, store = s["ring"], s["store"]
    lines = [
        ("cache", f"{s['name']} ({s['path']})"),
        ("epoch", s["epoch"]),
        ("created", created.isoformat(timespec="seconds")),
        ("owner", f"{who}, {owner['liveness']}" + (f" ({owner['state']})" if owner["state"] else "")),
        ("heartbeat", "never (no daemon owns it)" if beat is None else f"{beat:.1f} s ago"),
        ("socket", show_key(s["socket"]) if s["socket"] else "none"),
        ("rv", f"{s['rv']} (oldest {s['oldest_rv']})"),
        ("ring", ", ".join((_fill(ring["events"], ring["capacity"], "events"),
                            _fill(ring["bytes"], ring["arena_bytes"], "bytes")))),
        ("store", ", ".join((_fill(store["keys"], store["max_keys"], "keys"),
                             _fill(store["bytes"], store["store_bytes"], "bytes")))),
        ("events", f"{s['events_written']} written, {s['events_evicted']} evicted"),
        *([("upstream", _upstream_text(s["upstream"]))] if s.get("upstream") else []),
        ("mapped by", _plural(len(s["processes"]), "other process")
                      + (f" ({s['uninspected_processes']} not inspectable)" if s["uninspected_processes"] else "")),
    ]
    for label, text in lines:
        print(f"{label + ':':<11} {text}")
    for p in s["processes"]:
        print(f"  pid {p['pid']:<8} {p['mode']}  {show_key(p['name'])}")


def cmd_status(args: argparse.Namespace) -> int:
    status = status_of(args.name, args.owner)
    if args.output == "json":
        print(_dumps(status))
    else:
        _print_status(status)
    return Exit.OK


# ---- demo ----------------------------------------------------------------------


def _quiet(line: str) -> None:
    """The progress lines of a demo whose output is its JSON summary."""


def cmd_demo(args: argparse.Namespace) -> int:
    if args.name:  # before a daemon is started for it, as for every other command
        check_name(args.name)
    json_out = args.output == "json"
    say = _quiet if json_out else print
    if args.direct:
        result = run_direct_demo(readers=args.readers, events=args.events, batch=args.batch,
                                 capacity=args.capacity, name=args.name, say=say)
    else:
        result = run_daemon_demo(readers=args.readers, producers=args.producers, events=args.events,
                                 batch=args.batch, capacity=args.capacity, name=args.name, say=say)
    if json_out:
        print(_dumps({"ok": result.ok, **result.summary}))
    elif result.ok:
        print("all checks held")
    if result.ok:
        return Exit.OK
    print("A CHECK FAILED", file=sys.stderr)
    return Exit.FAILED


# ---- the parser ----------------------------------------------------------------


def _name_default() -> str:
    return os.environ.get("SHMCACHE_NAME") or "default"


def _rv(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_rv.__name__ = "resource version"  # argparse's "invalid resource version value: 'x'"


def _owners(text: str) -> list[str]:
    owners = [part.strip() for part in text.split(",") if part.strip()]
    if not owners:
        raise ValueError(text)
    trusted_owners(owners)  # a user that does not exist is a usage error
    return owners


_owners.__name__ = "owner"


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1e9:
        raise ValueError(text)
    return value


_seconds.__name__ = "seconds"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmcache", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def common(p: argparse.ArgumentParser, default: Any,
               name_help: str = 'the cache (default: $SHMCACHE_NAME, else "default")') -> None:
        # on the main parser with real defaults, on each command with SUPPRESS
        # so that a value given before the command is not overwritten
        p.add_argument("--name", metavar="NAME", default=default, help=name_help)
        p.add_argument("-o", "--output", choices=("human", "json"), default=default,
                       help="output format (default: human)")
        p.add_argument("--owner", metavar="USER[,USER]", type=_owners, default=default,
                       help="trust a cache (and a daemon) of these users besides root and "
                            "yourself (default: $SHMCACHE_OWNER, else the shmcache user)")

    common(parser, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str, **common_args: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description,
                           epilog="output formats and exit status: shmcache --help")
        common(p, argparse.SUPPRESS, **common_args)
        return p

    def writes(p: argparse.ArgumentParser) -> None:
        how = p.add_mutually_exclusive_group()
        how.add_argument("--socket", metavar="PATH",
                         help="the daemon's producer socket (default: the one the cache's "
                              "header records)")
        how.add_argument("--direct", action="store_true",
                         help="write the segment directly (a Writer), without the daemon; "
                              "needs write access to the segment and its semaphore")
        p.add_argument("--rv", type=_rv, default=None,
                       help="an explicit resource version, greater than the current one")

    p = command("put", "set a key", "Set KEY to VALUE: through the daemon, or --direct.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", help="the value; - reads it from stdin, as bytes")
    writes(p)
    p.set_defaults(handler=cmd_put)

    p = command("delete", "remove a key", "Remove KEY (exit status 1 if it is absent).")
    p.add_argument("key", metavar="KEY")
    writes(p)
    p.set_defaults(handler=cmd_delete)

    p = command("get", "show a key", "Show KEY's value and resource version "
                "(exit status 1 if it is absent).")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--raw", action="store_true", help="write the value's bytes exactly, nothing else")
    p.set_defaults(handler=cmd_get)

    p = command("list", "show the keys (under a prefix)",
                "Show every key starting with PREFIX, exactly as it was at one resource version.")
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    p.set_defaults(handler=cmd_list)

    p = command("watch", "stream changes", "List the keys under PREFIX as ADDED events, then "
                "print every change as it happens, until Ctrl-C (like kubectl get -w).  The "
                "ADDED events of a list carry the list's resource version, not each item's "
                "(Kubernetes' rule); every later event carries its own.  With --since RV: only "
                "the changes after RV.  If the watch falls behind the ring (resource expired), "
                "it says so on stderr and lists again: it prints a RELIST marker "
                '({"type": "RELIST", "rv": N} with -o json, a line starting RELIST in human '
                "output), then a DELETED event at rv N for each key it printed that the new "
                "list lacks (deleted while events were missed; with its last value printed), "
                "then the new list as ADDED events at rv N.  Applying the events in order keeps "
                "a copy of what the watch printed exact; a copy that also holds keys from "
                "elsewhere (--since) must be replaced at the marker.")
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    p.add_argument("--since", metavar="RV", type=_rv, default=0,
                   help="print the changes after resource version RV (default 0: list first)")
    p.add_argument("--no-relist", action="store_true",
                   help="exit with status 4 instead of listing again when events were missed")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds, default=None,
                   help="exit (status 0) after SECONDS without any change")
    p.set_defaults(handler=cmd_watch)

    p = command("status", "show the cache's owner, figures and users",
                "Show the cache's owner (and whether it lives), heartbeat, resource versions, "
                "ring and store fill, counters, and the processes that map it.")
    p.set_defaults(handler=cmd_status)

    p = command("demo", "the tour: a daemon, producers and readers, with figures",
                "The tour: shmcached owns a new cache, producer processes write through its "
                "socket, reader processes watch and verify every event, and the daemon is "
                "stopped with SIGTERM; with --direct, one Writer and the readers, no daemon.  "
                "The cache is a new one, demo-PID unless --name says otherwise.",
                name_help="the cache to create (default: demo-PID)")
    p.add_argument("--readers", type=int, default=3, help="reader processes (default 3)")
    p.add_argument("--events", type=int, default=200_000, help="events to publish (default 200000)")
    p.add_argument("--batch", type=int, default=64, help="events per put_many (default 64)")
    p.add_argument("--capacity", type=int, default=4096, help="ring slots (default 4096)")
    p.add_argument("--direct", action="store_true",
                   help="no daemon: one Writer in this process publishes the events")
    p.add_argument("--producers", type=int, default=2,
                   help="producer processes writing through the daemon (default 2)")
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``shmcache`` command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = "human"
    if args.command != "demo" and args.name is None:
        args.name = _name_default()
    if args.command == "demo":
        for label in ("readers", "events", "batch", "capacity", "producers"):
            if getattr(args, label) < 1:
                parser.error(f"--{label} must be at least 1")
    try:
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    status = _run(args.handler, args)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    return status
