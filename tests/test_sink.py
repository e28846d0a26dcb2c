"""DictSink: only changed keys travel, in dependency order, with recovery from a refused batch."""

from __future__ import annotations

from amesh_ext.native import BATCH_FULL, MemoryQueue
from amesh_ext.sink import INDEX_BUCKETS, INDEX_PREFIX, SENTINEL_KEY, DictSink


def _sink() -> tuple[DictSink, MemoryQueue]:
    queue = MemoryQueue()
    return DictSink(queue), queue


def test_first_batch_is_full_with_sentinel_and_index() -> None:
    sink, queue = _sink()
    sink.put("/routes/r1", b'{"id":"r1"}')
    sink.put("/upstreams/u1", b'{"id":"u1"}')
    assert sink.flush() == 1
    _, flags, sets, deletes = queue.batches[0]
    keys = [k.decode() for k, _ in sets]
    assert flags == BATCH_FULL and deletes == []
    assert keys.index("/upstreams/u1") < keys.index("/routes/r1")  # upstreams first
    assert SENTINEL_KEY in keys
    index = {k for k in keys if k.startswith(INDEX_PREFIX)}
    assert len(index) == INDEX_BUCKETS
    listed = set()
    for key, value in sets:
        if key.decode().startswith(INDEX_PREFIX) and value:
            listed |= set(value.decode().split("\n"))
    assert listed == {"/routes/r1", "/upstreams/u1"}


def test_only_changed_keys_are_sent_and_unchanged_flush_sends_nothing() -> None:
    sink, queue = _sink()
    for i in range(100):
        sink.put(f"/upstreams/u{i}", b"v0")
    sink.flush()
    sink.put("/upstreams/u7", b"v1")
    sink.put("/upstreams/u8", b"v0")  # same value: not a change
    sink.flush()
    _, flags, sets, deletes = queue.batches[-1]
    assert flags == 0 and deletes == []
    assert [k for k, _ in sets] == [b"/upstreams/u7"]  # no index rewrite: key set unchanged
    assert sink.flush() is None
    assert len(queue.batches) == 2


def test_deletes_come_after_sets_routes_before_upstreams_and_update_the_index() -> None:
    sink, queue = _sink()
    sink.put("/upstreams/u1", b"u")
    sink.put("/routes/r1", b"r")
    sink.put("/routes/r2", b"r")
    sink.flush()
    sink.delete("/upstreams/u1")
    sink.delete("/routes/r1")
    sink.put("/routes/r2", b"r2")
    sink.flush()
    _, _, sets, deletes = queue.batches[-1]
    assert deletes == [b"/routes/r1", b"/upstreams/u1"]
    assert sets[0] == (b"/routes/r2", b"r2")
    index_values = b"\n".join(v for k, v in sets if k.startswith(INDEX_PREFIX.encode()))
    assert b"/routes/r1" not in index_values and b"/upstreams/u1" not in index_values
    assert queue.data == {"/routes/r2": b"r2", SENTINEL_KEY: b"1",
                          **{k: v for k, v in queue.data.items() if k.startswith(INDEX_PREFIX)}}


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
    assert sink.flush(now=1.5) is None  # backing off
    sink.put("/routes/c", b"3")
    full = sink.flush(now=2.1)
    assert full is not None and full > batch
    _, flags, _, _ = queue.batches[-1]
    assert flags == BATCH_FULL
    assert {"/routes/a", "/routes/b", "/routes/c"} <= set(queue.data)
