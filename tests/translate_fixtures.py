"""Shared builders for the translator tests: Envoy JSON -> protos, translation helpers that
validate every emitted object against tests/apisix_schema.py, and a catalogue of
Istio-shaped resources for the sweep test."""

from __future__ import annotations

from typing import Any

import orjson
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401  (Any types)
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from amesh_ext.translate import (
    Clusters,
    HashPolicy,
    ListenerTranslation,
    TranslateOptions,
    Translation,
    translate_cluster,
    translate_listener,
    translate_route_configuration,
)
from amesh_ext.translate.routes import RAW_PATH_KEPT
from apisix_schema import validate_all

OPTS = TranslateOptions()
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CORS = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HPO = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def parse(cls, d: dict):
    msg = cls()
    json_format.ParseDict(d, msg)
    return msg


def rc(d: dict) -> RouteConfiguration:
    return parse(RouteConfiguration, d)


def route_config(*routes: dict, domains: list[str] | None = None, name: str = "80",
                 vh_name: str = "svc:80", **fields: Any) -> RouteConfiguration:
    """A RouteConfiguration with one virtual host holding `routes` (ports ignored in host
    matching, as Istio configures it, unless the caller says otherwise)."""
    fields.setdefault("ignore_port_in_host_matching", True)
    return rc({"name": name, "virtual_hosts": [
        {"name": vh_name, "domains": domains or ["*"], "routes": list(routes)}], **fields})


def to_cluster(route_match: dict, cluster: str = "outbound|80||svc.ns.svc.cluster.local",
               **action: Any) -> dict:
    return {"name": "r", "match": route_match, "route": {"cluster": cluster, **action}}


def check(tr: Translation) -> Translation:
    validate_all(tr.objects)
    return tr


def translate_rc(msg: RouteConfiguration, port: int | None = 80,
                 options: TranslateOptions = OPTS,
                 clusters: dict[str, str | None] | None = None) -> Translation:
    return check(translate_route_configuration(msg, port, options, Clusters(clusters)))


# What every proxied route carries so that APISIX forwards the normalised path.
NORMALISED_PATH = {"regex_uri": ["^/", "/"], "_meta": {"filter": [
    ["real_request_uri", "!", "~~", RAW_PATH_KEPT]]}}


def own_plugins(route: dict) -> dict:
    """The route's plugins but the proxy-rewrite that only normalises the path."""
    plugins = dict(route.get("plugins", {}))
    if plugins.get("proxy-rewrite") == NORMALISED_PATH:
        del plugins["proxy-rewrite"]
    return plugins


def routes_by_priority(tr: Translation) -> list[dict]:
    objs = [o for k, o in tr.objects.items() if k.startswith("/routes/")]
    return sorted(objs, key=lambda o: -o["priority"])


def first_route(msg: RouteConfiguration, **kw: Any) -> dict:
    """The highest-priority (first Envoy) route of a translation."""
    return routes_by_priority(translate_rc(msg, **kw))[0]


def translate_cl(d: dict, assignment: dict | None = None, hash_policy: HashPolicy | None = None,
                 options: TranslateOptions = OPTS) -> Translation:
    cla = parse(ClusterLoadAssignment, assignment) if assignment is not None else None
    return check(translate_cluster(parse(Cluster, d), cla, hash_policy, options))


def upstream(tr: Translation) -> dict:
    (obj,) = tr.objects.values()
    return obj


def translate_ln(d: dict, options: TranslateOptions = OPTS,
                 clusters: dict[str, str | None] | None = None) -> ListenerTranslation:
    lt = translate_listener(parse(Listener, d), options, Clusters(clusters))
    check(lt.translation)
    return lt


def dumps(tr: Translation) -> bytes:
    return orjson.dumps(tr.objects, option=orjson.OPT_SORT_KEYS) + orjson.dumps(
        [(s.feature, s.resource, s.detail) for s in tr.skipped])


def endpoints(*addrs: tuple[str, int], name: str = "c", **lb: Any) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}, **lb}
        for a, p in addrs]}]}


# --- a catalogue of Istio-shaped resources (what istiod generates, route-selection.md §2)

