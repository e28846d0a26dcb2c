"""The agent's side of the C queue (`_amesh_native`, registered by libamesh.so), and an
in-memory stand-in with the same interface for running the agent without the library."""

from __future__ import annotations

import threading
from collections import deque
from typing import Protocol

from .protocol import BATCH_FULL, Change, apply_batch

__all__ = ["BATCH_FULL", "ChangeQueue", "MemoryQueue", "native_queue"]


class ChangeQueue(Protocol):
    def push_batch(self, batch: int, flags: int, changes: list[Change]) -> int:
        """Queue one batch: its changes in order ((key, value); a None value deletes)."""
        ...

    def dict_capacity(self) -> int:
        """The data dict's capacity in bytes as the consumer told it; 0 if unknown."""
        ...

    def wait_reports(self, timeout_ms: int) -> list[tuple[int, int, str]]: ...

    def set_status(self, status_json: bytes) -> None: ...

    def log_error(self, message: str) -> None: ...


def native_queue() -> ChangeQueue:
    """The real queue; only importable inside a process that loaded libamesh.so."""
    import _amesh_native  # type: ignore[import-not-found]

    return _amesh_native  # the module itself has the ChangeQueue functions


class MemoryQueue:
    """A consumer that applies batches to a dict at once (tests, `amesh translate`)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.batches: list[tuple[int, int, list[Change]]] = []
        self.capacity = 0
        self.status: bytes = b"null"
        self.errors: list[str] = []
        self.fail_next: str | None = None  # a reason to refuse the next batch, as a full dict would
        self._reports: deque[tuple[int, int, str]] = deque()
        self._cond = threading.Condition()

    def push_batch(self, batch: int, flags: int, changes: list[Change]) -> int:
        with self._cond:
            self.batches.append((batch, flags, changes))
            if self.fail_next is not None:  # refused: the writer rolled it back
                self._reports.append((batch, -1, self.fail_next))
                self.fail_next = None
            else:
                apply_batch(self.data, flags, changes)
                self._reports.append((batch, 0, "applied"))
            self._cond.notify_all()
        return 0

    def dict_capacity(self) -> int:
        return self.capacity

    def snapshot(self) -> dict[str, bytes]:
        """A copy of the dict, consistent between batches (the agent may be writing)."""
        with self._cond:
            return dict(self.data)

    def wait_reports(self, timeout_ms: int) -> list[tuple[int, int, str]]:
        with self._cond:
            if not self._reports:
                self._cond.wait(timeout_ms / 1000)
            out = list(self._reports)
            self._reports.clear()
            return out

    def set_status(self, status_json: bytes) -> None:
        self.status = status_json

    def log_error(self, message: str) -> None:
        self.errors.append(message)
