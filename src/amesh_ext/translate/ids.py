"""APISIX ids for Envoy names: valid (`^[a-zA-Z0-9-_.]+$`, 1..64 chars), deterministic and
collision-free.

Escaped form: every byte of the UTF-8 name outside `[A-Za-z0-9.-]` (so `_` too) becomes
`_` + two lowercase hex digits; `outbound|80||a.ns` -> `outbound_7c80_7c_7ca.ns`. This is
injective, and in it `_` is always followed by two hex digits.

Hashed form, when the escaped form is too long (or empty): a readable prefix of it, `_z`,
and 20 hex digits (80 bits) of the SHA-256 of the whole escaped form. `z` is not a hex
digit, so no escaped form contains `_z` and the two forms never collide.

Route ids are `<route config part>_.<virtual host part>_.<route part>`; `_.` never occurs in
either form, so `route_key_prefix(rc)` = '/routes/<rc part>_.' is a prefix of exactly the
keys of that route config. Markers `_p<i>` (unnamed route at position i), `_d<n>` (n-th
repeat of a name), `_s<k>` (host selector k) and `_x` (the virtual host's closing 404 route)
use letters that are not hex digits either, so they cannot be confused with escapes.
"""

from __future__ import annotations

import functools
import hashlib
import re

MAX_ID = 64
_HASH_HEX = 20  # 80 bits
_SCOPE_MAX = 30  # route config / listener part of a scoped id
_SEP = "_."


_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9.\-]+")


def _escape_run(match: re.Match[str]) -> str:
    return "".join(f"_{byte:02x}" for byte in match.group().encode("utf-8", "surrogatepass"))


@functools.lru_cache(maxsize=1 << 16)
def escape(name: str) -> str:
    """The injective escaped form of a name (may be longer than an id allows).
    Cached: the same cluster names come back in every push and every route naming them."""
    return _UNSAFE_RUN.sub(_escape_run, name)


def compact(escaped: str, limit: int) -> str:
    """`escaped` itself if it fits `limit` (and is not empty), else the hashed form."""
    if 0 < len(escaped) <= limit:
        return escaped
    digest = hashlib.sha256(escaped.encode("ascii")).hexdigest()[:_HASH_HEX]
    keep = max(limit - 2 - _HASH_HEX, 0)
    head = escaped[:keep]
    # Do not end the readable head inside an escape: '_7' would look like a broken escape.
    cut = head.rfind("_")
    if cut >= 0 and cut > len(head) - 3:
        head = head[:cut]
    return f"{head}_z{digest}"


@functools.lru_cache(maxsize=1 << 16)
def upstream_id(cluster_name: str) -> str:
    """The APISIX upstream id of an Envoy cluster (cached like escape())."""
    return compact(escape(cluster_name), MAX_ID)


@functools.lru_cache(maxsize=1 << 10)
def _scope(name: str) -> str:
    """Cached: every route id of a route config (or listener) starts with it."""
    return compact(escape(name), _SCOPE_MAX) + _SEP


def scoped_id(scope: str, *parts: str) -> str:
    """An id inside `scope` (a route config or listener name); `parts` are already escaped
    or marker strings and are joined with the `_.` separator."""
    head = _scope(scope)
    return head + compact(_SEP.join(parts), MAX_ID - len(head))


def route_key_prefix(route_config_name: str) -> str:
    """The prefix shared by every key of one route config's routes."""
    return "/routes/" + _scope(route_config_name)


def stream_route_key_prefix(listener_name: str) -> str:
    """The prefix shared by every key of one listener's stream routes."""
    return "/stream_routes/" + _scope(listener_name)


class NameCounter:
    """Stable per-item keys within one list: the escaped name, `_d<n>` for the n-th repeat,
    `_p<i>` (position) for unnamed items."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def key(self, name: str, position: int) -> str:
        if not name:
            return f"_p{position}"
        n = self._seen.get(name, 0)
        self._seen[name] = n + 1
        return escape(name) if n == 0 else f"{escape(name)}_d{n}"
