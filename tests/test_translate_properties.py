"""Property tests: random valid Envoy resources never raise anything but InvalidResource,
always give schema-valid APISIX objects, and translate identically twice. Plus the sweep
over the fixture catalogue."""

from __future__ import annotations

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amesh_ext.translate import (
    HashPolicy,
    InvalidResource,
    TranslateOptions,
    route_hash_policies,
    translate_cluster,
    translate_route_configuration,
)
from apisix_schema import validate_all
from translate_fixtures import FAULT, OPTS, catalogue, dumps, parse, rc

text = st.text(max_size=12)
ascii_word = st.text(alphabet="abcXY-_.:*/|$%{}()[]\\^+? 1", min_size=0, max_size=10)
regex = st.sampled_from(["a.*", "(x|y)+", "[a-z]{2,3}", "a(b", "\\d+$", "(?i)abc", "(?=x)",
                         "\\pL+", "^/api/(.*)$", "[[:alpha:]]", ""])


def string_matcher():
    return st.one_of(
        st.builds(lambda v, i: {"exact": v, "ignore_case": i}, ascii_word, st.booleans()),
        st.builds(lambda v: {"prefix": v}, ascii_word),
        st.builds(lambda v: {"suffix": v}, ascii_word),
        st.builds(lambda v: {"contains": v}, ascii_word),
        st.builds(lambda r: {"safe_regex": {"regex": r}}, regex),
    )


header = st.one_of(
    st.builds(lambda n, m, inv, tm: {"name": n, "string_match": m, "invert_match": inv,
                                     "treat_missing_header_as_empty": tm},
              st.sampled_from(["x-a", "X-B", ":method", ":authority", ":scheme", ":path"]),
              string_matcher(), st.booleans(), st.booleans()),
    st.builds(lambda n, p, inv: {"name": n, "present_match": p, "invert_match": inv},
              st.sampled_from(["x-a", "y"]), st.booleans(), st.booleans()),
    st.builds(lambda a, b: {"name": "r", "range_match": {"start": str(a), "end": str(b)}},
              st.integers(-5, 5), st.integers(-5, 5)),
)
path = st.one_of(
    st.builds(lambda p: {"prefix": p}, ascii_word),
    st.builds(lambda p: {"path": "/" + p}, ascii_word),
    st.builds(lambda p: {"path_separated_prefix": "/" + p}, ascii_word),
    st.builds(lambda r: {"safe_regex": {"regex": r}}, regex),
)
match = st.builds(
    lambda p, cs, hs, qs, g: {**p, **({"case_sensitive": cs} if cs is not None else {}),
                              "headers": hs, "query_parameters": qs,
                              **({"grpc": {}} if g else {})},
    path, st.one_of(st.none(), st.booleans()), st.lists(header, max_size=3),
    st.lists(st.builds(lambda n, m: {"name": n, "string_match": m},
                       st.sampled_from(["q", "r"]), string_matcher()), max_size=2),
    st.booleans())
pct = st.builds(lambda n, d: {"numerator": n, "denominator": d}, st.integers(0, 2_000_000),
                st.sampled_from(["HUNDRED", "TEN_THOUSAND", "MILLION"]))
header_option = st.builds(
    lambda k, v, a: {"header": {"key": k, "value": v}, "append_action": a},
    st.sampled_from(["x-h", "x-i", "host", "Y"]), ascii_word,
    st.sampled_from(["APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS_OR_ADD"]))
cluster_name = st.sampled_from(["a", "outbound|80||s.ns.svc.cluster.local", "b|c", "x" * 80])
route_action = st.one_of(
    st.builds(lambda c, t, pr: {"cluster": c, "timeout": t, **pr}, cluster_name,
              st.sampled_from(["0s", "1.5s", "15s", "0.000001s"]),
              st.sampled_from([{}, {"prefix_rewrite": "/n$"},
                               {"regex_rewrite": {"pattern": {"regex": "^/(a)"},
                                                  "substitution": "/\\1"}},
                               {"host_rewrite_literal": "h.com"},
                               {"retry_policy": {"retry_on": "5xx", "num_retries": 3,
                                                 "per_try_timeout": "1s"}},
                               {"request_mirror_policies": [
                                   {"cluster": "outbound|80||m", "runtime_fraction": {
                                       "default_value": {"numerator": 3,
                                                         "denominator": "MILLION"}}}]},
                               {"hash_policy": [{"cookie": {"name": "c"}}]}])),
    st.builds(lambda ws: {"weighted_clusters": {"clusters": [
        {"name": f"c{i}", "weight": w} for i, w in enumerate(ws)]}},
        st.lists(st.integers(0, 5), min_size=1, max_size=4)),
)
route = st.builds(
    lambda n, m, kind, act, fault, hs: {
        "name": n, "match": m, **({
            "route": {"route": act},
            "redirect": {"redirect": {"host_redirect": "b.com", "strip_query": True}},
            "direct": {"direct_response": {"status": 503, "body": {"inline_string": "$x"}}},
        }[kind]), "request_headers_to_add": hs,
        **({"typed_per_filter_config": {"envoy.filters.http.fault": {
            "@type": FAULT, "abort": {"http_status": 503, "percentage": fault},
            "delay": {"fixed_delay": "0.1s", "percentage": fault}}}} if fault else {})},
    st.sampled_from(["", "r", "r", "default"]), match,
    st.sampled_from(["route", "route", "redirect", "direct"]), route_action,
    st.one_of(st.none(), pct), st.lists(header_option, max_size=3))
