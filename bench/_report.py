"""The report of a benchmark run: the machine it ran on, the JSON of every
figure, Markdown tables of the medians, PNG plots, and the project's
performance targets judged against the medians.

Tolerant by design: any scenario, system, parameter or metric may be
missing (a quick run, a skipped peer, a scenario not run); what is missing
is said, never filled in.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._common import Config, Recorder, Result

__all__ = ["machine", "targets", "targets_text", "write"]

#: distributions whose versions the report names: the project, its peers,
#: and what draws the plots
PACKAGES = ("shmcache", "pyzmq", "redis", "faster-fifo", "UltraDict", "matplotlib", "psutil", "cffi")
HEADLINE_BYTES = 100

# ---- the machine -------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                field, _, value = line.partition(":")
                if field.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _redis_server_version() -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "not installed"
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return done.stdout.strip() or done.stderr.strip() or f"unknown (exit {done.returncode})"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    host = platform.node() or "unknown-host"
    cpu = _cpu_model()
    cpus = os.cpu_count() or 0
    mem = _memory_bytes()
    kernel = platform.release()
    py = f"{platform.python_implementation()} {platform.python_version()}"
    info: dict[str, Any] = {
        "host": host,
        "cpu": cpu,
        "logical_cpus": cpus,
        "memory_bytes": mem,
        "kernel": f"{platform.system()} {kernel}",
        "python": py,
        "packages": {dist: _version(dist) for dist in PACKAGES},
        "redis_server": _redis_server_version(),
    }
    info["summary"] = (f"{host}: {cpu}, {cpus} logical CPUs, {mem / (1 << 30):.1f} GiB, "
                       f"{platform.system()} {kernel}, {py}, shmcache {info['packages']['shmcache']}")
    return info


# ---- numbers and units ---------------------------------------------------------


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if math.isnan(v):
        return "n/a"
    if abs(v) >= 100 or (isinstance(v, int) and v == int(v)):
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _unit(metric: str) -> str:
    if metric == "eps" or metric.endswith("_eps"):
        return "events/s"
    if metric.endswith("_us"):
        return "µs"
    if metric == "ms" or metric.endswith("_ms"):
        return "ms"
    if metric.endswith("_kib"):
        return "KiB"
    if metric == "mib_s":
        return "MiB/s"
    if metric.endswith("_s"):
        return "s"
    if metric.endswith("_events"):
        return "events"
    return ""


def _metric_label(metric: str) -> str:
    """The metric's name without its unit suffix ("" for a bare unit)."""
    if metric in ("eps", "ms"):
        return ""
    return re.sub(r"_(us|eps|kib|ms|s)$", "", metric)


def _header(name: str, unit: str) -> str:
    return f"{name} ({unit})" if unit else name


_PARAM_UNITS = {"value_bytes": "B", "ring_bytes": "B", "rate": "events/s"}


# ---- selecting figures ------------------------------------------------------------


def _scenarios(rec: Recorder) -> list[str]:
    seen: dict[str, None] = {}
    for r in rec.results:
        seen.setdefault(r.scenario, None)
    for s in rec.notes:
        seen.setdefault(s, None)
    return list(seen)


def _matches(r: Result, params: dict[str, Any]) -> bool:
    return all(r.params.get(k) == v for k, v in params.items())


def _find(meds: list[Result], system: str, metric: str, **params: Any) -> list[Result]:
    return [r for r in meds if r.system == system and metric in r.metrics and _matches(r, params)]


def _largest(rs: list[Result], key: str) -> Result | None:
    """The one with the largest ``params[key]`` (e.g. the most events)."""
    if not rs:
        return None
    return max(rs, key=lambda r: _sortable(r.params.get(key, 0)))


def _sortable(v: Any) -> tuple[int, float | str]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v))
    return (1, str(v))


def _why_missing(rec: Recorder, system: str, what: str) -> str:
    reason = rec.skipped.get(system)
    if reason:
        return f"{what}: {system} skipped ({reason})"
    return what


# ---- targets ----------------------------------------------------------------------


