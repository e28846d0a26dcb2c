"""What every config source (file, ADS) talks to, and what the agent offers it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from ..resources import Resource


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


class Source(Protocol):
    """A config source runs on its own daemon thread and feeds a ResourceHandler."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the agent's status, with at least "kind" and
        "connected" (a live stream, or a readable file tree)."""
        ...
