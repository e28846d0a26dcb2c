"""Per-type subscription state shared by the Delta and state-of-the-world wire protocols.

What we want (names), what we hold (name -> bytes + version, as accepted by the handler),
what we last accepted (version) and the last nonce seen, plus the dependency rule of an
Envoy sidecar: EDS names follow from the held CDS, RDS names from the held LDS.

Held resources are the handler's last good state: a rejected update keeps the old entry,
which is what Delta's initial_resource_versions and the SotW removal rule must see.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf.any_pb2 import Any as AnyMsg
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from ..handler import ResourceHandler
from ..references import REFERENCES
from ..resources import (
    CLUSTER,
    ENDPOINTS,
    LISTENER,
    ROUTES,
    SHORT_NAMES,
    TYPE_ORDER,
    Resource,
    ResourceError,
    message_class,
    name_of,
)

log = logging.getLogger("amesh.xds")

WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})
FOLLOWER = {CLUSTER: ENDPOINTS, LISTENER: ROUTES}  # parent type -> the type it names
MAX_REASON = 300  # per resource, in a NACK's error_detail
MAX_DETAIL = 4000  # istiod stores and logs the whole message


class Held(NamedTuple):
    raw: bytes
    version: str




@dataclass(eq=False)
class TypeState:
    type_url: str
    wildcard: bool
    names: set[str] = field(default_factory=set)  # wanted, for non-wildcard types
    held: dict[str, Held] = field(default_factory=dict)
    by_raw: dict[bytes, str] = field(default_factory=dict)  # SotW: skip decoding unchanged bytes
    refs: dict[str, frozenset[str]] = field(default_factory=dict)  # parent types: names named
    # Held resources whose latest update was rejected: name -> reason. When the server sends
    # the held (last good) bytes again, the handler must hear of it to drop the rejection.
    rejected: dict[str, str] = field(default_factory=dict)
    version: str = ""  # last accepted (SotW version_info / Delta system_version_info)
    nonce: str = ""  # last response nonce on the current stream
    requested: bool = False  # a subscription request went out on the current stream
    acks: int = 0
    nacks: int = 0
    last_nack: str = ""
    last_push: float | None = None

    @property
    def short(self) -> str:
        return SHORT_NAMES[self.type_url]

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names

    def versions(self) -> dict[str, str]:
        """What we hold and still want, for Delta's initial_resource_versions."""
        return {n: h.version for n, h in self.held.items() if self.wants(n)}

    def status(self) -> dict[str, Any]:
        return {
            "wildcard": self.wildcard,
            "subscribed": len(self.names),
            "version": self.version,
            "nonce": self.nonce,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": self.last_nack or None,
            "last_push": self.last_push,
            "resources": len(self.held),
            "rejected": len(self.rejected),
        }


class Batch:
    """One response's resources, checked and sorted into upserts, refreshes and rejections."""

    def __init__(self, state: TypeState, version: str) -> None:
        self.state = state
        self.version = version
        self.upserts: list[Resource] = []
        self.refreshed: dict[str, str] = {}  # unchanged bytes, new version
        self.rejected: dict[str, str] = {}
        self.seen: set[str] = set()  # names present in the response
        self.anonymous = False  # a rejected resource whose name is unknown
        self._refs: dict[str, frozenset[str]] = {}

    def reject(self, key: str, reason: str, named: bool = True) -> None:
        self.rejected[key] = reason
        if named:
            self.seen.add(key)
        else:
            self.anonymous = True

    def add(self, item: AnyMsg, where: str, name: str | None = None, version: str = "") -> None:
        """`name` is given by Delta's Resource wrapper; SotW names come from the bytes."""
        st = self.state
        key = name if name is not None else where
        if item.type_url != st.type_url:
            self.reject(key, f"has type {item.type_url or 'none'!r}", name is not None)
            return
        raw = item.value
        known = name if name is not None else st.by_raw.get(raw)
        if known is not None:
            held = st.held.get(known)
            if held is not None and held.raw == raw and known not in st.rejected:
                self.seen.add(known)
                if st.wants(known):
                    self.refreshed[known] = version or self.version
                return
        msg = message_class(st.type_url)()
        try:
            msg.ParseFromString(raw)
        except DecodeError as exc:
            self.reject(key, f"cannot decode: {exc}", name is not None)
            return
        decoded = name_of(st.type_url, msg)
        if not decoded:
            self.reject(key, "has no name", name is not None)
            return
        if name is not None and decoded != name:
            self.reject(name, f"carries a resource named {decoded!r}")
            return
        if decoded in self.seen:
            self.rejected[decoded] = "appears twice in one response"
            return
        self.seen.add(decoded)
        if not st.wants(decoded):
            return  # not subscribed (a late answer after an unsubscribe): ignore, as Envoy does
        refs = REFERENCES.get(st.type_url)
        if refs is not None:
            try:
                self._refs[decoded] = refs(msg)
            except ResourceError as exc:
                self.reject(decoded, str(exc))
                return
        self.upserts.append(Resource(st.type_url, decoded, raw, version or self.version, msg))


