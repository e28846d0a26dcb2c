"""From desired APISIX objects to ordered batches of dict changes (see DictSink)."""

from .dict_sink import INDEX_BUCKETS, INDEX_PREFIX, SENTINEL_KEY, DictSink

__all__ = ["INDEX_BUCKETS", "INDEX_PREFIX", "SENTINEL_KEY", "DictSink"]
