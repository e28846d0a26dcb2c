"""DictSink: only changed keys travel, in the protocol's order, with recovery from a refused
batch; the index lists every key at every step (docs/dict-protocol.md)."""

from __future__ import annotations

import random

from amesh_ext.native import MemoryQueue
from amesh_ext.protocol import (
    BATCH_FULL,
    INDEX_BUCKETS,
    KEY_INDEX_PREFIX,
    KEY_LOG_HEAD,
    KEY_SENTINEL,
    LOG_SLOTS,
    apply_batch,
    index_lines,
    invariant_problems,
    is_data_key,
    log_slot_key,
)
from amesh_ext.sink import DictSink


def _sink() -> tuple[DictSink, MemoryQueue]:
    queue = MemoryQueue()
    return DictSink(queue), queue


def _keys(changes: list) -> list[str]:
    return [k.decode() for k, _ in changes]


def _data_keys(queue: MemoryQueue) -> set[str]:
    return {k for k in queue.data if is_data_key(k)}


def test_first_batch_is_full_with_sentinel_index_and_log() -> None:
    sink, queue = _sink()
    sink.put("/routes/r1", b'{"id":"r1"}')
    sink.put("/upstreams/u1", b'{"id":"u1"}')
    assert sink.flush() == 1
    _, flags, changes = queue.batches[0]
    keys = _keys(changes)
    assert flags == BATCH_FULL and all(v is not None for _, v in changes)
    assert keys.index("/upstreams/u1") < keys.index("/routes/r1")  # upstreams first
    assert KEY_SENTINEL in keys
    index = [k for k in keys if k.startswith(KEY_INDEX_PREFIX)]
    assert len(index) == INDEX_BUCKETS
    assert max(keys.index(k) for k in index) < keys.index("/upstreams/u1")  # listed first
    listed = set().union(*(index_lines(v) for k, v in changes if k.decode() in index))
    assert listed == {"/routes/r1", "/upstreams/u1"}
    assert keys[-1] == KEY_LOG_HEAD
    assert queue.data[log_slot_key(1)].split(b"\n")[1] == b"full"


def test_only_changed_keys_are_sent_and_unchanged_flush_sends_nothing() -> None:
    sink, queue = _sink()
    for i in range(100):
        sink.put(f"/upstreams/u{i}", b"v0")
    sink.flush()
    sink.put("/upstreams/u7", b"v1")
    sink.put("/upstreams/u8", b"v0")  # same value: not a change
    sink.flush()
    _, flags, changes = queue.batches[-1]
    assert flags == 0
    # no index rewrite (the key set is unchanged): the key, then its log entry and head
    assert _keys(changes) == ["/upstreams/u7", log_slot_key(2), KEY_LOG_HEAD]
    entry = queue.data[log_slot_key(2)].decode().split("\n")
    assert entry[1:] == ["delta", "/upstreams/u7"]
    assert entry[0] == queue.data[KEY_LOG_HEAD].decode() and entry[0].endswith(":2")
    assert sink.flush() is None
    assert len(queue.batches) == 2


def test_index_lists_a_key_before_it_is_written_and_forgets_it_after_it_is_deleted() -> None:
    sink, queue = _sink()
    sink.put("/upstreams/u1", b"u")
    sink.put("/routes/r1", b"r")
    sink.flush()
    sink.delete("/upstreams/u1")
    sink.delete("/routes/r1")
    sink.put("/routes/r2", b"r")
    sink.flush()
    _, _, changes = queue.batches[-1]
    keys = _keys(changes)
    assert keys.index("/routes/r1") < keys.index("/upstreams/u1")  # routes deleted first
    # Replay the batch step by step: after every single change the invariant holds.
    data = dict(queue.data)
    for k in list(data):
        data.pop(k)
    apply_batch(data, BATCH_FULL, queue.batches[0][2])
    for change in changes:
        apply_batch(data, 0, [change])
        assert invariant_problems(data) == [], change
    assert _data_keys(queue) == {"/routes/r2"}
    listed = set().union(*(index_lines(queue.data.get(f"{KEY_INDEX_PREFIX}{b:02d}"))
                           for b in range(INDEX_BUCKETS)))
    assert listed == {"/routes/r2"}


