"""Diff what the translator wants against what was sent, and queue only the difference.

One batch per flush, laid out as docs/dict-protocol.md says: index pre-images, upserts
(upstreams before the routes that use them), deletes (routes before their upstreams), index
post-images, the change-log entry; the consumer then bumps the version once. Work is
O(changed keys): the agent marks keys as it changes them; nothing walks the whole state
except a FULL batch (the first one, and the resync after a batch the dict refused).

Keys the agent owns start with "/"; the sentinel, the key index and the change log do not,
so no APISIX consumer reads them as objects. The index lists every key the dict may hold
at every instant (a key is listed before it is written and forgotten after it is deleted),
so the next agent can remove whatever a crashed one left.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..native import ChangeQueue
from ..protocol import (
    BATCH_FULL,
    INDEX_BUCKETS,
    KEY_INDEX_PREFIX,
    KEY_LOG_HEAD,
    KEY_SENTINEL,
    Change,
    bucket_of,
    index_key,
    index_value,
    log_entry,
    log_slot_key,
)

INDEX_PREFIX = KEY_INDEX_PREFIX
SENTINEL_KEY = KEY_SENTINEL

log = logging.getLogger("amesh.sink")

# Set order inside a batch: what others reference goes first.
_SET_RANK = {"/ssls/": 0, "/upstreams/": 1, "/services/": 2, "/routes/": 3, "/stream_routes/": 3}


def _rank(key: str) -> int:
    for prefix, rank in _SET_RANK.items():
        if key.startswith(prefix):
            return rank
    return 3


class DictSink:
    def __init__(self, queue: ChangeQueue, resync_backoff_max: float = 30.0) -> None:
        self._queue = queue
        self._desired: dict[str, bytes] = {}
        self._sent: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._buckets: list[set[str]] = [set() for _ in range(INDEX_BUCKETS)]
        self._indexed: list[set[str]] = [set() for _ in range(INDEX_BUCKETS)]  # as written
        self._moved_buckets: set[int] = set()  # buckets whose key set changed since a flush
        self._batch = 0
        self._run = f"{os.getpid():x}{time.time_ns():x}"  # the change log's run: unique per start
        self._need_full = True  # the first batch reconciles whatever a previous run left
        self._resync_at = 0.0
        self._backoff = 0.0
        self._backoff_max = resync_backoff_max
        self._queued = 0    # the newest batch the queue took
        self._reported = 0  # the newest batch with a verdict (writers apply batches in order)
        self.counts: dict[str, Any] = {
            "batches": 0, "full_batches": 0, "sets": 0, "deletes": 0,
            "batches_applied": 0, "batches_failed": 0, "last_failure": "",
        }

    # -- what the agent wants ------------------------------------------------------------
    def put(self, key: str, value: bytes) -> None:
        if self._desired.get(key) != value:
            if key not in self._desired:
                b = bucket_of(key)
                self._buckets[b].add(key)
                self._moved_buckets.add(b)
            self._desired[key] = value
            self._dirty.add(key)

    def delete(self, key: str) -> None:
        if self._desired.pop(key, None) is not None:
            b = bucket_of(key)
            self._buckets[b].discard(key)
            self._moved_buckets.add(b)
            self._dirty.add(key)

    def get(self, key: str) -> bytes | None:
        return self._desired.get(key)

    def keys(self) -> list[str]:
        return list(self._desired)

    # -- batches -------------------------------------------------------------------------
    def flush(self, now: float | None = None) -> int | None:
        """Queue one batch with everything that changed; returns its number, or None."""
        now = time.monotonic() if now is None else now
        if self._need_full:
            if now < self._resync_at:
                return None
            return self._push_full()
        if not self._dirty:
            return None
        sets: list[Change] = []
        deletes: list[Change] = []
        changed: list[str] = []
        for key in sorted(self._dirty, key=lambda k: (_rank(k), k)):
            value = self._desired.get(key)
            if value is None:
                if key in self._sent:
                    deletes.append((key.encode(), None))
                    changed.append(key)
                    del self._sent[key]
            elif self._sent.get(key) != value:
                sets.append((key.encode(), value))
                changed.append(key)
                self._sent[key] = value
        deletes.reverse()  # routes before the upstreams they use
        self._dirty.clear()
        if not changed:
            return None
        pre, post = self._index_images(self._moved_buckets)
        self._moved_buckets = set()
        return self._push(0, pre + sets + deletes + post, changed)

    def _index_images(self, buckets: set[int]) -> tuple[list[Change], list[Change]]:
        """Index writes around the data: a bucket that gains keys lists them before they are
        written (old + new); one that loses keys forgets them after they are deleted."""
        pre: list[Change] = []
        post: list[Change] = []
        for b in sorted(buckets):
            old, new = self._indexed[b], self._buckets[b]
            if new == old:
                continue
            key = index_key(b).encode()
            if new - old:
                pre.append((key, index_value(old | new)))
            if old - new:
                post.append((key, index_value(new)))
            self._indexed[b] = set(new)
        return pre, post

    def _push_full(self) -> int:
        # The writer merges these index lists with the old index and reconciles at COMMIT.
        index = [(index_key(b).encode(), index_value(self._buckets[b]))
                 for b in range(INDEX_BUCKETS)]
        keys = sorted(self._desired, key=lambda k: (_rank(k), k))
        sets = [(k.encode(), self._desired[k]) for k in keys]
        self._sent = dict(self._desired)
        self._indexed = [set(b) for b in self._buckets]
        self._moved_buckets = set()
        self._dirty.clear()
        self._need_full = False
        self.counts["full_batches"] += 1
        return self._push(BATCH_FULL, [*index, *sets, (SENTINEL_KEY.encode(), b"1")], None)

    def _push(self, flags: int, changes: list[Change], logged: list[str] | None) -> int:
        self._batch += 1
        head = f"{self._run}:{self._batch}".encode()
        changes.append((log_slot_key(self._batch).encode(),
                        log_entry(self._run, self._batch, logged)))
        changes.append((KEY_LOG_HEAD.encode(), head))
        rc = self._queue.push_batch(self._batch, flags, changes)
        if rc != 0:
            log.warning("queue refused batch %d (rc %d): the library is stopping", self._batch, rc)
        else:
            self._queued = self._batch
        self.counts["batches"] += 1
        for key, value in changes:
            if key[:1] == b"/":  # data keys; the index and log ride along
                self.counts["sets" if value is not None else "deletes"] += 1
        return self._batch
    def on_report(self, batch: int, status: int, message: str, now: float | None = None) -> None:
        """The consumer's verdict. A refused batch was rolled back by the consumer; later
        batches assumed it landed, so the next batch is a FULL one (after a backoff). Batch 0
        is the library's word that a failure report was lost: resync as for a failure."""
        self._reported = max(self._reported, batch)
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
    def in_dict(self) -> bool:
        """Everything the agent wants is in the dict: sent, applied, nothing pending."""
        return (not self._need_full and not self._dirty and self._reported >= self._queued
                and self.counts["batches_applied"] > 0)

    @property
    def pending_resync_at(self) -> float | None:
        return self._resync_at if self._need_full else None

    def status(self) -> dict[str, Any]:
        return {**self.counts, "keys": len(self._desired), "last_batch": self._batch,
                "resync_pending": self._need_full, "in_dict": self.in_dict}
