"""What APISIX would do with a request, computed from amesh's objects (test-only).

A small model of APISIX's documented behaviour (route-selection.md §3; apache/apisix
`radixtree_host_uri`, lua-resty-radixtree, lua-resty-expr, and the plugins amesh emits),
used by the differential test against Envoy:

- route selection: `$host` (lowercased, no port, no trailing dot) picks host sub-routers,
  exact host first, then `*X` hosts longest first, then routes without hosts; a miss falls
  through. Inside one: exact uris, then prefix keys longest first; within a key the highest
  (priority, uri length) whose methods and vars pass. Two passing routes that tie there are
  ordered by the dict (undefined): reported as `Ambiguous`, never guessed.
- plugins in APISIX's order: fault-injection (rewrite, 11000), cors (4000), proxy-rewrite
  (1008), redirect (900), traffic-split (access), response-rewrite (header filter).
- upstream: the nodes of the highest priority (all healthy); a request may reach any.

`decide()` returns every possible Outcome with its probability (traffic-split weights,
fault percentages).
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Any

from peers.backends import RESPONSE_HEADERS

# Request and response headers whose values the comparison looks at (None: not observed).
TRACKED_REQUEST = ("x-set", "x-add", "x-remove", "x-dest")
TRACKED_RESPONSE = ("x-resp-set", "x-resp-add", "x-resp-remove", "access-control-allow-origin")
_LOGIC = ("AND", "OR", "!AND", "!OR")


class Ambiguous(AssertionError):
    """APISIX's choice depends on the shared dict's key order (undefined)."""


@dataclass(frozen=True)
class Request:
    method: str
    port: int  # the listener port (APISIX's server_port)
    host: str  # raw Host header, may carry a port
    path: str  # raw request target, with the query
    headers: tuple[tuple[str, str], ...] = ()  # in order; a name may repeat
    remote_addr: str = "127.0.0.1"

    @property
    def query(self) -> str | None:
        return self.path.split("?", 1)[1] if "?" in self.path else None

    def header_values(self, name: str) -> list[str]:
        """The values of a header as nginx reads them: the whitespace around each stripped."""
        name = name.lower()
        return [v.strip(" \t") for k, v in self.headers if k.lower() == name]


@dataclass(frozen=True)
class Outcome:
    """A local reply (`backends` empty) or a proxied request. For a proxied one, `path`,
    `host` and the tracked headers are what the backend receives; None fields are not
    compared (e.g. the body of a reply whose body APISIX and Envoy word differently)."""

    status: int = 200
    backends: frozenset[str] = frozenset()
    path: str | None = None
    host: str | None = None
    headers: tuple | None = None  # ((name, (values...)), ...) for TRACKED_REQUEST
    response_headers: tuple | None = None  # ((name, value | None), ...) TRACKED_RESPONSE
    location: str | None = None
    body: str | None = None
    delayed: bool = False
    via: str = field(default="", compare=False)  # the route (and upstream) that decided


def matches(observed: Outcome, expected: Outcome) -> bool:
    """An observed outcome (one backend) is one the expected outcome allows."""
    if observed.status != expected.status or observed.delayed != expected.delayed:
        return False
    proxied = expected.backends or observed.backends
    if proxied and not (observed.backends and observed.backends <= expected.backends):
        return False
    if observed.location != expected.location:
        return False
    return all(
        getattr(expected, f) is None or getattr(observed, f) == getattr(expected, f)
        for f in ("path", "host", "headers", "response_headers", "body")
    )


# --------------------------------------------------------------------------- variables


def pcre(pattern: str, icase: bool = False) -> re.Pattern:
    """Python's equivalent of the PCRE subset amesh emits."""
    py = pattern.replace("\\z", "\\Z").replace("(?<", "(?P<").replace("(?P<=", "(?<=")
    return re.compile(py.replace("(?P<!", "(?<!"), re.I if icase else 0)


def normalize_uri(path: str) -> str:
    """nginx's `$uri`: no query, percent-decoded, `//` merged, dot segments resolved."""
    raw = urllib.parse.unquote(path.split("?", 1)[0])
    merged = re.sub("/{2,}", "/", raw)
    out = posixpath.normpath(merged)
    if merged.endswith("/") and out != "/":
        out += "/"
    return out


def _args(query: str | None) -> dict[str, Any]:
    """ngx.req.get_uri_args: decoded values, first one wins here, a bare key is true."""
    out: dict[str, Any] = {}
    for part in (query or "").split("&"):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = urllib.parse.unquote_plus(key)
        if key not in out:
            out[key] = urllib.parse.unquote_plus(value) if eq else True
    return out


def host_of(raw: str) -> str:
    """nginx's `$host` from a Host header."""
    h = raw.lower()
    if h.startswith("["):
        h = h[: h.find("]") + 1]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h[:-1] if h.endswith(".") and len(h) > 1 else h


