"""RouteConfiguration translation: shape, priorities, hosts, ports, closing routes."""

from __future__ import annotations

import pytest

from amesh_ext.translate import (
    InvalidResource,
    TranslateOptions,
    route_key_prefix,
    upstream_id,
)
from translate_fixtures import (
    ISTIO_RC,
    OPTS,
    rc,
    route_config,
    routes_by_priority,
    to_cluster,
    translate_rc,
)

SVC = "outbound|80||svc.ns.svc.cluster.local"


def test_one_route_per_envoy_route_plus_closer_sharing_uri():
    msg = route_config(to_cluster({"prefix": "/a"}), to_cluster({"prefix": "/"}),
                       domains=["svc.ns", "svc"])
    tr = translate_rc(msg)
    objs = routes_by_priority(tr)
    assert [o["uri"] for o in objs] == ["/*"] * 3
    assert [o["priority"] for o in objs] == [2, 1, 0]
    assert all(o["hosts"] == ["svc.ns", "svc"] for o in objs)
    assert objs[0]["vars"] == [["server_port", "==", "80"], ["uri", "~~", r"^\/a"]]
    assert objs[0]["upstream_id"] == upstream_id(SVC)
    # prefix "/" needs no condition; the closer answers 404 like Envoy's NR.
    assert objs[1]["vars"] == [["server_port", "==", "80"]]
    assert objs[2]["plugins"] == {"fault-injection": {"abort": {"http_status": 404,
                                                                "body": ""}}}
    assert "upstream_id" not in objs[2]
    assert all(k.startswith(route_key_prefix("80")) for k in tr.objects)
    assert not tr.skipped


def test_route_ids_stable_when_routes_are_inserted():
    a = route_config({**to_cluster({"prefix": "/a"}), "name": "a"},
                     {**to_cluster({"prefix": "/"}), "name": "b"})
    b = route_config({**to_cluster({"prefix": "/x"}), "name": "x"},
                     {**to_cluster({"prefix": "/a"}), "name": "a"},
                     {**to_cluster({"prefix": "/"}), "name": "b"})
    ka, kb = set(translate_rc(a).objects), set(translate_rc(b).objects)
    assert ka < kb and len(kb - ka) == 1


def test_duplicate_and_unnamed_route_names_get_distinct_ids():
    msg = route_config({**to_cluster({"prefix": "/a"}), "name": "same"},
                       {**to_cluster({"prefix": "/b"}), "name": "same"},
                       {**to_cluster({"prefix": "/c"}), "name": ""})
    tr = translate_rc(msg)
    assert len(tr.objects) == 4


def test_no_port_var_without_listener_port_or_when_disabled():
    msg = route_config(to_cluster({"prefix": "/"}))
    assert "vars" not in routes_by_priority(translate_rc(msg, port=None))[0]
    opts = TranslateOptions(port_match_var=None)
    assert "vars" not in routes_by_priority(translate_rc(msg, options=opts))[0]
    custom = TranslateOptions(port_match_var="server_port_custom")
    assert routes_by_priority(translate_rc(msg, port=8080, options=custom))[0]["vars"] == [
        ["server_port_custom", "==", "8080"]]


def test_same_host_on_two_ports_does_not_collide():
    a = translate_rc(route_config(to_cluster({"prefix": "/"}), domains=["h"], name="80"), 80)
    b = translate_rc(route_config(to_cluster({"prefix": "/"}), domains=["h"], name="81"), 81)
    assert not set(a.objects) & set(b.objects)


def test_domains_lowercased_ports_dropped_and_trailing_dot():
    msg = route_config(to_cluster({"prefix": "/"}),
                       domains=["A.Example.COM", "a.example.com.", "b.example.com:80",
                                "*.Wild.com"], ignore_port_in_host_matching=True)
    obj = routes_by_priority(translate_rc(msg))[0]
    # a domain with a port can never match when Envoy strips the request's port
    assert obj["hosts"] == ["a.example.com", "*.wild.com"]


def test_ports_kept_when_not_ignored():
    msg = route_config(to_cluster({"prefix": "/"}), domains=["a.com", "b.com:8080"],
                       ignore_port_in_host_matching=False)
    objs = [o for o in translate_rc(msg).objects.values() if o["priority"] == 1]
    by_hosts = {tuple(o["hosts"]): o["vars"] for o in objs}
    assert by_hosts[("a.com",)] == [["server_port", "==", "80"],
                                    ["http_host", "!", "~~", r":[0-9]*\z"]]
    assert by_hosts[("b.com",)] == [["server_port", "==", "80"],
                                    ["http_host", "~*", r"^(?:b\.com:8080)\z"]]