class Subscriptions:
    """The four types' state, and the one place that talks to the handler."""

    def __init__(self, handler: ResourceHandler) -> None:
        self.handler = handler
        self.states = {t: TypeState(t, t in WILDCARD_TYPES) for t in TYPE_ORDER}

    def new_stream(self) -> None:
        """A fresh stream: nonces are per stream; names, versions and held data carry over."""
        for st in self.states.values():
            st.nonce = ""
            st.requested = False

    def commit(self, batch: Batch, removed: Iterable[str]) -> dict[str, str]:
        """Hand the batch to the handler; returns every rejection (client's and handler's)."""
        st = batch.state
        gone = sorted(n for n in set(removed) if n in st.held and n not in batch.seen)
        for name, version in batch.refreshed.items():
            st.held[name] = st.held[name]._replace(version=version)
        reasons = self._apply(st, batch.upserts, gone) if batch.upserts or gone else {}
        if batch.rejected:  # refused before the handler saw them: it lists them in status
            self.handler.note_rejected(st.type_url, batch.rejected)
        rejected = dict(batch.rejected)
        for res in batch.upserts:
            reason = reasons.get(res.name)
            if reason is not None:
                rejected[res.name] = str(reason)
                continue
            st.rejected.pop(res.name, None)
            old = st.held.get(res.name)
            if old is not None:
                st.by_raw.pop(old.raw, None)
            st.held[res.name] = Held(res.raw, res.version)
            st.by_raw[res.raw] = res.name
            if res.name in batch._refs:
                st.refs[res.name] = batch._refs[res.name]
        for name in gone:
            self._drop(st, name)
        # Only held names: a rejected resource we never accepted keeps nothing to re-offer.
        st.rejected.update((n, r) for n, r in rejected.items() if n in st.held)
        return rejected

    def follow(self, parent_type: str) -> tuple[TypeState, set[str], set[str]] | None:
        """Re-derive the follower type's names from the held parents.

        Returns (follower state, added, removed) when they changed. Held follower
        resources that are no longer wanted are removed through the handler now.
        """
        child_type = FOLLOWER.get(parent_type)
        if child_type is None:
            return None
        child = self.states[child_type]
        wanted: set[str] = set().union(*self.states[parent_type].refs.values())
        if wanted == child.names:
            return None
        added, removed = wanted - child.names, child.names - wanted
        child.names = wanted
        stale = sorted(n for n in removed if n in child.held)
        if stale:
            self._apply(child, [], stale)
            for name in stale:
                self._drop(child, name)
        return child, added, removed

    def conclude(self, st: TypeState, version: str, rejected: dict[str, str]) -> Any:
        """Book an ACK (returns None) or a NACK (returns the google.rpc.Status to send)."""
        if not rejected:
            st.version = version
            st.acks += 1
            return None
        st.nacks += 1
        st.last_nack = nack_message(rejected)
        log.warning(
            "xds NACK %s version=%s nonce=%s (keeping %s): %s",
            st.short, version, st.nonce, st.version or "none", st.last_nack,
        )
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=st.last_nack)

    def status(self) -> dict[str, dict[str, Any]]:
        return {st.short: st.status() for st in self.states.values()}

    def incomplete_because(self) -> str:
        """Why the held resources are not yet a whole config ("" once they are): a
        wildcard type that never had an accepted response, or names not yet received."""
        for st in self.states.values():
            if st.wildcard and not st.acks and not st.held:
                return f"no {st.short} accepted yet"
            missing = [n for n in st.names if n not in st.held]
            if missing:
                return (f"{len(missing)} {st.short} resource(s) not received yet,"
                        f" e.g. {missing[0]!r}")
        return ""

    def _apply(
        self, st: TypeState, upserts: list[Resource], removed: Collection[str]
    ) -> dict[str, str]:
        try:
            return self.handler.apply(st.type_url, upserts, removed) or {}
        except Exception as exc:  # the handler's bug must not end the stream: NACK instead
            log.exception("xds handler failed on %s", st.short)
            return {r.name: f"handler failed: {exc!r}" for r in upserts}

    @staticmethod
    def _drop(st: TypeState, name: str) -> None:
        held = st.held.pop(name, None)
        if held is not None and st.by_raw.get(held.raw) == name:
            del st.by_raw[held.raw]
        st.refs.pop(name, None)
        st.rejected.pop(name, None)


def nack_message(rejected: dict[str, str]) -> str:
    parts = [f"{name}: {reason[:MAX_REASON]}" for name, reason in sorted(rejected.items())]
    head = f"{len(parts)} resource(s) rejected: "
    text = head + "; ".join(parts)
    if len(text) <= MAX_DETAIL:
        return text
    kept: list[str] = []
    for i, part in enumerate(parts):
        if len(head) + sum(len(p) + 2 for p in kept) + len(part) > MAX_DETAIL - 40:
            return head + "; ".join(kept) + f"; ... and {len(parts) - i} more"
        kept.append(part)
    return text