def test_put_then_delete_before_flush_sends_nothing() -> None:
    sink, _ = _sink()
    sink.put("/routes/a", b"1")
    sink.flush()
    sink.put("/routes/b", b"1")
    sink.delete("/routes/b")
    assert sink.flush() is None


def test_refused_batch_triggers_full_resync_after_backoff() -> None:
    sink, queue = _sink()
    sink.put("/routes/a", b"1")
    sink.flush(now=0)
    queue.fail_next = "no memory"
    sink.put("/routes/b", b"2")
    batch = sink.flush(now=1)
    for b, status, msg in queue.wait_reports(10):
        sink.on_report(b, status, msg, now=1)
    assert sink.status()["batches_failed"] == 1
    assert "no memory" in sink.status()["last_failure"]
    assert "/routes/b" not in queue.data  # the consumer refused it
    assert not sink.in_dict
    assert sink.flush(now=1.5) is None  # backing off
    sink.put("/routes/c", b"3")
    full = sink.flush(now=2.1)
    assert full is not None and full > batch
    _, flags, _ = queue.batches[-1]
    assert flags == BATCH_FULL
    for b, status, msg in queue.wait_reports(10):
        sink.on_report(b, status, msg, now=2.1)
    assert _data_keys(queue) == {"/routes/a", "/routes/b", "/routes/c"}
    assert sink.in_dict


def test_lost_failure_report_resyncs() -> None:
    sink, _ = _sink()
    sink.put("/routes/a", b"1")
    sink.flush(now=0)
    sink.on_report(0, -1, "a failure report was lost", now=0)
    assert sink.status()["resync_pending"]


def test_full_batch_reconciles_whatever_a_crashed_run_left() -> None:
    """A previous run died after writing some of a batch: the next agent's FULL batch
    leaves exactly its own keys, because the index already listed the dead run's keys."""
    rng = random.Random(7)
    for trial in range(30):
        dead = MemoryQueue()
        old = DictSink(dead)
        for i in range(rng.randint(1, 60)):
            old.put(f"/upstreams/u{i}", b"x")
        old.flush()
        for i in rng.sample(range(200), rng.randint(1, 80)):
            old.put(f"/routes/r{i}", b"y")
        for k in rng.sample(old.keys(), rng.randint(0, len(old.keys()) // 2)):
            old.delete(k)
        old.flush()
        _, flags, changes = dead.batches[-1]
        cut = rng.randint(0, len(changes))  # kill -9 after `cut` changes
        data: dict[str, bytes] = {}
        apply_batch(data, BATCH_FULL, dead.batches[0][2])
        apply_batch(data, flags, changes[:cut])
        assert invariant_problems(data) == [], trial
        new, queue = _sink()
        queue.data = data
        wanted = {f"/routes/n{i}" for i in range(rng.randint(0, 20))}
        for k in wanted:
            new.put(k, b"z")
        new.flush()
        assert _data_keys(queue) == wanted, trial
        assert invariant_problems(queue.data) == []


def test_change_log_ring_wraps_and_names_its_batch() -> None:
    sink, queue = _sink()
    sink.put("/upstreams/u", b"0")
    sink.flush()
    for i in range(1, LOG_SLOTS + 5):
        sink.put("/upstreams/u", str(i).encode())
        sink.flush()
    head = queue.data[KEY_LOG_HEAD].decode()
    run, seq = head.rsplit(":", 1)
    assert int(seq) == LOG_SLOTS + 5
    # the oldest slots were overwritten by newer batches of the same run
    assert queue.data[log_slot_key(1)].decode().startswith(f"{run}:{LOG_SLOTS + 1}\n")