def _target(tid: str, text: str, need: str, measured: str, ratio: float | None, ok: bool | None,
            missing: str = "", values: dict[str, float] | None = None) -> dict[str, Any]:
    if ok is None:
        status = f"not measured ({missing})"
    else:
        status = "met" if ok else "MISSED"
    return {"id": tid, "target": text, "need": need, "measured": measured, "ratio": ratio,
            "status": status, "values": values or {}}


def _compare(tid: str, text: str, rec: Recorder, a: tuple[str, float | None, str],
             b: tuple[str, float | None, str], need: float, higher: bool, unit: str,
             strict: bool = False) -> dict[str, Any]:
    """Target "a ≥ need × b" (higher) or "a ≤ need × b" (lower; "<" if
    strict).  Each side: (label, value or None, why it is missing)."""
    (la, va, wa), (lb, vb, wb) = a, b
    sign = "≥" if higher else ("<" if strict else "≤")
    need_text = f"{sign} {need:g}×"
    missing = "; ".join(dict.fromkeys(w for v, w in ((va, wa), (vb, wb)) if v is None))
    if va is None or vb is None or vb == 0:
        have = "; ".join(f"{label} {_num(v)} {unit}" for label, v in ((la, va), (lb, vb)) if v is not None)
        return _target(tid, text, need_text, have or "—", None, None, missing or f"{lb} is 0")
    ratio = va / vb
    if higher:
        ok = ratio >= need
    else:
        ok = ratio < need if strict else ratio <= need
    return _target(tid, text, need_text, f"{la} {_num(va)} {unit}; {lb} {_num(vb)} {unit}", ratio, ok,
                   values={la: va, lb: vb})


def _fanout_targets(rec: Recorder) -> list[dict[str, Any]]:
    meds = rec.medians("fanout")
    where = {"readers": 8, "value_bytes": HEADLINE_BYTES}

    at8 = [r for r in meds if _matches(r, where) and "delivered_eps" in r.metrics]
    measured = sorted({r.params.get("readers") for r in meds if "readers" in r.params}, key=_sortable)
    none_at8 = "no fanout figure at 8 readers, 100 B" + (
        f" (readers measured: {', '.join(_num(n) for n in measured)})" if measured else " (fanout not run)")

    def side(system: str) -> tuple[str, float | None, str]:
        best = _largest(_find(meds, system, "delivered_eps", **where), "events")
        if best is None:
            if system in rec.skipped:
                return system, None, f"{system} skipped ({rec.skipped[system]})"
            return system, None, f"no fanout figure for {system} at 8 readers, 100 B" if at8 else none_at8
        return system, best.metrics["delivered_eps"], ""

    shm = side("shmcache")
    out = []
    for tid, peer, need in (("1a", "mp.Queue", 10.0), ("1b", "pyzmq", 3.0), ("1c", "redis", 5.0)):
        out.append(_compare(tid, f"fan-out, 8 readers, 100 B: shmcache delivered ≥ {need:g}× {peer}", rec,
                            shm, side(peer), need, True, "events/s"))
    return out


def _drain_pick(rs: list[Result]) -> Result | None:
    """Of several drain figures for one value size: the default buffer
    (100 events) if measured, else the largest buffer; the most events."""
    if not rs:
        return None
    pool = [r for r in rs if r.params.get("buffer_size") == 100]
    if not pool:
        top = max(rs, key=lambda r: _sortable(r.params.get("buffer_size", 0))).params.get("buffer_size")
        pool = [r for r in rs if r.params.get("buffer_size") == top]
    return _largest(pool, "events")


