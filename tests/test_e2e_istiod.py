"""End to end under the real istiod: Istio YAML -> istiod -> amesh in a real nginx -> the dict.

Each test runs once with state-of-the-world and once with Delta ADS. istiod reads the bookinfo
corpus (ServiceEntry + WorkloadEntry + DestinationRule + VirtualService) from a private
directory that the tests edit atomically; istiod reloads it after its 250 ms file debounce.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amesh_e2e import (
    DETAILS,
    ISTIOD_SAN,
    NGINX_USER,
    RATINGS,
    REVIEWS,
    ROUTE_TYPE,
    DictView,
    acked_all,
    new_service,
    outbound,
    reviews_weights,
    start_config,
    sync_types,
    view,
    wait_acked,
    wait_view,
    workloads,
    write_token,
)
from peers.istiod import BOOKINFO_DIR, Istiod, copy_corpus, wait_for
from xds_server import FakeHandler, source

PROTOCOLS = ["sotw", "delta"]
ENVOY_ADS = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
PROXY = "amesh-0.default"
SHIPPING = "shipping.default.svc.cluster.local"
# Istio's validation lets status 600 through (validateHTTPStatus checks `> 600`, its message
# says 200-599); Envoy's fault filter requires [200, 600) and NACKs the route configuration.
FAULT_600 = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  http:
  - fault:
      abort: {httpStatus: 600, percentage: {value: 100}}
    route:
    - destination: {host: details}
"""


def start_amesh(make_nginx, istiod: Istiod, protocol: str, **kwargs):
    config = start_config(f"grpc://{istiod.xds_address}", protocol, **kwargs)
    return make_nginx(config=config, user=NGINX_USER).start()


def bookinfo_landed(v: DictView) -> bool:
    reviews = v.vhost(REVIEWS)
    return (
        v.hosts(outbound(REVIEWS, "v2")) == ["127.0.0.22"]
        and "jason" in reviews
        and "weighted" in reviews
    )


def only_route(v: DictView, host: str) -> dict:
    """The one route of a virtual host besides the closing 404."""
    (route,) = (r for name, r in v.vhost(host).items() if name != "404")
    return route


