"""The ``shmcache`` command (``python -m shmcache``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmcache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="one writer and a few reader processes, with figures")
    demo.add_argument("--readers", type=int, default=3, help="reader processes (default 3)")
    demo.add_argument("--events", type=int, default=200_000, help="events to publish (default 200000)")
    demo.add_argument("--batch", type=int, default=64, help="events per put_many (default 64)")
    demo.add_argument("--capacity", type=int, default=4096, help="ring slots (default 4096)")
    demo.add_argument("--name", default=None, help="cache name (default demo-PID)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        for label in ("readers", "events", "batch", "capacity"):
            if getattr(args, label) < 1:
                parser.error(f"--{label} must be at least 1")
        return run(readers=args.readers, events=args.events, batch=args.batch,
                   capacity=args.capacity, name=args.name)
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
