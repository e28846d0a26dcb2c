"""APISIX's object schemas, rebuilt in Python from apache/apisix `apisix/schema_def.lua`
(route, upstream, stream_route) and the plugin schemas the translator emits
(traffic-split, proxy-rewrite, fault-injection, proxy-mirror, redirect, cors,
response-rewrite), plus the checks APISIX runs in code beyond the JSON schema
(`check_schema` functions, lua-resty-expr's compile rules).

Test-only tightening: plugin schemas get `additionalProperties: false` (APISIX ignores
unknown plugin keys; for the translator an unknown key is a typo).
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

ID = {"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[a-zA-Z0-9-_.]+$"},
    {"type": "integer", "minimum": 1},
]}
HOST_PAT = r"^\*$|^\*?[0-9a-zA-Z-._\[\]:]+$"
HOST = {"type": "string", "pattern": HOST_PAT}
TIMEOUT = {
    "type": "object",
    "properties": {k: {"type": "number", "exclusiveMinimum": 0}
                   for k in ("connect", "send", "read")},
    "required": ["connect", "send", "read"],
}
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
           "PURGE"]
LABELS = {"type": "object", "patternProperties": {".*": {
    "type": "string", "pattern": r"^\S+$", "maxLength": 256, "minLength": 1}}}
NAME = {"type": "string", "maxLength": 256, "minLength": 1}
DESC = {"type": "string", "maxLength": 256}
STATUSES = {"type": "array", "minItems": 1, "uniqueItems": True,
            "items": {"type": "integer", "minimum": 200, "maximum": 599}}
COUNTER = {"type": "integer", "minimum": 1, "maximum": 254}
COUNTER0 = {"type": "integer", "minimum": 0, "maximum": 254}

ACTIVE = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["http", "https", "tcp"]},
        "timeout": {"type": "number"},
        "concurrency": {"type": "integer"},
        "host": HOST,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "http_method": {"type": "string", "enum": METHODS},
        "http_path": {"type": "string"},
        "http_req_body": {"type": "string"},
        "https_verify_certificate": {"type": "boolean"},
        "healthy": {"type": "object", "properties": {
            "interval": {"type": "integer", "minimum": 1},
            "http_statuses": STATUSES, "successes": COUNTER}},
        "unhealthy": {"type": "object", "properties": {
            "interval": {"type": "integer", "minimum": 1}, "http_statuses": STATUSES,
            "http_failures": COUNTER, "tcp_failures": COUNTER, "timeouts": COUNTER}},
        "req_headers": {"type": "array", "minItems": 1, "items": {"type": "string"}},
    },
}
PASSIVE = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["http", "https", "tcp"]},
        "healthy": {"type": "object", "properties": {
            "http_statuses": STATUSES, "successes": COUNTER0}},
        "unhealthy": {"type": "object", "properties": {
            "http_statuses": STATUSES, "tcp_failures": COUNTER0, "timeouts": COUNTER0,
            "http_failures": COUNTER0}},
    },
}
NODES = {"anyOf": [
    {"type": "object", "patternProperties": {".*": {"type": "integer", "minimum": 0}}},
    {"type": "array", "items": {
        "type": "object",
        "properties": {
            "host": HOST,
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "weight": {"type": "integer", "minimum": 0},
            "priority": {"type": "integer"},
            "metadata": {"type": "object"},
        },
        "required": ["host", "weight"],
    }},
]}
UPSTREAM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": ID, "name": NAME, "desc": DESC, "labels": LABELS,
        "create_time": {"type": "integer"}, "update_time": {"type": "integer"},
        "nodes": NODES,
        "retries": {"type": "integer", "minimum": 0},
        "retry_timeout": {"type": "number", "minimum": 0},
        "timeout": TIMEOUT,
        "tls": {
            "type": "object",
            "properties": {
                "client_cert_id": ID,
                "client_cert": {"type": "string", "minLength": 128, "maxLength": 65536},
                "client_key": {"type": "string", "minLength": 64, "maxLength": 65536},
                "verify": {"type": "boolean"},
            },
            "dependencies": {
                "client_cert": {"required": ["client_key"]},
                "client_key": {"required": ["client_cert"]},
                "client_cert_id": {"not": {"required": ["client_cert", "client_key"]}},
            },
        },
        "keepalive_pool": {"type": "object", "properties": {
            "size": {"type": "integer", "minimum": 1},
            "idle_timeout": {"type": "number", "minimum": 0},
            "requests": {"type": "integer", "minimum": 1}}},
        "type": {"type": "string"},
        "checks": {
            "type": "object",
            "properties": {"active": ACTIVE, "passive": PASSIVE},
            "anyOf": [{"required": ["active"]}, {"required": ["active", "passive"]}],
        },
        "hash_on": {"type": "string",
                    "enum": ["vars", "header", "cookie", "consumer", "vars_combinations"]},
        "key": {"type": "string"},
        "scheme": {"enum": ["grpc", "grpcs", "http", "https", "tcp", "tls", "udp", "kafka"]},
        "discovery_type": {"type": "string"},
        "discovery_args": {"type": "object"},
        "pass_host": {"type": "string", "enum": ["pass", "node", "rewrite"]},
        "upstream_host": HOST,
        "service_name": {"type": "string", "maxLength": 256, "minLength": 1},
    },
    "oneOf": [{"required": ["nodes"]}, {"required": ["service_name", "discovery_type"]}],
    "additionalProperties": False,
}
ROUTE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": ID, "name": NAME, "desc": DESC, "labels": LABELS,
        "create_time": {"type": "integer"}, "update_time": {"type": "integer"},
        "uri": {"type": "string", "minLength": 1, "maxLength": 4096},
        "uris": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                 "uniqueItems": True},
        "priority": {"type": "integer"},
        "methods": {"type": "array", "items": {"type": "string", "enum": METHODS},
                    "uniqueItems": True},
        "host": HOST,
        "hosts": {"type": "array", "items": HOST, "minItems": 1, "uniqueItems": True},
        "remote_addr": {"type": "string"},
        "remote_addrs": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "timeout": TIMEOUT,
        "vars": {"type": "array"},
        "filter_func": {"type": "string", "minLength": 10, "pattern": "^function"},
        "script": {"type": "string", "minLength": 10, "maxLength": 102400},
        "script_id": ID,
        "plugins": {"type": "object"},
        "plugin_config_id": ID,
        "upstream": UPSTREAM,
        "service_id": ID,
        "upstream_id": ID,
        "enable_websocket": {"type": "boolean"},
        "status": {"type": "integer", "enum": [1, 0]},
    },
    "allOf": [
        {"oneOf": [{"required": ["uri"]}, {"required": ["uris"]}]},
        {"oneOf": [{"not": {"anyOf": [{"required": ["host"]}, {"required": ["hosts"]}]}},
                   {"required": ["host"]}, {"required": ["hosts"]}]},
    ],
    "anyOf": [{"required": [a, b]} for a in ("plugins", "upstream", "upstream_id",
                                             "service_id", "script")
              for b in ("uri", "uris")],
    "not": {"anyOf": [{"required": ["script", "plugins"]},
                      {"required": ["script", "plugin_config_id"]}]},
    "additionalProperties": False,
}
STREAM_ROUTE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": ID, "name": NAME, "desc": DESC, "labels": LABELS,
        "create_time": {"type": "integer"}, "update_time": {"type": "integer"},
        "remote_addr": {"type": "string"},
        "server_addr": {"type": "string"},
        "server_port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "sni": {"type": "string", "pattern": HOST_PAT},
        "upstream": UPSTREAM,
        "upstream_id": ID,
        "service_id": ID,
        "plugins": {"type": "object"},
        "protocol": {"type": "object"},
    },
    "additionalProperties": False,
}

_HEADER_VALUE = {"oneOf": [{"type": "string"}, {"type": "number"}]}
_HEADER_VALUES = {"oneOf": [
    {"type": "string"}, {"type": "number"},
    {"type": "array", "minItems": 1, "items": {"oneOf": [{"type": "string"},
                                                         {"type": "number"}]}}]}
_VARS_LIST = {"type": "array", "maxItems": 20, "items": {"type": "array"}}
_ORIGINS = r"^(\*|\*\*|null|\w+://[^,]+(,\w+://[^,]+)*)$"
_REGEX_LIST = {"type": "array", "minItems": 1, "uniqueItems": True,
               "items": {"type": "string", "minLength": 1, "maxLength": 4096}}

PLUGINS: dict[str, dict[str, Any]] = {
    "traffic-split": {
        "type": "object",
        "properties": {"rules": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "match": {"type": "array", "items": {
                    "type": "object", "properties": {"vars": {"type": "array"}},
                    "additionalProperties": False}},
                "weighted_upstreams": {
                    "type": "array", "minItems": 1, "maxItems": 20,
                    "items": {"type": "object", "properties": {
                        "upstream_id": ID, "upstream": UPSTREAM,
                        "weight": {"type": "integer", "minimum": 0}},
                        "additionalProperties": False}},
            },
            "additionalProperties": False,
        }}},
    },
    "proxy-rewrite": {
        "type": "object",
        "properties": {
            "uri": {"type": "string", "minLength": 1, "maxLength": 4096, "pattern": r"^\/.*"},
            "method": {"type": "string"},
            "regex_uri": {"type": "array", "minItems": 2, "items": {"type": "string"}},
            "host": {"type": "string", "pattern": r"^[0-9a-zA-Z-.]+(:\d{1,5})?$"},
            "headers": {"oneOf": [
                {"type": "object", "minProperties": 1, "additionalProperties": False,
                 "properties": {
                     "add": {"type": "object", "minProperties": 1,
                             "patternProperties": {"^[^:]+$": _HEADER_VALUES},
                             "additionalProperties": False},
                     "set": {"type": "object", "minProperties": 1,
                             "patternProperties": {"^[^:]+$": _HEADER_VALUES},
                             "additionalProperties": False},
                     "remove": {"type": "array", "minItems": 1,
                                "items": {"type": "string", "pattern": "^[^:]+$"}}}},
                {"type": "object", "minProperties": 1,
                 "patternProperties": {"^[^:]+$": _HEADER_VALUE},
                 "additionalProperties": False},
            ]},
            "use_real_request_uri_unsafe": {"type": "boolean"},
        },
        "minProperties": 1,
    },
    "fault-injection": {
        "type": "object",
        "properties": {
            "abort": {"type": "object", "properties": {
                "http_status": {"type": "integer", "minimum": 200},
                "body": {"type": "string", "minLength": 0},
                "headers": {"type": "object", "minProperties": 1,
                            "patternProperties": {"^[^:]+$": _HEADER_VALUE},
                            "additionalProperties": False},
                "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "vars": _VARS_LIST},
                "required": ["http_status"], "additionalProperties": False},
            "delay": {"type": "object", "properties": {
                "duration": {"type": "number", "minimum": 0},
                "percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "vars": _VARS_LIST},
                "required": ["duration"], "additionalProperties": False},
        },
        "minProperties": 1,
    },
    "proxy-mirror": {
        "type": "object",
        "properties": {
            "host": {"type": "string", "pattern":
                     r"^(http(s)?|grpc(s)?):\/\/([\da-zA-Z.-]+|\[[\da-fA-F:]+\])(:\d+)?$"},
            "path": {"type": "string", "pattern": r"^/[^?&]+$"},
            "path_concat_mode": {"type": "string", "enum": ["replace", "prefix"]},
            "sample_ratio": {"type": "number", "minimum": 0.00001, "maximum": 1},
        },
        "required": ["host"],
    },
    "redirect": {
        "type": "object",
        "properties": {
            "ret_code": {"type": "integer", "minimum": 200},
            "uri": {"type": "string", "minLength": 2},
            "regex_uri": {"type": "array", "minItems": 2, "maxItems": 2,
                          "items": {"type": "string"}},
            "http_to_https": {"type": "boolean"},
            "encode_uri": {"type": "boolean"},
            "append_query_string": {"type": "boolean"},
        },
        "oneOf": [{"required": ["uri"]}, {"required": ["regex_uri"]},
                  {"required": ["http_to_https"]}],
    },
    "cors": {
        "type": "object",
        "properties": {
            "allow_origins": {"type": "string", "pattern": _ORIGINS},
            "allow_methods": {"type": "string"},
            "allow_headers": {"type": "string"},
            "expose_headers": {"type": "string"},
            "max_age": {"type": "integer"},
            "allow_credential": {"type": "boolean"},
            "allow_origins_by_regex": _REGEX_LIST,
            "allow_origins_by_metadata": _REGEX_LIST,
            "timing_allow_origins": {"type": "string", "pattern": _ORIGINS},
            "timing_allow_origins_by_regex": _REGEX_LIST,
        },
    },
    "response-rewrite": {
        "type": "object",
        "properties": {
            "max_resp_body_size": {"type": "integer", "minimum": 1},
            "headers": {"anyOf": [
                {"type": "object", "minProperties": 1,
                 "patternProperties": {"^[^:]+$": _HEADER_VALUE}},
                {"properties": {
                    "add": {"type": "array", "minItems": 1, "items": {
                        "type": "string", "pattern": "^[^:]+:[^:]*[^/]$"}},
                    "set": {"type": "object", "minProperties": 1,
                            "patternProperties": {"^[^:]+$": _HEADER_VALUE}},
                    "remove": {"type": "array", "minItems": 1,
                               "items": {"type": "string", "pattern": "^[^:]+$"}}},
                 "additionalProperties": False},
            ]},
            "body": {"type": "string"},
            "body_base64": {"type": "boolean"},
            "status_code": {"type": "integer", "minimum": 200, "maximum": 598},
            "vars": {"type": "array"},
            "filters": {"type": "array", "minItems": 1},
        },
    },
}
# Every plugin's schema gets `_meta` (schema_def.plugin_injected_schema); amesh uses its
# `filter` (vars deciding whether the plugin runs).
_META = {"type": "object", "properties": {"filter": {"type": "array"}},
         "additionalProperties": False}
for _schema in PLUGINS.values():
    _schema["additionalProperties"] = False  # test-only tightening, see module doc
    _schema.setdefault("properties", {})["_meta"] = _META

_VALIDATORS = {
    kind: jsonschema.Draft7Validator(schema)
    for kind, schema in (("routes", ROUTE), ("upstreams", UPSTREAM),
                         ("stream_routes", STREAM_ROUTE))
}
_PLUGIN_VALIDATORS = {name: jsonschema.Draft7Validator(s) for name, s in PLUGINS.items()}

_EXPR_OPS = {"==", "~=", ">", ">=", "<", "<=", "~~", "~*", "in", "has", "ipmatch"}
_LOGIC = {"AND", "OR", "!AND", "!OR"}
_HASH_VARS = re.compile(r"^((uri|server_name|server_addr|request_uri|remote_port|remote_addr"
                        r"|query_string|host|hostname|mqtt_client_id)|arg_[0-9a-zA-z_-]+)$")
_HASH_NAME = re.compile(r"^[a-zA-Z0-9-_]+$")


class ApisixInvalid(AssertionError):
    pass


def _compile_pcre(pattern: str, where: str) -> None:
    """Approximate PCRE syntax check with Python's re (PCRE-only escapes replaced)."""
    py = pattern.replace("\\z", "\\Z").replace("(?<", "(?P<").replace("(?P<=", "(?<=")
    py = py.replace("(?P<!", "(?<!")
    py = re.sub(r"\\[pP](\{[^}]*\}|.)", "a", py)
    py = re.sub(r"\(\?[imsxU-]+\)", "(?:)", py)  # PCRE takes inline flags anywhere
    py = re.sub(r"\[\[:[a-z]+:\]", "[a", py)  # POSIX classes
    py = re.sub(r"\\x\{[0-9a-fA-F]+\}", "a", py)
    try:
        re.compile(py)
    except re.error as exc:
        raise ApisixInvalid(f"{where}: bad regex {pattern!r}: {exc}") from None


