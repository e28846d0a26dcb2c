"""Cluster + ClusterLoadAssignment -> APISIX upstream."""

from __future__ import annotations

import pytest

from amesh_ext.translate import HashPolicy, InvalidResource, TranslateOptions, upstream_id
from translate_fixtures import HPO, ISTIO_CLUSTERS, TLS, endpoints, translate_cl, upstream

EDS = {"name": "outbound|80||a.ns.svc.cluster.local", "type": "EDS", "connect_timeout": "1s"}


def feats(tr) -> list[str]:
    return [s.feature for s in tr.skipped]


def test_eds_cluster_with_endpoints():
    up = upstream(translate_cl({**EDS, "lb_policy": "ROUND_ROBIN", "connect_timeout": "0.5s"},
                               endpoints(("10.0.0.1", 80), ("10.0.0.2", 8080))))
    assert up == {
        "id": upstream_id(EDS["name"]), "name": EDS["name"], "type": "roundrobin",
        "scheme": "http", "retries": 2,
        "nodes": [{"host": "10.0.0.1", "port": 80, "weight": 1},
                  {"host": "10.0.0.2", "port": 8080, "weight": 1}],
        "timeout": {"connect": 0.5, "send": 3600.0, "read": 3600.0}}


def test_eds_cluster_without_assignment_has_empty_nodes():
    tr = translate_cl(EDS)
    assert upstream(tr)["nodes"] == [] and not tr.skipped


@pytest.mark.parametrize("policy, lb", [("ROUND_ROBIN", "roundrobin"),
                                        ("LEAST_REQUEST", "least_conn"),
                                        ("RANDOM", "roundrobin"), ("RING_HASH", "chash"),
                                        ("MAGLEV", "chash")])
def test_lb_policies(policy, lb):
    up = upstream(translate_cl({**EDS, "lb_policy": policy}, endpoints(("1.1.1.1", 80))))
    assert up["type"] == lb


def test_chash_uses_route_hash_policy_or_remote_addr():
    up = upstream(translate_cl({**EDS, "lb_policy": "RING_HASH"}, endpoints(("1.1.1.1", 80)),
                               HashPolicy("header", "x-user")))
    assert (up["hash_on"], up["key"]) == ("header", "x-user")
    up = upstream(translate_cl({**EDS, "lb_policy": "MAGLEV"}, endpoints(("1.1.1.1", 80))))
    assert (up["hash_on"], up["key"]) == ("vars", "remote_addr")
    # a hash policy on a non-hash cluster is ignored, as Envoy does
    up = upstream(translate_cl(EDS, endpoints(("1.1.1.1", 80)), HashPolicy("cookie", "s")))
    assert "hash_on" not in up


def test_weights_priorities_health_ipv6():
    cla = {"cluster_name": "c", "endpoints": [
        {"priority": 0, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "::1",
                                                         "port_value": 80}}},
             "load_balancing_weight": 3},
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.9",
                                                         "port_value": 80}}},
             "health_status": "DRAINING"},
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.8",
                                                         "port_value": 80}}},
             "health_status": "HEALTHY"}]},
        {"priority": 1, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.1.0.1",
                                                         "port_value": 80}}}}]}]}
    assert upstream(translate_cl(EDS, cla))["nodes"] == [
        {"host": "[::1]", "port": 80, "weight": 3},
        {"host": "10.0.0.8", "port": 80, "weight": 1},
        {"host": "10.1.0.1", "port": 80, "weight": 1, "priority": -1}]


def test_locality_weights():
    cla = {"cluster_name": "c", "endpoints": [
        {"load_balancing_weight": 1, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1",
                                                         "port_value": 80}}}},
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2",
                                                         "port_value": 80}}}}]},
        {"load_balancing_weight": 3, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.1.1",
                                                         "port_value": 80}}}}]},
        {"load_balancing_weight": 0, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.2.1",
                                                         "port_value": 80}}}}]}]}
    weighted = {**EDS, "common_lb_config": {"locality_weighted_lb_config": {}}}
    # locality 1 gets 1/4 split over two nodes, locality 2 gets 3/4; weight-0 locality none
    assert [(n["host"], n["weight"]) for n in upstream(translate_cl(weighted, cla))["nodes"]] \
        == [("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.1.1", 6)]
    # without locality-weighted LB, locality weights are ignored (as in Envoy)
    assert [n["weight"] for n in upstream(translate_cl(EDS, cla))["nodes"]] == [1, 1, 1, 1]


def test_static_and_dns_clusters_use_inline_assignment():
    up = upstream(translate_cl({"name": "s", "type": "STRICT_DNS",
                                "load_assignment": endpoints(("api.example.com", 443))}))
    assert up["nodes"] == [{"host": "api.example.com", "port": 443, "weight": 1}]


def test_original_dst():
    tr = translate_cl({"name": "PassthroughCluster", "type": "ORIGINAL_DST",
                       "lb_policy": "CLUSTER_PROVIDED"})
    assert upstream(tr)["nodes"] == [] and feats(tr) == ["cluster_discovery_type"]
    tr = translate_cl({"name": "inbound|9080||", "type": "ORIGINAL_DST",
                       "lb_policy": "CLUSTER_PROVIDED"})
    assert upstream(tr)["nodes"] == [{"host": "127.0.0.1", "port": 9080, "weight": 1}]
    assert not tr.skipped


