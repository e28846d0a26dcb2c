"""grpc:// through the real library in nginx: an ADS server (the Python test control plane)
-> amesh's ADS client -> translation -> the dict; changes, and a NACK naming a bad resource."""

from __future__ import annotations

import os

import pytest
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration

from amesh_ext.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTES
from xds_server import XdsTestServer, cluster, endpoints, listener

USER = "nobody nogroup" if os.geteuid() == 0 else None


def _routes(name: str, *vhosts: tuple[str, str]) -> RouteConfiguration:
    return RouteConfiguration(name=name, virtual_hosts=[
        VirtualHost(name=domain, domains=[domain], routes=[
            Route(match=RouteMatch(prefix="/"), route=RouteAction(cluster=target))])
        for domain, target in vhosts])


def _upstream_hosts(n, cluster_name: str) -> list[str] | None:
    for obj in n.objects().values():
        if obj.get("name") == cluster_name and "nodes" in obj:
            return sorted(node["host"] for node in obj["nodes"])
    return None


@pytest.mark.parametrize("protocol", ["delta", "sotw"])
def test_ads_source_feeds_the_dict_and_nacks_bad_resources(make_nginx, protocol: str) -> None:
    srv = XdsTestServer().start()
    try:
        srv.set_resources(CLUSTER, [cluster("c1"), cluster("c2")])
        srv.set_resources(ENDPOINTS, [endpoints("c1", "10.0.0.1"), endpoints("c2", "10.0.0.2")])
        srv.set_resources(LISTENER, [listener("0.0.0.0_80", "80")])
        srv.set_resources(ROUTES, [_routes("80", ("a.example", "c1"), ("b.example", "c2"))])
        config = {"source": srv.address, "xds": {
            "protocol": protocol, "node": {"pod_name": "amesh-0", "namespace": "default",
                                           "ip": "127.0.0.1"}}}
        n = make_nginx(config=config, user=USER).start()
        n.wait_for(lambda: _upstream_hosts(n, "c1") == ["10.0.0.1"], what="c1 in the dict")
        hosts = {h for o in n.objects().values() for h in o.get("hosts", [])}
        assert {"a.example", "b.example"} <= hosts
        status = n.wait_for(lambda: (s := n.status()["library"]["agent"])["connected"] and s,
                            what="connected in status")
        assert status["source"]["protocol"] == protocol

        # An endpoint moves: one incremental push, one key rewritten.
        srv.update(ENDPOINTS, endpoints("c1", "10.0.0.9"))
        srv.push(ENDPOINTS, names=["c1"])
        n.wait_for(lambda: _upstream_hosts(n, "c1") == ["10.0.0.9"], what="endpoint moved")
        assert _upstream_hosts(n, "c2") == ["10.0.0.2"]

        # A route config Envoy would reject (two virtual hosts with the same domain) is NACKed
        # with a detail naming it; the good cluster pushed alongside is applied.
        bad = _routes("80", ("a.example", "c1"), ("a.example", "c2"))
        srv.update(ROUTES, bad)
        srv.update(CLUSTER, cluster("c3", None))
        srv.push()
        nack = n.wait_for(lambda: [r for r in srv.requests_of(ROUTES) if r.is_nack],
                          what="NACK for the route config")[-1]
        assert "80" in nack.error.message and "a.example" in nack.error.message
        n.wait_for(lambda: any(o.get("name") == "c3" for o in n.objects().values()),
                   what="good cluster applied")
        hosts = {h for o in n.objects().values() for h in o.get("hosts", [])}
        assert {"a.example", "b.example"} <= hosts  # last good routes keep serving
        agent = n.wait_for(lambda: (s := n.status()["library"]["agent"])["rejected_count"] and s,
                           what="rejection in status")
        assert "80" in agent["rejected"]["rds"]
        assert "rejected rds '80'" in n.log_text()
    finally:
        srv.stop()
