"""Incremental translation of a RouteConfiguration, virtual host by virtual host.

istiod re-sends a whole RouteConfiguration (thousands of virtual hosts) when one service
changes. A virtual host's APISIX routes depend only on the route configuration's own
settings, the listener port and the virtual host itself, with two exceptions that this
module keeps whole: host-less virtual hosts (`*` and `X*` domains), whose priorities are
banded against each other, travel together as one piece; and a route configuration whose
virtual host names are empty or repeated (their ids then depend on position) is translated
in one go. Pieces whose bytes did not change reuse their last translation, so a push that
adds one service costs one virtual host, not ten thousand. Kept pieces hold their objects
already encoded (encoding.to_json): the same bytes the agent and the sink keep, so the
cache costs no second copy and reused objects are not encoded again. The result equals
translate_route_configuration() of the whole, encoded (tests/test_route_pieces.py). A piece
also depends on the clusters its routes name (which exist, their mirror nodes): it is reused
only while the agent's clusters give the answers recorded in its cluster_deps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import translate as tr
from ..encoding import to_json


def _hostless(vh: Any) -> bool:
    return any(d == "*" or (d.endswith("*") and not d.startswith("*")) for d in vh.domains)


def _pieces(rc: Any) -> list[tuple[bytes, list[Any]]] | None:
    """(identity, virtual hosts) per piece, or None when the hosts are not independent."""
    names = [vh.name for vh in rc.virtual_hosts]
    if "" in names or len(set(names)) != len(names):
        return None
    pieces: list[tuple[bytes, list[Any]]] = []
    hostless: list[Any] = []
    for vh in rc.virtual_hosts:
        if _hostless(vh):
            hostless.append(vh)
        else:
            pieces.append((vh.SerializeToString(deterministic=True), [vh]))
    if hostless:
        identity = b"\0hostless\0" + b"\0".join(
            vh.SerializeToString(deterministic=True) for vh in hostless)
        pieces.append((identity, hostless))
    return pieces


class RouteConfigTranslator:
    """One route configuration's translation, kept per piece between pushes."""

    def __init__(self) -> None:
        self._context: bytes | None = None
        self._done: dict[bytes, tr.Translation] = {}

    def translate(self, rc: Any, port: int | None, options: tr.TranslateOptions,
                  clusters: Mapping[str, str | None] | None = None) -> tr.Translation:
        """The route configuration's objects (in `encoded` when they come from pieces);
        `clusters` as tr.Clusters takes it."""
        pieces = _pieces(rc)
        if pieces is None:
            self._context, self._done = None, {}
            return tr.translate_route_configuration(rc, port, options, tr.Clusters(clusters))
        tr.check_route_domains(rc, f"RouteConfiguration {rc.name!r}")  # across pieces
        settings = type(rc)()
        settings.CopyFrom(rc)
        settings.ClearField("virtual_hosts")
        context = settings.SerializeToString(deterministic=True) + repr((port, options)).encode()
        if context != self._context:
            self._context, self._done = context, {}
        done: dict[bytes, tr.Translation] = {}
        out = tr.Translation()
        seen_skips: set[tuple[str, str, str]] = set()
        for identity, vhosts in pieces:
            piece = done.get(identity) or self._done.get(identity)
            if piece is not None and any(tr.cluster_answer(clusters, dep) != answer
                                         for dep, answer in piece.cluster_deps.items()):
                piece = None
            if piece is None:
                partial = type(rc)()
                partial.CopyFrom(settings)
                partial.virtual_hosts.extend(vhosts)
                piece = tr.translate_route_configuration(partial, port, options,
                                                         tr.Clusters(clusters))
                piece.encoded = {k: to_json(v) for k, v in piece.objects.items()}
                piece.objects = {}
            done[identity] = piece
            out.encoded.update(piece.encoded)
            out.cluster_deps.update(piece.cluster_deps)
            for skip in piece.skipped:  # route-config-level skips come with every piece
                mark = (skip.feature, skip.resource, skip.detail)
                if mark not in seen_skips:
                    seen_skips.add(mark)
                    out.skipped.append(skip)
        self._done = done
        return out