def _drain_targets(rec: Recorder) -> list[dict[str, Any]]:
    meds = rec.medians("drain")
    if not meds:
        return [_target("2", "drain into Event objects (\"events\"): ≥ 2,000,000 events/s",
                        "≥ 2,000,000 events/s", "—", None, None, "drain not run"),
                _target("3", "drain \"raw\" ≥ memcpy / 5 (same value size)", "≥ 0.2×", "—", None, None,
                        "drain not run")]
    out = []
    events = _find(meds, "shmcache", "eps", path="events")
    sizes = sorted({r.params.get("value_bytes") for r in events}, key=_sortable)
    size = HEADLINE_BYTES if HEADLINE_BYTES in sizes else (sizes[0] if sizes else None)
    pick = _drain_pick([r for r in events if r.params.get("value_bytes") == size])
    text = "drain into Event objects (\"events\"): ≥ 2,000,000 events/s"
    if pick is None:
        out.append(_target("2", text, "≥ 2,000,000 events/s", "—", None, None,
                           _why_missing(rec, "shmcache", "no drain \"events\" figure")))
    else:
        eps = pick.metrics["eps"]
        out.append(_target("2", text, "≥ 2,000,000 events/s",
                           f"{_num(eps)} events/s ({_num(pick.params.get('value_bytes'))} B, "
                           f"buffer {_num(pick.params.get('buffer_size'))})",
                           eps / 2e6, eps >= 2e6, values={"eps": eps}))
    raw = _find(meds, "shmcache", "eps", path="raw")
    copies = _find(meds, "memcpy", "eps")
    raw_sizes = sorted({r.params.get("value_bytes") for r in raw}, key=_sortable)
    copy_sizes = {r.params.get("value_bytes") for r in copies}
    common = [s for s in raw_sizes if s in copy_sizes]
    text3 = "drain \"raw\" ≥ memcpy / 5 (same value size)"
    if not common:
        what = []
        if not raw:
            what.append("no drain \"raw\" figure")
        if not copies:
            what.append(_why_missing(rec, "memcpy", "no memcpy figure"))
        if raw and copies:
            what.append("no value size measured by both")
        out.append(_target("3", text3, "≥ 0.2×", "—", None, None, "; ".join(what)))
    for s in common:
        r = _drain_pick([x for x in raw if x.params.get("value_bytes") == s])
        c = _largest([x for x in copies if x.params.get("value_bytes") == s], "events")
        assert r is not None and c is not None
        out.append(_compare("3", f"{text3}: {_num(s)} B", rec,
                            ("raw", r.metrics["eps"], ""), ("memcpy", c.metrics["eps"], ""),
                            0.2, True, "events/s"))
    return out


def _latency_targets(rec: Recorder) -> list[dict[str, Any]]:
    meds = rec.medians("latency")
    mine = _find(meds, "shmcache", "p99_us")
    sized = [r for r in mine if r.params.get("value_bytes") == HEADLINE_BYTES] or mine
    base = sized[0] if sized else None
    where = dict(base.params) if base else {}

    def side(system: str) -> tuple[str, float | None, str]:
        rs = _find(meds, system, "p99_us", **where)
        if not meds:
            return f"{system} p99", None, "latency not run"
        if not rs:
            return (f"{system} p99", None,
                    _why_missing(rec, system, f"no latency figure for {system}"
                                              + (f" at {_params_text(where)}" if where else "")))
        return f"{system} p99", rs[0].metrics["p99_us"], ""

    out = []
    text = "latency: shmcache p99 ≤ 100 µs"
    if base is None:
        out.append(_target("4a", text, "≤ 100 µs", "—", None, None,
                           _why_missing(rec, "shmcache", "no latency figure" if meds else "latency not run")))
    else:
        p99 = base.metrics["p99_us"]
        floor = _find(meds, "pipe", "p99_us", **where)
        # the machine's own wake-up (a bare FIFO) beside it: a p99 above
        # 100 µs there means no blocking reader can meet this target here
        floor_text = f"; the floor (pipe) p99 {_num(floor[0].metrics['p99_us'])} µs" if floor else ""
        out.append(_target("4a", text, "≤ 100 µs", f"p99 {_num(p99)} µs ({_params_text(where)}){floor_text}",
                           p99 / 100, p99 <= 100, values={"p99_us": p99}))
    shm = side("shmcache")
    for tid, peer in (("4b", "pyzmq"), ("4c", "redis")):
        out.append(_compare(tid, f"latency: shmcache p99 < {peer} p99", rec, shm, side(peer), 1.0, False,
                            "µs", strict=True))
    return out


