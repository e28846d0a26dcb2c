"""Envoy header mutations (route, virtual host and route config levels) -> the headers
part of APISIX's proxy-rewrite (request) and response-rewrite (response).

Envoy applies, per level, remove, then overwrite, then append; the route's level first,
then the virtual host's, then the route config's (reversed under
most_specific_header_mutations_wins), each later one winning. APISIX applies add, then set,
then remove. So the end state of each header is computed here and expressed so that
APISIX's order cannot change it: a header is either kept and appended to (`add`), replaced
by a list of values (`set`), or removed (`remove`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Skips
from .templates import envoy_format

# envoy.config.core.v3.HeaderValueOption.HeaderAppendAction
_APPEND, _ADD_IF_ABSENT, _OVERWRITE, _OVERWRITE_IF_EXISTS = 0, 1, 2, 3


@dataclass
class _State:
    replaced: bool = False  # the original values are gone
    values: list[str] = field(default_factory=list)


@dataclass
class HeaderLevel:
    """One level's mutations: (HeaderValueOption list, names to remove)."""

    add: list
    remove: list[str]
    where: str


def _action(hvo) -> int:
    if hvo.HasField("append"):  # the deprecated BoolValue wins when set
        return _APPEND if hvo.append.value else _OVERWRITE
    return hvo.append_action


def fold(levels: list[HeaderLevel], skips: Skips, feature: str) -> dict[str, _State]:
    """End state per lowercased header name after all levels, in evaluation order."""
    states: dict[str, _State] = {}
    for level in levels:
        for name in level.remove:
            states[name.lower()] = _State(replaced=True)
        appends: list[tuple[str, str]] = []
        for hvo in level.add:
            name = hvo.header.key.lower()
            raw = hvo.header.value or hvo.header.raw_value.decode("utf-8", "replace")
            if name.startswith(":") or name == "host":
                skips.add(feature, f"header {name!r} cannot be mutated", level.where)
                continue
            if raw == "" and not hvo.keep_empty_value:
                continue  # Envoy skips empty values unless keep_empty_value
            value = envoy_format(raw)
            if value is None:
                skips.add(feature, f"header {name!r}: value {raw!r} has an Envoy format "
                          "command APISIX cannot evaluate", level.where)
                continue
            action = _action(hvo)
            if action == _OVERWRITE:
                states[name] = _State(replaced=True, values=[value])
            elif action == _APPEND:
                appends.append((name, value))
            else:
                skips.add(feature, f"header {name!r}: append_action {action} (add only if "
                          "absent / overwrite only if present) depends on the request",
                          level.where)
        for name, value in appends:
            states.setdefault(name, _State()).values.append(value)
    return states


def _one(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else list(values)


def request_headers(states: dict[str, _State]) -> dict:
    """proxy-rewrite `headers` ({add, set, remove}); {} when nothing changes."""
    add: dict = {}
    set_: dict = {}
    remove: list[str] = []
    for name in sorted(states):
        st = states[name]
        if st.replaced:
            if st.values:
                set_[name] = _one(st.values)
            else:
                remove.append(name)
        elif st.values:
            add[name] = _one(st.values)
    return _mutations(add, set_, remove)


def response_headers(states: dict[str, _State], skips: Skips, where: str) -> dict:
    """response-rewrite `headers` ({add: ["N: v"], set, remove}); {} when nothing changes.
    Its `add` entries must match `^[^:]+:[^:]*[^/]$` and `set` takes one value per name."""
    add: list[str] = []
    set_: dict = {}
    remove: list[str] = []
    for name in sorted(states):
        st = states[name]
        if st.replaced and not st.values:
            remove.append(name)
            continue
        if st.replaced:
            # APISIX sets after adding: a replaced header can carry one value only.
            set_[name] = st.values[0]
            if len(st.values) > 1:
                skips.add("response_header_mutation",
                          f"response header {name!r}: only the first of "
                          f"{len(st.values)} values is set", where)
            continue
        for v in st.values:
            if ":" in v or v.endswith("/") or v == "":
                skips.add("response_header_mutation",
                          f"response header {name!r}: value {v!r} cannot be appended", where)
                continue
            add.append(f"{name}: {v}")
    return _mutations(add, set_, remove)


def _mutations(add: dict | list, set_: dict, remove: list) -> dict:
    """The plugin's `headers` object, with only the parts that hold something."""
    return {k: v for k, v in (("add", add), ("set", set_), ("remove", remove)) if v}
