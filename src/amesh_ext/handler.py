"""What a config source (file, ADS) hands its resources to: the agent, as a source sees
it. Its own module so that the protocol packages (xds/, sources/) and the agent meet here
without importing each other."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from .resources import Resource


class ResourceHandler(Protocol):
    """The agent, as a source sees it."""

    def apply(
        self, type_url: str, upserts: Sequence[Resource], removed: Collection[str]
    ) -> dict[str, str]:
        """Apply one type's changes: `upserts` are new or changed resources, `removed`
        names that are gone. Returns {name: reason} for each rejected resource; a rejected
        resource keeps its last good version and everything else is applied."""
        ...

    def note_rejected(self, type_url: str, rejected: dict[str, str]) -> None:
        """Resources the source refused itself (undecodable, a name twice in one
        response): not applied, but listed with the handler's own rejections."""
        ...
