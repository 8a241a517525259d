"""README's Python example runs as written: its block is extracted and run
in a child process while a daemon owns the cache it names, as README's "Use
it" starts one.  The only change made to the text is the cache names, "demo"
and "other", replaced by names unique to the test (tests run in parallel)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .support import REPO, daemon_env, remove_cache, running, unique_name


def python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples() -> None:
    assert python_blocks(), "README.md has no ```python block"


def test_readme_python_example_runs(name: str, tmp_path: Path) -> None:
    other = unique_name("other")
    (block,) = python_blocks()
    code = block.replace('"demo"', repr(name)).replace('"other"', repr(other))
    assert code != block and repr(name) in code, "the example no longer names the cache 'demo'"
    try:
        with running(name, str(tmp_path / "d.sock"), tmp_path / "d.log"):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                  env=daemon_env(), check=False)
    finally:
        remove_cache(other)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # get() of pods/b; watch(0): the list as ADDED at its rv (pods/a was
    # deleted); interval(0)'s raw batch: that one item, key and value bytes
    assert lines[0] == "Item(key='pods/b', value=b'beta', rv=2)", lines
    assert lines[1] == "ADDED pods/b 3", lines
    count, _meta, data = map(int, lines[2].split())
    assert (count, data) == (1, len("pods/b") + len("beta")), lines
    assert len(lines) == 3, lines
