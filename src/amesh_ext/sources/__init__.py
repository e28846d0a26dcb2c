"""Config sources: where Envoy resources come from (a file tree, or an ADS server)."""

from __future__ import annotations

from typing import Any

from .base import ResourceHandler, Source


def make_source(url: str, xds: dict[str, Any], handler: ResourceHandler, limits: Any) -> Source:
    """The source for a start-config `source` URL."""
    if url.startswith("file://"):
        from .file import FileSource

        return FileSource(url[len("file://"):], handler, poll_interval=limits("file_poll_interval"))
    from .ads import AdsConfig, AdsSource

    return AdsSource(AdsConfig.from_mapping({**xds, "address": url}), handler)


__all__ = ["ResourceHandler", "Source", "make_source"]
