"""Envoy RedirectAction -> APISIX redirect plugin.

APISIX's redirect `uri` is a template (`$scheme`, `$http_host`, `$uri` expand), while its
`regex_uri` replacement is plain text with `$1` groups. A path rewritten by prefix or regex
therefore becomes a *relative* Location when scheme, host and port are kept (clients resolve
it against the request URL, which lands where Envoy's absolute Location does), or an
absolute one when they are all literal. `$uri` is nginx's decoded, normalized path.
"""

from __future__ import annotations

import re

from .model import InvalidResource, Skips
from .regex import pcre_literal, re2_to_pcre

# envoy.config.route.v3.RedirectAction.RedirectResponseCode
_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
# The redirect template parser drops backslashes and expands `$word` / `${word}`.
_UNSAFE_LITERAL = re.compile(r"\\|\$[0-9A-Za-z_{]")


def backrefs(replacement: str) -> str:
    """RE2 rewrite `\\1` -> ngx.re.sub `$1`; a literal `$` -> `$$`."""
    out = replacement.replace("$", "$$")
    return re.sub(r"\\(\d)", r"${\1}", out)


def redirect(rd, match, where: str, skips: Skips) -> dict | None:
    """APISIX redirect config, or None (with a Skip) when it cannot be expressed."""
    code = _CODES.get(rd.response_code)
    if code is None:
        raise InvalidResource(f"{where}: unknown redirect response_code {rd.response_code}")
    scheme_kind = rd.WhichOneof("scheme_rewrite_specifier")
    scheme = "https" if scheme_kind == "https_redirect" else (rd.scheme_redirect or None)
    if scheme is not None:
        scheme = scheme.lower()
    for lit in (scheme or "", rd.host_redirect, rd.path_redirect):
        if _UNSAFE_LITERAL.search(lit):
            skips.add("redirect", f"literal {lit!r} cannot be written in an APISIX redirect",
                      where)
            return None
    if rd.port_redirect:
        host = (rd.host_redirect or "$host") + f":{rd.port_redirect}"
    elif rd.host_redirect:
        host = rd.host_redirect
    else:
        # Envoy drops the original port when it changes the scheme.
        host = "$host" if scheme is not None else "$http_host"
    path_kind = rd.WhichOneof("path_rewrite_specifier")
    conf: dict = {"ret_code": code}
    if path_kind in ("prefix_rewrite", "regex_rewrite"):
        if path_kind == "prefix_rewrite":
            pattern, repl = prefix_pattern(match, rd.prefix_rewrite, where, skips)
            if pattern is None:
                return None
        else:
            pattern = re2_to_pcre(rd.regex_rewrite.pattern.regex, where)
            repl = backrefs(rd.regex_rewrite.substitution)
        absolute = scheme is not None or rd.host_redirect or rd.port_redirect
        if absolute:
            if scheme is None or not rd.host_redirect:
                skips.add("redirect", "a path rewrite with a scheme/host/port change needs "
                          "both scheme and host literal", where)
                return None
            repl = f"{scheme}://{host.replace('$', '$$')}" + repl
        conf["regex_uri"] = [pattern, repl]
    else:
        path = rd.path_redirect or "$uri"
        conf["uri"] = f"{scheme or '$scheme'}://{host}{path}"
        if "?" in rd.path_redirect:
            # Envoy: a query in path_redirect replaces the request's query.
            return conf
    if not rd.strip_query:
        conf["append_query_string"] = True
    return conf


def prefix_pattern(match, new_prefix: str, where: str, skips: Skips):
    """(regex, replacement) replacing the matched prefix (or the whole path of an exact or
    regex match)."""
    kind = match.WhichOneof("path_specifier")
    flags = "(?i)" if match.HasField("case_sensitive") and not match.case_sensitive.value else ""
    repl = new_prefix.replace("$", "$$")
    if kind == "prefix":
        return f"{flags}^{pcre_literal(match.prefix)}(.*)", repl + "$1"
    if kind == "path_separated_prefix":
        return f"{flags}^{pcre_literal(match.path_separated_prefix)}(.*)", repl + "$1"
    if kind == "path":
        return f"{flags}^{pcre_literal(match.path)}\\z", repl
    if kind == "safe_regex":
        # Envoy (RegexRouteEntryImpl) replaces the whole path; the query is kept.
        return "(?s)^.*", repl
    skips.add("prefix_rewrite", f"prefix_rewrite with a {kind} match is undefined", where)
    return None, None
