"""Proof tests for the real test peers: istiod (built from the pinned istio) and upstream Envoy.

These build istiod when it is not cached (minutes, cold) and FAIL when anything is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from peers import dump_xds
from peers.envoy import EnvoyPeer, find_route
from peers.istiod import (
    BOOKINFO_DIR,
    ISTIO_VERSION,
    Istiod,
    cache_dir,
    copy_corpus,
    ensure_istiod_binary,
    istio_module_version,
    istiod_binary_path,
)

REVIEWS = "reviews.default.svc.cluster.local"
REVIEWS_V2 = f"outbound|9080|v2|{REVIEWS}"
ROUTE_9080 = "9080"  # outbound HTTP route config of a sidecar for port 9080




# --------------------------------------------------------------------------- helpers


def reviews_routes(envoy: EnvoyPeer, predicate=bool, timeout: float = 30.0) -> list[dict]:
    rc = envoy.wait_route_config(
        ROUTE_9080, lambda rc: predicate(find_route(rc, f"{REVIEWS}:9080")), timeout=timeout
    )
    return find_route(rc, f"{REVIEWS}:9080")


def weights(routes: list[dict]) -> dict[str, int]:
    """Cluster -> weight of the weighted route (the one without a header match)."""
    for r in routes:
        if not r.get("match", {}).get("headers") and "weighted_clusters" in r.get("route", {}):
            return {
                c["name"]: int(c["weight"]) for c in r["route"]["weighted_clusters"]["clusters"]
            }
    return {}


def set_reviews_weights(istiod: Istiod, v1: int, v2: int) -> None:
    """Rewrite the corpus' reviews 80/20 split as v1/v2 (atomic write into the config dir)."""
    text = (BOOKINFO_DIR / "virtual-services.yaml").read_text()
    new = text.replace("weight: 80", f"weight: {v1}").replace("weight: 20", f"weight: {v2}")
    assert new != text
    istiod.write_config("virtual-services.yaml", new)


def header_route(routes: list[dict]) -> dict | None:
    for r in routes:
        for h in r.get("match", {}).get("headers", []):
            if h.get("name") == "end-user":
                return r
    return None


def acked(entry: dict | None) -> bool:
    """syncz entry: CDS/LDS/RDS sent and ACKed at the same version."""
    if not entry:
        return False
    return all(
        entry.get(f"{t}_sent") and entry.get(f"{t}_sent") == entry.get(f"{t}_acked")
        for t in ("cluster", "listener", "route")
    )


# --------------------------------------------------------------------------- tests


def test_istiod_binary_is_built_and_cached(istiod_binary: Path) -> None:
    assert istiod_binary == istiod_binary_path()
    assert istiod_binary.is_file()
    start = time.monotonic()
    assert ensure_istiod_binary() == istiod_binary  # cached: no rebuild
    assert time.monotonic() - start < 5
    # Clients send ISTIO_VERSION; keep it in step with the pinned module's VERSION file.
    version_file = (
        cache_dir() / "go" / "mod" / f"istio.io/istio@{istio_module_version()}" / "VERSION"
    )
    if version_file.is_file():  # absent only when the binary came from elsewhere
        assert ISTIO_VERSION.startswith(version_file.read_text().strip() + ".")


def test_istiod_debug_endpoints(istiod: Istiod) -> None:
    assert istiod.get("/ready") == b""  # 200 with an empty body (errors raise)
    assert istiod.syncz() == []  # no proxy yet
    configz = json.dumps(istiod.get_json("/debug/configz"))
    for name in ("reviews", "ratings", "reviews-v2"):
        assert f'"name": "{name}"' in configz
    registry = json.dumps(istiod.get_json("/debug/registryz"))
    assert REVIEWS in registry and "240.240.0.4" in registry


