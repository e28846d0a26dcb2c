"""Route matchers -> APISIX vars/methods (route-selection.md §4 table)."""

from __future__ import annotations

import pytest

from translate_fixtures import first_route, route_config, to_cluster, translate_rc

PORT = ["server_port", "==", "80"]


def match_vars(match: dict) -> list:
    """The vars of the first route, without the port condition."""
    obj = first_route(route_config(to_cluster(match)))
    assert obj["vars"][0] == PORT
    return obj["vars"][1:]


@pytest.mark.parametrize("match, expected", [
    ({"prefix": "/api"}, [["uri", "~~", r"^\/api"]]),
    ({"prefix": "/a.b(c)"}, [["uri", "~~", r"^\/a\.b\(c\)"]]),
    ({"prefix": "/api", "case_sensitive": False}, [["uri", "~*", r"^\/api"]]),
    ({"prefix": ""}, []),
    ({"path": "/exact"}, [["uri", "==", "/exact"]]),
    ({"path": "/Exact", "case_sensitive": False}, [["uri", "~*", r"^\/Exact\z"]]),
    ({"path_separated_prefix": "/api"}, [["uri", "~~", r"^\/api(?:/|\z)"]]),
    ({"safe_regex": {"regex": "/v[0-9]+/.*"}}, [["uri", "~~", r"\A(?:/v[0-9]+/.*)\z"]]),
    # RE2's `$` is end of text: PCRE's would also match before a final newline
    ({"safe_regex": {"regex": "/a$"}, "case_sensitive": False},
     [["uri", "~~", r"\A(?:/a\z)\z"]]),
    ({"prefix": "/", "grpc": {}}, [["http_content_type", "~~", r"^application/grpc(?:\+|\z)"]]),
])
def test_path_matchers(match, expected):
    assert match_vars(match) == expected


def header(h: dict) -> list:
    return match_vars({"prefix": "/", "headers": [h]})


@pytest.mark.parametrize("h, expected", [
    ({"name": "X-User", "string_match": {"exact": "a$b"}}, [["http_x_user", "==", "a$b"]]),
    ({"name": "x", "string_match": {"exact": "Ab", "ignore_case": True}},
     [["http_x", "~*", r"^Ab\z"]]),
    ({"name": "x", "string_match": {"prefix": "a.b"}}, [["http_x", "~~", r"^a\.b"]]),
    ({"name": "x", "string_match": {"suffix": "+1"}}, [["http_x", "~~", r"\+1\z"]]),
    ({"name": "x", "string_match": {"contains": "[v]"}}, [["http_x", "~~", r"\[v\]"]]),
    ({"name": "x", "string_match": {"safe_regex": {"regex": "v[12]"}}},
     [["http_x", "~~", r"\A(?:v[12])\z"]]),
    ({"name": "x", "exact_match": "v"}, [["http_x", "==", "v"]]),
    ({"name": "x", "safe_regex_match": {"regex": "a|b"}}, [["http_x", "~~", r"\A(?:a|b)\z"]]),
    ({"name": "x", "present_match": True}, [["http_x", "~~", ""]]),
    ({"name": "x"}, [["http_x", "~~", ""]]),
    ({"name": "x", "present_match": False}, [["http_x", "!", "~~", ""]]),
    ({"name": "x", "present_match": True, "invert_match": True}, [["http_x", "!", "~~", ""]]),
    ({"name": "x", "range_match": {"start": "-5", "end": "10"}},
     [["AND", ["http_x", "~~", r"^\s*[+-]?[0-9]+\s*\z"], ["http_x", ">=", -5],
       ["http_x", "<", 10]]]),
])
def test_header_matchers(h, expected):
    assert header(h) == expected


def test_inverted_header_requires_presence():
    # Envoy: a missing header fails even an inverted matcher; APISIX's `!` would pass.
    assert header({"name": "x", "string_match": {"exact": "v"}, "invert_match": True}) == [
        ["http_x", "~~", ""], ["http_x", "!", "==", "v"]]