def _get_targets(rec: Recorder) -> list[dict[str, Any]]:
    meds = _find(rec.medians("get"), "shmcache", "p50_us")
    by_keys = {r.params.get("keys"): r for r in meds}
    text = "get: p50 at the largest key count ≤ 1.5× p50 at 1,000 keys"
    small = by_keys.get(1000)
    counts = sorted((k for k in by_keys if isinstance(k, int) and k > 1000), key=int)
    if small is None or not counts:
        what = []
        if small is None:
            what.append("no get figure at 1,000 keys")
        if not counts:
            what.append("no get figure above 1,000 keys")
        return [_target("5", text, "≤ 1.5×", "—", None, None,
                        _why_missing(rec, "shmcache", "; ".join(what)))]
    big = by_keys[counts[-1]]
    return [_compare("5", text, rec, (f"p50 at {counts[-1]:,} keys", big.metrics["p50_us"], ""),
                     ("p50 at 1,000 keys", small.metrics["p50_us"], ""), 1.5, False, "µs")]


def targets(rec: Recorder) -> list[dict[str, Any]]:
    """Each performance target with the measured value(s), the ratio and
    "met", "MISSED" or "not measured (why)"; judged on medians over rounds."""
    return [*_fanout_targets(rec), *_drain_targets(rec), *_latency_targets(rec), *_get_targets(rec)]


def _ratio_text(t: dict[str, Any]) -> str:
    r = t["ratio"]
    return "—" if r is None else f"{r:.3g}×"