def agent_status(n) -> dict:
    """The agent's status as nginx serves it (published every 250 ms, absent at first)."""
    return n.wait_for(lambda: n.status()["library"]["agent"], what="agent status")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_istio_config_changes_reach_the_dict(
    istiod: Istiod, make_nginx, envoy_factory, protocol: str
) -> None:
    n = start_amesh(make_nginx, istiod, protocol)
    v = wait_view(n, bookinfo_landed, "bookinfo in the dict")

    # Upstreams carry the WorkloadEntry addresses; subsets select by the version label.
    assert v.hosts(outbound(REVIEWS)) == ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
    assert v.hosts(outbound(REVIEWS, "v1")) == ["127.0.0.21"]
    assert v.hosts(outbound(DETAILS)) == ["127.0.0.12"]
    assert all(node["port"] == 9080 for node in v.upstreams[outbound(REVIEWS)]["nodes"])
    reviews = v.vhost(REVIEWS)
    jason, weighted = reviews["jason"], reviews["weighted"]
    assert v.target(jason) == outbound(REVIEWS, "v2")
    assert any("jason" in map(str, var) for var in jason["vars"])  # the end-user header match
    assert jason["priority"] > weighted["priority"]  # the header match is tried first
    assert v.split(weighted) == {outbound(REVIEWS, "v1"): 80, outbound(REVIEWS, "v2"): 20}
    assert "default" not in reviews  # the VirtualService replaced istiod's default route
    assert v.target(only_route(v, RATINGS)) == outbound(RATINGS, "v1")
    assert v.target(v.vhost(DETAILS)["default"]) == outbound(DETAILS)
    assert not v.duplicate_names()

    # istiod sees every type ACKed at the nonce it sent (not STALE), no error.
    entry = wait_acked(istiod, PROXY)
    assert entry["istio_version"] and entry["proxy_type"] == "sidecar"
    status = agent_status(n)["source"]
    assert status["protocol"] == protocol
    assert {t: s["nacks"] for t, s in status["types"].items()} == dict.fromkeys(
        ("cds", "eds", "lds", "rds"), 0
    )

    # A new service: its upstream and virtual host appear.
    istiod.write_config("shipping.yaml", new_service("shipping", "240.240.0.9", "127.0.0.31"))
    v = wait_view(
        n,
        lambda v: v.hosts(outbound(SHIPPING)) == ["127.0.0.31"] and "default" in v.vhost(SHIPPING),
        "new service in the dict",
    )
    assert "240.240.0.9" in v.vhost(SHIPPING)["default"]["hosts"]
    assert v.target(v.vhost(SHIPPING)["default"]) == outbound(SHIPPING)

    # An endpoint moves: the subset and the service-wide upstream follow, others do not change.
    before = n.dump()
    istiod.write_config("workloads.yaml", workloads({"reviews-v2": "127.0.0.32"}))
    v = wait_view(
        n, lambda v: v.hosts(outbound(REVIEWS, "v2")) == ["127.0.0.32"], "endpoint moved"
    )
    assert v.hosts(outbound(REVIEWS)) == ["127.0.0.21", "127.0.0.23", "127.0.0.32"]
    after = n.dump()
    for cluster in (outbound(REVIEWS, "v1"), outbound(DETAILS), outbound(SHIPPING)):
        key = next(k for k, o in v.objects.items() if o.get("name") == cluster)
        assert after[key] == before[key]

    # Weights change.
    istiod.write_config("virtual-services.yaml", reviews_weights(30, 70))
    wait_view(
        n,
        lambda v: v.split(v.vhost(REVIEWS)["weighted"])
        == {outbound(REVIEWS, "v1"): 30, outbound(REVIEWS, "v2"): 70},
        "weights changed",
    )

    # The reviews VirtualService goes: its routes revert to istiod's default route.
    docs = [d for d in reviews_weights(30, 70) if d["metadata"]["name"] != "reviews"]
    istiod.write_config("virtual-services.yaml", docs)
    # (A dump may land between a batch's sets and its deletes: wait for the whole batch.)
    v = wait_view(n, lambda v: set(v.vhost(REVIEWS)) == {"default", "404"},
                  "reviews back to the default")
    assert v.target(v.vhost(REVIEWS)["default"]) == outbound(REVIEWS)
    assert v.target(only_route(v, RATINGS)) == outbound(RATINGS, "v1")  # untouched
    assert not v.duplicate_names()
    wait_acked(istiod, PROXY)

    # A route configuration Envoy rejects: amesh NACKs it, istiod shows the reason as the
    # proxy's lastError, and the last good routes keep serving. Envoy, fed the same, agrees.
    envoy = envoy_factory(istiod.xds_address, ads_type=ENVOY_ADS[protocol], node_ip="127.0.0.6")
    wait_acked(istiod, envoy.proxy_id)
    good = n.dump()
    istiod.write_config("fault.yaml", FAULT_600)

    def route_error(proxy: str) -> str | None:
        return sync_types(istiod.sync_status(proxy)).get(ROUTE_TYPE, {}).get("lastError")

    error = wait_for(lambda: route_error(PROXY), 20, "amesh's NACK in istiod's lastError")
    assert "9080" in error and "fault abort status 600" in error
    assert "FaultAbortValidationError.HttpStatus" in wait_for(
        lambda: route_error(envoy.proxy_id), 20, "Envoy's NACK"
    )
    agent = n.wait_for(lambda: (s := agent_status(n))["rejected_count"] and s, what="rejected")
    assert "fault abort status 600" in agent["rejected"]["rds"]["9080"]
    assert agent["source"]["types"]["rds"]["nacks"] >= 1
    assert n.dump() == good  # nothing of the rejected version reached the dict
    assert "xds NACK rds" in n.log_text()

    # Fixed: the next version is ACKed, istiod clears lastError, the rejection is gone.
    istiod.remove_config("fault.yaml")
    wait_acked(istiod, PROXY)
    n.wait_for(lambda: agent_status(n)["rejected_count"] == 0, what="rejection cleared")
    assert n.dump() == good


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_istiod_restarts(istiod: Istiod, make_nginx, protocol: str) -> None:
    """istiod restarts 10 times; each time a change is made while it is down. The dict keeps
    its config while istiod is away and converges after; at the end it equals the dict of a
    fresh amesh, key for key."""
    n = start_amesh(make_nginx, istiod, protocol)
    wait_view(n, bookinfo_landed, "bookinfo in the dict")
    wait_acked(istiod, PROXY)
    for i in range(10):
        held = n.dump()
        version = n.version()
        istiod.stop()
        # Down: amesh notices, retries, and serves what it had.
        n.wait_for(
            lambda: (s := agent_status(n)["source"])["state"] != "connected"
            and s["backoff_attempts"] >= 2,
            what="amesh retrying while istiod is down",
        )
        # Changes while istiod is away: weights, an endpoint moves (every other time), a
        # service comes (4th) and goes (8th): Delta must learn of the removal on reconnect.
        v1 = 5 * (i + 1)  # 5..50: a zero weight would drop the destination
        istiod.write_config("virtual-services.yaml", reviews_weights(v1, 100 - v1))
        v3 = f"127.0.0.{40 + i}" if i % 2 else "127.0.0.23"
        istiod.write_config("workloads.yaml", workloads({"reviews-v3": v3}))
        shipping = 3 <= i < 7
        if i == 3:
            istiod.write_config("shipping.yaml", new_service("shipping", "240.240.0.9", v3))
        elif i == 7:
            istiod.remove_config("shipping.yaml")
        assert n.dump() == held and n.version() == version
        istiod.restart()

        def converged(v: DictView, v1=v1, v3=v3, shipping=shipping) -> bool:
            weighted = v.vhost(REVIEWS).get("weighted")
            return (
                weighted is not None
                and v.split(weighted).get(outbound(REVIEWS, "v1")) == v1
                and v.hosts(outbound(REVIEWS, "v3")) == [v3]
                and (outbound(SHIPPING) in v.upstreams) == shipping
                and bool(v.vhost(SHIPPING)) == shipping
            )

        wait_view(n, converged, f"the change made while istiod was down (restart {i + 1})")
    wait_acked(istiod, PROXY)
    status = n.wait_for(
        lambda: (s := agent_status(n)["source"])["state"] == "connected" and s,
        what="connected in status",
    )
    # Exactly one new stream per restart: no flapping, no stream left behind.
    assert status["connections"] == 11 and status["reconnects"] >= 10

    # A fresh amesh fed by the same istiod now: same keys, same values (nothing lost, nothing
    # stale, nothing twice).
    fresh = start_amesh(make_nginx, istiod, protocol, pod="amesh-1", ip="127.0.0.7")
    wait_acked(istiod, "amesh-1.default")
    want = wait_view(fresh, converged, "fresh amesh converged").objects
    got = view(n)
    assert got.objects == want
    assert not got.duplicate_names()
    # Every worker read the final version, all of its keys.
    seen = n.seen()
    for worker in (0, 1):
        assert seen[f"version:{worker}"] == n.version()
        assert int(seen[f"keys:{worker}"]) == len(want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_to_istiod(tmp_path: Path, istiod_binary: Path, make_nginx, protocol: str) -> None:
    """istiod's 15012-like port: TLS from istiod's own CA, its DNS name checked, a bearer token
    sent from a file. istiod cannot authenticate a token without Kubernetes and amesh has no
    client certificate, so istiod runs with XDS_AUTH=false."""
    env = {"XDS_AUTH": "false"}
    with Istiod(tmp_path / "istiod", binary=istiod_binary, secure_grpc=True, env=env) as peer:
        peer.start(copy_corpus(BOOKINFO_DIR, tmp_path / "config"))
        token = write_token(tmp_path / "istio-token", "not-checked-by-istiod")
        tls = {
            "ca_file": str(peer.root_cert_path),
            "server_name": ISTIOD_SAN,
            "token_file": str(token),
        }
        config = start_config(f"grpcs://{peer.secure_xds_address}", protocol, tls=tls)
        n = make_nginx(config=config, user=NGINX_USER).start()
        wait_view(n, bookinfo_landed, "bookinfo over TLS")
        wait_acked(peer, PROXY)
        assert agent_status(n)["source"]["server"].startswith("grpcs://")

        # The same port with a name its certificate does not carry: refused, and said so.
        handler = FakeHandler()
        bad = source(
            f"grpcs://{peer.secure_xds_address}",
            handler,
            protocol,
            tls={**tls, "server_name": "istiod.elsewhere.svc"},
        )
        try:
            wait_for(
                lambda: bad.status()["backoff_attempts"] >= 2, 10, "retries after a TLS failure"
            )
            assert not bad.status()["connected"] and not handler.calls
            error = bad.status()["last_error"]
            assert error.startswith("UNAVAILABLE") and "verification" in error.lower(), error
        finally:
            bad.stop()
        assert acked_all(peer.sync_status(PROXY))


def test_istiod_refuses_without_identity(tmp_path: Path, istiod_binary: Path) -> None:
    """With XDS_AUTH on, istiod refuses a token it cannot verify: amesh reports it and backs
    off instead of hammering istiod."""
    with Istiod(tmp_path / "istiod", binary=istiod_binary, secure_grpc=True) as peer:
        peer.start(copy_corpus(BOOKINFO_DIR, tmp_path / "config"))
        token = write_token(tmp_path / "istio-token", "unverifiable")
        handler = FakeHandler()
        src = source(
            f"grpcs://{peer.secure_xds_address}",
            handler,
            "delta",
            tls={"ca_file": str(peer.root_cert_path), "server_name": ISTIOD_SAN,
                 "token_file": str(token)},
        )
        try:
            wait_for(lambda: src.status()["backoff_attempts"] >= 2, 10, "retries")
            status = src.status()
            assert status["last_error"].startswith("UNAUTHENTICATED"), status
            assert not handler.calls and not peer.syncz()
            # The token was sent: istiod tried to verify it (no header reads "no HTTP
            # authorization header exists").
            assert "KubeJWTAuthenticator: failed to validate the JWT" in peer.log_tail(20000)
        finally:
            src.stop()
