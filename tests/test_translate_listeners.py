"""Listener -> route config ports and stream routes."""

from __future__ import annotations

from amesh_ext.translate import upstream_id
from translate_fixtures import HCM, ISTIO_LISTENERS, TCP, translate_ln


def test_rds_listener_maps_route_config_to_port():
    lt = translate_ln(ISTIO_LISTENERS[0])
    assert lt.route_config_ports == {"9080": 9080}
    assert lt.translation.objects == {} and lt.translation.skipped == []


def test_tcp_proxy_to_stream_route():
    lt = translate_ln(ISTIO_LISTENERS[1])
    assert lt.route_config_ports == {}
    (obj,) = lt.translation.objects.values()
    assert obj["server_port"] == 3306
    assert obj["upstream_id"] == upstream_id("outbound|3306||mysql.db.svc.cluster.local")


def test_absent_clusters_get_no_stream_route_and_inline_routes_answer_503():
    # Envoy closes a TCP connection to a cluster it lacks: no stream route does the same.
    lt = translate_ln(ISTIO_LISTENERS[1], clusters={})
    assert lt.translation.objects == {}
    assert lt.translation.cluster_deps == {
        ("exists", "outbound|3306||mysql.db.svc.cluster.local"): False}
    lt = translate_ln(ISTIO_LISTENERS[2], clusters={})
    routes = [o for k, o in lt.translation.objects.items() if k.startswith("/routes/")]
    assert not any("upstream_id" in o for o in routes)
    assert {o["plugins"]["fault-injection"]["abort"]["http_status"] for o in routes} == {
        503, 404}


def test_inline_route_config_uses_chain_destination_port():
    lt = translate_ln(ISTIO_LISTENERS[2])
    assert lt.route_config_ports == {"inbound|9080||": 9080}
    routes = [o for k, o in lt.translation.objects.items() if k.startswith("/routes/")]
    assert {o.get("upstream_id") for o in routes} == {upstream_id("inbound|9080||"), None}
    assert all(o["vars"][0] == ["server_port", "==", "9080"] for o in routes)


def test_weighted_tcp_and_unknown_filters_are_skipped():
    lt = translate_ln({"name": "l", "address": {"socket_address": {"address": "0.0.0.0",
                                                                  "port_value": 9000}},
                       "filter_chains": [{"filters": [
                           {"name": "envoy.filters.network.rbac"},
                           {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                               "@type": TCP, "stat_prefix": "s", "weighted_clusters": {
                                   "clusters": [{"name": "a", "weight": 1},
                                                {"name": "b", "weight": 3}]}}}]}]})
    (obj,) = lt.translation.objects.values()
    assert obj["upstream_id"] == "b"
    assert [s.feature for s in lt.translation.skipped] == ["network_filter",
                                                           "tcp_weighted_clusters"]


def test_hcm_http_filters_reported():
    lt = translate_ln({"name": "l", "address": {"socket_address": {"address": "0.0.0.0",
                                                                  "port_value": 80}},
                       "filter_chains": [{"filters": [
                           {"name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {"@type": HCM, "stat_prefix": "s",
                                             "rds": {"route_config_name": "80"},
                                             "http_filters": [
                                                 {"name": "envoy.filters.http.rbac"},
                                                 {"name": "envoy.filters.http.router"}]}}]}]})
    assert lt.route_config_ports == {"80": 80}
    assert [s.feature for s in lt.translation.skipped] == ["http_filter"]
