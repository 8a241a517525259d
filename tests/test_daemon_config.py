"""shmcached's configuration as a new user meets it: flags, SHMCACHED_*
variables, the TOML file, --help and --version.  ``parse`` is called in this
process where that suffices (the environment is scrubbed of SHMCACHED_*
first); the exit statuses and one-line messages of the real program are
checked in tests/test_daemon.py ("configuration") and here for --version."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmcache
from daemon._config import OPTIONS, Config, ConfigError, parse

from .support import daemon_env

FLAGS = ("allow-local-writes", "etcd-keep-prefix")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SHMCACHED_* variable (nor SHMCACHE_NAME) of the developer's or the
    CI's reaches parse()."""
    for key in list(os.environ):
        if key.startswith("SHMCACHED_") or key == "SHMCACHE_NAME":
            monkeypatch.delenv(key)
    yield


def config(tmp_path: Path, *argv: str) -> Config:
    return parse(["--socket", str(tmp_path / "d.sock"), *argv])


def attr(option: str) -> str:
    return option.replace("-", "_")


def env_name(option: str) -> str:
    return "SHMCACHED_" + option.upper().replace("-", "_")


# ---- flags ------------------------------------------------------------------


def test_the_boolean_options_are_exactly_the_flags() -> None:
    assert {o.name for o in OPTIONS if isinstance(o.default, bool)} == set(FLAGS)


@pytest.mark.parametrize("option", FLAGS)
def test_flags_on_the_command_line(tmp_path: Path, option: str) -> None:
    assert getattr(config(tmp_path), attr(option)) is False
    assert getattr(config(tmp_path, f"--{option}"), attr(option)) is True
    assert getattr(config(tmp_path, f"--no-{option}"), attr(option)) is False
    assert getattr(config(tmp_path, f"--{option}", f"--no-{option}"), attr(option)) is False  # the last wins


@pytest.mark.parametrize("option", FLAGS)
def test_a_flag_takes_no_value(tmp_path: Path, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        config(tmp_path, f"--{option}", "true")
    assert exit_.value.code == 2
    assert "unrecognized arguments: true" in capsys.readouterr().err


@pytest.mark.parametrize("option", FLAGS)
@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("1", True), ("0", False),
                                             ("yes", True), ("no", False), ("TRUE", True), ("No", False)])
def test_flags_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str,
                                    text: str, value: bool) -> None:
    monkeypatch.setenv(env_name(option), text)
    assert getattr(config(tmp_path), attr(option)) is value


@pytest.mark.parametrize("option", FLAGS)
def test_flags_from_the_toml_file(tmp_path: Path, option: str) -> None:
    path = tmp_path / "shmcached.toml"
    path.write_text(f"{attr(option)} = true\n")
    assert getattr(config(tmp_path, "--config", str(path)), attr(option)) is True
    path.write_text(f"{attr(option)} = false\n")
    assert getattr(config(tmp_path, "--config", str(path)), attr(option)) is False


def test_flag_precedence_command_line_then_environment_then_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shmcached.toml"
    path.write_text("allow_local_writes = true\n")
    assert config(tmp_path, "--config", str(path)).allow_local_writes is True
    monkeypatch.setenv("SHMCACHED_ALLOW_LOCAL_WRITES", "false")
    assert config(tmp_path, "--config", str(path)).allow_local_writes is False
    monkeypatch.setenv("SHMCACHED_ALLOW_LOCAL_WRITES", "true")
    assert config(tmp_path, "--config", str(path), "--no-allow-local-writes").allow_local_writes is False


@pytest.mark.parametrize("text", ["maybe", "", "2", "tru"])
def test_a_bad_flag_variable_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   text: str) -> None:
    monkeypatch.setenv("SHMCACHED_ETCD_KEEP_PREFIX", text)
    with pytest.raises(ConfigError, match=r"^SHMCACHED_ETCD_KEEP_PREFIX: .* must be true or false"):
        config(tmp_path)


