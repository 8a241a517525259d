"""shmcached's configuration: command line, then environment, then a TOML
file, then defaults — each option settable in all three places.

Every option has one entry in OPTIONS: its default, unit and validation.
A bad value is a ``ConfigError`` naming where it was set (the option, the
``SHMCACHED_*`` variable, or the option and the file); ``main`` prints it on
one line and exits 2 before anything is created.  Boolean options are flags
(``--x``/``--no-x``); their variables and TOML keys take true or false.
"""

from __future__ import annotations

import argparse
import grp
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shmcache import __version__
from shmcache import _protocol as proto
from shmcache._layout import Geometry, check_name
from shmcache._rules import (
    DEFAULT_ARENA_BYTES,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_KEYS,
    DEFAULT_STORE_BYTES,
    MAX_RV,
)
from shmcache._trust import check_cache_mode
from shmcache.exceptions import InvalidSize

__all__ = ["Config", "ConfigError", "default_socket_path", "parse"]


class ConfigError(Exception):
    """A bad option value; the message names the option."""


def default_socket_path(name: str) -> str | None:
    """Where the daemon of cache ``name`` listens unless told otherwise:
    ``$RUNTIME_DIRECTORY/NAME.sock`` (systemd's RuntimeDirectory=), else
    ``$XDG_RUNTIME_DIR/shmcache.NAME.sock``; None without either (no guess
    in a directory that others may write)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, f"{name}.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, f"shmcache.{name}.sock") if xdg else None


def _positive_int(text: Any) -> int:
    if isinstance(text, (bool, float)):
        raise ValueError("must be a positive integer")
    # int()'s own message ("invalid literal for int() with base 10") says
    # nothing about what the option wants
    try:
        value = int(text)
    except (ValueError, TypeError):
        raise ValueError("must be a positive integer") from None
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _seconds(text: Any) -> float:
    try:
        value = float(text)
    except (ValueError, TypeError):
        raise ValueError("must be a positive number of seconds") from None
    if not 0 < value < 1e7:
        raise ValueError("must be a positive number of seconds")
    return value


def _mode(text: Any) -> int:
    try:
        value = int(text, 8) if isinstance(text, str) else int(text)
    except (ValueError, TypeError):
        raise ValueError("must be permission bits such as 0640") from None
    if not 0 <= value <= 0o777:
        raise ValueError("must be permission bits such as 0640")
    return value


def _segment_mode(text: Any) -> int:
    # Only the owner may ever write the segment and take the writers'
    # semaphore: readers refuse a segment that others could write.
    value = _mode(text)
    try:
        return check_cache_mode(value)
    except InvalidSize:
        raise ValueError("gives write access to others than the owner (group or world write bit); "
                         "use a mode such as 0640") from None


def _socket_mode(text: Any) -> int:
    # Connecting needs write permission on the socket: o+w would let every
    # local user reach the daemon; a group-writable socket is how a group gets in.
    value = _mode(text)
    if value & 0o002:
        raise ValueError("lets every local user connect (world write bit); "
                         "use a mode such as 0660 and --group")
    return value


def _frame_bytes(text: Any) -> int:
    # Producers send frames up to this size without asking the daemon for
    # its limit (docs/protocol.md, "Frames"): a smaller limit would refuse them.
    value = _positive_int(text)
    if value < proto.MIN_FRAME_BYTES:
        raise ValueError(f"must be at least {proto.MIN_FRAME_BYTES}")
    return value


def _rv_jump(text: Any) -> int:
    value = _positive_int(text)
    if value > MAX_RV:
        raise ValueError(f"must be at most {MAX_RV}")
    return value


def _ids(text: Any) -> tuple[int, ...]:
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        ids = tuple(int(str(i).strip()) for i in items if str(i).strip())
    except ValueError:
        raise ValueError("must be a comma-separated list of numeric ids") from None
    if any(i < 0 for i in ids):
        raise ValueError("must be a comma-separated list of numeric ids")
    return ids


def _group(text: Any) -> int:
    text = str(text)
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group named {text!r}") from None


def _source(text: Any) -> str:
    source = str(text).lower()
    if source not in ("local", "etcd"):
        raise ValueError("must be local or etcd")
    return source


def _endpoints(text: Any) -> tuple[str, ...]:
    items = text if isinstance(text, list) else str(text).split(",")
    endpoints = tuple(str(i).strip() for i in items if str(i).strip())
    if not endpoints:
        raise ValueError("must name at least one endpoint")
    from ._etcd import EtcdClient

    EtcdClient(list(endpoints))  # the same validation the source applies
    return endpoints


def _prefix(text: Any) -> str:
    prefix = str(text)
    if not prefix:
        raise ValueError("must not be empty")
    return prefix


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false (or 1/0, yes/no, on/off)")


def _level(text: Any) -> str:
    level = str(text).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be debug, info, warning or error")
    return level


def _name(text: Any) -> str:
    try:
        return check_name(str(text))
    except ValueError as err:
        raise ValueError(str(err)) from None


@dataclass(frozen=True)
class Option:
    name: str  # the long option, without "--"
    default: Any  # None: computed (see Config)
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None  # default: the option name's last word


OPTIONS = [
    Option("name", "default", _name, "the cache to own (env SHMCACHE_NAME too)"),
    Option("capacity", DEFAULT_CAPACITY, _positive_int, "ring capacity, in events"),
    Option("arena-bytes", DEFAULT_ARENA_BYTES, _positive_int, "ring payload arena, in bytes"),
    Option("max-keys", DEFAULT_MAX_KEYS, _positive_int, "store capacity, in keys"),
    Option("store-bytes", DEFAULT_STORE_BYTES, _positive_int, "store capacity, in record bytes (the heap is twice that)"),
    Option("mode", 0o640, _segment_mode,
           "permission bits of the segment and semaphore, octal; no group or world write bit"),
    Option("group", None, _group, "group owning the segment, semaphore and socket (default: the daemon's)"),
    Option("socket", None, str, "producer socket path (default: derived from the name, see docs/protocol.md)"),
    Option("socket-mode", 0o660, _socket_mode, "permission bits of the producer socket, octal; no world write bit"),
    Option("allow-uid", None, _ids, "more uids allowed to produce, comma-separated (default: none; root and "
           "the daemon's uid always may)"),
    Option("allow-gid", None, _ids, "gids whose members (primary or supplementary) may produce, "
           "comma-separated (default: none)"),
    Option("allow-rv-uid", None, _ids, "more uids whose writes may carry an explicit resource version, "
           "comma-separated (default: none; root and the daemon's uid always may)"),
    Option("max-rv-jump", 1 << 40, _rv_jump, "how far past the current resource version an explicit one may be"),
    Option("max-frame-bytes", 17 << 20, _frame_bytes,
           f"largest request frame, in bytes (at least {proto.MIN_FRAME_BYTES})"),
    Option("max-buffered-bytes", 64 << 20, _positive_int,
           "frames larger than 32 KiB wait until their size fits in this many bytes, all producers together"),
    Option("max-clients", 1024, _positive_int, "producer connections served at once"),
    Option("max-clients-per-uid", 64, _positive_int,
           "producer connections of one uid at once (root and the daemon's uid: only max-clients)",
           "CLIENTS"),
    Option("client-timeout", 30.0, _seconds, "a client that stalls mid-frame this long is dropped, in seconds"),
    Option("lock-timeout", 5.0, _seconds, "wait for a live holder of the writers' lock, in seconds"),
    Option("heartbeat", 1.0, _seconds, "heartbeat and status interval, in seconds"),
    Option("log-level", "info", _level, "debug, info, warning or error"),
    Option("source", "local", _source, "local (producers write) or etcd (mirror an etcd prefix)"),
    Option("etcd-endpoints", None, _endpoints, "etcd client URLs, comma-separated (--source etcd)"),
    Option("etcd-prefix", None, _prefix, "the etcd key prefix to mirror (--source etcd)"),
    Option("etcd-keep-prefix", False, _bool, "keep the prefix in cache keys"),
    Option("etcd-ca", None, str, "CA bundle for https:// endpoints"),
    Option("etcd-cert", None, str, "client certificate for https:// endpoints"),
    Option("etcd-key", None, str, "client certificate's key"),
    Option("allow-local-writes", False, _bool, "with --source etcd: accept producers' writes too"),
]


@dataclass(frozen=True)
class Config:
    name: str
    capacity: int
    arena_bytes: int
    max_keys: int
    store_bytes: int
    mode: int
    group: int | None
    socket: str
    socket_mode: int
    allow_uid: tuple[int, ...]
    allow_gid: tuple[int, ...]
    allow_rv_uid: tuple[int, ...]
    max_rv_jump: int
    max_frame_bytes: int
    max_buffered_bytes: int
    max_clients: int
    max_clients_per_uid: int
    client_timeout: float
    lock_timeout: float
    heartbeat: float
    log_level: str
    source: str
    etcd_endpoints: tuple[str, ...] | None
    etcd_prefix: str | None
    etcd_keep_prefix: bool
    etcd_ca: str | None
    etcd_cert: str | None
    etcd_key: str | None
    allow_local_writes: bool


def _env_name(option: str) -> str:
    return "SHMCACHED_" + option.upper().replace("-", "_")


#: the variable naming the TOML file; every other SHMCACHED_* variable is an option's
CONFIG_ENV = "SHMCACHED_CONFIG"


def _is_flag(opt: Option) -> bool:
    return opt.parse is _bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcached",
        description="Own one shmcache cache: create its shared memory segment, serve "
        "producers on a Unix socket, keep a heartbeat, and remove it all on SIGTERM.",
        epilog="Each option can also be set in the TOML file of --config (key: the option's "
        "name with '_' for '-'; flags take true or false) or in the environment "
        "(SHMCACHED_<OPTION>, e.g. SHMCACHED_ARENA_BYTES; flags take true/false, 1/0 or yes/no); "
        "the command line wins over the environment, which wins over the file. An unknown "
        "SHMCACHED_* variable or TOML key is an error.",
    )
    # -V leads its --help line, so the lines that start with "--" stay exactly
    # the configurable options (tests/test_systemd.py checks the examples against them)
    parser.add_argument("-V", "--version", action="version", version=f"shmcached {__version__}")
    parser.add_argument("--config", metavar="PATH", default=os.environ.get(CONFIG_ENV),
                        help=f"TOML file with any of the options below (env {CONFIG_ENV})")
    for opt in OPTIONS:
        default = opt.default
        if default is None:
            text = opt.help  # the help says how the default is computed
        elif opt.parse in (_mode, _segment_mode, _socket_mode):
            text = f"{opt.help} (default: {default:04o})"
        elif _is_flag(opt):
            text = f"{opt.help} (default: {'on' if default else 'off'})"
        else:
            text = f"{opt.help} (default: {default})"
        # default None: "not on the command line", so the environment and the file are consulted
        if _is_flag(opt):
            parser.add_argument(f"--{opt.name}", action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            parser.add_argument(f"--{opt.name}", metavar=opt.metavar or opt.name.split("-")[-1].upper(),
                                default=None, help=text)
    return parser


def _check_environment() -> None:
    """ConfigError for a SHMCACHED_* variable that sets nothing: a misspelt
    one would otherwise be ignored, silently leaving its option at the default."""
    known = {CONFIG_ENV} | {_env_name(opt.name) for opt in OPTIONS}
    unknown = sorted(k for k in os.environ if k.startswith("SHMCACHED_") and k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown variable (the options' variables are "
                          f"SHMCACHED_<OPTION>, e.g. SHMCACHED_ARENA_BYTES for --arena-bytes; "
                          f"see shmcached --help)")


def parse(argv: list[str] | None = None) -> Config:
    """The configuration; ConfigError for a bad value, SystemExit(2) for bad
    usage (argparse's own message), SystemExit(0) after --help or --version."""
    args = vars(build_parser().parse_args(argv))
    _check_environment()
    file_values: dict[str, Any] = {}
    if args["config"]:
        try:
            with open(args["config"], "rb") as f:
                file_values = tomllib.load(f)
        except OSError as err:
            raise ConfigError(f"--config: cannot read {args['config']}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"--config: {args['config']} is not valid TOML: {err}") from None
        known = {opt.name.replace("-", "_") for opt in OPTIONS}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"--config: unknown option {unknown[0]!r} in {args['config']}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each option given was set, for the messages
    for opt in OPTIONS:
        key = opt.name.replace("-", "_")
        raw = args[key]
        source = f"--{opt.name}"
        if raw is None:
            source = _env_name(opt.name)
            raw = os.environ.get(source)
            if raw is None and opt.name == "name":
                source = "SHMCACHE_NAME"
                raw = os.environ.get(source)
        if raw is None and key in file_values:
            raw = file_values[key]
            source = f"--{opt.name} (from {args['config']})"
        if raw is None:
            values[key] = opt.default
            continue
        sources[key] = source
        try:
            values[key] = opt.parse(raw)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{source}: {raw!r} {err}") from None

    def where(key: str) -> str:
        return sources.get(key, f"--{key.replace('_', '-')}")

    for key in ("allow_uid", "allow_gid", "allow_rv_uid"):
        if values[key] is None:  # least privilege: root and the daemon's uid are allowed in the server
            values[key] = ()
    if values["max_frame_bytes"] > values["max_buffered_bytes"]:
        raise ConfigError(f"{where('max_buffered_bytes')}: {values['max_buffered_bytes']} is less than "
                          f"--max-frame-bytes {values['max_frame_bytes']}: a frame that large could never "
                          f"be admitted")
    try:  # the sizes together, as the cache will check them
        Geometry.plan(values["capacity"], values["arena_bytes"], values["max_keys"], values["store_bytes"])
    except InvalidSize as err:
        raise ConfigError(f"{where(str(err).split('=', 1)[0])}: {err}") from None
    if values["source"] == "etcd":
        for needed in ("etcd_endpoints", "etcd_prefix"):
            if values[needed] is None:
                raise ConfigError(f"--{needed.replace('_', '-')}: needed with --source etcd")
        try:
            from ._etcd import EtcdClient

            EtcdClient(list(values["etcd_endpoints"]), ca=values["etcd_ca"], cert=values["etcd_cert"],
                       key=values["etcd_key"])
        except (OSError, ValueError) as err:
            raise ConfigError(f"--etcd-ca/--etcd-cert/--etcd-key: {err}") from None
    if values["socket"] is None:  # after the other checks: they name what was given
        values["socket"] = default_socket_path(values["name"])
        if values["socket"] is None:
            raise ConfigError(
                "--socket: neither RUNTIME_DIRECTORY (systemd's RuntimeDirectory=) nor XDG_RUNTIME_DIR "
                "is set, and a guessed path in a directory others may write (such as /tmp) could be "
                "taken by anyone: pass --socket PATH, in a directory only the daemon's user can write")
    if len(values["socket"].encode()) > 107:
        raise ConfigError(f"{where('socket')}: {values['socket']!r} is longer than a Unix socket path may be")
    return Config(**values)
