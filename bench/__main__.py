"""Run every benchmark scenario for shmcache and its peers in one run.

    python -m bench --quick            # smoke run: tiny sizes, seconds
    python -m bench --full             # the published figures: minutes
    python -m bench --full --only fanout,latency

Writes bench/results/<date>-<host>.json (every round of every figure, the
machine, the skipped peers and why), the Markdown tables beside it (.md) and
PNG plots (bench/results/<date>-<host>-<scenario>.png).  Peers come from the
``[bench]`` extra; Redis is a real redis-server started on a Unix socket in a
temporary directory.  A peer that cannot run is skipped with its reason.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from ._common import Config, Recorder

SCENARIOS = ["fanout", "drain", "latency", "lookup", "watchmem", "producer"]
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="tiny sizes, one round (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the sizes of the published figures, three rounds")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios of {','.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the results (default: bench/results; --quick: a temporary one "
                             "unless given)")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    args = parser.parse_args(argv)
    cfg = Config.for_mode(args.mode or "quick")
    only = [s for s in args.only.split(",") if s] or SCENARIOS
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")

    from . import _report

    rec = Recorder()
    machine = _report.machine()
    print(f"# shmcache benchmarks, {args.mode or 'quick'}: {machine['summary']}", flush=True)
    started = time.time()
    for name in only:
        print(f"## {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        t0 = time.perf_counter()
        module.run(cfg, rec)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    out = args.out
    if out is None:
        if cfg.quick:
            import tempfile
            out = Path(tempfile.mkdtemp(prefix="shmcache-bench-"))
        else:
            out = RESULTS
    paths = _report.write(rec, cfg, machine, out, started=started, plots=not args.no_plots)
    print(_report.targets_text(rec))
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
