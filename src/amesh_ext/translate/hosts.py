"""Virtual host domains -> APISIX host selectors (`hosts` plus host `vars`).

Envoy picks exactly one virtual host: exact domain, then suffix wildcards `*X` (longest
first), then prefix wildcards `X*` (longest first), then `*`. APISIX's radixtree_host_uri
router tries exact and suffix-wildcard `hosts` itself (longest first), then the routes
without hosts. So exact and `*X` domains become `hosts`; each `X*` domain becomes a host-less
selector with a regex on the host, ranked by length; `*` becomes a host-less selector
ranked last (see routes.py for the priority bands).

Ports: with `ignore_port_in_host_matching` (Istio since 1.16) Envoy cuts the request's port
and never the domain's, so a domain carrying a port can never match and is dropped. Without
it `a:80` matches only a request for `a:80` and `a` only a request without a port; APISIX's
`$host` has no port, so the port is checked on the raw `http_host` var.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .model import InvalidResource, Skips
from .regex import pcre_literal

# APISIX host_def: `^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$`
_APISIX_HOST = re.compile(r"\*|\*?[0-9a-zA-Z\-._\[\]:]+")
# A domain that is its own APISIX host (no wildcard, port, brackets or trailing dot): most
# are, and they need none of host_selectors' other checks.
_PLAIN_HOST = re.compile(r"[0-9a-z\-_.]*[0-9a-z\-_]")
# A request host without a port (IPv6 literals end in ']').
_NO_PORT = ["http_host", "!", "~~", r":[0-9]*\z"]


@dataclass
class HostSelector:
    """One way a request reaches a virtual host. `tag` distinguishes the route ids of the
    selectors of one virtual host; `band` ranks host-less selectors (None: has hosts)."""

    tag: str
    hosts: list[str] | None
    vars: list[list] = field(default_factory=list)
    band: tuple | None = None


def port_start(domain: str) -> int:
    """Index of the ':' that starts a port, -1 if none (a ':' inside [...] is not one)."""
    colon = domain.rfind(":")
    if colon < 0 or "]" in domain[colon:]:
        return -1
    return colon


def _wild_regex(domain: str) -> str:
    """PCRE for one domain against a raw host; a wildcard covers at least one character."""
    if domain.startswith("*"):
        return ".+" + pcre_literal(domain[1:])
    if domain.endswith("*"):
        return pcre_literal(domain[:-1]) + ".+"
    return pcre_literal(domain)


def check_domains(route_config, where: str) -> None:
    """Envoy rejects a RouteConfiguration with a duplicate domain (compared lowercased, per
    kind: exact, `*X`, `X*`), a second `*`, or a virtual host without domains."""
    lowered: list[str] = []
    for vh in route_config.virtual_hosts:
        domains = vh.domains
        if not domains:
            break
        lowered += map(str.lower, domains)
    else:
        if len(set(lowered)) == len(lowered):
            return  # the common case, decided without naming the culprits
    _raise_bad_domains(route_config, where)


def _raise_bad_domains(route_config, where: str) -> None:
    seen: dict[str, str] = {}
    for vh in route_config.virtual_hosts:
        if not vh.domains:
            raise InvalidResource(f"{where}: virtual host {vh.name!r} has no domains")
        for raw in vh.domains:
            d = raw.lower()
            if d in seen:
                what = "a second '*' virtual host" if d == "*" else f"duplicate domain {raw!r}"
                raise InvalidResource(
                    f"{where}: {what} in virtual hosts {seen[d]!r} and {vh.name!r}"
                )
            seen[d] = vh.name


def host_selectors(vh, ignore_port: bool, skips: Skips) -> list[HostSelector]:
    plain: list[str] = []
    ported: list[tuple[str, str]] = []  # (APISIX host, raw-host regex)
    prefix: list[str] = []
    any_host = False
    for raw in vh.domains:
        d = raw.lower()
        if _PLAIN_HOST.fullmatch(d):
            if d not in plain:
                plain.append(d)
            continue
        if d == "*":
            any_host = True
            continue
        if d.endswith("*") and not d.startswith("*"):
            prefix.append(d)
            continue
        p = port_start(d)
        if p >= 0 and ignore_port:
            continue  # never matches: Envoy strips the request's port, not the domain's
        # nginx's $host drops one trailing dot; Envoy keeps it (strip_trailing_host_dot).
        name = d[:p] if p >= 0 else d
        name = name[:-1] if name.endswith(".") and len(name) > 1 else name
        if not _APISIX_HOST.fullmatch(name) or name == "*":
            skips.add("virtual_host_domain", f"domain {raw!r} is not a valid APISIX host",
                      f"virtual host {vh.name!r}")
            continue
        if p >= 0:
            ported.append((name, _wild_regex(d)))
        elif name not in plain:
            plain.append(name)
    out: list[HostSelector] = []
    if plain:
        out.append(HostSelector("", plain, [] if ignore_port else [list(_NO_PORT)]))
    if ported:
        hosts = sorted({h for h, _ in ported})
        alts = "|".join(r for _, r in ported)
        out.append(HostSelector("_sp", hosts, [["http_host", "~*", f"^(?:{alts})\\z"]]))
    for k, d in enumerate(sorted(prefix, key=lambda s: (-len(s), s))):
        # `$host` is lowercased and port-less (what Envoy compares when ignoring ports);
        # without ignore_port Envoy compares the raw host, port included.
        var = ["host", "~~", "^" + _wild_regex(d)] if ignore_port else [
            "http_host", "~*", "^" + _wild_regex(d) + "\\z"]
        out.append(HostSelector(f"_sw{k}", None, [var], ("prefix", len(d), d)))
    if any_host:
        out.append(HostSelector("_sa", None, [], ("any",)))
    return out
