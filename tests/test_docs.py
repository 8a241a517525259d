"""The docs name only what the code has: every ``sc_*`` name docs/design.md
mentions exists in native/, every field of its header table is a field of
``struct sc_header`` (and every field of the struct is in the table, padding
aside), and the STATS keys docs/protocol.md lists are exactly those the
daemon sends.  When code and docs disagree one of them is wrong: these tests
say which names."""

from __future__ import annotations

import re
from pathlib import Path

from shmcache._native import ffi

from .support import REPO, Served

DESIGN = (REPO / "docs" / "design.md").read_text()
PROTOCOL = (REPO / "docs" / "protocol.md").read_text()
NATIVE = "\n".join(p.read_text() for p in sorted((REPO / "native").glob("*.[ch]")))

#: header fields that only align or reserve bytes: the table need not name them
PADDING = re.compile(r"(pad|reserved)\d*|tail_pad")


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def test_every_sc_name_in_design_exists_in_native() -> None:
    named = set(re.findall(r"\bsc_[a-z0-9_]*[a-z0-9]\b|\bsc_[a-z0-9_]+\*", DESIGN))
    assert named, "design.md names no sc_* function or struct"
    # ``sc_ring_*`` names a family: at least one name must start so
    missing = sorted(n for n in named
                     if not re.search(rf"\b{n[:-1]}" if n.endswith("*") else rf"\b{n}\b", NATIVE))
    assert not missing, f"docs/design.md names what native/ does not have: {missing}"


def header_table() -> list[str]:
    """The 'fields' column of design.md's header table, one cell per line."""
    start = DESIGN.index("| line | fields | written by |")
    rows = []
    for line in DESIGN[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append(cells[1])
    return rows


def test_header_table_is_struct_sc_header() -> None:
    fields = {name for name, _ in ffi.typeof("struct sc_header").fields}
    named = set()
    for cell in header_table():
        named |= {word for word in backticked(cell) if re.fullmatch(r"[a-z][a-z0-9_]*", word)}
    unknown = sorted(named - fields)
    assert not unknown, f"design.md's header table names fields struct sc_header lacks: {unknown}"
    unnamed = sorted(f for f in fields - named if not PADDING.fullmatch(f))
    assert not unnamed, f"fields of struct sc_header missing from design.md's header table: {unnamed}"


def documented_stats_keys() -> set[str]:
    """The backticked names at the top level of the parenthesis after
    'a JSON object for STATS' in protocol.md (nested remarks skipped)."""
    start = PROTOCOL.index("a JSON object for STATS (") + len("a JSON object for STATS (")
    depth, top = 1, []
    for ch in PROTOCOL[start:]:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                break
        if depth == 1:
            top.append(ch)
    return set(backticked("".join(top)))


def test_stats_keys_in_protocol_are_what_the_daemon_sends(served: Served) -> None:
    sent = set(served.producer.stats())
    documented = documented_stats_keys()
    assert sent == documented, (f"only sent: {sorted(sent - documented)}; "
                                f"only documented: {sorted(documented - sent)}")


def test_the_docs_mark_nothing_in_progress() -> None:
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "systemd" / "README.md"]:
        text = Path(path).read_text()
        assert "in progress" not in text.lower(), f"{path.relative_to(REPO)} says 'in progress'"
