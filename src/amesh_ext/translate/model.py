"""The values the translator hands back: translations, skips, hash policies, errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class InvalidResource(ValueError):
    """The resource is bad as a whole (Envoy would reject it); the message names it and why."""


@dataclass(frozen=True)
class Skip:
    """A feature of one resource that APISIX cannot express; counted and logged by the agent."""

    feature: str
    resource: str
    detail: str


@dataclass
class Translation:
    """APISIX objects keyed '/upstreams/<id>', '/routes/<id>' or '/stream_routes/<id>'."""

    objects: dict[str, dict] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    # Objects already encoded as the dict stores them (JSON bytes): the route cache's
    # reused pieces. A key is in `objects` or here, never both.
    encoded: dict[str, bytes] = field(default_factory=dict)
    # Every question asked of the Clusters view and its answer ((kind, cluster) -> answer):
    # the translation is the same as long as the view gives the same answers.
    cluster_deps: dict[tuple[str, str], object] = field(default_factory=dict)

    def merge(self, other: Translation) -> None:
        self.objects.update(other.objects)
        self.encoded.update(other.encoded)
        self.skipped.extend(other.skipped)
        self.cluster_deps.update(other.cluster_deps)


class Clusters:
    """The clusters the agent holds, as route and listener translation see them.

    `known` maps each cluster name to the node a mirror copy goes to (`scheme://host:port`,
    None while the cluster has no endpoints); None means every cluster exists and none has
    a node (translation of a route configuration alone, in tests). Envoy answers 503 for a
    route to a cluster it does not have, so amesh must know which exist: a route naming an
    absent upstream makes APISIX answer 502 (500 in traffic-split). Each answer is recorded
    in `deps`, so the agent re-translates only what a cluster change can alter.
    """

    __slots__ = ("_known", "deps")

    def __init__(self, known: Mapping[str, str | None] | None = None) -> None:
        self._known = known
        self.deps: dict[tuple[str, str], object] = {}

    def exists(self, name: str) -> bool:
        return self._ask(("exists", name))  # type: ignore[return-value]

    def mirror_node(self, name: str) -> str | None:
        return self._ask(("mirror", name))  # type: ignore[return-value]

    def _ask(self, dep: tuple[str, str]) -> object:
        answer = self.deps[dep] = cluster_answer(self._known, dep)
        return answer


def cluster_answer(known: Mapping[str, str | None] | None, dep: tuple[str, str]) -> object:
    """What Clusters(known) answers today to a question recorded in Translation.cluster_deps:
    ("exists", name) -> bool, ("mirror", name) -> the mirror node or None."""
    kind, name = dep
    if kind == "exists":
        return known is None or name in known
    return known.get(name) if known is not None else None


@dataclass
class ListenerTranslation:
    """route_config_ports: every RDS (or inline) route config name the listener's HTTP
    connection managers use, mapped to the listener's port (None when it has none)."""

    route_config_ports: dict[str, int | None] = field(default_factory=dict)
    translation: Translation = field(default_factory=Translation)


@dataclass(frozen=True)
class HashPolicy:
    """What an APISIX `chash` upstream needs: `hash_on` (vars | header | cookie |
    vars_combinations) and `key` (a var name, header/cookie name, or `$a$b` template)."""

    hash_on: str
    key: str


class Skips:
    """Collects Skips for one resource, so helpers need not thread the name around."""

    __slots__ = ("items", "resource")

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.items: list[Skip] = []

    def add(self, feature: str, detail: str, where: str = "") -> None:
        if not where:
            resource = self.resource
        elif where.startswith(self.resource):  # already names the resource
            resource = where
        else:
            resource = f"{self.resource} {where}"
        self.items.append(Skip(feature, resource, detail))
