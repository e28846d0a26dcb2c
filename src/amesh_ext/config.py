"""The start config: JSON given to amesh_start() (or amesh.json next to libxds.so).

Validated before the agent starts so that a bad config fails amesh_start() with a message
that names the field, instead of an agent that dies later in the background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SOURCE = "grpc://istiod.istio-system.svc:15010"

_TOP_LEVEL = {"source", "xds", "translate", "limits", "log_level"}
_LIMITS = {
    "file_poll_interval": (float, 0.5),  # seconds between checks of a file:// source
    "first_sync_quiet": (float, 0.02),  # first batch: a whole config, then this much quiet…
    "first_sync_max_wait": (float, 3.0),  # …but no longer than this after the first data
    "status_interval": (float, 0.25),  # seconds between status publications
    "resync_backoff_max": (float, 30.0),  # retry of a batch the dict refused
    "max_object_bytes": (float, 0),  # larger objects are rejected alone; 0: a quarter of the dict
    "status_max_rejected": (float, 50),  # rejected resources listed per type (all are counted)
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """An invalid start config; the message names the field."""


@dataclass(frozen=True)
class StartConfig:
    source: str = DEFAULT_SOURCE
    xds: dict[str, Any] = field(default_factory=dict)
    translate: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    log_level: str = "info"

    def limit(self, name: str) -> float:
        return self.limits.get(name, _LIMITS[name][1])


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"start config: '{where}' must be an object, got {type(value).__name__}")
    return value


def parse_start_config(text: str) -> StartConfig:
    """Parse and validate; raises ConfigError naming the offending field."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"start config is not valid JSON: {exc}") from exc
    raw = _mapping(raw, "(top level)")
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"start config: unknown field(s) {unknown}; known: {sorted(_TOP_LEVEL)}")
    source = raw.get("source", DEFAULT_SOURCE)
    if not isinstance(source, str) or not source.startswith(("file://", "grpc://", "grpcs://")):
        raise ConfigError(
            f"start config: 'source' must be file://PATH, grpc://HOST:PORT or grpcs://HOST:PORT,"
            f" got {source!r}"
        )
    limits = _mapping(raw.get("limits", {}), "limits")
    for name, value in limits.items():
        if name not in _LIMITS:
            raise ConfigError(
                f"start config: unknown limit 'limits.{name}'; known: {sorted(_LIMITS)}"
            )
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"start config: 'limits.{name}' must be a positive number")
    log_level = raw.get("log_level", "info")
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"start config: 'log_level' must be one of {_LOG_LEVELS}")
    return StartConfig(
        source=source,
        xds=_mapping(raw.get("xds", {}), "xds"),
        translate=_mapping(raw.get("translate", {}), "translate"),
        limits={k: float(v) for k, v in limits.items()},
        log_level=log_level,
    )
