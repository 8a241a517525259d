"""The etcd client's TLS options against a real etcd serving https with
client certificate authentication (certificates made here with openssl),
and the rule that keeps every request encrypted once TLS is asked for:
https endpoints only, never a mix of schemes, in the client and in
shmcached's configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon._config import ConfigError, parse
from daemon._etcd import EtcdClient, EtcdError, EtcdUnavailable
from daemon._main import main

from ._etcd import ETCD_BINARY, _etcd_env, dead_endpoint, free_port
from ._fakehttp import fake_server

OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    # the server's certificate is a client one too: etcd's JSON gateway
    # connects to its own gRPC port with it
    for who, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        (d / f"{who}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "1", "-extfile", f"{who}.ext", cwd=d)


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    if not Path(ETCD_BINARY).exists():
        pytest.skip(f"{ETCD_BINARY} is not installed (Debian package etcd-server)")
    _certificates(tmp_path)
    client_port, peer_port = free_port(), free_port()
    url, peer = f"https://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    log = open(tmp_path / "etcd.log", "wb")
    proc = subprocess.Popen(
        [ETCD_BINARY, "--name", "tls", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"tls={peer}", "--initial-cluster-state", "new",
         "--cert-file", str(tmp_path / "server.pem"), "--key-file", str(tmp_path / "server.key"),
         "--trusted-ca-file", str(tmp_path / "ca.pem"), "--client-cert-auth"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_etcd_env())
    try:
        client = EtcdClient([url], ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / "client.pem"),
                            key=str(tmp_path / "client.key"), timeout=2.0)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.status()
                break
            except EtcdError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("TLS etcd did not start: "
                                         + (tmp_path / "etcd.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield url, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp_path / "data", ignore_errors=True)


def test_tls_with_a_client_certificate(tls_etcd: tuple[str, Path]) -> None:
    url, d = tls_etcd
    good = EtcdClient([url], ca=str(d / "ca.pem"), cert=str(d / "client.pem"), key=str(d / "client.key"))
    revision, kvs = good.range_prefix(b"/app/")
    assert revision >= 1 and kvs == []
    with good.watch(b"/app/", revision + 1, idle_timeout=30.0) as watch:
        assert watch is not None  # created over TLS: the created message was checked
    # no client certificate: the server refuses the handshake
    with pytest.raises(EtcdUnavailable):
        EtcdClient([url], ca=str(d / "ca.pem"), timeout=5.0).status()
    # a CA that did not sign the server's certificate: we refuse the server
    (d / "other").mkdir()
    _certificates(d / "other")
    with pytest.raises(EtcdUnavailable, match="(?i)certificate"):
        EtcdClient([url], ca=str(d / "other" / "ca.pem"), cert=str(d / "client.pem"),
                   key=str(d / "client.key"), timeout=5.0).status()


# ---- https only, once TLS is asked for ------------------------------------------------


@pytest.mark.parametrize("endpoints", [
    ["http://127.0.0.1:2379"],
    ["https://127.0.0.1:2379", "http://10.0.0.2:2379"],
    ["http://10.0.0.2:2379", "https://127.0.0.1:2379"],
])
@pytest.mark.parametrize("option", ["ca", "cert", "key"])
def test_tls_files_with_an_http_endpoint_are_refused(endpoints: list[str], option: str) -> None:
    # the check comes before the files are read: these need not exist
    with pytest.raises(ValueError, match="is not https://, but TLS files are given") as info:
        EtcdClient(endpoints, **{option: "/nonexistent/file.pem"})  # type: ignore[arg-type]
    [http] = [e for e in endpoints if e.startswith("http:")]
    assert repr(http) in str(info.value)


@pytest.mark.parametrize("endpoints", [
    ["https://127.0.0.1:2379", "http://10.0.0.2:2379"],
    ["http://127.0.0.1:2379", "http://10.0.0.3:2379", "https://10.0.0.2:2379"],
])
def test_mixed_schemes_are_refused(endpoints: list[str]) -> None:
    with pytest.raises(ValueError, match="all endpoints must use the same scheme") as info:
        EtcdClient(endpoints)
    assert repr(endpoints[0]) in str(info.value) and repr(endpoints[-1]) in str(info.value)


def test_an_https_client_never_falls_over_to_plaintext() -> None:
    """The second endpoint is a plain HTTP server under an https:// URL:
    it gets a TLS handshake, never a request it could read."""
    with dead_endpoint() as dead, fake_server({}) as plain:
        tls_dead = dead.replace("http://", "https://")
        tls_plain = plain.url.replace("http://", "https://")
        client = EtcdClient([tls_dead, tls_plain], timeout=2.0)
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            client.status()
        with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
            client.watch(b"/p/", 1)
    assert len(plain.peers) == 2
    for peer in plain.peers:
        assert peer.path == "" and peer.received[:1] == b"\x16"  # a TLS handshake record


def _etcd_config(tmp_path: Path, *args: str) -> list[str]:
    return ["--name", "tlscheck", "--socket", str(tmp_path / "d.sock"), "--source", "etcd",
            "--etcd-prefix", "/app/", *args]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.startswith("SHMCACHED_"):
            monkeypatch.delenv(variable)


@pytest.mark.usefixtures("clean_environment")
def test_the_daemon_configuration_refuses_tls_with_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("unused: refused before it is read\n")
    args = _etcd_config(tmp_path, "--etcd-endpoints", "https://10.0.0.1:2379,http://10.0.0.2:2379", "--etcd-ca", str(ca))
    with pytest.raises(ConfigError, match="all endpoints must use the same scheme"):
        parse(args)
    args = _etcd_config(tmp_path, "--etcd-endpoints", "http://10.0.0.2:2379", "--etcd-ca", str(ca))
    with pytest.raises(ConfigError, match="'http://10.0.0.2:2379' is not https://, but TLS files are given"):
        parse(args)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("shmcached: error: --etcd-ca/--etcd-cert/--etcd-key: ") and "http://10.0.0.2:2379" in err
    assert len(err.splitlines()) == 1


@pytest.mark.usefixtures("clean_environment")
def test_the_daemon_configuration_takes_https_with_tls_files(tmp_path: Path) -> None:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    _certificates(tmp_path)
    config = parse(_etcd_config(tmp_path, "--etcd-endpoints", "https://10.0.0.1:2379,https://10.0.0.2:2379",
                                "--etcd-ca", str(tmp_path / "ca.pem"), "--etcd-cert", str(tmp_path / "client.pem"),
                                "--etcd-key", str(tmp_path / "client.key")))
    assert config.etcd_endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