def test_http2_and_grpc_schemes():
    h2 = {**EDS, "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HPO, "explicit_http_config": {"http2_protocol_options": {}}}}}
    assert upstream(translate_cl(h2))["scheme"] == "grpc"
    assert upstream(translate_cl({**EDS, "http2_protocol_options": {}}))["scheme"] == "grpc"
    tr = translate_cl(h2, options=TranslateOptions(http2_as_grpc=False))
    assert upstream(tr)["scheme"] == "http" and feats(tr) == ["upstream_http2"]


ISTIO_TLS = {"name": "envoy.transport_sockets.tls", "typed_config": {
    "@type": TLS, "common_tls_context": {
        "tls_certificate_sds_secret_configs": [{"name": "default"}]}}}
PEM_CERT = "-----BEGIN CERTIFICATE-----\n" + "A" * 200 + "\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\n" + "B" * 100 + "\n-----END PRIVATE KEY-----\n"


def test_istio_mutual_tls():
    tr = translate_cl({**EDS, "transport_socket": ISTIO_TLS}, endpoints(("10.0.0.1", 80)))
    assert upstream(tr)["scheme"] == "https" and "tls" not in upstream(tr)
    assert feats(tr) == ["upstream_client_cert"]
    opts = TranslateOptions(istio_client_cert_pem=PEM_CERT, istio_client_key_pem=PEM_KEY)
    up = upstream(translate_cl({**EDS, "transport_socket": ISTIO_TLS}, options=opts))
    assert up["tls"] == {"client_cert": PEM_CERT, "client_key": PEM_KEY}
    opts = TranslateOptions(istio_client_cert_id="istio-workload")
    up = upstream(translate_cl({**EDS, "transport_socket": ISTIO_TLS}, options=opts))
    assert up["tls"] == {"client_cert_id": "istio-workload"}


def test_istio_mutual_without_the_workload_certificate_answers_503():
    # Envoy fails the cluster's requests while its SDS secret is missing; an upstream that
    # named an unwritten SSL object (or had no client certificate) would answer 502.
    cluster, cla = ISTIO_CLUSTERS[0]
    tr = translate_cl(cluster, cla)
    up = upstream(tr)
    assert up["scheme"] == "https" and "tls" not in up
    assert up["nodes"] == []
    assert sorted(feats(tr)) == ["upstream_client_cert", "upstream_tls_context"]


def test_istio_auto_mtls_transport_socket_matches():
    cluster, cla = ISTIO_CLUSTERS[0]
    opts = TranslateOptions(istio_client_cert_id="istio-workload")
    tr = translate_cl(cluster, cla, options=opts)
    up = upstream(tr)
    assert up["scheme"] == "https"
    assert up["nodes"] == [{"host": "10.0.0.1", "port": 9080, "weight": 1}]
    assert sorted(feats(tr)) == ["upstream_tls_context"]
    # plaintext endpoints (no tlsMode) outweigh: plain upstream, the TLS one dropped
    cla2 = endpoints(("10.0.0.3", 9080), ("10.0.0.4", 9080), name=cluster["name"])
    cla2["endpoints"].append(cla["endpoints"][0])
    tr = translate_cl(cluster, cla2)
    assert upstream(tr)["scheme"] == "http"
    assert [n["host"] for n in upstream(tr)["nodes"]] == ["10.0.0.3", "10.0.0.4"]
    assert feats(tr) == ["transport_socket_matches"]


def test_outlier_detection_to_checks():
    up = upstream(translate_cl({**EDS, "outlier_detection": {
        "consecutive_gateway_failure": 3, "enforcing_consecutive_gateway_failure": 100,
        "consecutive_5xx": 0, "base_ejection_time": "10s", "max_ejection_percent": 100,
        "enforcing_success_rate": 0}}))
    assert up["checks"]["passive"]["unhealthy"] == {
        "http_statuses": [502, 503, 504], "http_failures": 3, "tcp_failures": 3, "timeouts": 3}
    assert up["checks"]["active"]["healthy"]["interval"] == 10
    tr = translate_cl({**EDS, "outlier_detection": {}})
    assert upstream(tr)["checks"]["passive"]["unhealthy"]["http_failures"] == 5
    assert feats(tr) == ["outlier_detection", "outlier_detection"]


def test_circuit_breakers_skip_only_when_limited():
    unlimited = {"thresholds": [{"max_connections": 4294967295}]}
    assert not translate_cl({**EDS, "circuit_breakers": unlimited}).skipped
    tr = translate_cl({**EDS, "circuit_breakers": {"thresholds": [{"max_requests": 10}]}})
    assert feats(tr) == ["circuit_breakers"]


def test_bad_endpoints():
    tr = translate_cl(EDS, {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"pipe": {"path": "/tmp/s"}}}},
        {"endpoint": {"address": {"socket_address": {"address": "bad host",
                                                     "port_value": 1}}}}]}]})
    assert upstream(tr)["nodes"] == [] and feats(tr) == ["endpoint_address"] * 2
    with pytest.raises(InvalidResource, match="weight 0"):
        translate_cl(EDS, {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "1.1.1.1",
                                                         "port_value": 1}}},
             "load_balancing_weight": 0}]}]})


def test_catalogue_clusters_all_translate():
    for cluster, cla in ISTIO_CLUSTERS:
        assert len(translate_cl(cluster, cla).objects) == 1