class Vars:
    """ctx.var of one request."""

    def __init__(self, req: Request, uri: str | None = None) -> None:
        self.req = req
        self.uri = uri if uri is not None else normalize_uri(req.path)
        self.args = _args(req.query)

    def get(self, name: str) -> Any:
        req = self.req
        fixed = {
            "uri": self.uri, "host": host_of(req.host), "server_port": str(req.port),
            "request_method": req.method, "scheme": "http", "remote_addr": req.remote_addr,
            "http_host": req.host,
            "request_uri": self.uri + (f"?{req.query}" if req.query is not None else ""),
            "real_request_uri": req.path,  # init.lua keeps the raw one here
        }
        if name in fixed:
            return fixed[name]
        if name.startswith("http_"):
            want = name[5:]
            # nginx (as HTTP says) strips the whitespace around a header value.
            values = [v.strip(" \t") for k, v in req.headers
                      if k.lower().replace("-", "_") == want]
            return ", ".join(values) if values else None  # nginx >= 1.23 joins with ", "
        if name.startswith("arg_"):
            return self.args.get(name[4:])
        if name.startswith("cookie_"):
            for header in req.header_values("cookie"):
                for part in header.split(";"):
                    k, _, v = part.strip().partition("=")
                    if k == name[7:]:
                        return v
            return None
        return None