def test_without_headers_treat_missing_as_empty():
    # Istio withoutHeaders: invert + treat_missing_header_as_empty -> missing matches.
    assert header({"name": "x", "string_match": {"exact": "v"}, "invert_match": True,
                   "treat_missing_header_as_empty": True}) == [["http_x", "!", "==", "v"]]
    # Missing header compared as "": prefix "" matches it, so the missing case is ORed in.
    assert header({"name": "x", "string_match": {"prefix": ""},
                   "treat_missing_header_as_empty": True}) == [
        ["OR", ["http_x", "!", "~~", ""], ["http_x", "~~", "^"]]]
    # exact "v" does not match "" -> a missing header still fails.
    assert header({"name": "x", "string_match": {"exact": "v"},
                   "treat_missing_header_as_empty": True}) == [["http_x", "==", "v"]]


def test_inverted_range():
    assert header({"name": "x", "range_match": {"start": "1", "end": "2"},
                   "invert_match": True}) == [
        ["http_x", "~~", ""],
        ["!AND", ["http_x", "~~", r"^\s*[+-]?[0-9]+\s*\z"], ["http_x", ">=", 1],
         ["http_x", "<", 2]]]


def test_never_matching_header_drops_route():
    tr = translate_rc(route_config(to_cluster({"prefix": "/", "headers": [
        {"name": "x", "present_match": False, "invert_match": True}]})))
    assert len(tr.objects) == 2  # inverted present_match:false is "present"
    tr = translate_rc(route_config(to_cluster({"prefix": "/", "headers": [
        {"name": ":method", "exact_match": "GET"}, {"name": ":method", "exact_match": "PUT"}]})))
    assert len(tr.objects) == 1  # only the 404 closer


def test_method_authority_scheme():
    obj = first_route(route_config(to_cluster({"prefix": "/", "headers": [
        {"name": ":method", "string_match": {"exact": "POST"}},
        {"name": ":authority", "string_match": {"prefix": "a.com"}},
        {"name": ":scheme", "string_match": {"exact": "https"}}]})))
    assert obj["methods"] == ["POST"]
    assert obj["vars"][1:] == [["http_host", "~~", r"^a\.com"], ["scheme", "==", "https"]]
    # a method APISIX cannot list stays a var
    obj = first_route(route_config(to_cluster({"prefix": "/", "headers": [
        {"name": ":method", "string_match": {"exact": "PROPFIND"}}]})))
    assert "methods" not in obj
    assert obj["vars"][1:] == [["request_method", "==", "PROPFIND"]]


def test_query_parameters():
    assert match_vars({"prefix": "/", "query_parameters": [
        {"name": "q", "string_match": {"exact": "1"}},
        {"name": "r", "string_match": {"prefix": "a"}},
        {"name": "s", "present_match": True}]}) == [
        ["arg_q", "==", "1"],
        ["arg_r", "~=", True], ["arg_r", "~~", "^a"],
        ["arg_s", "~=", None]]


@pytest.mark.parametrize("match, feature", [
    ({"prefix": "/", "dynamic_metadata": [{"filter": "f", "path": [{"key": "k"}],
                                           "value": {"string_match": {"exact": "v"}}}]},
     "route_dynamic_metadata"),
    ({"connect_matcher": {}}, "path_matcher"),
    ({"prefix": "/", "headers": [{"name": ":protocol", "present_match": True}]},
     "header_matcher"),
])
def test_unsupported_matchers_drop_route_with_skip(match, feature):
    tr = translate_rc(route_config(to_cluster(match)))
    assert len(tr.objects) == 1
    assert [s.feature for s in tr.skipped] == [feature]


def test_runtime_fraction_is_skipped_but_route_kept():
    tr = translate_rc(route_config(to_cluster({"prefix": "/", "runtime_fraction": {
        "default_value": {"numerator": 50}, "runtime_key": "k"}})))
    assert len(tr.objects) == 2
    assert [s.feature for s in tr.skipped] == ["route_runtime_fraction"]
