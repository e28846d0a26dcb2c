"""Route actions and per-route features -> APISIX route fields and plugins."""

from __future__ import annotations

import pytest

from amesh_ext.translate import TranslateOptions, mirror_node, route_hash_policies, upstream_id
from amesh_ext.translate.model import HashPolicy
from amesh_ext.translate.templates import LITERAL_DOLLAR
from translate_fixtures import (
    CORS,
    FAULT,
    NORMALISED_PATH,
    first_route,
    own_plugins,
    rc,
    route_config,
    routes_by_priority,
    to_cluster,
    translate_rc,
)

P = {"prefix": "/"}
CLUSTER = "outbound|80||svc.ns.svc.cluster.local"  # to_cluster's


def act(**action) -> dict:
    return first_route(route_config(to_cluster(P, **action)))


def feats(msg) -> list[str]:
    return [s.feature for s in translate_rc(msg).skipped]


def test_weighted_clusters_to_traffic_split():
    obj = first_route(route_config({"name": "w", "match": P, "route": {"weighted_clusters": {
        "clusters": [{"name": "a", "weight": 3}, {"name": "b", "weight": 0},
                     {"name": "c", "weight": 1}]}}}))
    assert obj["upstream_id"] == "a"
    assert obj["plugins"]["traffic-split"] == {"rules": [{"weighted_upstreams": [
        {"upstream_id": "a", "weight": 3}, {"upstream_id": "c", "weight": 1}]}]}


def test_single_weighted_cluster_is_plain_upstream():
    obj = first_route(route_config({"name": "w", "match": P, "route": {"weighted_clusters": {
        "clusters": [{"name": "a|b", "weight": 3}, {"name": "b", "weight": 0}]}}}))
    assert obj["upstream_id"] == upstream_id("a|b") and not own_plugins(obj)


def test_cluster_header_without_and_with_candidates():
    msg = route_config({"name": "h", "match": P, "route": {"cluster_header": "x-cluster"}})
    obj = first_route(msg)
    assert obj["plugins"] == {"fault-injection": {"abort": {"http_status": 404, "body": ""}}}
    assert feats(msg) == ["cluster_header"]
    opts = TranslateOptions(cluster_header_clusters=("a", "b"))
    obj = first_route(msg, options=opts)
    assert obj["plugins"]["traffic-split"]["rules"][1] == {
        "match": [{"vars": [["http_x_cluster", "==", "b"]]}],
        "weighted_upstreams": [{"upstream_id": "b", "weight": 1}]}
    assert obj["plugins"]["fault-injection"]["abort"]["vars"] == [
        [["http_x_cluster", "!", "in", ["a", "b"]]]]


@pytest.mark.parametrize("action, timeout", [
    ({}, {"connect": 10.0, "send": 15.0, "read": 15.0}),
    ({"timeout": "0s"}, {"connect": 10.0, "send": 86400.0, "read": 86400.0}),
    ({"timeout": "0.25s"}, {"connect": 0.25, "send": 0.25, "read": 0.25}),
    ({"timeout": "30s", "retry_policy": {"per_try_timeout": "2.5s"}},
     {"connect": 2.5, "send": 2.5, "read": 2.5}),
    ({"timeout": "0s", "idle_timeout": "300s"}, {"connect": 10.0, "send": 300.0, "read": 300.0}),
])
def test_timeouts(action, timeout):
    assert act(**action)["timeout"] == timeout


def test_retry_skips():
    msg = route_config(to_cluster(P, retry_policy={"retry_on": "5xx,connect-failure",
                                                   "num_retries": 3}))
    assert sorted(feats(msg)) == ["retry_on", "retry_policy_num_retries"]
    ok = route_config(to_cluster(P, retry_policy={"retry_on": "connect-failure,reset",
                                                  "num_retries": 2}))
    assert feats(ok) == []