def resolve_var(template: str, v: Vars) -> str:
    """core.utils.resolve_var: `$name`, `${name}`, `${name??default}` (not after `\\`)."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        value = v.get(name)
        if value is None:
            return m.group(2) if m.group(2) is not None else ""
        return str(value)

    return re.sub(r"(?<!\\)\$(?:\{(\w+)(?:\?\?([^}]*))?\}|(\w+))", sub, template)


# --------------------------------------------------------------------------- lua-resty-expr


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    try:
        return float(int(text, 16)) if text.lower().startswith(("0x", "-0x")) else float(text)
    except ValueError:
        return None


def _compare(left: Any, op: str, right: Any) -> bool:
    if op in ("==", "~="):
        if isinstance(right, (int, float)) and not isinstance(right, bool):
            equal = _number(left) == float(right)
        else:
            equal = left == right
        return equal if op == "==" else not equal
    if op in (">", ">=", "<", "<="):
        a, b = _number(left), _number(right)
        if a is None or b is None:
            return False
        return {">": a > b, ">=": a >= b, "<": a < b, "<=": a <= b}[op]
    if op in ("~~", "~*"):
        # A non-string (missing var, bare `?q`) never matches.
        return isinstance(left, str) and pcre(right, op == "~*").search(left) is not None
    if op == "in":
        return left is not None and left in right
    if op == "has":
        return isinstance(left, list) and right in left
    raise ValueError(f"operator {op!r} not modelled")


def eval_expr(expr: list, v: Vars) -> bool:
    if isinstance(expr[0], list):  # a list of expressions: AND
        return all(eval_expr(e, v) for e in expr)
    if isinstance(expr[0], str) and expr[0] in _LOGIC:
        results = [eval_expr(e, v) for e in expr[1:]]
        result = all(results) if expr[0].endswith("AND") else any(results)
        return not result if expr[0].startswith("!") else result
    if len(expr) == 4:
        return not _compare(v.get(expr[0]), expr[2], expr[3])
    return _compare(v.get(expr[0]), expr[1], expr[2])


def _vars_pass(vars_: list | None, v: Vars) -> bool:
    return not vars_ or all(eval_expr(e, v) for e in vars_)


def _any_vars(rule_sets: list | None, v: Vars) -> bool:
    """Plugin `vars` (fault-injection) / traffic-split `match`: any set of ANDed exprs."""
    return not rule_sets or any(_vars_pass(s, v) for s in rule_sets)


# --------------------------------------------------------------------------- routing


def _route_passes(route: dict, v: Vars) -> bool:
    if route.get("status", 1) == 0:
        return False
    if "methods" in route and v.req.method not in route["methods"]:
        return False
    return _vars_pass(route.get("vars"), v)


def _match_uri(routes: list[dict], v: Vars) -> dict | None:
    uri = v.uri
    exact = [r for r in routes if "*" not in r["uri"] and r["uri"] == uri]
    groups: dict[str, list[dict]] = {}
    for r in routes:
        if "*" in r["uri"]:
            # The radix key is the uri up to its first `*`; only trailing `*`s are emitted.
            key = r["uri"].split("*", 1)[0]
            if uri.startswith(key):
                groups.setdefault(key, []).append(r)
    for candidates in [exact] + [groups[k] for k in sorted(groups, key=len, reverse=True)]:
        passing = [r for r in candidates if _route_passes(r, v)]
        if not passing:
            continue
        best = max((r.get("priority", 0), len(r["uri"])) for r in passing)
        top = [r for r in passing if (r.get("priority", 0), len(r["uri"])) == best]
        if len(top) > 1:
            raise Ambiguous(f"{[r['id'] for r in top]} tie for {v.req}")
        return top[0]
    return None


def select_route(routes: list[dict], v: Vars) -> dict | None:
    host = v.get("host")
    by_host: dict[str, list[dict]] = {}
    hostless: list[dict] = []
    for r in routes:
        hosts = r.get("hosts") or ([r["host"]] if "host" in r else [])
        for h in hosts:
            by_host.setdefault(h, []).append(r)
        if not hosts:
            hostless.append(r)
    order = [host] if host in by_host else []
    wild = [h for h in by_host if h.startswith("*") and host.endswith(h[1:])]
    order += sorted(wild, key=len, reverse=True)
    for h in order:
        route = _match_uri(by_host[h], v)
        if route is not None:
            return route
    return _match_uri(hostless, v)


# --------------------------------------------------------------------------- plugins


class Apisix:
    """The objects of one translation ('/routes/<id>' ... -> object)."""

    def __init__(self, objects: dict[str, dict]) -> None:
        self.routes = [o for k, o in objects.items() if k.startswith("/routes/")]
        self.upstreams = {o["id"]: o for k, o in objects.items() if k.startswith("/upstreams/")}
        self.stream_routes = [o for k, o in objects.items() if k.startswith("/stream_routes/")]

    def backends(self, upstream_id: str) -> frozenset[str]:
        nodes = [n for n in self.upstreams[upstream_id]["nodes"] if n["weight"] > 0]
        if not nodes:
            return frozenset()
        top = max(n.get("priority", 0) for n in nodes)
        # Nodes named by DNS (STRICT_DNS clusters) resolve on loopback here.
        return frozenset(f"{'127.0.0.1' if n['host'] == 'localhost' else n['host']}:{n['port']}"
                         for n in nodes if n.get("priority", 0) == top)

    def decide_stream(self, port: int) -> list[tuple[Outcome, float]]:
        for sr in self.stream_routes:
            if sr.get("server_port") == port:
                return [(Outcome(backends=self.backends(sr["upstream_id"]), via=sr["id"]), 1.0)]
        return []

    def decide(self, req: Request) -> list[tuple[Outcome, float]]:
        """Every possible outcome of `req` with its probability."""
        v = Vars(req)
        route = select_route(self.routes, v)
        if route is None:
            return [(Outcome(status=404, via="no route"), 1.0)]
        plugins = route.get("plugins", {})
        fi = plugins.get("fault-injection", {})
        delay, abort = fi.get("delay"), fi.get("abort")
        # Sampling is `random(1,100) <= percentage`; no percentage is 100%.
        p_delay = delay.get("percentage", 100) / 100 if delay and _any_vars(
            delay.get("vars"), v) else 0.0
        p_abort = abort.get("percentage", 100) / 100 if abort and _any_vars(
            abort.get("vars"), v) else 0.0
        after = self._after_fault(route, plugins, req, v) if p_abort < 1 else []
        out: list[tuple[Outcome, float]] = []
        for delayed, p_d in ((True, p_delay), (False, 1 - p_delay)):
            if p_d <= 0:
                continue
            if p_abort > 0:
                body = abort.get("body")
                out.append((Outcome(status=abort["http_status"], delayed=delayed,
                                    body=resolve_var(body, v) if body is not None else None,
                                    via=route["id"]), p_d * p_abort))
            out += [(replace(o, delayed=delayed), p_d * (1 - p_abort) * p) for o, p in after]
        return out

    def _after_fault(self, route: dict, plugins: dict, req: Request,
                     v: Vars) -> list[tuple[Outcome, float]]:
        cors = plugins.get("cors")
        acao = None
        origin = (req.header_values("origin") or [None])[0]
        if cors and origin is not None and any(
                pcre(rx).search(origin) for rx in cors.get("allow_origins_by_regex", [])):
            acao = origin
        if cors and req.method == "OPTIONS":
            return [(Outcome(status=200, response_headers=_response_headers({}, {}, acao),
                             via=route["id"]), 1.0)]
        rewrite = plugins.get("proxy-rewrite", {})
        if not _runs(rewrite, v):
            rewrite = {}
        redirect = plugins.get("redirect")
        if redirect:
            return [(Outcome(status=redirect.get("ret_code", 302),
                             location=_location(redirect, v), via=route["id"]), 1.0)]
        path, host, headers = _proxy_rewrite(rewrite, req, v)
        resp = _response_headers(plugins.get("response-rewrite", {}).get("headers", {}),
                                 RESPONSE_HEADERS, acao)
        targets = _split(route, plugins.get("traffic-split"), v)
        return [(self._proxied(up, path, host, headers, resp, f"{route['id']} -> {up}"), p)
                for up, p in targets]

    def _proxied(self, up: str, path: str, host: str, headers: tuple, resp: tuple,
                 via: str) -> Outcome:
        backends = self.backends(up)
        if not backends:
            # upstream.lua: "no valid upstream node" (503) before any balancing.
            return Outcome(status=503, via=via)
        return Outcome(backends=backends, path=path, host=host, headers=headers,
                       response_headers=resp, via=via)


def _runs(conf: dict, v: Vars) -> bool:
    """A plugin's `_meta.filter` (vars) lets it run (plugin.lua meta_filter)."""
    return _vars_pass(conf.get("_meta", {}).get("filter"), v)