def check_expr(expr: Any, where: str) -> None:
    """One lua-resty-expr expression (as lua-resty-expr's compile() accepts it)."""
    if not isinstance(expr, list) or not expr:
        raise ApisixInvalid(f"{where}: expression must be a non-empty list: {expr!r}")
    if isinstance(expr[0], list):
        for sub in expr:
            check_expr(sub, where)
        return
    if isinstance(expr[0], str) and expr[0].upper() in _LOGIC:
        if len(expr) < 3:
            raise ApisixInvalid(f"{where}: {expr[0]} needs two operands: {expr!r}")
        for sub in expr[1:]:
            check_expr(sub, where)
        return
    if len(expr) == 4:
        if expr[1] != "!":
            raise ApisixInvalid(f"{where}: bad 'not' expression {expr!r}")
        var, op, val = expr[0], expr[2], expr[3]
    elif len(expr) == 3:
        var, op, val = expr
    else:
        raise ApisixInvalid(f"{where}: bad expression {expr!r}")
    if not isinstance(var, str) or op not in _EXPR_OPS:
        raise ApisixInvalid(f"{where}: bad expression {expr!r}")
    if op in ("~~", "~*"):
        if not isinstance(val, str):
            raise ApisixInvalid(f"{where}: regex operand must be a string: {expr!r}")
        _compile_pcre(val, where)


