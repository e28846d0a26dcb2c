"""file://PATH: a file or a folder of Envoy resources, reloaded when it changes.

Like Envoy's path-based config sources, a file holds Envoy's JSON/YAML forms: single
resources with "@type", lists of them, whole DiscoveryResponses ({"resources": [...]}), or
an Envoy admin `/config_dump` (also `istioctl proxy-config all -o json`), whose dynamic
resources are read as they are (static ones are the proxy's own bootstrap plumbing).
Typed configs of any type are accepted (typed_json.py): unknown ones are carried opaquely.
A file that cannot be read or parsed keeps its last good resources; a bad resource is
rejected alone (logged, listed in status) and everything else is applied.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..resources import TYPE_ORDER, Resource, ResourceError, parse_json_resource
from . import typed_json
from .base import ResourceHandler

log = logging.getLogger("amesh.file")

SUFFIXES = (".json", ".yaml", ".yml")


def _documents(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return [json.loads(text)]
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


# envoy.admin.v3 *ConfigDump: (list field, the resource inside each entry). Listeners sit
# under active_state (warming ones are not serving yet).
_DUMP_SECTIONS = {
    "ClustersConfigDump": ("dynamic_active_clusters", ("cluster",)),
    "EndpointsConfigDump": ("dynamic_endpoint_configs", ("endpoint_config",)),
    "ListenersConfigDump": ("dynamic_listeners", ("active_state", "listener")),
    "RoutesConfigDump": ("dynamic_route_configs", ("route_config",)),
}


def _dump_resources(configs: list) -> Iterator[Any]:
    """The dynamic resources of an Envoy /config_dump's `configs`."""
    for section in configs:
        if not isinstance(section, dict):
            continue
        kind = str(section.get("@type", "")).rsplit(".", 1)[-1]
        if kind not in _DUMP_SECTIONS:
            continue  # bootstrap, secrets, scoped routes, ECDS: not mesh resources
        list_field, path = _DUMP_SECTIONS[kind]
        for entry in section.get(list_field) or []:
            for step in path:
                entry = entry.get(step) if isinstance(entry, dict) else None
            if entry is not None:
                yield entry


def _resource_objects(doc: Any) -> Iterator[Any]:
    """The resources in one document, whatever its form."""
    if isinstance(doc, list):
        for item in doc:
            yield from _resource_objects(item)
    elif isinstance(doc, dict) and "@type" not in doc and isinstance(doc.get("configs"), list):
        yield from _dump_resources(doc["configs"])
    elif isinstance(doc, dict) and "@type" not in doc and "resources" in doc:
        resources = doc["resources"]
        yield from resources if isinstance(resources, list) else [resources]
    else:
        yield doc


def parse_resource(obj: Any, where: str) -> tuple[Resource, list[str]]:
    """One resource from its JSON form, and the type URLs of the typed configs inside it
    that are carried opaquely (no descriptor for them in xds-protos)."""
    prepared, opaque = typed_json.prepare(obj)
    res = parse_json_resource(prepared, where)
    if opaque:
        msg = res.message()
        typed_json.restore_opaque(msg)
        res = Resource.from_message(res.type_url, msg)
    return res, opaque


def load_file(path: Path) -> tuple[list[Resource], list[ResourceError], set[str]]:
    """Resources of one file, the errors of the ones that were rejected, and the type URLs
    carried opaquely. Raises OSError/ValueError when the file as a whole cannot be read or
    parsed."""
    resources: list[Resource] = []
    errors: list[ResourceError] = []
    opaque: set[str] = set()
    for d, doc in enumerate(_documents(path)):
        for i, obj in enumerate(_resource_objects(doc)):
            try:
                res, types = parse_resource(obj, f"{path} (document {d}, item {i})")
            except ResourceError as exc:
                errors.append(exc)
                continue
            resources.append(res)
            opaque.update(types)
    return resources, errors, opaque


