"""Envoy RouteMatch -> APISIX `methods` + `vars` (lua-resty-expr), per route-selection.md §4.

Semantics kept (Envoy's, see HeaderUtility::matchHeaders):
- paths are matched in `vars` on `uri` (every route of a virtual host shares uri "/*");
- a missing header fails a matcher, even an inverted one, unless `treat_missing_header_as_empty`
  (then the matcher sees "") or it is `present_match: false` / inverted `present_match: true`.
  APISIX's `!` is true for a missing var, so the missing case is spelled out explicitly;
- literal values are PCRE-escaped, regexes are full matches (`\\A(?:R)\\z`).
Known differences (documented, not fixable here): nginx decodes `%XX` and merges `//` in
`uri`; a repeated header is one var joined with ", " (Envoy matches any one value); query
values are decoded in APISIX and raw in Envoy; a bare `?q` is boolean `true` in APISIX
("" in Envoy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import InvalidResource, Skips
from .regex import full_match, matches_empty, pcre_literal

APISIX_METHODS = frozenset(
    ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE")
)
_PSEUDO_VARS = {":authority": "http_host", ":scheme": "scheme", ":method": "request_method",
                ":path": "request_uri"}
_INT64 = r"^\s*[+-]?[0-9]+\s*\z"


@dataclass
class MatchResult:
    methods: list[str] | None = None
    vars: list[list] = field(default_factory=list)
    never: bool = False  # the route can never match (Envoy would never pick it either)


def _present(var: str) -> list:
    return [var, "~~", ""]


def _absent(var: str) -> list:
    return [var, "!", "~~", ""]


def _string_op(sm, var: str, where: str, skips: Skips) -> tuple[list | None, object]:
    """(APISIX expression true iff a *present* value matches, predicate on "" for
    treat_missing_header_as_empty) for an envoy.type.matcher.v3.StringMatcher."""
    kind = sm.WhichOneof("match_pattern")
    icase = sm.ignore_case and kind != "safe_regex"
    op = "~*" if icase else "~~"
    if kind == "exact":
        if icase:
            return [var, op, f"^{pcre_literal(sm.exact)}\\z"], sm.exact == ""
        return [var, "==", sm.exact], sm.exact == ""
    if kind == "prefix":
        return [var, op, "^" + pcre_literal(sm.prefix)], sm.prefix == ""
    if kind == "suffix":
        return [var, op, pcre_literal(sm.suffix) + "\\z"], sm.suffix == ""
    if kind == "contains":
        return [var, op, pcre_literal(sm.contains)], sm.contains == ""
    if kind == "safe_regex":
        pattern = full_match(sm.safe_regex.regex, where)
        return [var, "~~", pattern], matches_empty(sm.safe_regex.regex, where)
    skips.add("string_matcher", f"{kind or 'unset'} string matcher on {var!r}", where)
    return None, False


def _negate(expr: list) -> list:
    if expr and expr[0] in ("AND", "OR"):
        return ["!" + expr[0], *expr[1:]]
    return [expr[0], "!", *expr[1:]]


def _header_var(name: str) -> str | None:
    name = name.lower()
    if name.startswith(":"):
        return _PSEUDO_VARS.get(name)
    return "http_" + name.replace("-", "_")


def _header(hm, res: MatchResult, where: str, skips: Skips) -> bool:
    """Add one HeaderMatcher to `res`; False if the route must be dropped."""
    var = _header_var(hm.name)
    if var is None:
        skips.add("header_matcher", f"pseudo-header {hm.name!r} cannot be matched", where)
        return False
    kind = hm.WhichOneof("header_match_specifier")
    invert = hm.invert_match
    sm = None
    if kind == "string_match":
        sm = hm.string_match
    elif kind in ("exact_match", "prefix_match", "suffix_match", "contains_match"):
        from envoy.type.matcher.v3.string_pb2 import StringMatcher

        value = getattr(hm, kind)
        if kind == "exact_match" and value == "":
            kind = None  # the deprecated exact_match "" matches any present value
        else:
            sm = StringMatcher(**{kind[: -len("_match")]: value})
    elif kind == "safe_regex_match":
        from envoy.type.matcher.v3.string_pb2 import StringMatcher

        sm = StringMatcher(safe_regex=hm.safe_regex_match)

    if sm is None and kind != "range_match":
        # Presence (present_match, or no specifier at all, which Envoy treats as present).
        want = hm.present_match if kind == "present_match" else True
        on_present = want != invert
        if hm.treat_missing_header_as_empty:
            on_missing = on_present
        else:
            on_missing = kind == "present_match" and (want if invert else not want)
        if on_present and on_missing:
            return True
        if not on_present and not on_missing:
            res.never = True
            return True
        res.vars.append(_present(var) if on_present else _absent(var))
        return True

    if kind == "range_match":
        r = hm.range_match
        expr: list | None = ["AND", [var, "~~", _INT64], [var, ">=", r.start], [var, "<", r.end]]
        empty_ok = False
    else:
        expr, empty_ok = _string_op(sm, var, where, skips)
        if expr is None:
            return False
    if var == "request_method" and not invert and expr[1] == "==" and expr[2] in APISIX_METHODS:
        res.methods = [expr[2]] if res.methods is None else [
            m for m in res.methods if m == expr[2]]
        if not res.methods:
            res.never = True
        return True
    on_missing = (empty_ok != invert) if hm.treat_missing_header_as_empty else False
    if not invert:
        # A positive operator is false on a missing var.
        res.vars.append(["OR", _absent(var), expr] if on_missing else expr)
    else:
        neg = _negate(expr)  # true on a missing var
        if on_missing:
            res.vars.append(neg)
        else:
            res.vars.extend([_present(var), neg])
    return True


def _query(qm, res: MatchResult, where: str, skips: Skips) -> bool:
    var = "arg_" + qm.name
    kind = qm.WhichOneof("query_parameter_match_specifier")
    if kind == "present_match" or kind is None:
        if kind is None or qm.present_match:
            # JSON null is ngx.null, which lua-resty-expr compares as nil: "is set".
            res.vars.append([var, "~=", None])
        else:
            res.never = True  # present_match: false is rejected by Envoy's PGV (const true)
        return True
    expr, _ = _string_op(qm.string_match, var, where, skips)
    if expr is None:
        return False
    if expr[1] in ("~~", "~*"):
        # A bare `?q` is boolean true in APISIX and ngx.re.find would raise on it.
        res.vars.append([var, "~=", True])
    res.vars.append(expr)
    return True


def _path(match, res: MatchResult, where: str, skips: Skips) -> bool:
    kind = match.WhichOneof("path_specifier")
    if kind == "prefix" and match.prefix in ("", "/"):
        return True  # every path starts with "/"
    icase = match.HasField("case_sensitive") and not match.case_sensitive.value
    op = "~*" if icase else "~~"
    if kind == "prefix":
        res.vars.append(["uri", op, "^" + pcre_literal(match.prefix)])
    elif kind == "path":
        if icase:
            res.vars.append(["uri", op, f"^{pcre_literal(match.path)}\\z"])
        else:
            res.vars.append(["uri", "==", match.path])
    elif kind == "path_separated_prefix":
        p = match.path_separated_prefix
        if not p.startswith("/") or p.endswith("/") or "?" in p or "#" in p:
            raise InvalidResource(f"{where}: invalid path_separated_prefix {p!r}")
        res.vars.append(["uri", op, f"^{pcre_literal(p)}(?:/|\\z)"])
    elif kind == "safe_regex":
        # case_sensitive does not apply to safe_regex in Envoy.
        res.vars.append(["uri", "~~", full_match(match.safe_regex.regex, where)])
    elif kind is None:
        raise InvalidResource(f"{where}: route match has no path specifier")
    else:
        skips.add("path_matcher", f"{kind} cannot be expressed; route dropped", where)
        return False
    return True


def translate_match(match, where: str, skips: Skips) -> MatchResult | None:
    """The APISIX match of an Envoy RouteMatch; None drops the route (a Skip says why)."""
    res = MatchResult()
    if not _path(match, res, where, skips):
        return None
    if len(match.ListFields()) == 1:
        return res  # the path specifier alone (most routes): one call instead of seven
    if match.HasField("runtime_fraction"):
        skips.add("route_runtime_fraction",
                  "runtime_fraction ignored: the route always matches", where)
    for name, matchers in (("dynamic_metadata", match.dynamic_metadata),
                           ("filter_state", match.filter_state)):
        if matchers:
            skips.add(f"route_{name}", f"{name} matchers cannot be evaluated; route dropped",
                      where)
            return None
    if match.HasField("tls_context"):
        skips.add("route_tls_context", "tls_context matcher cannot be evaluated; route dropped",
                  where)
        return None
    if match.HasField("grpc"):
        res.vars.append(["http_content_type", "~~", r"^application/grpc(?:\+|\z)"])
    for hm in match.headers:
        if not _header(hm, res, where, skips):
            return None
    for qm in match.query_parameters:
        if not _query(qm, res, where, skips):
            return None
    return res