def targets_text(rec: Recorder) -> str:
    """The targets as a plain-text table, for the terminal."""
    rows = [("#", "target", "measured", "ratio", "need", "status")]
    for t in targets(rec):
        rows.append((t["id"], t["target"], t["measured"], _ratio_text(t), t["need"], t["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    widths[2] = min(widths[2], 70)
    lines = ["# targets (medians over rounds)"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- Markdown tables ---------------------------------------------------------------------


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in params.items())


def _md_table(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    align = ["---:" if i in set(right) else "---" for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join(align) + "|", *(line(r) for r in rows)]


def _long_table(meds: list[Result]) -> list[str]:
    """One row per (system, params): every parameter and metric."""
    pkeys: dict[str, None] = {}
    mkeys: dict[str, None] = {}
    for r in meds:
        for k in r.params:
            pkeys.setdefault(k, None)
        for k in r.metrics:
            mkeys.setdefault(k, None)
    header = ["system", *(_header(k, _PARAM_UNITS.get(k, "")) for k in pkeys),
              *(_header(k, _unit(k)) for k in mkeys)]
    rows = [[r.system, *(_num(r.params[k]) if k in r.params else "" for k in pkeys),
             *(_num(r.metrics[k]) if k in r.metrics else "" for k in mkeys)] for r in meds]
    text_params = {i + 1 for i, k in enumerate(pkeys)
                   if any(k in r.params and not _is_number(r.params[k]) for r in meds)}
    return _md_table(header, rows, right=set(range(1, len(header))) - text_params)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pivot(meds: list[Result], metrics: tuple[str, ...], rows: tuple[str, ...], col: str) -> list[str] | None:
    """Rows: system (and the ``rows`` params); columns: the values of param
    ``col``; cells: the metrics joined by " / ".  None if some figure lacks
    ``col`` or has none of the metrics (the caller falls back)."""
    use = [r for r in meds if any(m in r.metrics for m in metrics)]
    if not use or any(col not in r.params for r in use):
        return None
    cols = sorted({r.params[col] for r in use}, key=_sortable)
    table: dict[tuple[Any, ...], dict[Any, str]] = {}
    for r in use:
        key = (r.system, *(r.params.get(p, "") for p in rows))
        cell = " / ".join(_num(r.metrics[m]) if m in r.metrics else "—" for m in metrics)
        table.setdefault(key, {})[r.params[col]] = cell
    unit = _unit(metrics[0])
    what = " / ".join(label for label in map(_metric_label, metrics) if label)
    title = f"{what} ({unit})" if what and unit else (what or unit)
    header = ["system", *(_header(p, _PARAM_UNITS.get(p, "")) for p in rows),
              *(f"{title} at {col}={_num(c)}" for c in cols)]
    numeric_rows = {1 + i for i, p in enumerate(rows) if all(_is_number(r.params.get(p)) for r in use)}
    body = [[str(key[0]), *(_num(v) for v in key[1:]), *(cells.get(c, "") for c in cols)]
            for key, cells in table.items()]
    return _md_table(header, body, right=numeric_rows | set(range(1 + len(rows), len(header))))


#: per scenario: a line saying what it measures, and the pivot tables
#: (metrics, row params, column param); other metrics go to a full table
_SPECS: dict[str, tuple[str, list[tuple[tuple[str, ...], tuple[str, ...], str]]]] = {
    "fanout": (("One writer publishes; every reader receives every event. Delivered = events × readers / "
                "time until the slowest reader has them all."),
               [(("delivered_eps",), ("value_bytes",), "readers"),
                (("writer_eps",), ("value_bytes",), "readers"),
                (("slowest_s",), ("value_bytes",), "readers")]),
    "drain": (("One reader drains a full ring: into Event objects (\"events\"), as raw copies (\"raw\"); "
               "memcpy of the same bytes is the ceiling."), []),
    "latency": ("Publish-to-receive latency of events published one at a time at a fixed rate.", []),
    "get": ("One lookup of a random existing key, each call timed; 100-byte values.",
            [(("p50_us", "p99_us"), (), "keys"), (("mean_us",), (), "keys")]),
    "list": ("One full listing of every key.", [(("ms",), (), "keys")]),
    "watchmem": (("Private memory a fresh reader process gains by opening many intervals at the oldest "
                  "event of a large ring (it takes the first event of each)."), []),
    "producer": (("Events/s of 100-byte puts, directly or through the shmcached socket; several "
                  "producer processes: aggregate."), [(("eps",), ("path",), "producers")]),
}


def _scenario_md(rec: Recorder, scenario: str) -> list[str]:
    meds = rec.medians(scenario)
    about, pivots = _SPECS.get(scenario, ("", []))
    lines = [f"## {scenario}", ""]
    if about:
        lines += [about, ""]
    if not meds:
        lines += ["No figures.", ""]
    drawn = False
    for metrics, rows, col in pivots:
        table = _pivot(meds, metrics, rows, col)
        if table is not None:
            lines += table + [""]
            drawn = True
    if meds and not drawn:
        lines += _long_table(meds) + [""]
    rounds = sorted({r.round for r in meds})
    if rounds:
        lines.append(f"Medians over {'/'.join(str(n) for n in rounds)} round(s) per figure.")
        lines.append("")
    if scenario in rec.notes:
        lines += [f"Note: {rec.notes[scenario]}", ""]
    return lines


def _markdown(rec: Recorder, cfg: Config, info: dict[str, Any], started: float, finished: float,
              plot_lines: list[str], tgts: list[dict[str, Any]]) -> str:
    mode = "quick" if cfg.quick else "full"
    lines = [
        f"# shmcache benchmarks, {time.strftime('%Y-%m-%d', time.localtime(started))}",
        "",
        f"Machine: {info.get('summary', '?')}.",
        "",
        (f"Mode {mode}, {cfg.rounds} round(s); started {_stamp(started)}, finished {_stamp(finished)} "
         f"({finished - started:,.0f} s).  Every figure is the median over rounds; in each round the "
         f"systems were measured one after the other, alternating.  The machine may be shared: compare "
         f"figures of one run only."),
        "",
        "## Targets",
        "",
    ]
    lines += _md_table(["#", "target", "measured", "ratio", "need", "status"],
                       [[t["id"], t["target"], t["measured"], _ratio_text(t), t["need"], t["status"]]
                        for t in tgts])
    lines.append("")
    for scenario in _scenarios(rec):
        lines += _scenario_md(rec, scenario)
    lines += ["## Skipped systems", ""]
    if rec.skipped:
        lines += [f"- **{system}**: {reason}" for system, reason in rec.skipped.items()]
    else:
        lines.append("None.")
    lines += ["", "## Plots", "", *plot_lines, ""]
    lines += ["## Versions", ""]
    pk = info.get("packages", {})
    lines += [f"- {name}: {ver}" for name, ver in pk.items()]
    lines.append(f"- redis-server: {info.get('redis_server', '?')}")
    lines.append("")
    return "\n".join(lines)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))


# ---- plots ------------------------------------------------------------------------------------


def _headline(rs: list[Result]) -> list[Result]:
    """The figures at the 100-byte value size (or the smallest measured)."""
    sizes = sorted({r.params.get("value_bytes") for r in rs if "value_bytes" in r.params}, key=_sortable)
    if not sizes:
        return rs
    size = HEADLINE_BYTES if HEADLINE_BYTES in sizes else sizes[0]
    return [r for r in rs if r.params.get("value_bytes") == size]


def _new_figure() -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    return fig


def _plain_log_y(ax: Any) -> None:
    """Tick labels as plain numbers (30, 100) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def _rate_text(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _rate_log_y(ax: Any) -> None:
    """Events/s ticks as 200k, 1M, 5M instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _rate_text(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def _legend_outside(ax: Any) -> None:
    # lines of several systems end at the same x: a legend inside hides some
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def _plot_fanout(rec: Recorder, path: Path) -> str | None:
    rs = _headline([r for r in rec.medians("fanout") if "delivered_eps" in r.metrics and "readers" in r.params])
    if not rs:
        return "no fanout figures"
    fig = _new_figure()
    ax = fig.add_subplot()
    systems = list(dict.fromkeys(r.system for r in rs))
    for system in systems:
        pts: dict[Any, float] = {}
        for r in rs:
            if r.system == system:
                pts[r.params["readers"]] = max(pts.get(r.params["readers"], 0.0), r.metrics["delivered_eps"])
        xs = sorted(pts, key=_sortable)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=system)
    readers = sorted({r.params["readers"] for r in rs}, key=_sortable)
    ax.set_xticks(readers)
    ax.set_yscale("log")
    ax.set_xlabel("readers")
    ax.set_ylabel("delivered events/s")
    _rate_log_y(ax)
    ax.set_title(f"Fan-out, {_num(rs[0].params.get('value_bytes', '?'))} B values")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    _save(fig, path)
    return None


def _plot_latency(rec: Recorder, path: Path) -> str | None:
    rs = _headline([r for r in rec.medians("latency") if "p99_us" in r.metrics])
    if not rs:
        return "no latency figures"
    first = dict(rs[0].params)
    rs = [r for r in rs if r.params == first] or rs
    fig = _new_figure()
    ax = fig.add_subplot()
    systems = list(dict.fromkeys(r.system for r in rs))
    by = {r.system: r for r in rs}
    width = 0.27
    for i, (metric, label) in enumerate((("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"))):
        xs = [j + (i - 1) * width for j in range(len(systems))]
        ys = [by[s].metrics.get(metric, float("nan")) for s in systems]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(systems)))
    ax.set_xticklabels(systems, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("latency (µs)")
    _plain_log_y(ax)
    ax.set_title(f"Latency at {_params_text(first)}", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return None


def _plot_get(rec: Recorder, path: Path) -> str | None:
    rs = [r for r in rec.medians("get") if "p50_us" in r.metrics and "keys" in r.params]
    if not rs:
        return "no get figures"
    fig = _new_figure()
    ax = fig.add_subplot()
    for system in dict.fromkeys(r.system for r in rs):
        pts = sorted(((r.params["keys"], r.metrics["p50_us"]) for r in rs if r.system == system),
                     key=lambda p: _sortable(p[0]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("keys")
    ax.set_ylabel("p50 of one lookup (µs)")
    _plain_log_y(ax)
    ax.set_title("get(): p50 latency by cache size, 100 B values")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    _save(fig, path)
    return None


def _plot_drain(rec: Recorder, path: Path) -> str | None:
    meds = rec.medians("drain")
    bars: dict[str, dict[Any, float]] = {}
    for label in ("events", "raw", "memcpy"):
        system = "memcpy" if label == "memcpy" else "shmcache"
        rs = _find(meds, system, "eps", path=label)
        for size in {r.params.get("value_bytes") for r in rs}:
            pick = _drain_pick([r for r in rs if r.params.get("value_bytes") == size]) if system == "shmcache" \
                else _largest([r for r in rs if r.params.get("value_bytes") == size], "events")
            if pick is not None:
                bars.setdefault(label, {})[size] = pick.metrics["eps"]
    if not bars:
        return "no drain figures"
    sizes = sorted({s for b in bars.values() for s in b}, key=_sortable)
    fig = _new_figure()
    ax = fig.add_subplot()
    width = 0.8 / len(bars)
    for i, (label, vals) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar(xs, [vals.get(s, float("nan")) for s in sizes], width, label=label)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"{_num(s)} B" for s in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("events/s")
    _rate_log_y(ax)
    ax.set_title("Draining a full ring, by value size")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return None


_PLOTS: list[tuple[str, Callable[[Recorder, Path], str | None]]] = [
    ("fanout", _plot_fanout), ("latency", _plot_latency), ("get", _plot_get), ("drain", _plot_drain),
]


def _plots(rec: Recorder, base: Path, plots: bool) -> tuple[list[Path], list[str]]:
    """The PNGs written, and the Markdown lines about them."""
    if not plots:
        return [], ["Not drawn: --no-plots."]
    try:
        import matplotlib

        matplotlib.use("Agg")  # only files are drawn: no display is needed
    except Exception as err:  # noqa: BLE001 (a plot that cannot be drawn is reported, the figures stand)
        return [], [(f"Not drawn: matplotlib does not import ({type(err).__name__}: {err}); "
                     f"pip install -e '.[bench]'.")]
    written: list[Path] = []
    lines: list[str] = []
    not_drawn: list[str] = []
    for name, draw in _PLOTS:
        path = base.with_name(f"{base.name}-{name}.png")
        try:
            why = draw(rec, path)
        except Exception as err:  # noqa: BLE001 (a plot that cannot be drawn is reported, the figures stand)
            why = f"drawing failed ({type(err).__name__}: {err})"
        if why is None:
            written.append(path)
            lines.append(f"![{name}]({path.name})")
            lines.append("")
        else:
            not_drawn.append(f"- {name}: not drawn, {why}.")
    return written, lines + not_drawn


# ---- writing ------------------------------------------------------------------------------------


def _result_json(r: Result, rounds_key: str = "round") -> dict[str, Any]:
    return {"scenario": r.scenario, "system": r.system, "params": r.params, "metrics": r.metrics,
            rounds_key: r.round}


def write(rec: Recorder, cfg: Config, machine: dict[str, Any], out: Path, *, started: float,
          plots: bool) -> list[Path]:
    """Write <date>-<host>.json, .md and the PNGs into ``out``; their paths."""
    finished = time.time()
    out.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(machine.get("host", "host"))) or "host"
    base = out / f"{time.strftime('%Y-%m-%d', time.localtime(started))}-{host}"
    tgts = targets(rec)
    pngs, plot_lines = _plots(rec, base, plots)
    scenarios = _scenarios(rec)
    doc = {
        "machine": machine,
        "config": dataclasses.asdict(cfg),
        "started": started,
        "finished": finished,
        "started_iso": _stamp(started),
        "finished_iso": _stamp(finished),
        "results": [_result_json(r) for r in rec.results],
        "medians": {s: [_result_json(r, "rounds") for r in rec.medians(s)] for s in scenarios},
        "skipped": rec.skipped,
        "notes": rec.notes,
        "targets": tgts,
        "plots": [p.name for p in pngs],
    }
    json_path = base.with_name(base.name + ".json")
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md_path = base.with_name(base.name + ".md")
    md_path.write_text(_markdown(rec, cfg, machine, started, finished, plot_lines, tgts))
    return [json_path, md_path, *pngs]
