"""The release artifacts install and work: ``python -m build`` makes an sdist
and, from that sdist, a wheel (so a file the sdist lacks fails here, as it
would for a user's ``pip install shmcache-X.tar.gz``); each installs into a
fresh virtual environment, its dependencies from the configured index as a
user's pip gets them, and passes a smoke test run from outside the checkout.
The C sources are compiled twice: the wheel, and the sdist's install."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from .support import REPO

#: Run by each installed interpreter: argv is the cache name, the version
#: pyproject.toml declares and the environment's prefix.
SMOKE = textwrap.dedent("""
    import importlib.metadata
    import importlib.resources
    import subprocess
    import sys
    from pathlib import Path

    import shmcache
    from shmcache import _codec, _native

    name, version, prefix = sys.argv[1:]
    # the installed copy, not the checkout's
    assert Path(shmcache.__file__).is_relative_to(prefix), shmcache.__file__
    assert shmcache.__version__ == importlib.metadata.version("shmcache") == version, shmcache.__version__
    files = importlib.resources.files("shmcache")
    for typed in ("py.typed", "_native.pyi", "_codec.pyi"):
        assert (files / typed).is_file(), typed
    assert _native.lib.sc_sem_bytes() > 0
    assert _codec.__file__

    with shmcache.Writer(name, capacity=64, arena_bytes=1 << 16, max_keys=64, store_bytes=1 << 16) as w:
        w.put("pods/a", b"1")
        with shmcache.Reader(name) as r:
            assert r.get("pods/a") == shmcache.Item("pods/a", b"1", 1), r.get("pods/a")
            snap = r.list("pods/")
            assert [item.key for item in snap.items] == ["pods/a"], snap
            w.put("pods/b", b"2")
            event = next(r.watch(snap.rv, timeout=10))
            assert event == shmcache.Event(shmcache.EventType.ADDED, "pods/b", b"2", 2), event

    bindir = Path(sys.executable).parent
    for command in ([str(bindir / "shmcache"), "--help"], [sys.executable, "-m", "shmcached", "--help"]):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    print("ok")
""")


def _env() -> dict[str, str]:
    # Nothing from the checkout's environment may make the installed copy
    # importable from elsewhere; pip's own settings (PIP_*) stay.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(args: list[str | Path], cwd: Path, timeout: float) -> str:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _install(artifact: Path, venv: Path) -> subprocess.Popen[str]:
    _run([sys.executable, "-m", "venv", venv], cwd=venv.parent, timeout=120)
    return subprocess.Popen([venv / "bin" / "python", "-m", "pip", "install", "-q", artifact],
                            cwd=venv.parent, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_native_stub_is_current() -> None:
    """shmcache/_native.pyi is what native/gen_native_stub.py makes of shmcache.h."""
    done = subprocess.run([sys.executable, REPO / "native" / "gen_native_stub.py", "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_sdist_and_wheel_install_and_run(name: str) -> None:
    pytest.importorskip("build", reason="needs the 'build' package (the test extra)")
    # not tmp_path: pytest keeps the last runs', and two venvs are ~100 MB
    with tempfile.TemporaryDirectory(prefix="shmcache-release-") as tmp:
        _build_install_smoke(Path(tmp), name)


def _build_install_smoke(tmp_path: Path, name: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    dist = tmp_path / "dist"
    # without --sdist/--wheel, build makes the sdist, then the wheel from it
    _run([sys.executable, "-m", "build", "--outdir", dist, REPO], cwd=tmp_path, timeout=300)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")

    with tarfile.open(sdist) as tar:
        in_sdist = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert {"LICENSE", "native/build_native.py", "native/shmcache.h", "native/shmcache.c",
            "native/codec.c", "shmcache/py.typed", "shmcache/_native.pyi"} <= in_sdist
    assert not {f for f in in_sdist if f.startswith("tests/") or f.endswith((".so", ".o"))}
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    assert {"shmcache/py.typed", "shmcache/_native.pyi", "shmcache/_codec.pyi", "shmcached/_main.py",
            f"shmcache-{version}.dist-info/licenses/LICENSE"} <= in_wheel
    assert {f.split(".")[0] for f in in_wheel if f.endswith(".so")} == {"shmcache/_native", "shmcache/_codec"}

    # both at once: the sdist's install compiles while the wheel's only copies
    installs = {artifact: _install(artifact, tmp_path / f"venv-{kind}")
                for kind, artifact in (("sdist", sdist), ("wheel", wheel))}
    try:
        for artifact, proc in installs.items():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"installing {artifact.name} failed:\n{out}"
    finally:
        for proc in installs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for kind in ("sdist", "wheel"):
        venv = tmp_path / f"venv-{kind}"
        out = _run([venv / "bin" / "python", "-c", SMOKE, name, version, venv], cwd=tmp_path, timeout=120)
        assert out.strip() == "ok", f"{kind}: {out}"