def check_vars(vars_: Any, where: str) -> None:
    """A route's `vars`: a list of expressions ANDed (lua-resty-expr new())."""
    if not isinstance(vars_, list):
        raise ApisixInvalid(f"{where}: vars must be a list")
    if vars_ and not isinstance(vars_[0], list):
        raise ApisixInvalid(f"{where}: vars must be wrapped inside brackets")
    for expr in vars_:
        check_expr(expr, where)


def _check_plugin(name: str, conf: Any, where: str) -> None:
    validator = _PLUGIN_VALIDATORS.get(name)
    if validator is None:
        raise ApisixInvalid(f"{where}: plugin {name!r} is not one the translator may emit")
    errors = sorted(validator.iter_errors(conf), key=lambda e: list(e.path))
    if errors:
        raise ApisixInvalid(f"{where}: plugin {name}: {errors[0].message} at "
                            f"{list(errors[0].path)}")
    if name == "proxy-rewrite" and "regex_uri" in conf:
        if len(conf["regex_uri"]) % 2:
            raise ApisixInvalid(f"{where}: regex_uri length must be even")
        for pat in conf["regex_uri"][::2]:
            _compile_pcre(pat, where)
    if name == "redirect":
        if conf.get("http_to_https") and conf.get("append_query_string"):
            raise ApisixInvalid(f"{where}: http_to_https with append_query_string")
        if "regex_uri" in conf:
            _compile_pcre(conf["regex_uri"][0], where)
    if name == "cors":
        if conf.get("allow_credential") and "*" in (
                conf.get("allow_origins", "*"), conf.get("allow_methods", "*"),
                conf.get("allow_headers", "*"), conf.get("expose_headers"),
                conf.get("timing_allow_origins")):
            raise ApisixInvalid(f"{where}: cors '*' with allow_credential")
        for pat in conf.get("allow_origins_by_regex", []):
            _compile_pcre(pat, where)
    if name == "traffic-split":
        for rule in conf.get("rules", []):
            if "match" in rule and not rule["match"]:
                raise ApisixInvalid(f"{where}: traffic-split match: [] carries over results")
            for m in rule.get("match", []):
                check_vars(m.get("vars", []), where)
    if name == "fault-injection":
        for part in ("abort", "delay"):
            for expr in conf.get(part, {}).get("vars", []):
                check_vars(expr, where)


