"""The values the translator hands back: translations, skips, hash policies, errors."""

from __future__ import annotations

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

    def merge(self, other: Translation) -> None:
        self.objects.update(other.objects)
        self.skipped.extend(other.skipped)


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
