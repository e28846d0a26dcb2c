"""Shared fixtures. Tests use the installed amesh (run.sh installs the working tree first)."""

from __future__ import annotations

import os

# Before grpc loads: peers are started with a preexec_fn (a fork, not a vfork), and gRPC's
# fork handlers can abort the child while other threads use gRPC (istiod exited rc -6
# before exec). The tests never use gRPC in a forked child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nginx import Nginx
from peers.envoy import EnvoyPeer
from peers.istiod import BOOKINFO_DIR, Istiod, copy_corpus, ensure_istiod_binary
from xds_server import FakeHandler, XdsTestServer, mesh


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A per-test directory that nginx workers running as `nobody` can traverse.

    pytest's own tmp_path lives under /tmp/pytest-of-<user>, which every new pytest session
    resets to mode 0700: a worker respawned later could then no longer read its files."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    path = Path(tempfile.mkdtemp(prefix=f"amesh-{name}-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_nginx(tmp_path: Path) -> Iterator:
    """Factory for private nginx instances; all are killed at teardown."""
    started: list[Nginx] = []

    def make(**kwargs) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        n = Nginx(prefix, **kwargs)
        started.append(n)
        return n

    yield make
    for n in started:
        n.stop()


@pytest.fixture(scope="session")
def istiod_binary() -> Path:
    """The real istiod (built from the pinned istio module, cached under ~/.cache/amesh)."""
    return ensure_istiod_binary()


@pytest.fixture
def istiod(tmp_path: Path, istiod_binary: Path) -> Iterator[Istiod]:
    """istiod serving a private copy of the bookinfo corpus (tests may edit it)."""
    peer = Istiod(tmp_path / "istiod", binary=istiod_binary)
    try:
        peer.start(copy_corpus(BOOKINFO_DIR, tmp_path / "config"))
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator:
    """``make(xds_address, **EnvoyPeer kwargs)`` -> started EnvoyPeer; all stopped at teardown."""
    started: list[EnvoyPeer] = []

    def make(xds_address: str, **kwargs) -> EnvoyPeer:
        peer = EnvoyPeer(tmp_path / f"envoy{len(started)}", xds_address, **kwargs)
        started.append(peer)
        return peer.start()

    try:
        yield make
    finally:
        for peer in started:
            peer.stop()


@pytest.fixture
def srv() -> Iterator[XdsTestServer]:
    """The Python ADS test control plane serving a small Istio-like mesh."""
    with XdsTestServer() as server:
        mesh(server)
        yield server


@pytest.fixture
def handler() -> FakeHandler:
    """A ResourceHandler that records every apply() and can reject chosen names."""
    return FakeHandler()
