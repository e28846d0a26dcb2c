"""Which unit owns each dict key, and what happens when two units want the same one.

A unit is the set of APISIX objects one Envoy resource translates to (a cluster its
upstream, a route configuration its routes, ...). Ids are collision-free by construction,
but a key two units want is still possible (two names that escape alike): the first unit
keeps it, the other is recorded as a contender and takes the key over when the first one
lets go, as if the first had never been there."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("amesh.agent")

Unit = tuple[str, str]  # ("cluster" | "routes" | "listener" | "certs", resource name)


class KeySink(Protocol):
    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class KeyOwnership:
    def __init__(self, sink: KeySink) -> None:
        self._sink = sink
        self._wanted: dict[Unit, dict[str, bytes]] = {}  # a unit's objects, encoded
        self._owner: dict[str, Unit] = {}  # who has each key in the dict
        self._contenders: dict[str, set[Unit]] = {}  # units that lost a collision on a key
        self.collisions: dict[str, str] = {}  # key -> what collided, for status

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def __len__(self) -> int:
        return len(self._owner)

    def set(self, unit: Unit, wanted: dict[str, bytes]) -> None:
        """The unit's objects are now `wanted` (empty: the unit is gone)."""
        old = self._wanted.pop(unit, {})
        if wanted:
            self._wanted[unit] = wanted
        for key in sorted(old.keys() - wanted.keys()):
            self._contenders.get(key, set()).discard(unit)
            if self._owner.get(key) == unit:
                self._release(key)
        for key, value in wanted.items():
            owner = self._owner.get(key)
            if owner is not None and owner != unit:
                self._contenders.setdefault(key, set()).add(unit)
                self.collisions[key] = f"{unit} collides with {owner}"
                log.error("key %s from %s collides with %s: kept the first", key, unit, owner)
                continue
            self._owner[key] = unit
            self._sink.put(key, value)

    def _release(self, key: str) -> None:
        del self._owner[key]
        contenders = self._contenders.get(key)
        while contenders:
            unit = min(contenders)
            contenders.discard(unit)
            value = self._wanted.get(unit, {}).get(key)
            if value is not None:
                self._owner[key] = unit
                self._sink.put(key, value)
                if not contenders:
                    self._contenders.pop(key, None)
                    self.collisions.pop(key, None)
                return
        self._contenders.pop(key, None)
        self.collisions.pop(key, None)
        self._sink.delete(key)
