"""The dict protocol's keys and encodings (docs/dict-protocol.md), on the agent's side.

The values are defined in include/amesh.h; lua/amesh/abi.lua carries them too, and
tests/test_abi.py checks the three agree. `apply_batch` is the protocol's reference
writer: what the Lua consumer and the C writer do to a dict, in Python, for tests and for
`amesh translate`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, MutableMapping

KEY_SENTINEL = "amesh:sentinel"
KEY_INDEX_PREFIX = "amesh:index:"
INDEX_BUCKETS = 64
KEY_LOG_HEAD = "amesh:log:head"
KEY_LOG_PREFIX = "amesh:log:"
LOG_SLOTS = 256
KEY_VERSION = "version"
KEY_STATUS = "amesh:status"

BATCH_FULL = 0x1  # AMESH_BATCH_FULL
LOG_MAX_KEYS = 4096  # a batch with more changed keys logs "full": readers reload everything

Change = tuple[bytes, bytes | None]  # (key, value); None deletes


def bucket_of(key: str) -> int:
    return zlib.crc32(key.encode()) % INDEX_BUCKETS


def index_key(bucket: int) -> str:
    return f"{KEY_INDEX_PREFIX}{bucket:02d}"


def is_index_key(key: str) -> bool:
    return key.startswith(KEY_INDEX_PREFIX)


def is_data_key(key: str) -> bool:
    """Keys amesh owns and APISIX reads; reconciles never touch any other key."""
    return key.startswith("/")


def index_value(keys: Iterable[str]) -> bytes:
    return "\n".join(sorted(keys)).encode()


def index_lines(value: bytes | None) -> set[str]:
    return {line for line in (value or b"").decode().split("\n") if line}


def log_slot_key(seq: int) -> str:
    return f"{KEY_LOG_PREFIX}{seq % LOG_SLOTS:03d}"


def log_entry(run: str, seq: int, keys: list[str] | None) -> bytes:
    """One change-log entry; keys None (a FULL batch, or too many keys) means "full"."""
    if keys is None or len(keys) > LOG_MAX_KEYS:
        return f"{run}:{seq}\nfull".encode()
    return "\n".join([f"{run}:{seq}", "delta", *keys]).encode()


def indexed_keys(data: Mapping[str, bytes]) -> set[str]:
    keys: set[str] = set()
    for b in range(INDEX_BUCKETS):
        keys |= index_lines(data.get(index_key(b)))
    return keys


def apply_batch(data: MutableMapping[str, bytes], flags: int, changes: list[Change]) -> None:
    """What a writer does with one batch that fits (docs/dict-protocol.md, "FULL batches")."""
    full = bool(flags & BATCH_FULL)
    old_index = {b: index_lines(data.get(index_key(b))) for b in range(INDEX_BUCKETS)}
    new_index: dict[str, bytes] = {}
    written: set[str] = set()
    for raw_key, value in changes:
        key = raw_key.decode()
        if value is None:
            data.pop(key, None)
            continue
        written.add(key)
        if full and is_index_key(key):
            new_index[key] = value
            old = old_index[int(key[len(KEY_INDEX_PREFIX):])]
            value = index_value(old | index_lines(value))
        data[key] = value
    if not full:
        return
    for keys in old_index.values():
        for key in keys:
            if is_data_key(key) and key not in written:
                data.pop(key, None)
    for key, value in new_index.items():
        data[key] = value


def invariant_problems(data: Mapping[str, bytes]) -> list[str]:
    """What breaks "every data key is listed in the index" in a dict snapshot."""
    missing = {k for k in data if is_data_key(k)} - indexed_keys(data)
    return [f"{k} is not in the index" for k in sorted(missing)]
