"""When the agent may send its first batch.

The first batch is FULL: it replaces whatever a previous run left in the dict. Sent too
early (clusters in, routes a moment later) it would briefly delete routes that keep serving
otherwise, so it waits for a whole config — the types the resources name — and a moment of
quiet, but never longer than first_sync_max_wait after the first data."""

from __future__ import annotations


class FirstSync:
    def __init__(self, quiet: float, max_wait: float) -> None:
        self._quiet, self._max_wait = quiet, max_wait
        self._first_data: float | None = None
        self._last_apply = 0.0
        self._types_seen: set[str] = set()
        self.done = False

    def saw(self, type_url: str, now: float) -> None:
        """A source delivered (possibly empty) data of this type."""
        self._last_apply = now
        if self._first_data is None:
            self._first_data = now
        self._types_seen.add(type_url)

    def check(self, now: float, needed: set[str]) -> bool:
        """Whether the first sync is done (it stays done once it is)."""
        if not self.done and self._first_data is not None:
            quiet = now - self._last_apply >= self._quiet
            late = now - self._first_data >= self._max_wait
            self.done = (quiet and needed <= self._types_seen) or late
        return self.done
