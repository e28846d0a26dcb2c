"""TLS to the control plane (istiod's 15012 shape): own CA, SAN override, bearer token."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xds_server import ROUTES, FakeHandler, XdsTestServer, eventually, mesh, source

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

SAN = "istiod.istio-system.svc"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign",
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for istiod's DNS name signed by it, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=istiod", cwd=d,
    )
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{SAN}\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf", cwd=d,
    )
    return d


@pytest.fixture
def tls_srv(pki: Path) -> Iterator[XdsTestServer]:
    key, cert = (pki / "server.key").read_bytes(), (pki / "server.crt").read_bytes()
    with XdsTestServer(tls=(key, cert)) as server:
        mesh(server)
        yield server


def write_token(path: Path, value: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)  # atomically, as kubelet rotates projected tokens


@pytest.mark.parametrize("protocol", ["delta", "sotw"])
def test_tls_with_token_and_rotation(
    protocol: str, pki: Path, tls_srv: XdsTestServer, tmp_path: Path
) -> None:
    token = tmp_path / "istio-token"
    write_token(token, "token-one")
    handler = FakeHandler()
    src = source(
        tls_srv.address,
        handler,
        protocol,
        tls={"ca_file": str(pki / "ca.crt"), "server_name": SAN, "token_file": str(token)},
    )
    try:
        assert tls_srv.address.startswith("grpcs://")
        assert handler.wait_names(ROUTES, {"r1", "r2"})
        assert tls_srv.streams[0].metadata["authorization"] == "Bearer token-one"

        write_token(token, "token-two-rotated")
        tls_srv.drop_streams()
        assert tls_srv.wait_for(lambda: len(tls_srv.streams) == 2)
        assert tls_srv.streams[1].metadata["authorization"] == "Bearer token-two-rotated"
        assert tls_srv.wait_for(lambda: bool(tls_srv.sent_of(ROUTES, 2)))
    finally:
        src.stop()


def _failing(src: Any) -> bool:
    return eventually(lambda: src.status()["reconnects"] >= 1)


def test_untrusted_ca_never_connects(pki: Path, tls_srv: XdsTestServer) -> None:
    handler = FakeHandler()
    src = source(
        tls_srv.address, handler, tls={"ca_file": str(pki / "other.crt"), "server_name": SAN}
    )
    try:
        assert _failing(src)
        assert src.status()["last_error"].startswith("UNAVAILABLE")
        assert tls_srv.streams == [] and handler.calls == []
    finally:
        src.stop()


def test_san_mismatch_never_connects(pki: Path, tls_srv: XdsTestServer) -> None:
    # no server_name override: 127.0.0.1 is not in the certificate
    src = source(tls_srv.address, FakeHandler(), tls={"ca_file": str(pki / "ca.crt")})
    try:
        assert _failing(src)
        assert tls_srv.streams == []
    finally:
        src.stop()


def test_token_file_vanishing_is_retried(
    pki: Path, tls_srv: XdsTestServer, tmp_path: Path
) -> None:
    token = tmp_path / "istio-token"
    write_token(token, "t")
    handler = FakeHandler()
    src = source(
        tls_srv.address,
        handler,
        tls={"ca_file": str(pki / "ca.crt"), "server_name": SAN, "token_file": str(token)},
    )
    try:
        assert handler.wait_names(ROUTES, {"r1", "r2"})
        token.unlink()
        tls_srv.drop_streams()
        assert eventually(lambda: "cannot prepare" in (src.status()["last_error"] or ""))
        write_token(token, "back")
        assert tls_srv.wait_for(lambda: len(tls_srv.streams) == 2)
        assert tls_srv.streams[1].metadata["authorization"] == "Bearer back"
    finally:
        src.stop()
