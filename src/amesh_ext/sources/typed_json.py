"""Envoy JSON with typed configs (`Any` fields, `"@type"`) that amesh does not know.

istiod's and istio-proxy's JSON carries typed configs of every kind: Envoy extensions that
amesh never imports (RBAC, access loggers, DNS resolvers, request-id), Istio's own (the
stats `PluginConfig`, metadata exchange) and others no xds-protos release has. Over ADS an
`Any` travels as bytes and needs no descriptor; protobuf's JSON parser needs one for every
`"@type"`. So, before parsing:

- every type xds-protos knows is registered (all its `_pb2` modules are imported, once, the
  first time a document names a type that is not registered yet);
- a typed config whose type is still unknown is carried opaquely: parsed as a
  `google.protobuf.Struct` placeholder, then turned back into an `Any` with the original type
  URL and the Struct encoding of its fields as value. Its filter or extension is then what
  the translator reports (a Skip), like any other it does not translate.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Any

from google.protobuf import descriptor_pool, message_factory, struct_pb2
from google.protobuf.any_pb2 import Any as AnyMsg
from google.protobuf.message import Message

_STRUCT_URL = "type.googleapis.com/google.protobuf.Struct"
_OPAQUE_KEY = "amesh.opaque_type_url"  # not a valid proto field name: no real Struct has it
# The packages xds-protos installs; `google` is protobuf's own (well-known types) as well.
_PACKAGES = ("envoy", "xds", "udpa", "validate", "opencensus", "opentelemetry", "cel")
_lock = threading.Lock()
_all_registered = False


def register_all_protos() -> None:
    """Import every generated module of xds-protos (about 600; ~1 s and ~12 MB once)."""
    global _all_registered
    with _lock:
        if _all_registered:
            return
        for top in _PACKAGES:
            try:
                pkg = importlib.import_module(top)
            except ImportError:
                continue
            for mod in pkgutil.walk_packages(pkg.__path__, top + "."):
                if mod.name.endswith("_pb2"):
                    try:
                        importlib.import_module(mod.name)
                    except Exception:  # a module of a broken optional dependency
                        continue
        _all_registered = True


def _known(type_url: str) -> bool:
    try:
        descriptor_pool.Default().FindMessageTypeByName(type_url.rsplit("/", 1)[-1])
    except KeyError:
        return False
    return True


def _type_urls(doc: Any, out: set[str]) -> set[str]:
    if isinstance(doc, dict):
        url = doc.get("@type")
        if isinstance(url, str):
            out.add(url)
        for value in doc.values():
            _type_urls(value, out)
    elif isinstance(doc, list):
        for value in doc:
            _type_urls(value, out)
    return out


def _wrap_unknown(doc: Any, unknown: set[str]) -> Any:
    if isinstance(doc, list):
        return [_wrap_unknown(v, unknown) for v in doc]
    if not isinstance(doc, dict):
        return doc
    url = doc.get("@type")
    if isinstance(url, str) and url in unknown:
        fields = {k: v for k, v in doc.items() if k != "@type"}
        return {"@type": _STRUCT_URL, "value": {_OPAQUE_KEY: url, "fields": fields}}
    return {k: _wrap_unknown(v, unknown) for k, v in doc.items()}


def prepare(doc: Any) -> tuple[Any, list[str]]:
    """`doc` ready for json_format.ParseDict, and the type URLs it carries opaquely (pass
    the parsed message to restore_opaque when there are any)."""
    urls = _type_urls(doc, set())
    unknown = {u for u in urls if not _known(u)}
    if unknown and not _all_registered:
        register_all_protos()
        unknown = {u for u in unknown if not _known(u)}
    if not unknown:
        return doc, []
    return _wrap_unknown(doc, unknown), sorted(unknown)


def _restore_any(any_msg: AnyMsg) -> bool:
    """Restore a placeholder Any, or the placeholders inside a known Any's message (which
    is unpacked and packed again); True when something changed."""
    name = any_msg.type_url.rsplit("/", 1)[-1]
    if any_msg.type_url == _STRUCT_URL:
        placeholder = struct_pb2.Struct()
        any_msg.Unpack(placeholder)
        if _OPAQUE_KEY not in placeholder.fields:
            return False
        any_msg.type_url = placeholder[_OPAQUE_KEY]
        any_msg.value = placeholder["fields"].SerializeToString(deterministic=True)
        return True
    try:
        cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(
            name))
    except KeyError:
        return False
    inner = cls()
    if not any_msg.Unpack(inner) or not restore_opaque(inner):
        return False
    any_msg.value = inner.SerializeToString(deterministic=True)
    return True


def restore_opaque(msg: Message) -> bool:
    """Turn prepare()'s placeholders inside a parsed message back into opaque Anys; True
    when there were any."""
    if msg.DESCRIPTOR.full_name == "google.protobuf.Any":
        return _restore_any(msg)  # type: ignore[arg-type]
    changed = False
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.is_repeated:
            if field.message_type.GetOptions().map_entry:
                if field.message_type.fields_by_name["value"].message_type is not None:
                    for item in value.values():
                        changed |= restore_opaque(item)
            else:
                for item in value:
                    changed |= restore_opaque(item)
        else:
            changed |= restore_opaque(value)
    return changed