class FileSource:
    def __init__(self, path: str, handler: ResourceHandler, poll_interval: float = 0.5) -> None:
        self._root = Path(path)
        self._handler = handler
        self._interval = poll_interval
        self._stop = threading.Event()
        self._signature: tuple[Any, ...] | None = None
        self._by_file: dict[Path, list[Resource]] = {}  # last good resources of each file
        self._held: dict[str, set[str]] = {t: set() for t in TYPE_ORDER}
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {
            "kind": "file", "path": str(self._root), "connected": False, "loads": 0,
            "last_load": None,
            "files": 0, "errors": [], "rejected": {}, "opaque_types": [],
        }

    def _files(self) -> list[Path]:
        if self._root.is_dir():
            return sorted(p for p in self._root.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        return [self._root] if self._root.exists() else []

    def _current_signature(self, files: list[Path]) -> tuple[Any, ...]:
        sig = []
        for p in files:
            try:
                st = p.stat()
                sig.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                sig.append((str(p), None))
        return tuple(sig)

    def load_once(self) -> bool:
        """Reload if anything changed; returns True when the handler was called."""
        files = self._files()
        signature = self._current_signature(files)
        if signature == self._signature:
            return False
        self._signature = signature
        errors: list[str] = []
        bad_names: set[tuple[str, str]] = set()  # rejected but named: keep their last good
        if not files:
            errors.append(f"{self._root}: no {'/'.join(SUFFIXES)} file found")
        by_file: dict[Path, list[Resource]] = {}
        opaque: set[str] = set()
        for path in files:
            try:
                resources, bad, types = load_file(path)
                by_file[path] = resources
                opaque |= types
                errors += [str(e) for e in bad]
                bad_names |= {(e.type_url, e.name) for e in bad if e.name}
            except (OSError, ValueError, yaml.YAMLError) as exc:
                errors.append(f"{path}: cannot load, keeping its last good resources: {exc}")
                by_file[path] = self._by_file.get(path, [])
        self._by_file = by_file
        with self._lock:
            # Typed configs without a descriptor, kept as bytes (what ADS delivers anyway).
            self._status["opaque_types"] = sorted(opaque)
        self._apply(by_file, errors, bad_names)
        return True

    def _apply(
        self, by_file: dict[Path, list[Resource]], errors: list[str], bad: set[tuple[str, str]]
    ) -> None:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in TYPE_ORDER}
        for path, resources in by_file.items():
            for res in resources:
                same = by_type[res.type_url]
                if res.name in same:
                    errors.append(f"{path}: duplicate {res.type_url.rsplit('.', 1)[-1]} "
                                  f"{res.name!r} ignored (first definition wins)")
                    continue
                same[res.name] = res
        rejected: dict[str, str] = {}
        for type_url in TYPE_ORDER:
            current = by_type[type_url]
            kept = {name for t, name in bad if t == type_url}
            removed = self._held[type_url] - current.keys() - kept
            rejected.update(self._handler.apply(type_url, list(current.values()), removed))
            self._held[type_url] = (self._held[type_url] & kept) | set(current)
        for msg in errors:
            log.error("%s", msg)
        with self._lock:
            self._status.update(
                loads=self._status["loads"] + 1, last_load=time.time(), files=len(by_file),
                connected=bool(by_file),  # "connected" to a file source: it has files
                errors=errors, rejected=rejected,
                resources={t.rsplit(".", 1)[-1]: len(v) for t, v in by_type.items()},
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.load_once()
            except Exception:  # never let the watcher die: the next change may load fine
                log.exception("file source %s", self._root)
            self._stop.wait(self._interval)

    def start(self) -> None:
        threading.Thread(target=self._run, name="amesh-file", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            status = dict(self._status)
        # A path that does not exist is no config, not an empty one.
        why = ("" if status["files"] else f"{self._root} has no readable config files"
               if self._root.exists() else f"{self._root} does not exist")
        if not status["loads"]:
            why = "not read yet"
        return {**status, "complete": not why, "incomplete_because": why}