@pytest.mark.parametrize("ads_type", ["GRPC", "DELTA_GRPC"])
def test_envoy_gets_bookinfo(istiod: Istiod, envoy_factory, ads_type: str) -> None:
    envoy = envoy_factory(istiod.xds_address, ads_type=ads_type)
    envoy.wait_cluster(REVIEWS_V2)
    routes = reviews_routes(envoy, lambda rs: weights(rs) and header_route(rs))
    assert weights(routes) == {f"outbound|9080|v1|{REVIEWS}": 80, REVIEWS_V2: 20}
    jason = header_route(routes)
    assert jason["route"]["cluster"] == REVIEWS_V2
    assert jason["match"]["headers"][0]["string_match"]["exact"] == "jason"
    # EDS: subset v2 has exactly the v2 WorkloadEntry.
    cla = envoy.wait_for(lambda: envoy.endpoints().get(REVIEWS_V2), 30, "EDS reviews v2")
    addrs = [
        e["endpoint"]["address"]["socket_address"]
        for loc in cla["endpoints"]
        for e in loc["lb_endpoints"]
    ]
    assert addrs == [{"address": "127.0.0.22", "port_value": 9080}]
    # istiod sees the proxy and its ACKs.
    entry = envoy.wait_for(
        lambda: acked(istiod.sync_status(envoy.proxy_id)) and istiod.sync_status(envoy.proxy_id),
        30,
        "istiod syncz ACKs",
    )
    assert entry["proxy"].startswith(envoy.proxy_id)
    assert not entry.get("cluster_error") and not entry.get("listener_error")
    # istiod's own view of what it sends this proxy.
    dump = json.dumps(istiod.config_dump(envoy.proxy_id))
    assert REVIEWS_V2 in dump


def test_config_change_reaches_envoy(istiod: Istiod, envoy_factory) -> None:
    envoy = envoy_factory(istiod.xds_address, ads_type="DELTA_GRPC")
    reviews_routes(envoy, weights)
    set_reviews_weights(istiod, 50, 50)
    start = time.monotonic()
    routes = reviews_routes(envoy, lambda rs: set(weights(rs).values()) == {50}, timeout=10)
    assert weights(routes) == {f"outbound|9080|v1|{REVIEWS}": 50, REVIEWS_V2: 50}
    assert time.monotonic() - start < 10


def test_istiod_restart_envoy_reconnects(istiod: Istiod, envoy_factory) -> None:
    envoy = envoy_factory(istiod.xds_address, ads_type="GRPC")
    envoy.wait_cluster(REVIEWS_V2)
    before = istiod.xds_address
    istiod.stop()
    envoy.wait_for(lambda: not envoy.connected(), 15, "ADS disconnect")
    # A config change while istiod is down must arrive after the reconnect.
    set_reviews_weights(istiod, 70, 30)
    istiod.restart()
    assert istiod.xds_address == before
    envoy.wait_connected(timeout=30)
    routes = reviews_routes(envoy, lambda rs: weights(rs).get(REVIEWS_V2) == 30)
    assert weights(routes)[f"outbound|9080|v1|{REVIEWS}"] == 70
    envoy.wait_for(lambda: acked(istiod.sync_status(envoy.proxy_id)), 30, "ACKs after restart")


def test_probe_matches_golden(istiod: Istiod) -> None:
    """The committed golden files are what this istiod sends the probe node (regenerate:
    ``python -m tests.peers.dump_xds`` from the repo root)."""
    docs = dump_xds.golden_documents(dump_xds.fetch_sotw(istiod.xds_address))
    names = {
        f: sorted(r.get("name") or r.get("cluster_name") for r in d["resources"])
        for f, d in docs.items()
        if "resources" in d
    }
    assert REVIEWS_V2 in names["clusters.json"] and REVIEWS_V2 in names["endpoints.json"]
    assert ROUTE_9080 in names["routes.json"]
    for name, doc in docs.items():
        golden = dump_xds.GOLDEN_DIR / name
        assert golden.is_file(), f"missing {golden}: run python -m tests.peers.dump_xds"
        assert json.loads(golden.read_text()) == doc, (
            f"{golden} is stale: run python -m tests.peers.dump_xds and review the diff"
        )
    # Deterministic: a second probe gives the same documents.
    assert dump_xds.golden_documents(dump_xds.fetch_sotw(istiod.xds_address)) == docs


@pytest.mark.parametrize("xds_auth", [True, False])
def test_secure_grpc_with_istiod_ca(tmp_path: Path, istiod_binary: Path, xds_auth: bool) -> None:
    """15012-like TLS port: server cert from istiod's self-signed CA (root written to a file).
    Without a client identity (cert or JWT) istiod refuses the stream; XDS_AUTH=false serves."""
    env = {} if xds_auth else {"XDS_AUTH": "false"}
    with Istiod(tmp_path / "istiod", binary=istiod_binary, secure_grpc=True, env=env) as peer:
        peer.start(copy_corpus(BOOKINFO_DIR, tmp_path / "config"))
        creds = grpc.ssl_channel_credentials(root_certificates=peer.root_cert_path.read_bytes())

        def probe():
            return dump_xds.fetch_sotw(
                peer.secure_xds_address, credentials=creds, server_name="istiod.istio-system.svc"
            )

        if xds_auth:
            with pytest.raises(grpc.RpcError) as err:
                probe()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        else:
            assert REVIEWS_V2 in probe()[dump_xds.CDS]
