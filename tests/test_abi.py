"""include/amesh.h is the one definition of the ABI: the Lua cdef and constants must agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _declarations(c_text: str) -> set[str]:
    """Function prototypes and typedef structs, whitespace-normalised."""
    text = _strip_comments(c_text)
    text = re.sub(r"^\s*#.*$", "", text, flags=re.M)
    text = re.sub(r'extern\s+"C"\s*\{|^\s*\}\s*$', "", text, flags=re.M)
    structs = re.findall(r"typedef struct \w+\s*\{.*?\}\s*\w+\s*;", text, flags=re.S)
    for struct in structs:
        text = text.replace(struct, "")
    functions = re.findall(r"[\w\s\*]+\([^;{]*\)\s*;", text)
    return {" ".join(d.replace("*", " * ").split()) for d in structs + functions}


def _lua_cdef() -> str:
    lua = (ROOT / "lua" / "amesh" / "abi.lua").read_text()
    match = re.search(r"ffi\.cdef\[\[(.*?)\]\]", lua, flags=re.S)
    assert match, "lua/amesh/abi.lua has no ffi.cdef block"
    return match.group(1)


def test_lua_cdef_declares_exactly_the_header_functions() -> None:
    header = _declarations((ROOT / "include" / "amesh.h").read_text())
    lua = _declarations(_lua_cdef())
    assert any("amesh_poll" in d for d in header)
    assert any("typedef struct amesh_change_s" in d for d in header)
    assert lua == header, {"only in header": header - lua, "only in lua": lua - header}


def test_lua_constants_match_header_defines() -> None:
    header = (ROOT / "include" / "amesh.h").read_text()
    defines = {name: int(value) for name, value in
               re.findall(r"#define AMESH_(\w+)\s+\(?(-?\d+|0x[0-9a-f]+)\)?", header)
               if not value.startswith("0x")}
    defines.update({name: int(value, 16) for name, value in
                    re.findall(r"#define AMESH_(\w+)\s+(0x[0-9a-f]+)", header)})
    lua = (ROOT / "lua" / "amesh" / "abi.lua").read_text()
    lua_values = {name: int(value) for name, value in re.findall(r"(\w+) = (-?\d+)", lua)}
    assert lua_values, "no constants found in abi.lua"
    for name, value in lua_values.items():
        assert defines.get(name) == value, f"{name}: lua {value}, header {defines.get(name)}"


def test_library_exports_the_header_functions() -> None:
    import subprocess

    from nginx import LIBRARY

    out = subprocess.run(["nm", "-D", "--defined-only", str(LIBRARY)], capture_output=True,
                         text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    names = set(re.findall(r"\b(amesh_\w+|initial)\s*\(", _lua_cdef()))
    assert names <= exported, names - exported
    # Nothing else leaks out of the library (hidden visibility).
    assert {n for n in exported if not n.startswith("_")} == names


def test_protocol_keys_agree_in_header_python_and_lua() -> None:
    """docs/dict-protocol.md's keys and sizes: one definition (amesh.h), two copies."""
    from amesh_ext import protocol

    header = _strip_comments((ROOT / "include" / "amesh.h").read_text())
    names = r"KEY_\w+|INDEX_BUCKETS|LOG_SLOTS"
    defined = dict(re.findall(rf'#define AMESH_({names})\s+"?([^"\s]+)"?', header))
    assert {"KEY_SENTINEL", "KEY_INDEX_PREFIX", "INDEX_BUCKETS", "KEY_LOG_HEAD",
            "KEY_LOG_PREFIX", "LOG_SLOTS", "KEY_VERSION", "KEY_STATUS"} <= defined.keys()
    lua = (ROOT / "lua" / "amesh" / "abi.lua").read_text()
    lua_values = dict(re.findall(r'(\w+) = "?([^",\s]+)"?,', lua))
    for name, value in defined.items():
        assert str(getattr(protocol, name)) == value, f"python {name}"
        assert lua_values.get(name) == value, f"lua {name}"