def test_prefix_and_regex_rewrites():
    obj = first_route(route_config(to_cluster({"prefix": "/old"}, prefix_rewrite="/new")))
    assert obj["plugins"]["proxy-rewrite"] == {"regex_uri": [r"^\/old(.*)", "/new$1"]}
    obj = first_route(route_config(to_cluster({"path": "/a"}, prefix_rewrite="/b")))
    assert obj["plugins"]["proxy-rewrite"] == {"regex_uri": [r"^\/a\z", "/b"]}
    obj = act(regex_rewrite={"pattern": {"regex": "^/svc/([^/]+)/(.*)$"},
                             "substitution": "/\\2/\\1$"})
    assert obj["plugins"]["proxy-rewrite"] == {
        "regex_uri": [r"^/svc/([^/]+)/(.*)\z", "/${2}/${1}$$"]}


def test_host_rewrites():
    assert act(host_rewrite_literal="new.host:8080")["plugins"]["proxy-rewrite"] == {
        "host": "new.host:8080"}
    msg = route_config(to_cluster(P, auto_host_rewrite=True))
    assert feats(msg) == ["auto_host_rewrite"]


def test_request_header_mutations_keep_envoy_semantics():
    msg = route_config({**to_cluster(P), "request_headers_to_add": [
        {"header": {"key": "x-set", "value": "v1"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-add", "value": "a"}},
        {"header": {"key": "x-add", "value": "b"}},
        {"header": {"key": "x-removed-then-set", "value": "s"}, "append": False},
        {"header": {"key": "x-dollar", "value": "$var ${x} 100%% $"}, "append": True},
        {"header": {"key": "x-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
    ], "request_headers_to_remove": ["x-removed-then-set", "x-gone"]})
    obj = first_route(msg)
    assert obj["plugins"]["proxy-rewrite"]["headers"] == {
        "add": {"x-add": ["a", "b"],
                "x-dollar": f"{LITERAL_DOLLAR}var {LITERAL_DOLLAR}{{x}} 100% $",
                "x-ip": "${remote_addr}"},
        "set": {"x-removed-then-set": "s", "x-set": "v1"},
        "remove": ["x-gone"]}


def test_header_levels_route_then_vhost_then_config():
    msg = rc({"name": "80", "ignore_port_in_host_matching": True,
              "request_headers_to_add": [{"header": {"key": "x", "value": "rc"},
                                          "append": False}],
              "virtual_hosts": [{"name": "v", "domains": ["*"],
                                 "request_headers_to_add": [
                                     {"header": {"key": "x", "value": "vh"}}],
                                 "routes": [{**to_cluster(P), "request_headers_to_add": [
                                     {"header": {"key": "x", "value": "route"},
                                      "append": False}]}]}]})
    assert first_route(msg)["plugins"]["proxy-rewrite"]["headers"] == {"set": {"x": "rc"}}
    msg.most_specific_header_mutations_wins = True
    assert first_route(msg)["plugins"]["proxy-rewrite"]["headers"] == {"set": {"x": "route"}}


def test_unsupported_header_mutations_skip():
    msg = route_config({**to_cluster(P), "request_headers_to_add": [
        {"header": {"key": "x", "value": "%START_TIME%"}},
        {"header": {"key": "y", "value": "v"}, "append_action": "ADD_IF_ABSENT"},
        {"header": {"key": "host", "value": "h"}}]})
    assert feats(msg) == ["request_header_mutation"] * 3
    assert not own_plugins(first_route(msg))


def test_response_headers():
    obj = first_route(route_config({**to_cluster(P), "response_headers_to_add": [
        {"header": {"key": "x-a", "value": "1"}},
        {"header": {"key": "x-s", "value": "2"}, "append": False}],
        "response_headers_to_remove": ["server"]}))
    assert obj["plugins"]["response-rewrite"] == {"headers": {
        "add": ["x-a: 1"], "set": {"x-s": "2"}, "remove": ["server"]}}


@pytest.mark.parametrize("redirect, conf", [
    ({"host_redirect": "b.com"},
     {"ret_code": 301, "uri": "$scheme://b.com$uri", "append_query_string": True}),
    ({"https_redirect": True, "response_code": "PERMANENT_REDIRECT", "strip_query": True},
     {"ret_code": 308, "uri": "https://$host$uri"}),
    ({"scheme_redirect": "http", "host_redirect": "b.com", "port_redirect": 8080,
      "path_redirect": "/x", "response_code": "FOUND"},
     {"ret_code": 302, "uri": "http://b.com:8080/x", "append_query_string": True}),
    ({"path_redirect": "/x?y=1"}, {"ret_code": 301, "uri": "$scheme://$http_host/x?y=1"}),
    ({"prefix_rewrite": "/new"},
     {"ret_code": 301, "regex_uri": [r"^\/old(.*)", "/new$1"], "append_query_string": True}),
    ({"prefix_rewrite": "/new", "https_redirect": True, "host_redirect": "b.com"},
     {"ret_code": 301, "regex_uri": [r"^\/old(.*)", "https://b.com/new$1"],
      "append_query_string": True}),
])
def test_redirects(redirect, conf):
    obj = first_route(route_config({"name": "r", "match": {"prefix": "/old"},
                                    "redirect": redirect}))
    assert obj["plugins"] == {"redirect": conf}
    assert "upstream_id" not in obj


def test_inexpressible_redirect_answers_503_with_skip():
    msg = route_config({"name": "r", "match": P,
                        "redirect": {"prefix_rewrite": "/n", "https_redirect": True}})
    assert first_route(msg)["plugins"]["fault-injection"]["abort"]["http_status"] == 503
    assert feats(msg) == ["redirect"]


def test_direct_response():
    obj = first_route(route_config({"name": "d", "match": P, "direct_response": {
        "status": 418, "body": {"inline_string": "I'm a $teapot"}}}))
    assert obj["plugins"] == {"fault-injection": {"abort": {
        "http_status": 418, "body": f"I'm a {LITERAL_DOLLAR}teapot"}}}
    obj = first_route(route_config({"name": "d", "match": P,
                                    "direct_response": {"status": 502}}))
    assert obj["plugins"] == {"fault-injection": {"abort": {"http_status": 502}}}


def fault(cfg: dict, where: str = "route") -> dict:
    tpfc = {"envoy.filters.http.fault": {"@type": FAULT, **cfg}}
    route = {**to_cluster(P)}
    if where == "route":
        route["typed_per_filter_config"] = tpfc
        return first_route(route_config(route))
    msg = rc({"name": "80", "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route],
                                               "typed_per_filter_config": tpfc}]})
    return first_route(msg)


@pytest.mark.parametrize("cfg, conf", [
    ({"abort": {"http_status": 503, "percentage": {"numerator": 100000,
                                                   "denominator": "MILLION"}}},
     {"abort": {"http_status": 503, "percentage": 10, "body": "fault filter abort"}}),
    ({"abort": {"http_status": 503, "percentage": {"numerator": 100}}},
     {"abort": {"http_status": 503, "percentage": 100, "body": "fault filter abort"}}),
    ({"delay": {"fixed_delay": "0.5s", "percentage": {"numerator": 2500,
                                                       "denominator": "TEN_THOUSAND"}}},
     {"delay": {"duration": 0.5, "percentage": 25}}),
    ({"abort": {"grpc_status": 14, "percentage": {"numerator": 100}}},
     {"abort": {"http_status": 200, "percentage": 100, "body": "",
                "headers": {"grpc-status": "14", "content-type": "application/grpc"}}}),
])
def test_fault_injection(cfg, conf):
    assert fault(cfg)["plugins"]["fault-injection"] == conf
    assert fault(cfg, where="vhost")["plugins"]["fault-injection"] == conf


def test_fault_with_unset_percentage_is_zero():
    assert not own_plugins(fault({"abort": {"http_status": 503}, "delay": {
        "fixed_delay": "1s"}}))


def test_fault_percentage_rounding_is_reported():
    msg = route_config({**to_cluster(P), "typed_per_filter_config": {
        "envoy.filters.http.fault": {"@type": FAULT, "abort": {
            "http_status": 500, "percentage": {"numerator": 1, "denominator": "MILLION"}}}}})
    assert not own_plugins(first_route(msg))  # 0.0001% rounds to 0: never fires
    assert feats(msg) == ["fault_percentage_rounded"]


def test_mirror_goes_to_a_node_of_the_mirror_cluster():
    mirror = "outbound|8080||m.ns.svc.cluster.local"
    known = {CLUSTER: None, mirror: "http://10.0.0.9:8080"}
    msg = route_config(to_cluster(P, request_mirror_policies=[{"cluster": mirror}]))
    tr = translate_rc(msg, clusters=known)
    assert routes_by_priority(tr)[0]["plugins"]["proxy-mirror"] == {
        "host": "http://10.0.0.9:8080", "sample_ratio": 1.0}
    assert tr.cluster_deps[("mirror", mirror)] == "http://10.0.0.9:8080"
    # Envoy appends -shadow to the copy's Host unless told not to (Istio tells it).
    assert [k.feature for k in tr.skipped] == ["request_mirror"]
    istio = route_config(to_cluster(P, request_mirror_policies=[
        {"cluster": mirror, "disable_shadow_host_suffix_append": True}]))
    assert not translate_rc(istio, clusters=known).skipped
    # A mirror cluster without endpoints, or unknown, gets no copy (Envoy: no host).
    for view in ({CLUSTER: None, mirror: None}, {CLUSTER: None}):
        assert "proxy-mirror" not in own_plugins(first_route(msg, clusters=view))
    assert not own_plugins(first_route(route_config(to_cluster(P, request_mirror_policies=[
        {"cluster": mirror, "runtime_fraction": {"default_value": {}}}])), clusters=known))


def test_mirror_node_is_the_first_node_of_the_priority_tried_first():
    up = {"scheme": "http", "nodes": [{"host": "a", "port": 1, "weight": 1, "priority": -1},
                                      {"host": "b", "port": 2, "weight": 0},
                                      {"host": "c", "port": 3, "weight": 1}]}
    assert mirror_node(up) == "http://c:3"
    assert mirror_node({"scheme": "https", "nodes": [{"host": "a", "port": 1, "weight": 1}]}) \
        == "https://a:1"
    assert mirror_node({"nodes": []}) is None


def test_route_to_an_absent_cluster_answers_503_and_names_no_upstream():
    tr = translate_rc(route_config(to_cluster(P)), clusters={})
    route = routes_by_priority(tr)[0]
    assert "upstream_id" not in route
    assert route["plugins"] == {"fault-injection": {"abort": {"http_status": 503, "body": ""}}}
    assert tr.cluster_deps == {("exists", CLUSTER): False}
    assert not [k for k in tr.objects if k.startswith("/upstreams/")]


def test_weighted_entry_to_an_absent_cluster_draws_the_no_cluster_upstream():
    msg = route_config({"name": "w", "match": P, "route": {"weighted_clusters": {
        "clusters": [{"name": "gone", "weight": 1}, {"name": "a", "weight": 3}]}}})
    tr = translate_rc(msg, clusters={"a": None})
    route = routes_by_priority(tr)[0]
    no_cluster = "80_._n"
    assert route["plugins"]["traffic-split"] == {"rules": [{"weighted_upstreams": [
        {"upstream_id": no_cluster, "weight": 1}, {"upstream_id": "a", "weight": 3}]}]}
    assert tr.objects["/upstreams/" + no_cluster]["nodes"] == []  # APISIX answers 503
    # Every entry absent: the route answers 503 itself, no upstream is written.
    tr = translate_rc(msg, clusters={})
    assert routes_by_priority(tr)[0]["plugins"]["fault-injection"]["abort"]["http_status"] \
        == 503
    assert "/upstreams/" + no_cluster not in tr.objects


def test_cluster_header_candidates_the_agent_lacks_are_unknown():
    opts = TranslateOptions(cluster_header_clusters=("a", "b"))
    msg = route_config({"name": "h", "match": P, "route": {"cluster_header": "x-c"}})
    obj = first_route(msg, options=opts, clusters={"b": None})
    assert [r["weighted_upstreams"][0]["upstream_id"]
            for r in obj["plugins"]["traffic-split"]["rules"]] == ["b"]
    assert first_route(msg, options=opts, clusters={})["plugins"]["fault-injection"] == {
        "abort": {"http_status": 404, "body": ""}}


def test_prefix_rewrite_on_a_regex_match_replaces_the_whole_path():
    obj = first_route(route_config(to_cluster({"safe_regex": {"regex": "/re/[0-9]+"}},
                                              prefix_rewrite="/new")))
    # regex_uri keeps the query (APISIX appends the request's args).
    assert obj["plugins"]["proxy-rewrite"] == {"regex_uri": ["(?s)^.*", "/new"]}


def test_every_proxied_route_forwards_the_normalised_path():
    assert act()["plugins"] == {"proxy-rewrite": NORMALISED_PATH}
    # A route that rewrites already makes APISIX forward the normalised path.
    assert act(prefix_rewrite="/x")["plugins"]["proxy-rewrite"] == {
        "regex_uri": ["^\\/(.*)", "/x$1"]}


def test_cors_per_filter_and_legacy():
    policy = {"allow_origin_string_match": [{"exact": "https://a.com"},
                                            {"suffix": ".b.com", "ignore_case": True}],
              "allow_methods": "GET,POST", "max_age": "60", "allow_credentials": True}
    expected = {"allow_origins_by_regex": [r"^https:\/\/a\.com\z", r"(?i:\.b\.com\z)"],
                "allow_methods": "GET,POST", "allow_headers": "", "allow_credential": True,
                "allow_origins": "null", "max_age": 60}
    obj = first_route(route_config({**to_cluster(P), "typed_per_filter_config": {
        "envoy.filters.http.cors": {"@type": CORS, **policy}}}))
    assert obj["plugins"]["cors"] == expected
    obj = act(cors=policy)
    assert obj["plugins"]["cors"] == expected
    assert not own_plugins(act(cors={"allow_methods": "GET"}))


def test_route_hash_policies():
    msg = route_config(to_cluster(P, "c1", hash_policy=[{"cookie": {"name": "sess"}}]),
                       {"name": "w", "match": {"prefix": "/w"}, "route": {
                           "weighted_clusters": {"clusters": [
                               {"name": "c2", "weight": 1}, {"name": "c3", "weight": 1}]},
                           "hash_policy": [{"header": {"header_name": "X-User"}},
                                           {"connection_properties": {"source_ip": True}}]}},
                       to_cluster({"prefix": "/q"}, "c4", hash_policy=[
                           {"query_parameter": {"name": "id"}, "terminal": True},
                           {"header": {"header_name": "x"}}]),
                       to_cluster({"prefix": "/z"}, "c1", hash_policy=[
                           {"connection_properties": {"source_ip": True}}]))
    assert route_hash_policies(msg) == {
        "c1": HashPolicy("cookie", "sess"),
        "c2": HashPolicy("vars_combinations", "$http_x_user$remote_addr"),
        "c3": HashPolicy("vars_combinations", "$http_x_user$remote_addr"),
        "c4": HashPolicy("vars", "arg_id"),
    }


def test_istio_default_route_translation_is_complete():
    obj = routes_by_priority(translate_rc(route_config(to_cluster(P, timeout="0s"))))[0]
    assert obj["enable_websocket"] is True
    assert obj["upstream_id"] == upstream_id("outbound|80||svc.ns.svc.cluster.local")
