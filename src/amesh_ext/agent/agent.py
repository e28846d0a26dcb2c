"""The agent: keeps the mesh's Envoy resources and turns each change into dict changes.

Translation is incremental. Each resource owns a *unit* of APISIX objects (a cluster its
upstream, a route configuration its routes, a listener its stream routes); a change
re-translates only the units it touches, through two joins Envoy itself makes:
- an EDS cluster reads the ClusterLoadAssignment named by its service_name;
- a route configuration takes its listener's port, and the hash policy of its routes
  lands on the upstreams they target (APISIX keeps chash on the upstream);
- route configurations and listeners see which clusters exist (a route to an absent one
  answers 503 and names no upstream) and their mirror nodes: each records the answers it
  used (Translation.cluster_deps) and is re-translated when a cluster changes one.
Every unit is computed before anything is changed, so a resource the translator rejects
leaves the last good state untouched (and is reported for the NACK).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from .. import translate as tr
from ..certs import ISTIO_CLIENT_SSL_ID, SSL_KEY, IstioCertFiles
from ..config import ConfigError, StartConfig
from ..encoding import to_json
from ..native import ChangeQueue
from ..references import eds_name
from ..resources import CLUSTER, ENDPOINTS, LISTENER, ROUTES, SHORT_NAMES, Resource, ResourceError
from ..sink import DictSink
from ..sources import Source
from .first_sync import FirstSync
from .keys import KeyOwnership, Unit
from .route_pieces import RouteConfigTranslator

log = logging.getLogger("amesh.agent")



_TRIM_AFTER_SETS = 5000  # a batch this large leaves megabytes of freed heap behind


def _trim_heap() -> None:
    """Give freed heap back to the OS after a large apply (glibc only; else a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _capped(status: dict[str, Any], cap: int) -> dict[str, Any]:
    """A source's status with its lists of rejections and errors cut to `cap` entries."""
    out = dict(status)
    for field in ("rejected", "errors"):
        value = out.get(field)
        if isinstance(value, (dict, list)) and len(value) > cap:
            items = sorted(value.items()) if isinstance(value, dict) else value
            kept = list(itertools.islice(items, cap))
            out[field] = dict(kept) if isinstance(value, dict) else kept
            out[f"{field}_count"] = len(value)
    return out


class ObjectTooLarge(ValueError):
    """An APISIX object larger than the dict could ever hold."""


_ABSENT = object()  # a cluster the agent does not hold (for _cluster_changed)


class Agent:
    def __init__(self, config: StartConfig, queue: ChangeQueue) -> None:
        translate = dict(config.translate)
        # ISTIO_MUTUAL upstreams name the agent's client SSL object (see certs.py), but only
        # while it is written: never a reference to an object that is not in the dict.
        managed = not {"istio_client_cert_id", "istio_client_cert_pem"} & translate.keys()
        try:
            self._options = tr.TranslateOptions(**translate)
        except TypeError as exc:
            raise ConfigError(f"start config: invalid 'translate' section: {exc}") from exc
        self._certs = IstioCertFiles(tr.istio_cert_paths(self._options)) if managed else None
        self._config = config
        self._queue = queue
        self._lock = threading.RLock()
        self.sink = DictSink(queue, config.limit("resync_backoff_max"))
        self._resources: dict[str, dict[str, Resource]] = {
            CLUSTER: {}, ENDPOINTS: {}, LISTENER: {}, ROUTES: {},
        }
        self._keys = KeyOwnership(self.sink)
        self._unit_skips: dict[Unit, list[tr.Skip]] = {}
        self._logged_features: set[str] = set()
        self._eds_users: dict[str, set[str]] = {}  # EDS name -> clusters reading it
        self._cluster_eds: dict[str, str] = {}
        self._listener_ports: dict[str, dict[str, int | None]] = {}  # listener -> rc -> port
        self._route_hashes: dict[str, dict[str, tr.HashPolicy]] = {}  # rc -> cluster -> hash
        self._route_translators: dict[str, RouteConfigTranslator] = {}  # per-vhost reuse
        self._cluster_nodes: dict[str, str | None] = {}  # cluster -> mirror node (tr.Clusters)
        self._unit_deps: dict[Unit, frozenset[str]] = {}  # clusters a unit asked about
        # cluster -> unit -> what it asked about the cluster and the answer it got
        self._dep_users: dict[str, dict[Unit, dict[str, object]]] = {}
        self._rejected: dict[str, dict[str, str]] = {t: {} for t in self._resources}
        self._decoded_in_use: list[Resource] = []
        self._source: Source | None = None
        self._first_sync = FirstSync(config.limit("first_sync_quiet"),
                                     config.limit("first_sync_max_wait"))
        self.started_at = time.time()
        self.first_batch_at: float | None = None  # unix time the first batch was queued
        self._refresh_certs()  # before any cluster: ISTIO_MUTUAL upstreams need to know

    # -- ResourceHandler -----------------------------------------------------------------
    def apply(
        self, type_url: str, upserts: Sequence[Resource], removed: Collection[str]
    ) -> dict[str, str]:
        with self._lock:
            rejected: dict[str, str] = {}
            store = self._resources.get(type_url)
            if store is None:
                return {r.name: f"amesh does not consume {type_url}" for r in upserts}
            for res in upserts:
                old = store.get(res.name)
                if old is not None and old.raw == res.raw:
                    # Unchanged: the common case in a state-of-the-world push, and the server
                    # going back to our last good version after we rejected a newer one.
                    self._rejected[type_url].pop(res.name, None)
                    continue
                try:
                    self._upsert(type_url, res)
                    self._rejected[type_url].pop(res.name, None)
                except Exception as exc:
                    # Any failure (a translator bug too) rejects this resource alone: the
                    # units are computed before anything changes, so the last good state stays.
                    expected = isinstance(exc, (ResourceError, tr.InvalidResource, ValueError))
                    reason = str(exc) if expected else f"internal error: {exc!r}"
                    rejected[res.name] = reason
                    self._rejected[type_url][res.name] = reason
                    log.error("rejected %s %r: %s", SHORT_NAMES[type_url], res.name, reason,
                              exc_info=not expected)
                finally:
                    self._release_decoded()
            for name in removed:
                if name in store:
                    try:
                        self._remove(type_url, name)
                    except Exception:
                        # The resource is gone either way; what depended on it keeps its
                        # last good translation (a translator bug must not escape apply).
                        log.exception("removing %s %r", SHORT_NAMES[type_url], name)
                    finally:
                        self._release_decoded()
                self._rejected[type_url].pop(name, None)
            now = time.monotonic()
            self._first_sync.saw(type_url, now)
            if self._first_sync.done:
                self._flush(now)
            return rejected

    def note_rejected(self, type_url: str, rejected: dict[str, str]) -> None:
        with self._lock:
            store = self._rejected.get(type_url)
            if store is not None:
                store.update(rejected)

    # -- per type --------------------------------------------------------------------------
    def _upsert(self, type_url: str, res: Resource) -> None:
        msg = self._decode(res)
        if type_url == CLUSTER:
            eds = eds_name(msg)
            assignment = self._assignment(eds)
            translation = tr.translate_cluster(
                msg, assignment, self._hash_for(res.name), self._options)
            encoded = self._encode(("cluster", res.name), translation)
            self._resources[CLUSTER][res.name] = res
            self._link_eds(res.name, eds)
            self._commit_unit(("cluster", res.name), encoded, translation)
        elif type_url == ENDPOINTS:
            users = sorted(self._eds_users.get(res.name, ()))
            translations = {c: self._translate_cluster(c, msg) for c in users}
            encoded = {c: self._encode(("cluster", c), t) for c, t in translations.items()}
            self._resources[ENDPOINTS][res.name] = res  # all or nothing: nothing raises below
            for cluster, translation in translations.items():
                self._commit_unit(("cluster", cluster), encoded[cluster], translation)
        elif type_url == LISTENER:
            lt = tr.translate_listener(msg, self._options, tr.Clusters(self._cluster_nodes))
            encoded = self._encode(("listener", res.name), lt.translation)
            self._resources[LISTENER][res.name] = res
            self._set_listener_ports(res.name, lt.route_config_ports)
            self._commit_unit(("listener", res.name), encoded, lt.translation)
        else:
            port = self._route_port(res.name)
            translation = self._route_translator(res.name).translate(
                msg, port, self._options, self._cluster_nodes)
            hashes = tr.route_hash_policies(msg)
            encoded = self._encode(("routes", res.name), translation)
            self._resources[ROUTES][res.name] = res
            self._commit_unit(("routes", res.name), encoded, translation)
            self._set_route_hashes(res.name, hashes)

    def _remove(self, type_url: str, name: str) -> None:
        del self._resources[type_url][name]
        if type_url == CLUSTER:
            self._link_eds(name, None)
            self._set_unit(("cluster", name), None)
        elif type_url == ENDPOINTS:
            for cluster in sorted(self._eds_users.get(name, ())):
                self._retranslate_cluster(cluster)
        elif type_url == LISTENER:
            self._set_listener_ports(name, {})
            self._set_unit(("listener", name), None)
        else:
            self._route_translators.pop(name, None)
            self._set_unit(("routes", name), None)
            self._set_route_hashes(name, {})

    # -- joins -----------------------------------------------------------------------------
    def _decode(self, res: Resource) -> Any:
        self._decoded_in_use.append(res)  # released when the apply is done
        return res.message()

    def _assignment(self, eds_name: str | None) -> Any:
        res = self._resources[ENDPOINTS].get(eds_name) if eds_name else None
        return self._decode(res) if res is not None else None

    def _translate_cluster(self, name: str, assignment: Any) -> tr.Translation:
        cluster = self._decode(self._resources[CLUSTER][name])
        return tr.translate_cluster(cluster, assignment, self._hash_for(name), self._options)

    def _retranslate_cluster(self, name: str) -> None:
        try:
            assignment = self._assignment(self._cluster_eds.get(name))
            translation = self._translate_cluster(name, assignment)
        except Exception as exc:
            # The cluster itself was accepted; keep its last good upstream.
            log.error("cluster %r kept at its last good upstream: %s", name, exc,
                      exc_info=not isinstance(exc, (tr.InvalidResource, ValueError)))
            return
        self._set_unit_or_keep(("cluster", name), translation)

    def _link_eds(self, cluster: str, eds: str | None) -> None:
        old = self._cluster_eds.pop(cluster, None)
        if old is not None:
            users = self._eds_users.get(old, set())
            users.discard(cluster)
            if not users:
                self._eds_users.pop(old, None)
        if eds is not None:
            self._cluster_eds[cluster] = eds
            self._eds_users.setdefault(eds, set()).add(cluster)

    def _route_port(self, route_config: str) -> int | None:
        # The first listener (by name) that references the route configuration gives the port.
        for listener in sorted(self._listener_ports):
            ports = self._listener_ports[listener]
            if route_config in ports:
                return ports[route_config]
        return None

    @staticmethod
    def _rejoin(table: dict[str, dict[str, Any]], owner: str, entries: dict[str, Any],
                lookup: Callable[[str], Any], present: Collection[str],
                retranslate: Callable[[str], None]) -> None:
        """`owner` (a listener, a route configuration) now gives `entries` to the resources
        they name: re-translate each present one whose joined value (lookup) changed."""
        old = table.get(owner, {})
        if old == entries:
            return
        names = set(old) | set(entries)
        before = {name: lookup(name) for name in names}
        if entries:
            table[owner] = dict(entries)
        else:
            table.pop(owner, None)
        for name in sorted(names):
            if name in present and lookup(name) != before[name]:
                retranslate(name)

    def _set_listener_ports(self, listener: str, ports: dict[str, int | None]) -> None:
        self._rejoin(self._listener_ports, listener, ports, self._route_port,
                     self._resources[ROUTES], self._retranslate_routes)

    def _retranslate_routes(self, name: str) -> None:
        msg = self._decode(self._resources[ROUTES][name])
        try:
            translation = self._route_translator(name).translate(
                msg, self._route_port(name), self._options, self._cluster_nodes)
        except Exception as exc:
            log.error("route configuration %r kept at its last good routes: %s", name, exc,
                      exc_info=not isinstance(exc, (tr.InvalidResource, ValueError)))
            return
        self._set_unit_or_keep(("routes", name), translation)

    def _retranslate_listener(self, name: str) -> None:
        msg = self._decode(self._resources[LISTENER][name])
        try:
            lt = tr.translate_listener(msg, self._options, tr.Clusters(self._cluster_nodes))
        except Exception as exc:
            log.error("listener %r kept at its last good objects: %s", name, exc,
                      exc_info=not isinstance(exc, (tr.InvalidResource, ValueError)))
            return
        self._set_unit_or_keep(("listener", name), lt.translation)

    def _cluster_changed(self, name: str, translation: tr.Translation | None) -> None:
        """Record whether cluster `name` exists and its mirror node; re-translate the route
        configurations and listeners that asked about it and would now get another answer.
        O(what asked about this cluster): an endpoint change costs nothing more unless it
        moves a mirror node someone uses."""
        before = self._cluster_nodes.get(name, _ABSENT)
        if translation is None or not translation.objects:
            self._cluster_nodes.pop(name, None)
        else:
            upstream = next(iter(translation.objects.values()))
            self._cluster_nodes[name] = tr.mirror_node(upstream)
        if self._cluster_nodes.get(name, _ABSENT) == before:
            return
        for unit, asked in sorted(self._dep_users.get(name, {}).items()):
            if any(tr.cluster_answer(self._cluster_nodes, (kind, name)) != answer
                   for kind, answer in asked.items()):
                if unit[0] == "routes" and unit[1] in self._resources[ROUTES]:
                    self._retranslate_routes(unit[1])
                elif unit[0] == "listener" and unit[1] in self._resources[LISTENER]:
                    self._retranslate_listener(unit[1])

    def _set_deps(self, unit: Unit, deps: dict[tuple[str, str], object]) -> None:
        """Index a unit's recorded cluster answers by cluster (see _cluster_changed)."""
        for cluster in self._unit_deps.pop(unit, ()):
            users = self._dep_users.get(cluster)
            if users is not None:
                users.pop(unit, None)
                if not users:
                    del self._dep_users[cluster]
        by_cluster: dict[str, dict[str, object]] = {}
        for (kind, cluster), answer in deps.items():
            by_cluster.setdefault(cluster, {})[kind] = answer
        if by_cluster:
            self._unit_deps[unit] = frozenset(by_cluster)
            for cluster, asked in by_cluster.items():
                self._dep_users.setdefault(cluster, {})[unit] = asked

    def _route_translator(self, route_config: str) -> RouteConfigTranslator:
        translator = self._route_translators.get(route_config)
        if translator is None:
            translator = self._route_translators[route_config] = RouteConfigTranslator()
        return translator

    def _hash_for(self, cluster: str) -> tr.HashPolicy | None:
        for rc in sorted(self._route_hashes):
            policy = self._route_hashes[rc].get(cluster)
            if policy is not None:
                return policy
        return None

    def _set_route_hashes(self, route_config: str, hashes: dict[str, tr.HashPolicy]) -> None:
        self._rejoin(self._route_hashes, route_config, hashes, self._hash_for,
                     self._resources[CLUSTER], self._retranslate_cluster)

    # -- units -> sink ---------------------------------------------------------------------
    def _encode(self, unit: Unit, translation: tr.Translation | None) -> dict[str, bytes]:
        """A unit's objects as the bytes the dict gets. Raises ObjectTooLarge for an object
        that could never fit the dict: its resource is rejected alone (nothing changed)."""
        if translation is None:
            return {}
        limit = self._max_object_bytes()
        encoded = {key: to_json(obj) for key, obj in translation.objects.items()}
        encoded.update(translation.encoded)  # pieces the route cache reused
        for key, value in encoded.items():
            if limit and len(value) > limit:
                raise ObjectTooLarge(
                    f"{key} would take {len(value)} bytes; the dict takes objects up to "
                    f"{limit} bytes (limits.max_object_bytes, or a quarter of the dict)")
        return encoded

    def _max_object_bytes(self) -> int:
        configured = int(self._config.limit("max_object_bytes"))
        if configured:
            return configured
        capacity = self._queue.dict_capacity()
        return capacity // 4

    def _set_unit(self, unit: Unit, translation: tr.Translation | None) -> None:
        self._commit_unit(unit, self._encode(unit, translation), translation)

    def _set_unit_or_keep(self, unit: Unit, translation: tr.Translation) -> None:
        """A join's re-translation: an object too large keeps the unit's last good keys."""
        try:
            encoded = self._encode(unit, translation)
        except ObjectTooLarge as exc:
            log.error("%s kept at its last good objects: %s", unit, exc)
            return
        self._commit_unit(unit, encoded, translation)

    def _commit_unit(self, unit: Unit, wanted: dict[str, bytes],
                     translation: tr.Translation | None) -> None:
        if translation is not None:
            self._record_skips(unit, translation.skipped)
        else:
            self._unit_skips.pop(unit, None)
        self._keys.set(unit, wanted)
        if unit[0] in ("routes", "listener"):
            self._set_deps(unit, translation.cluster_deps if translation is not None else {})
        elif unit[0] == "cluster":
            self._cluster_changed(unit[1], translation)

    def _record_skips(self, unit: Unit, skips: list[tr.Skip]) -> None:
        if skips:
            self._unit_skips[unit] = list(skips)
        else:
            self._unit_skips.pop(unit, None)
        for skip in skips:
            if skip.feature not in self._logged_features:
                self._logged_features.add(skip.feature)
                log.warning("not expressible in APISIX, skipped: %s (first seen in %s: %s)",
                            skip.feature, skip.resource, skip.detail)

    # -- the agent thread's periodic work --------------------------------------------------
    def _needed_types(self) -> set[str]:
        """A whole config: clusters, listeners, and the endpoints and routes they name."""
        needed = {CLUSTER, LISTENER}
        if self._eds_users:
            needed.add(ENDPOINTS)
        if any(self._listener_ports.values()):
            needed.add(ROUTES)
        return needed

    def _refresh_certs(self) -> None:
        if self._certs is None or not self._certs.changed():
            return
        ssl = self._certs.load()
        self._set_unit(("certs", "istio"), tr.Translation({SSL_KEY: ssl} if ssl else {}, []))
        if self._certs.error:
            log.warning("%s", self._certs.error)
        cert_id = ISTIO_CLIENT_SSL_ID if ssl else None
        if cert_id != self._options.istio_client_cert_id:
            # ISTIO_MUTUAL upstreams name the SSL object only while it is in the dict.
            self._options = dataclasses.replace(self._options, istio_client_cert_id=cert_id)
            for cluster in sorted(self._resources[CLUSTER]):
                self._retranslate_cluster(cluster)

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._refresh_certs()
            if self._first_sync.check(now, self._needed_types()):
                self._flush(now)

    def _flush(self, now: float) -> None:
        batch_before = self.sink.counts["sets"]
        if self.sink.flush(now) is not None and self.first_batch_at is None:
            self.first_batch_at = time.time()
        if self.sink.counts["sets"] - batch_before >= _TRIM_AFTER_SETS:
            _trim_heap()

    def _release_decoded(self) -> None:
        for res in self._decoded_in_use:
            res.release()
        self._decoded_in_use.clear()

    def on_reports(self, reports: list[tuple[int, int, str]]) -> None:
        with self._lock:
            for batch, status, message in reports:
                self.sink.on_report(batch, status, message)
                if status != 0:
                    self._queue.log_error(f"dict write failed (batch {batch}): {message}")

    def skips(self) -> list[tr.Skip]:
        """Every Skip of the current translation (status() only counts them by feature)."""
        with self._lock:
            return [s for unit in sorted(self._unit_skips) for s in self._unit_skips[unit]]

    def attach_source(self, source: Source) -> None:
        self._source = source

    def _not_ready_because(self, source: dict[str, Any]) -> str:
        """Why the dict may not hold the source's whole current config ("" when it does)."""
        if not source.get("complete", False):
            return source.get("incomplete_because") or "the source has no complete config yet"
        if not self._first_sync.done:
            return "waiting for the first whole config"
        if not self.sink.in_dict:
            return "changes not yet applied to the dict"
        return ""

    def status(self) -> dict[str, Any]:
        with self._lock:
            skipped: dict[str, int] = {}
            for skips in self._unit_skips.values():
                for skip in skips:
                    skipped[skip.feature] = skipped.get(skip.feature, 0) + 1
            source = self._source.status() if self._source is not None else {}
            cap = int(self._config.limit("status_max_rejected"))
            source = _capped(source, cap)
            why_not = self._not_ready_because(source)
            ready = not why_not
            return {
                "source": source,
                "connected": bool(source.get("connected")),
                "first_sync_done": self._first_sync.done,
                "synced": ready,  # kept for readers of earlier versions: same as "ready"
                "ready": ready,
                "not_ready_because": why_not,
                "resources": {SHORT_NAMES[t]: len(v) for t, v in self._resources.items()},
                "objects": len(self._keys),
                # The first few per type: a status must stay small (it shares a dict with
                # APISIX's version key); the counts are whole.
                "rejected": {SHORT_NAMES[t]: dict(itertools.islice(sorted(v.items()), cap))
                             for t, v in self._rejected.items() if v},
                "rejected_counts": {SHORT_NAMES[t]: len(v)
                                    for t, v in self._rejected.items() if v},
                "rejected_count": sum(len(v) for v in self._rejected.values()),
                "skipped": skipped,
                "collisions": dict(self._keys.collisions),
                "istio_certs": (("loaded" if SSL_KEY in self._keys else self._certs.error
                                 or "missing") if self._certs else "not managed"),
                "sink": self.sink.status(),
                "started_at": self.started_at,
                "first_batch_at": self.first_batch_at,
            }
