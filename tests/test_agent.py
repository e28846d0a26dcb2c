"""The agent in-process: the client SSL object that ISTIO_MUTUAL upstreams name, kept in
step with the files istio-agent writes; per-resource rejection of translation failures."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from amesh_ext.agent import Agent
from amesh_ext.certs import ISTIO_CLIENT_SSL_ID, SSL_KEY
from amesh_ext.config import parse_start_config
from amesh_ext.native import MemoryQueue
from amesh_ext.resources import CLUSTER, LISTENER, ROUTES, parse_json_resource
from apisix_schema import validate


def _self_signed(directory: Path, cn: str) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={cn}",
                    "-keyout", str(directory / "key.pem"),
                    "-out", str(directory / "cert-chain.pem")],
                   check=True, capture_output=True)


MTLS_CLUSTER = {
    "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "name": "outbound|80||secure.default.svc.cluster.local", "type": "STATIC",
    "load_assignment": {"cluster_name": "secure", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1",
                                                     "port_value": 80}}}}]}]},
    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default"}],
            "combined_validation_context": {"default_validation_context": {},
                                            "validation_context_sds_secret_config": {
                                                "name": "ROOTCA"}}}}},
}


def test_istio_mutual_upstreams_use_the_agents_client_ssl(tmp_path: Path) -> None:
    """Upstreams name the client SSL object only while it is in the dict (APISIX answers
    502 for an absent one); without it they answer 503, as Envoy does while its workload
    certificate (SDS secret) is missing."""
    queue = MemoryQueue()
    config = parse_start_config(json.dumps(
        {"source": "file:///dev/null", "translate": {"istio_cert_dir": str(tmp_path)}}))
    agent = Agent(config, queue)
    assert agent.apply(CLUSTER, [parse_json_resource(MTLS_CLUSTER, "test")], []) == {}
    agent._first_sync.done = True  # settle the first sync at once

    def upstream() -> dict:
        key = next(k for k in queue.data if k.startswith("/upstreams/"))
        value = json.loads(queue.data[key])
        validate(key, value)
        return value

    agent.tick(now=10)
    assert upstream()["scheme"] == "https"
    assert "tls" not in upstream() and upstream()["nodes"] == []
    assert SSL_KEY not in queue.data and agent.status()["istio_certs"] == "missing"

    _self_signed(tmp_path, "first")  # istio-agent writes the workload certificate
    agent.tick(now=11)
    ssl = json.loads(queue.data[SSL_KEY])
    assert ssl["type"] == "client" and "BEGIN CERTIFICATE" in ssl["cert"]
    assert agent.status()["istio_certs"] == "loaded"
    assert upstream()["tls"] == {"client_cert_id": ISTIO_CLIENT_SSL_ID}
    assert upstream()["nodes"] == [{"host": "10.0.0.1", "port": 80, "weight": 1}]
    sets_before = agent.sink.counts["sets"]

    first = ssl["cert"]
    os.remove(tmp_path / "key.pem")
    _self_signed(tmp_path, "rotated")
    agent.tick(now=12)
    assert json.loads(queue.data[SSL_KEY])["cert"] != first
    assert agent.sink.counts["sets"] == sets_before + 1  # a rotation rewrites one key

    os.remove(tmp_path / "key.pem")
    agent.tick(now=13)
    assert SSL_KEY not in queue.data
    assert "not loaded" in agent.status()["istio_certs"]
    assert "tls" not in upstream() and upstream()["nodes"] == []


def test_a_translator_crash_rejects_only_that_resource(monkeypatch) -> None:
    """A bug in translation (an unexpected exception) must not take the agent down or
    lose other resources: the resource is rejected with the reason, the rest applies."""
    from amesh_ext import translate

    real = translate.translate_cluster

    def flaky(cluster, *args):
        if cluster.name == "boom":
            raise KeyError("bug")
        return real(cluster, *args)

    monkeypatch.setattr(translate, "translate_cluster", flaky)
    agent = Agent(parse_start_config('{"source": "file:///dev/null"}'), MemoryQueue())
    good = dict(MTLS_CLUSTER, name="good")
    bad = dict(MTLS_CLUSTER, name="boom")
    rejected = agent.apply(CLUSTER, [parse_json_resource(bad, "t"),
                                     parse_json_resource(good, "t")], [])
    assert list(rejected) == ["boom"] and "internal error" in rejected["boom"]
    assert agent.status()["resources"]["cds"] == 1
    assert agent.status()["rejected"] == {"cds": {"boom": rejected["boom"]}}


def test_first_batch_waits_for_a_whole_config() -> None:
    """ADS delivers CDS, EDS, LDS, RDS one after another; the first (FULL) batch must hold
    all of them, or it would delete what a previous run left and re-add it a moment later."""
    from amesh_ext.resources import ENDPOINTS, LISTENER, ROUTES, Resource
    from xds_server import cluster, endpoints, listener, route

    queue = MemoryQueue()
    agent = Agent(parse_start_config('{"source": "file:///dev/null"}'), queue)
    steps = [(CLUSTER, cluster("c1")), (ENDPOINTS, endpoints("c1", "10.0.0.1")),
             (LISTENER, listener("l1", "r1")), (ROUTES, route("r1", "a.example"))]
    for i, (type_url, msg) in enumerate(steps):
        assert agent.apply(type_url, [Resource.from_message(type_url, msg)], []) == {}
        agent.tick(now=time.monotonic() + 0.5)  # quiet long enough, not past the max wait
        assert bool(queue.batches) == (i == len(steps) - 1), f"after {type_url}"
    keys = {k.decode() for k, _ in queue.batches[0][2]}
    assert any(k.startswith("/routes/") for k in keys)
    assert any(k.startswith("/upstreams/") for k in keys)


def test_invalid_translate_and_xds_sections_name_the_field() -> None:
    import pytest

    from amesh_ext.config import ConfigError
    from amesh_ext.sources import make_source

    bad_translate = parse_start_config('{"translate": {"port_match": "x"}}')
    with pytest.raises(ConfigError, match=r"'translate'.*port_match"):
        Agent(bad_translate, MemoryQueue())
    bad_xds = parse_start_config('{"source": "grpc://127.0.0.1:15010", "xds": {"protocl": 1}}')
    with pytest.raises(ValueError, match="protocl"):
        make_source(bad_xds.source, bad_xds.xds, Agent(bad_xds, MemoryQueue()), bad_xds.limit)


ROUTES_TO_C1 = {
    "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "name": "80", "virtual_hosts": [{"name": "a:80", "domains": ["a"], "routes": [
        {"name": "one", "match": {"prefix": "/one"}, "route": {"cluster": "c1"}},
        {"name": "split", "match": {"prefix": "/"}, "route": {"weighted_clusters": {
            "clusters": [{"name": "c1", "weight": 1}, {"name": "c2", "weight": 1}]}}}]}]}


def _static_cluster(name: str) -> dict:
    return {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name,
            "type": "STATIC", "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "10.0.0.1", "port_value": 80}}}}]}]}}


def test_routes_never_name_an_upstream_that_is_not_written() -> None:
    """A route to a cluster the agent lacks answers 503 (Envoy's cluster_not_found); when the
    cluster arrives or leaves, the routes that name it are translated again."""
    queue = MemoryQueue()
    agent = Agent(parse_start_config('{"source": "file:///dev/null"}'), queue)
    cluster = [parse_json_resource(_static_cluster(n), "test") for n in ("c1", "c2")]
    assert agent.apply(CLUSTER, cluster[1:], []) == {}
    assert agent.apply(LISTENER, [], []) == {}
    assert agent.apply(ROUTES, [parse_json_resource(ROUTES_TO_C1, "test")], []) == {}
    agent._first_sync.done = True
    agent.tick(now=10)

    def check() -> dict[str, dict]:
        objs = {k: json.loads(v) for k, v in queue.data.items() if k.startswith("/")}
        named = {o["upstream_id"] for k, o in objs.items() if "upstream_id" in o}
        for o in objs.values():
            for rule in o.get("plugins", {}).get("traffic-split", {}).get("rules", []):
                named |= {u["upstream_id"] for u in rule["weighted_upstreams"]}
        assert {f"/upstreams/{u}" for u in named} <= set(objs)  # nothing dangles
        return {o["name"].rsplit("/", 1)[-1]: o for k, o in objs.items()
                if k.startswith("/routes/")}

    routes = check()
    assert routes["one"]["plugins"]["fault-injection"]["abort"]["http_status"] == 503
    split = routes["split"]["plugins"]["traffic-split"]["rules"][0]["weighted_upstreams"]
    assert [u["upstream_id"] for u in split] == ["80_._n", "c2"]

    assert agent.apply(CLUSTER, cluster, []) == {}  # c1 arrives
    routes = check()
    assert routes["one"]["upstream_id"] == "c1"
    split = routes["split"]["plugins"]["traffic-split"]["rules"][0]["weighted_upstreams"]
    assert [u["upstream_id"] for u in split] == ["c1", "c2"]
    assert "/upstreams/80_._n" not in queue.data

    assert agent.apply(CLUSTER, cluster[:1], ["c2"]) == {}  # c2 leaves
    routes = check()
    split = routes["split"]["plugins"]["traffic-split"]["rules"][0]["weighted_upstreams"]
    assert [u["upstream_id"] for u in split] == ["c1", "80_._n"]


def test_a_mirror_follows_its_clusters_first_node() -> None:
    queue = MemoryQueue()
    agent = Agent(parse_start_config('{"source": "file:///dev/null"}'), queue)
    routes = {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
              "name": "80", "virtual_hosts": [{"name": "a:80", "domains": ["a"], "routes": [
                  {"name": "m", "match": {"prefix": "/"}, "route": {
                      "cluster": "c1", "request_mirror_policies": [{"cluster": "c2"}]}}]}]}
    c2 = _static_cluster("c2")
    assert agent.apply(CLUSTER, [parse_json_resource(_static_cluster("c1"), "t"),
                                 parse_json_resource(c2, "t")], []) == {}
    assert agent.apply(LISTENER, [], []) == {}
    assert agent.apply(ROUTES, [parse_json_resource(routes, "t")], []) == {}
    agent._first_sync.done = True
    agent.tick(now=10)

    def mirror() -> dict | None:
        route = json.loads(queue.data["/routes/80_.a_3a80_.m"])
        return route.get("plugins", {}).get("proxy-mirror")

    assert mirror() == {"host": "http://10.0.0.1:80", "sample_ratio": 1.0}
    sa = c2["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    sa["socket_address"]["address"] = "10.0.0.7"  # the mirror cluster's endpoint moves
    assert agent.apply(CLUSTER, [parse_json_resource(c2, "t")], []) == {}
    assert mirror() == {"host": "http://10.0.0.7:80", "sample_ratio": 1.0}
    assert agent.apply(CLUSTER, [], ["c2"]) == {}  # gone: Envoy mirrors nothing
    assert mirror() is None
