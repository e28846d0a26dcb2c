"""A synthetic Istio-like mesh in Envoy's JSON forms (the shape anchors.md measured Envoy on):
per service one EDS cluster `outbound|80||svc-i.ns.svc.cluster.local` with 3 endpoints and one
virtual host with 6 domains; every 10th service has a header match and a 90/10 split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

T = "type.googleapis.com/envoy.config"


def fqdn(i: int) -> str:
    return f"svc-{i}.ns.svc.cluster.local"


def cluster_name(i: int, subset: str = "") -> str:
    return f"outbound|80|{subset}|{fqdn(i)}"


def cluster(name: str) -> dict[str, Any]:
    return {"@type": f"{T}.cluster.v3.Cluster", "name": name, "type": "EDS",
            "eds_cluster_config": {"service_name": name, "eds_config": {"ads": {}}},
            "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST"}


def endpoints(name: str, i: int, generation: int = 0) -> dict[str, Any]:
    return {"@type": f"{T}.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": f"10.{(i >> 8) & 255}.{i & 255}.{k + 1 + generation}",
                    "port_value": 8080}}}} for k in range(3)]}]}


def virtual_host(i: int) -> dict[str, Any]:
    name = fqdn(i)
    short = f"svc-{i}"
    vh: dict[str, Any] = {
        "name": f"{name}:80",
        "domains": [name, f"{name}.", short, f"{short}.ns", f"{short}.ns.svc",
                    f"240.240.{(i >> 8) & 255}.{i & 255}"],
        "routes": [{"name": "default", "match": {"prefix": "/"},
                    "route": {"cluster": cluster_name(i), "timeout": "0s"}}],
    }
    if i % 10 == 0:
        vh["routes"] = [
            {"name": "canary-header", "match": {"prefix": "/", "headers": [
                {"name": "x-canary", "string_match": {"exact": "yes"}}]},
             "route": {"cluster": cluster_name(i, "v2"), "timeout": "0s"}},
            {"name": "split", "match": {"prefix": "/"}, "route": {"timeout": "0s",
             "weighted_clusters": {"clusters": [{"name": cluster_name(i, "v1"), "weight": 90},
                                                {"name": cluster_name(i, "v2"), "weight": 10}]}}},
        ]
    return vh


def listener() -> dict[str, Any]:
    return {"@type": f"{T}.listener.v3.Listener", "name": "0.0.0.0_80",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "outbound_0.0.0.0_80",
                    "rds": {"route_config_name": "80", "config_source": {"ads": {}}},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                                 "Router"}}]}}]}]}


def cluster_names(n: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        out.append((cluster_name(i), i))
        if i % 10 == 0:
            out += [(cluster_name(i, "v1"), i), (cluster_name(i, "v2"), i)]
    return out


def write_mesh(directory: Path, n: int) -> Path:
    """Four files (one per type) for n services; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    names = cluster_names(n)
    files = {
        "clusters.json": [cluster(name) for name, _ in names],
        "endpoints.json": [endpoints(name, i) for name, i in names],
        "listeners.json": [listener()],
        "routes.json": [{"@type": f"{T}.route.v3.RouteConfiguration", "name": "80",
                         "ignore_port_in_host_matching": True,
                         "virtual_hosts": [virtual_host(i) for i in range(n)]}],
    }
    for name, resources in files.items():
        (directory / name).write_text(json.dumps({"resources": resources}))
    return directory
