"""APISIX ids: valid, deterministic, injective; key prefixes per route config."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from amesh_ext.translate import route_key_prefix, stream_route_key_prefix, upstream_id
from amesh_ext.translate.ids import NameCounter, escape, scoped_id

VALID = re.compile(r"^[a-zA-Z0-9-_.]{1,64}$")
TRICKY = [
    "a|b", "a_7cb", "a_b", "a__b", "a_5fb", "_", "__", "", "a", "A", "a.b", "a-b",
    "outbound|80||reviews.default.svc.cluster.local",
    "outbound|80|v1|reviews.default.svc.cluster.local",
    "inbound|80||", "BlackHoleCluster", "PassthroughCluster",
    "x" * 64, "x" * 65, "x" * 200, "x" * 200 + "y", "ü", "u\u0308", "日本語", "a b", "a/b",
    "a_zdeadbeef", "a_z" + "0" * 20, "x" * 38 + "_z" + "0" * 20,
]


def test_escape_examples():
    assert upstream_id("outbound|80||a.ns") == "outbound_7c80_7c_7ca.ns"
    assert upstream_id("a_b") == "a_5fb"
    assert upstream_id("a|b") != upstream_id("a_7cb")


def test_ids_valid_and_injective_on_tricky_names():
    ids = [upstream_id(n) for n in TRICKY]
    assert all(VALID.match(i) for i in ids), ids
    assert len(set(ids)) == len(TRICKY)


def test_long_names_keep_readable_prefix_and_hash():
    i = upstream_id("outbound|9080|v1|" + "very-long-service-name." * 5 + "svc.cluster.local")
    assert len(i) <= 64 and i.startswith("outbound_7c9080_7cv1_7cvery") and "_z" in i


@given(st.lists(st.text(max_size=120), min_size=2, max_size=8, unique=True))
def test_upstream_ids_injective_property(names):
    ids = [upstream_id(n) for n in names]
    assert all(VALID.match(i) for i in ids)
    assert len(set(ids)) == len(names)


@given(st.text(max_size=100), st.text(max_size=100), st.text(max_size=100),
       st.text(max_size=100))
def test_route_key_prefixes_never_nest(rc1, rc2, vh, route):
    rid = scoped_id(rc1, escape(vh), NameCounter().key(route, 0))
    assert VALID.match(rid)
    key = "/routes/" + rid
    assert key.startswith(route_key_prefix(rc1))
    if rc1 != rc2:
        assert not key.startswith(route_key_prefix(rc2))


def test_scoped_ids_distinct_for_distinct_parts():
    parts = [("vh", "r"), ("vh", "r_d1"), ("vh_.r", ""), ("v", "h_.r"), ("x" * 50, "r"),
             ("x" * 50, "s"), ("vh", "_x"), ("vh", "_x_sa"), ("vh", "_p0")]
    ids = {scoped_id("80", escape(a) if not a.startswith("_") else a, b) for a, b in parts}
    assert len(ids) == len(parts)


def test_name_counter():
    c = NameCounter()
    assert [c.key("a", 0), c.key("a", 1), c.key("", 2), c.key("b", 3)] == [
        "a", "a_d1", "_p2", "b"]


def test_stream_prefix():
    assert stream_route_key_prefix("0.0.0.0_80") == "/stream_routes/0.0.0.0_5f80_."
