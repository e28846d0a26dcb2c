"""Incremental route translation (route_pieces): always equal to translating the whole
RouteConfiguration, while a push that changes one virtual host translates only that one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amesh_ext import translate as tr
from amesh_ext.agent import route_pieces
from amesh_ext.encoding import to_json
from amesh_ext.resources import parse_json_resource
from amesh_ext.sources.file import parse_resource

GOLDEN = Path(__file__).resolve().parent / "golden" / "istiod"
RC_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
OPTIONS = tr.TranslateOptions()


def _rc(vhosts: list[dict], **settings_: object) -> object:
    return parse_json_resource({"@type": RC_TYPE, "name": "80", "ignore_port_in_host_matching":
                                True, "virtual_hosts": vhosts, **settings_}, "test").message()


def _vhost(name: str, domains: list[str], header: str = "") -> dict:
    match: dict = {"prefix": "/"}
    if header:
        match["headers"] = [{"name": "x-user", "string_match": {"exact": header}}]
    return {"name": name, "domains": domains,
            "routes": [{"name": "r", "match": match, "route": {"cluster": f"c-{name}"}}]}


def _encoded(translation: tr.Translation) -> dict[str, bytes]:
    return {**{k: to_json(v) for k, v in translation.objects.items()}, **translation.encoded}


def _same_as_whole(result: tr.Translation, rc: object, port: int | None = 80) -> None:
    whole = tr.translate_route_configuration(rc, port, OPTIONS)
    assert _encoded(result) == _encoded(whole)
    assert {(s.feature, s.resource, s.detail) for s in result.skipped} == {
        (s.feature, s.resource, s.detail) for s in whole.skipped}


def _golden_route_configs() -> list[object]:
    out = []
    for corpus in ("bookinfo", "features"):
        doc = json.loads((GOLDEN / corpus / "routes.json").read_text())
        out += [parse_resource({"@type": doc["type_url"], **r}, corpus)[0].message()
                for r in doc["resources"]]
    return out


@pytest.mark.parametrize("rc", _golden_route_configs(), ids=lambda rc: rc.name)
def test_istiod_route_configs_translate_the_same_piece_by_piece(rc: object) -> None:
    _same_as_whole(route_pieces.RouteConfigTranslator().translate(rc, 9080, OPTIONS), rc, 9080)


def test_one_changed_virtual_host_is_the_only_one_translated(monkeypatch) -> None:
    calls: list[list[str]] = []
    real = tr.translate_route_configuration

    def counting(rc, port, options, clusters=None):
        calls.append([vh.name for vh in rc.virtual_hosts])
        return real(rc, port, options, clusters)

    monkeypatch.setattr(tr, "translate_route_configuration", counting)
    hosts = [_vhost(f"s{i}", [f"s{i}.ns.svc.cluster.local", f"s{i}"]) for i in range(50)]
    catch_all = _vhost("allow_any", ["*"])
    translator = route_pieces.RouteConfigTranslator()
    translator.translate(_rc([*hosts, catch_all]), 80, OPTIONS)
    assert len(calls) == 51  # every host once, the host-less ones together
    calls.clear()
    hosts[7] = _vhost("s7", ["s7.ns.svc.cluster.local", "s7"], header="jason")
    added = _vhost("new", ["new.ns.svc.cluster.local"])
    rc = _rc([*hosts, added, catch_all])
    result = translator.translate(rc, 80, OPTIONS)
    assert sorted(map(tuple, calls)) == [("new",), ("s7",)]
    _same_as_whole(result, rc)
    calls.clear()
    on_81 = translator.translate(rc, 81, OPTIONS)  # another port: every piece again
    assert len(calls) == 52
    _same_as_whole(on_81, rc, 81)


def test_invalid_whole_is_rejected_even_when_each_piece_is_valid() -> None:
    translator = route_pieces.RouteConfigTranslator()
    translator.translate(_rc([_vhost("a", ["x.example"])]), 80, OPTIONS)
    with pytest.raises(tr.InvalidResource, match="duplicate domain"):
        translator.translate(_rc([_vhost("a", ["x.example"]), _vhost("b", ["x.example"])]),
                             80, OPTIONS)


POOL = [
    _vhost("a", ["a.example", "a"]),
    _vhost("a", ["a.example", "a"], header="v2"),
    _vhost("b", ["b.example"]),
    _vhost("c", ["*.c.example"]),
    _vhost("d", ["d.*"]),  # prefix wildcard: host-less, banded
    _vhost("e", ["e.*", "e.example"]),
    _vhost("", ["unnamed.example"]),  # positions matter: translated whole
    _vhost("any", ["*"]),
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(range(len(POOL))), max_size=6), min_size=1,
                max_size=5),
       st.sampled_from([{}, {"request_headers_to_remove": ["x-debug"]}]))
def test_any_sequence_of_pushes_equals_the_whole(pushes, settings_) -> None:
    translator = route_pieces.RouteConfigTranslator()
    for picks in pushes:
        vhosts, names, domains = [], set(), set()
        for i in picks:  # skip what Envoy would reject: repeated names or domains
            vh = POOL[i]
            if vh["name"] in names or domains & set(vh["domains"]):
                continue
            names.add(vh["name"])
            domains |= set(vh["domains"])
            vhosts.append(vh)
        rc = _rc(vhosts, **settings_)
        _same_as_whole(translator.translate(rc, 80, OPTIONS), rc)