def test_help_shows_flags_as_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in FLAGS:
        assert f"--{option}, --no-{option}\n" in out, out
        assert f"[--{option} | --no-{option}]" in out, out
    assert "WRITES" not in out and "--etcd-keep-prefix PREFIX" not in out


# ---- the environment --------------------------------------------------------


@pytest.mark.parametrize("variable", ["SHMCACHED_BOGUS", "SHMCACHED_CAPACTIY", "SHMCACHED_", "SHMCACHED_NAME_"])
def test_an_unknown_variable_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   variable: str) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError) as err:
        config(tmp_path)
    assert str(err.value).startswith(f"{variable}: unknown variable"), err.value


def test_every_option_variable_and_the_config_variable_are_known(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shmcached.toml"
    path.write_text("capacity = 128\n")
    monkeypatch.setenv("SHMCACHED_CONFIG", str(path))
    monkeypatch.setenv("SHMCACHED_MAX_KEYS", "512")
    monkeypatch.setenv("SHMCACHED_ALLOW_LOCAL_WRITES", "yes")
    c = config(tmp_path)
    assert (c.capacity, c.max_keys, c.allow_local_writes) == (128, 512, True)
    for option in OPTIONS:  # each is recognised (its value may still be refused)
        monkeypatch.setenv(env_name(option.name), "x")
        try:
            config(tmp_path)
        except ConfigError as err:
            assert str(err).startswith(env_name(option.name) + ": 'x' "), err
        monkeypatch.delenv(env_name(option.name))


@pytest.mark.parametrize(("variable", "text", "message"), [
    ("SHMCACHED_CAPACITY", "x", "SHMCACHED_CAPACITY: 'x' must be a positive integer"),
    ("SHMCACHED_CAPACITY", "0", "SHMCACHED_CAPACITY: '0' must be a positive integer"),
    ("SHMCACHED_HEARTBEAT", "soon", "SHMCACHED_HEARTBEAT: 'soon' must be a positive number of seconds"),
    ("SHMCACHED_MODE", "rw", "SHMCACHED_MODE: 'rw' must be permission bits such as 0640"),
    ("SHMCACHED_ALLOW_UID", "bob", "SHMCACHED_ALLOW_UID: 'bob' must be a comma-separated list of numeric ids"),
    ("SHMCACHED_MAX_FRAME_BYTES", "1000", "SHMCACHED_MAX_FRAME_BYTES: '1000' must be at least 65536"),
    # checks of several options together name the variable that set the one at fault
    ("SHMCACHED_ARENA_BYTES", "1", "SHMCACHED_ARENA_BYTES: arena_bytes=1 is out of range"),
    ("SHMCACHE_NAME", "no/slash", "SHMCACHE_NAME: 'no/slash' invalid cache name"),
])
def test_errors_in_variables_name_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               variable: str, text: str, message: str) -> None:
    monkeypatch.setenv(variable, text)
    with pytest.raises(ConfigError) as err:
        config(tmp_path)
    assert str(err.value).startswith(message), err.value


def test_errors_on_the_command_line_still_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--capacity: 'x' must be a positive integer$"):
        config(tmp_path, "--capacity", "x")
    with pytest.raises(ConfigError, match=r"^--max-frame-bytes: '4096' must be at least 65536$"):
        config(tmp_path, "--max-frame-bytes", "4096")
    assert config(tmp_path, "--max-frame-bytes", "65536").max_frame_bytes == 65536


# ---- --version ----------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    # with a bogus variable too: --version answers before the configuration is judged
    out = subprocess.run([sys.executable, "-m", "shmcached", flag], capture_output=True, text=True, check=False,
                         timeout=60, env=daemon_env({"SHMCACHED_BOGUS": "1"}))
    assert (out.returncode, out.stdout, out.stderr) == (0, f"shmcached {shmcache.__version__}\n", "")