def test_wildcard_any_and_prefix_wildcard_bands():
    msg = rc({"name": "80", "ignore_port_in_host_matching": True, "virtual_hosts": [
        {"name": "any", "domains": ["*"], "routes": [to_cluster({"prefix": "/"}, "c1")]},
        {"name": "short", "domains": ["b.*"], "routes": [to_cluster({"prefix": "/"}, "c2")]},
        {"name": "long", "domains": ["b.c.*"], "routes": [
            to_cluster({"prefix": "/x"}, "c3"), to_cluster({"prefix": "/"}, "c3")]},
    ]})
    objs = routes_by_priority(translate_rc(msg))
    order = [(o.get("upstream_id"), o["priority"]) for o in objs]
    # longest prefix wildcard first, then shorter, then '*'; each closed by its 404
    assert order == [("c3", 6), ("c3", 5), (None, 4), ("c2", 3), (None, 2), ("c1", 1),
                     (None, 0)]
    assert all("hosts" not in o for o in objs)
    assert objs[0]["vars"][1] == ["host", "~~", r"^b\.c\..+"]
    assert len({o["priority"] for o in objs}) == len(objs)


def test_suffix_wildcard_goes_to_hosts():
    msg = route_config(to_cluster({"prefix": "/"}), domains=["*-bar.foo.com"])
    assert routes_by_priority(translate_rc(msg))[0]["hosts"] == ["*-bar.foo.com"]


@pytest.mark.parametrize("domains", [
    [["a.com"], ["A.com"]],
    [["*"], ["*"]],
    [["*.a.com", "x"], ["*.A.com"]],
])
def test_duplicate_domains_reject_the_route_config(domains):
    msg = rc({"name": "bad", "virtual_hosts": [
        {"name": f"v{i}", "domains": d, "routes": [to_cluster({"prefix": "/"})]}
        for i, d in enumerate(domains)]})
    with pytest.raises(InvalidResource, match="'bad'"):
        translate_rc(msg)


def test_invalid_regex_rejects_the_route_config():
    msg = route_config(to_cluster({"safe_regex": {"regex": "/a(b"}}), name="rx")
    with pytest.raises(InvalidResource, match="RouteConfiguration 'rx'"):
        translate_rc(msg)
    for bad in ["(?=x)", r"(a)\1", "a*+", "[a"]:
        with pytest.raises(InvalidResource):
            translate_rc(route_config(to_cluster({"safe_regex": {"regex": bad}})))


def test_istio_route_config_shape():
    tr = translate_rc(rc(ISTIO_RC), 9080)
    objs = routes_by_priority(tr)
    host_routes = [o for o in objs if "hosts" in o]
    assert [o["name"].rsplit("/", 1)[1] for o in host_routes] == [
        "jason", "split", "default", "404"]
    passthrough = [o for o in objs if "hosts" not in o]
    assert [o.get("upstream_id") for o in passthrough] == ["PassthroughCluster", None]
    assert host_routes[0]["hosts"] == [
        "reviews.default.svc.cluster.local", "reviews", "reviews.default",
        "reviews.default.svc", "10.96.0.12"]


def test_uppercase_and_invalid_hosts_skipped_not_emitted():
    msg = route_config(to_cluster({"prefix": "/"}), domains=["ok.com", "bad host"])
    tr = translate_rc(msg)
    assert routes_by_priority(tr)[0]["hosts"] == ["ok.com"]
    assert [s.feature for s in tr.skipped] == ["virtual_host_domain"]


def test_translation_is_deterministic_and_pure():
    msg = rc(ISTIO_RC)
    before = msg.SerializeToString(deterministic=True)
    a = translate_rc(msg, 9080)
    b = translate_rc(msg, 9080)
    assert a == b
    assert msg.SerializeToString(deterministic=True) == before


def test_vhost_route_config_level_skips():
    msg = rc({"name": "80", "internal_only_headers": ["x-internal"], "virtual_hosts": [
        {"name": "v", "domains": ["*"], "require_tls": "ALL",
         "routes": [to_cluster({"prefix": "/"})]}]})
    feats = {s.feature for s in translate_rc(msg).skipped}
    assert {"internal_only_headers", "require_tls"} <= feats


def test_default_options_are_the_documented_ones():
    assert OPTS.port_match_var == "server_port"
    assert OPTS.istio_cert_dir == "/etc/certs"