def _split(route: dict, conf: dict | None, v: Vars) -> list[tuple[str, float]]:
    if conf:
        for rule in conf.get("rules", []):
            # `match` is a list of {vars} ORed; a rule without one always applies.
            if "match" in rule and not any(_vars_pass(m.get("vars"), v)
                                           for m in rule["match"]):
                continue
            total = sum(u.get("weight", 1) for u in rule["weighted_upstreams"])
            return [(u.get("upstream_id", route.get("upstream_id")), u.get("weight", 1) / total)
                    for u in rule["weighted_upstreams"] if u.get("weight", 1) > 0]
    return [(route["upstream_id"], 1.0)]


def _location(conf: dict, v: Vars) -> str:
    if "regex_uri" in conf:
        pattern, repl = conf["regex_uri"]
        new = _ngx_sub(v.uri, pattern, repl)
    else:
        new = resolve_var(conf["uri"], v)
    if conf.get("append_query_string") and v.req.query:
        new += ("&" if "?" in new else "?") + v.req.query
    return new


def _ngx_sub(subject: str, pattern: str, repl: str) -> str:
    """ngx.re.sub: the first match only; `$1`/`${1}` groups, `$$` a dollar."""
    m = pcre(pattern).search(subject)
    if m is None:
        return subject

    def group(g: re.Match) -> str:
        if g.group(0) == "$$":
            return "$"
        return m.group(int(g.group(1) or g.group(2))) or ""

    text = re.sub(r"\$\$|\$\{(\d+)\}|\$(\d)", group, repl)
    return subject[: m.start()] + text + subject[m.end():]


# ngx_escape_uri(NGX_ESCAPE_URI), APISIX's uri_safe_encode: space, `#`, `%`, `?`, controls
# and bytes >= 0x7f.
_UNSAFE_URI_BYTE = frozenset(b" #%?") | frozenset(range(0x20)) | frozenset(range(0x7f, 0x100))


def uri_safe_encode(uri: str) -> str:
    return "".join(f"%{b:02X}" if b in _UNSAFE_URI_BYTE else chr(b)
                   for b in uri.encode("utf-8", "surrogateescape"))


def _proxy_rewrite(conf: dict, req: Request, v: Vars) -> tuple[str, str, tuple]:
    """What the upstream gets. Without proxy-rewrite APISIX forwards the raw request
    target; with it, uri_safe_encode of the (rewritten) normalised `$uri` plus the args."""
    if not conf:
        path = req.path
    else:
        uri = v.uri
        if "regex_uri" in conf:
            uri = _ngx_sub(uri, *conf["regex_uri"])
        elif "uri" in conf:
            uri = resolve_var(conf["uri"], v)
        path = uri_safe_encode(uri) + (f"?{req.query}" if req.query is not None else "")
    host = conf.get("host", req.host)
    values = {n: req.header_values(n) for n in TRACKED_REQUEST}
    hdrs = conf.get("headers", {})
    for name, value in hdrs.get("add", {}).items():
        if name in values:
            values[name] += [resolve_var(x, v) for x in _as_list(value)]
    for name, value in hdrs.get("set", {}).items():
        if name in values:
            values[name] = [resolve_var(x, v) for x in _as_list(value)]
    for name in hdrs.get("remove", []):
        if name in values:
            values[name] = []
    return path, host, tuple((n, tuple(values[n])) for n in TRACKED_REQUEST)


def _as_list(value: Any) -> list[str]:
    return list(value) if isinstance(value, list) else [value]


def _response_headers(conf: dict, base: dict[str, str], acao: str | None) -> tuple:
    """Tracked response headers: `base` (what the backend sent) after response-rewrite's
    add, set, remove, and the CORS origin header."""
    have: dict[str, str | None] = {n: base.get(n) for n in TRACKED_RESPONSE}
    for line in conf.get("add", []):
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name in have:
            have[name] = value if have[name] is None else f"{have[name]},{value}"
    for name, value in conf.get("set", {}).items():
        if name in have:
            have[name] = value
    for name in conf.get("remove", []):
        if name in have:
            have[name] = None
    have["access-control-allow-origin"] = acao
    return tuple(have.items())