SVC = "outbound|9080||reviews.default.svc.cluster.local"
ISTIO_RC = {
    "name": "9080",
    "validate_clusters": False,
    "ignore_port_in_host_matching": True,
    "max_direct_response_body_size_bytes": 1048576,
    "virtual_hosts": [
        {"name": "reviews.default.svc.cluster.local:9080",
         "domains": ["reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local.",
                     "reviews", "reviews.default", "reviews.default.svc", "10.96.0.12"],
         "routes": [
             {"name": "jason", "match": {"prefix": "/", "case_sensitive": True, "headers": [
                 {"name": "end-user", "string_match": {"exact": "jason"}}]},
              "route": {"cluster": "outbound|9080|v2|reviews.default.svc.cluster.local",
                        "timeout": "0s", "max_grpc_timeout": "0s",
                        "retry_policy": {
                            "retry_on": "connect-failure,refused-stream,unavailable,"
                                        "cancelled,retriable-status-codes",
                            "num_retries": 2, "host_selection_retry_max_attempts": "5"}},
              "typed_per_filter_config": {"envoy.filters.http.fault": {
                  "@type": FAULT, "delay": {"fixed_delay": "2s", "percentage": {
                      "numerator": 500000, "denominator": "MILLION"}}}}},
             {"name": "split", "match": {"prefix": "/api", "case_sensitive": False},
              "route": {"weighted_clusters": {"clusters": [
                  {"name": "outbound|9080|v1|reviews.default.svc.cluster.local", "weight": 90},
                  {"name": "outbound|9080|v3|reviews.default.svc.cluster.local", "weight": 10},
                  {"name": "outbound|9080|v4|reviews.default.svc.cluster.local", "weight": 0}]},
                  "timeout": "1.5s", "prefix_rewrite": "/v2/api",
                  "request_mirror_policies": [{"cluster": "outbound|9080||mirror.ns.svc."
                                               "cluster.local", "runtime_fraction": {
                      "default_value": {"numerator": 25}}}],
                  "hash_policy": [{"header": {"header_name": "x-user"}}]},
              "request_headers_to_add": [{"header": {"key": "x-env", "value": "prod $HOME"},
                                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
              "response_headers_to_remove": ["server"]},
             {"name": "default", "match": {"prefix": "/"},
              "route": {"cluster": SVC, "timeout": "0s"}},
         ]},
        {"name": "allow_any", "domains": ["*"], "routes": [
            {"name": "allow_any", "match": {"prefix": "/"},
             "route": {"cluster": "PassthroughCluster", "timeout": "0s"}}]},
    ],
}
ISTIO_CLUSTERS: list[tuple[dict, dict | None]] = [
    ({"name": SVC, "type": "EDS", "eds_cluster_config": {"service_name": SVC},
      "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST",
      "circuit_breakers": {"thresholds": [{"max_connections": 4294967295,
                                           "max_pending_requests": 4294967295,
                                           "max_requests": 4294967295,
                                           "max_retries": 4294967295}]},
      "outlier_detection": {"consecutive_5xx": 7, "interval": "10s",
                            "base_ejection_time": "30s", "max_ejection_percent": 100,
                            "enforcing_success_rate": 0},
      "transport_socket_matches": [
          {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": {
              "name": "envoy.transport_sockets.tls", "typed_config": {
                  "@type": TLS, "sni": "outbound_.9080_._.reviews.default.svc.cluster.local",
                  "common_tls_context": {
                      "alpn_protocols": ["istio-peer-exchange", "istio"],
                      "tls_certificate_sds_secret_configs": [{"name": "default"}],
                      "combined_validation_context": {
                          "default_validation_context": {},
                          "validation_context_sds_secret_config": {"name": "ROOTCA"}}}}}},
          {"name": "tlsMode-disabled", "match": {}, "transport_socket": {
              "name": "envoy.transport_sockets.raw_buffer"}}]},
     {"cluster_name": SVC, "endpoints": [
         {"locality": {"region": "r1"}, "lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1",
                                                          "port_value": 9080}}},
              "metadata": {"filter_metadata": {"envoy.transport_socket_match": {
                  "tlsMode": "istio"}}}, "load_balancing_weight": 1},
             {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2",
                                                          "port_value": 9080}}},
              "health_status": "UNHEALTHY"}]}]}),
    ({"name": "outbound|80||httpbin.org", "type": "STRICT_DNS", "connect_timeout": "0.25s",
      "lb_policy": "ROUND_ROBIN", "load_assignment": endpoints(("httpbin.org", 80))}, None),
    ({"name": "outbound|50051||grpc.ns.svc.cluster.local", "type": "EDS",
      "lb_policy": "RING_HASH", "typed_extension_protocol_options": {
          "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
              "@type": HPO, "explicit_http_config": {"http2_protocol_options": {}}}}},
     endpoints(("fd00::1", 50051), ("fd00::2", 50051))),
    ({"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"}, None),
    ({"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
      "connect_timeout": "10s"}, None),
    ({"name": "inbound|9080||", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"},
     None),
]
ISTIO_LISTENERS: list[dict] = [
    {"name": "0.0.0.0_9080", "address": {"socket_address": {"address": "0.0.0.0",
                                                           "port_value": 9080}},
     "bind_to_port": False, "filter_chains": [{"filters": [
         {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
             "@type": HCM, "stat_prefix": "outbound_0.0.0.0_9080",
             "rds": {"route_config_name": "9080", "config_source": {"ads": {}}},
             "http_filters": [{"name": "envoy.filters.http.fault"},
                              {"name": "envoy.filters.http.cors"},
                              {"name": "envoy.filters.http.router"}]}}]}]},
    {"name": "10.96.0.20_3306", "address": {"socket_address": {"address": "10.96.0.20",
                                                              "port_value": 3306}},
     "filter_chains": [{"filters": [{
         "name": "envoy.filters.network.tcp_proxy",
         "typed_config": {"@type": TCP, "stat_prefix": "mysql",
                          "cluster": "outbound|3306||mysql.db.svc.cluster.local"}}]}]},
    {"name": "virtualInbound", "address": {"socket_address": {"address": "0.0.0.0",
                                                             "port_value": 15006}},
     "filter_chains": [
         {"name": "0.0.0.0_9080", "filter_chain_match": {"destination_port": 9080},
          "filters": [{"name": "envoy.filters.network.http_connection_manager",
                       "typed_config": {"@type": HCM, "stat_prefix": "inbound_0.0.0.0_9080",
                                        "route_config": {
                                            "name": "inbound|9080||",
                                            "virtual_hosts": [{
                                                "name": "inbound|http|9080", "domains": ["*"],
                                                "routes": [{"name": "default",
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "inbound|9080||",
                                                                      "timeout": "0s"}}]}]},
                                        "http_filters": [
                                            {"name": "envoy.filters.http.router"}]}}]}]},
]


def catalogue() -> list[Translation]:
    """Translations of every catalogue resource (for the sweep test)."""
    out = [translate_route_configuration(rc(ISTIO_RC), 9080, OPTS)]
    for c, a in ISTIO_CLUSTERS:
        out.append(translate_cluster(parse(Cluster, c), parse(ClusterLoadAssignment, a)
                                     if a else None, None, OPTS))
    for ln in ISTIO_LISTENERS:
        out.append(translate_listener(parse(Listener, ln), OPTS).translation)
    return out
