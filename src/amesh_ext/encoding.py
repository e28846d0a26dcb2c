"""The one JSON encoding of APISIX objects: compact, sorted keys, so equal objects are equal
bytes (the sink diffs bytes) and translating twice is byte-identical."""

from __future__ import annotations

from typing import Any

import orjson


def to_json(obj: dict[str, Any]) -> bytes:
    # orjson returns bytes with spare capacity (kilobytes per object); amesh keeps every
    # object's JSON, so keep an exact-size copy (saves ~100 MB at 10,000 services).
    return memoryview(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).tobytes()