domain = st.sampled_from(["*", "a.com", "A.com", "*.b.com", "c.*", "d.com:80", "[::1]",
                          "e.com.", "bad host", "f.com"])
vhost = st.builds(lambda n, ds, rs: {"name": n, "domains": ds, "routes": rs},
                  st.sampled_from(["v", "w", "v"]), st.lists(domain, min_size=1, max_size=3),
                  st.lists(route, max_size=4))
route_configs = st.builds(
    lambda name, vhs, ign: {"name": name, "virtual_hosts": vhs,
                            "ignore_port_in_host_matching": ign},
    st.sampled_from(["80", "inbound|80||", "x" * 70]), st.lists(vhost, max_size=3),
    st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_configs, st.one_of(st.none(), st.integers(1, 65535)))
def test_route_configs_translate_or_are_invalid(d, port):
    msg = rc(d)
    try:
        tr = translate_route_configuration(msg, port, OPTS)
    except InvalidResource as exc:
        assert str(exc)
        return
    validate_all(tr.objects)
    assert dumps(tr) == dumps(translate_route_configuration(msg, port, OPTS))
    for hp in route_hash_policies(msg).values():
        assert isinstance(hp, HashPolicy)


endpoint = st.builds(
    lambda a, p, w, h: {"endpoint": {"address": {"socket_address": {
        "address": a, "port_value": p}}}, "health_status": h,
        **({"load_balancing_weight": w} if w is not None else {})},
    st.sampled_from(["10.0.0.1", "::1", "fe80::1%eth0", "host.example", "bad host"]),
    st.integers(0, 70000), st.one_of(st.none(), st.integers(0, 100)),
    st.sampled_from(["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "DEGRADED"]))
assignment = st.builds(
    lambda locs: {"cluster_name": "c", "endpoints": locs},
    st.lists(st.builds(lambda eps, lw, pr: {"lb_endpoints": eps, "priority": pr,
                                            **({"load_balancing_weight": lw} if lw else {})},
                       st.lists(endpoint, max_size=4), st.integers(0, 7), st.integers(0, 2)),
             max_size=3))
clusters = st.builds(
    lambda name, typ, lb, ct, od, lw, h2: {
        "name": name, "type": typ, "lb_policy": lb, "connect_timeout": ct,
        **({"outlier_detection": od} if od is not None else {}),
        **({"common_lb_config": {"locality_weighted_lb_config": {}}} if lw else {}),
        **({"http2_protocol_options": {}} if h2 else {})},
    cluster_name, st.sampled_from(["EDS", "STATIC", "STRICT_DNS", "ORIGINAL_DST"]),
    st.sampled_from(["ROUND_ROBIN", "LEAST_REQUEST", "RING_HASH", "RANDOM", "MAGLEV"]),
    st.sampled_from(["0s", "0.25s", "10s"]),
    st.one_of(st.none(), st.builds(lambda c, g, b: {
        "consecutive_5xx": c, "consecutive_gateway_failure": g, "base_ejection_time": b},
        st.integers(0, 300), st.integers(0, 300), st.sampled_from(["0s", "0.4s", "30s"]))),
    st.booleans(), st.booleans())
hash_policies = st.one_of(st.none(), st.sampled_from([
    HashPolicy("header", "x-user"), HashPolicy("vars", "arg_q"),
    HashPolicy("vars_combinations", "$remote_addr$http_x")]))


@settings(max_examples=300, deadline=None)
@given(clusters, st.one_of(st.none(), assignment), hash_policies, st.booleans())
def test_clusters_translate_or_are_invalid(cd, ad, hp, inline):
    if inline and ad is not None:
        cd = {**cd, "load_assignment": ad}
    cluster = parse(Cluster, cd)
    cla = parse(ClusterLoadAssignment, ad) if ad is not None else None
    opts = TranslateOptions(istio_client_cert_id="ssl-1")
    try:
        tr = translate_cluster(cluster, cla, hp, opts)
    except InvalidResource as exc:
        assert cd["name"] in str(exc)
        return
    validate_all(tr.objects)
    assert dumps(tr) == dumps(translate_cluster(cluster, cla, hp, opts))


def test_sweep_catalogue_outputs_are_schema_valid():
    outputs = catalogue()
    keys = [k for t in outputs for k in t.objects]
    assert len(keys) == len(set(keys))
    for tr in outputs:
        validate_all(tr.objects)
    assert [dumps(t) for t in outputs] == [dumps(t) for t in catalogue()]