def _check_upstream(up: dict, where: str) -> None:
    for node in up.get("nodes", []) if isinstance(up.get("nodes"), list) else []:
        host = node["host"]
        if ":" in host and not host.startswith("["):
            raise ApisixInvalid(f"{where}: IPv6 address must be enclosed with '[' and ']'")
    if up.get("pass_host") == "rewrite" and not up.get("upstream_host"):
        raise ApisixInvalid(f"{where}: pass_host rewrite without upstream_host")
    if up.get("type") not in (None, "roundrobin", "chash", "ewma", "least_conn"):
        raise ApisixInvalid(f"{where}: unknown balancer type {up.get('type')!r}")
    if up.get("type") == "chash":
        hash_on = up.get("hash_on", "vars")
        key = up.get("key")
        if hash_on != "consumer" and key is None:
            raise ApisixInvalid(f"{where}: chash without key")
        if hash_on == "vars" and not _HASH_VARS.match(key):
            raise ApisixInvalid(f"{where}: bad chash var {key!r}")
        if hash_on in ("header", "cookie") and not _HASH_NAME.match(key):
            raise ApisixInvalid(f"{where}: bad chash {hash_on} {key!r}")


def validate(key: str, obj: Any) -> None:
    """Raise ApisixInvalid unless APISIX would accept `obj` stored at `key`."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "" or parts[1] not in _VALIDATORS:
        raise ApisixInvalid(f"bad key {key!r}")
    kind, oid = parts[1], parts[2]
    if not isinstance(obj, dict) or obj.get("id") != oid:
        raise ApisixInvalid(f"{key}: id must equal the key's id")
    errors = sorted(_VALIDATORS[kind].iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise ApisixInvalid(f"{key}: {errors[0].message} at {list(errors[0].path)}")
    if kind == "upstreams":
        _check_upstream(obj, key)
    if "vars" in obj:
        check_vars(obj["vars"], key)
    for name, conf in obj.get("plugins", {}).items():
        _check_plugin(name, conf, key)


def validate_all(objects: dict[str, Any]) -> None:
    for key, obj in objects.items():
        validate(key, obj)
