"""What every config source (file, ADS) talks to, and what the agent offers it."""

from __future__ import annotations

from typing import Any, Protocol

from ..handler import ResourceHandler

__all__ = ["ResourceHandler", "Source"]


class Source(Protocol):
    """A config source runs on its own daemon thread and feeds a ResourceHandler."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the agent's status, with at least "kind" and
        "connected" (a live stream, or a readable file tree)."""
        ...
