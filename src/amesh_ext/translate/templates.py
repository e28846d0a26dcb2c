"""Envoy header-value formatting (`%CMD%`, `%%`) -> APISIX `$var` templates, and keeping
literal `$` literal.

APISIX expands `$word`, `${word}` (core.utils.resolve_var) in proxy-rewrite header values,
response-rewrite header values and fault-injection bodies, and `$1` captures in proxy-rewrite.
A backslash stops the expansion but stays in the output, so `\\$` is no escape. What does
work: `${name??default}` expands to `default` when the var `name` is unset (nil); with an
undefined var name and default `$`, it yields a literal `$`. Only a `$` that APISIX would
expand (not after a backslash, followed by a word character, `.` or `{`) is rewritten.
"""

from __future__ import annotations

import re

# An nginx/APISIX variable name nothing defines, so its `??` default is always used.
LITERAL_DOLLAR = "${amesh_literal_dollar??$}"
_EXPANDED_DOLLAR = re.compile(r"(?<!\\)\$(?=[\w.{])", re.ASCII)
_FORMAT = re.compile(r"%%|%([A-Z_0-9]+)(?:\(([^)]*)\))?(?::[0-9]+)?%")

_COMMANDS = {
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": "${remote_addr}",
    "DOWNSTREAM_REMOTE_ADDRESS": "${remote_addr}:${remote_port}",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": "${realip_remote_addr}",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": "${server_addr}",
    "DOWNSTREAM_LOCAL_ADDRESS": "${server_addr}:${server_port}",
    "DOWNSTREAM_LOCAL_PORT": "${server_port}",
    "HOSTNAME": "${hostname}",
    "PROTOCOL": "${server_protocol}",
    "REQUEST_ID": "${request_id}",
}


def literal(text: str) -> str:
    """`text` as an APISIX template that expands to exactly `text`."""
    if "$" not in text:
        return text  # the common case, without the regex
    return _EXPANDED_DOLLAR.sub(lambda _: LITERAL_DOLLAR, text)


def header_var(name: str) -> str:
    """The APISIX var of a request header (lowercase, '-' -> '_')."""
    name = name.lower()
    if name == ":authority":
        return "http_host"
    return "http_" + name.replace("-", "_")


def envoy_format(value: str) -> str | None:
    """An Envoy header value (with `%CMD%` substitutions) as an APISIX template, or None
    when a command has no APISIX equivalent."""
    out: list[str] = []
    pos = 0
    for m in _FORMAT.finditer(value):
        out.append(literal(value[pos : m.start()]))
        pos = m.end()
        if m.group(0) == "%%":
            out.append("%")
            continue
        cmd, arg = m.group(1), m.group(2)
        if cmd == "REQ" and arg and "?" not in arg and re.fullmatch(r"[A-Za-z0-9_:-]+", arg):
            sub = "${" + header_var(arg) + "}"
        elif arg is None and cmd in _COMMANDS:
            sub = _COMMANDS[cmd]
        else:
            return None
        if out and out[-1].endswith("\\"):
            return None  # a backslash right before `$` would stop APISIX's expansion
        out.append(sub)
    if "%" in value[pos:]:
        return None  # an unterminated or unknown `%...` Envoy would reject or keep raw
    out.append(literal(value[pos:]))
    return "".join(out)
