"""Diff what the translator wants against what was sent, and queue only the difference.

One batch per flush: upserts (upstreams before the routes that use them), then deletes
(routes before their upstreams), then the consumer bumps the version once. Work is
O(changed keys): the agent marks keys as it changes them; nothing walks the whole state
except a FULL batch (the first one, and the resync after a batch the dict refused).

Keys the agent owns start with "/"; the sentinel and the key index do not, so no APISIX
consumer reads them. The index (keys in INDEX_BUCKETS buckets) lets a consumer without
get_keys (the C writer of initial()) find keys a previous run left behind.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

from ..native import BATCH_FULL, ChangeQueue

INDEX_BUCKETS = 64  # must match INDEX_BUCKETS in src/native/writer.c
INDEX_PREFIX = "amesh:index:"
SENTINEL_KEY = "amesh:sentinel"

log = logging.getLogger("amesh.sink")

# Set order inside a batch: what others reference goes first.
_SET_RANK = {"/ssls/": 0, "/upstreams/": 1, "/services/": 2, "/routes/": 3, "/stream_routes/": 3}


def _rank(key: str) -> int:
    for prefix, rank in _SET_RANK.items():
        if key.startswith(prefix):
            return rank
    return 3


def _bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % INDEX_BUCKETS


class DictSink:
    def __init__(self, queue: ChangeQueue, resync_backoff_max: float = 30.0) -> None:
        self._queue = queue
        self._desired: dict[str, bytes] = {}
        self._sent: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._buckets: list[set[str]] = [set() for _ in range(INDEX_BUCKETS)]
        self._dirty_buckets: set[int] = set()
        self._batch = 0
        self._need_full = True  # the first batch reconciles whatever a previous run left
        self._resync_at = 0.0
        self._backoff = 0.0
        self._backoff_max = resync_backoff_max
        self.counts: dict[str, Any] = {
            "batches": 0, "full_batches": 0, "sets": 0, "deletes": 0,
            "batches_applied": 0, "batches_failed": 0, "last_failure": "",
        }

    # -- what the agent wants ------------------------------------------------------------
    def put(self, key: str, value: bytes) -> None:
        if self._desired.get(key) != value:
            if key not in self._desired:
                self._buckets[_bucket(key)].add(key)
                self._dirty_buckets.add(_bucket(key))
            self._desired[key] = value
            self._dirty.add(key)

    def delete(self, key: str) -> None:
        if self._desired.pop(key, None) is not None:
            self._buckets[_bucket(key)].discard(key)
            self._dirty_buckets.add(_bucket(key))
            self._dirty.add(key)

    def get(self, key: str) -> bytes | None:
        return self._desired.get(key)

    def keys(self) -> list[str]:
        return list(self._desired)

    # -- batches -------------------------------------------------------------------------
    def _index_entries(self, buckets: Any) -> list[tuple[bytes, bytes]]:
        return [
            (f"{INDEX_PREFIX}{b:02d}".encode(), "\n".join(sorted(self._buckets[b])).encode())
            for b in sorted(buckets)
        ]

    def flush(self, now: float | None = None) -> int | None:
        """Queue one batch with everything that changed; returns its number, or None."""
        now = time.monotonic() if now is None else now
        if self._need_full:
            if now < self._resync_at:
                return None
            return self._push_full()
        if not self._dirty and not self._dirty_buckets:
            return None
        sets: list[tuple[bytes, bytes]] = []
        deletes: list[bytes] = []
        for key in sorted(self._dirty, key=lambda k: (_rank(k), k)):
            value = self._desired.get(key)
            if value is None:
                if key in self._sent:
                    deletes.append(key.encode())
                    del self._sent[key]
            elif self._sent.get(key) != value:
                sets.append((key.encode(), value))
                self._sent[key] = value
        deletes.reverse()  # routes before the upstreams they use
        self._dirty.clear()
        if not sets and not deletes:
            self._dirty_buckets.clear()
            return None
        sets += self._index_entries(self._dirty_buckets)
        self._dirty_buckets.clear()
        return self._push(0, sets, deletes)

    def _push_full(self) -> int:
        keys = sorted(self._desired, key=lambda k: (_rank(k), k))
        sets = [(k.encode(), self._desired[k]) for k in keys]
        sets.append((SENTINEL_KEY.encode(), b"1"))
        sets += self._index_entries(range(INDEX_BUCKETS))
        self._sent = dict(self._desired)
        self._dirty.clear()
        self._dirty_buckets.clear()
        self._need_full = False
        self.counts["full_batches"] += 1
        return self._push(BATCH_FULL, sets, [])

    def _push(self, flags: int, sets: list[tuple[bytes, bytes]], deletes: list[bytes]) -> int:
        self._batch += 1
        rc = self._queue.push_batch(self._batch, flags, sets, deletes)
        if rc != 0:
            log.warning("queue refused batch %d (rc %d): the library is stopping", self._batch, rc)
        self.counts["batches"] += 1
        self.counts["sets"] += len(sets)
        self.counts["deletes"] += len(deletes)
        return self._batch

    def on_report(self, batch: int, status: int, message: str, now: float | None = None) -> None:
        """The consumer's verdict. A refused batch was rolled back by the consumer; later
        batches assumed it landed, so the next batch is a FULL one (after a backoff)."""
        if status == 0:
            self.counts["batches_applied"] += 1
            self._backoff = 0.0
            return
        self.counts["batches_failed"] += 1
        self.counts["last_failure"] = f"batch {batch}: {message}"
        now = time.monotonic() if now is None else now
        self._backoff = min(self._backoff_max, max(1.0, self._backoff * 2))
        self._resync_at = now + self._backoff
        self._need_full = True
        log.error("dict refused batch %d (%s): version kept; full resync in %.0f s",
                  batch, message, self._backoff)

    @property
    def pending_resync_at(self) -> float | None:
        return self._resync_at if self._need_full else None

    def status(self) -> dict[str, Any]:
        return {**self.counts, "keys": len(self._desired), "last_batch": self._batch,
                "resync_pending": self._need_full}
