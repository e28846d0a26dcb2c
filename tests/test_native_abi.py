"""The C ABI driven directly (ctypes) in a fresh Python process that hosts the agent:
start once, batches framed BEGIN..COMMIT in dependency order, bounded polls, reports,
status JSON, the stop fence."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from nginx import BUNDLED_MESH, LIBRARY

DRIVER = textwrap.dedent("""
    import ctypes, json, sys, time
    lib = ctypes.CDLL(sys.argv[1])

    class Change(ctypes.Structure):
        _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_uint32), ("batch", ctypes.c_uint64),
                    ("key", ctypes.c_char_p), ("key_len", ctypes.c_size_t),
                    ("value", ctypes.c_char_p), ("value_len", ctypes.c_size_t)]

    lib.amesh_last_error.restype = ctypes.c_char_p
    lib.amesh_status.restype = ctypes.c_size_t
    out = {}
    out["bad_start"] = lib.amesh_start(b'{"source": 1}')
    out["bad_error"] = lib.amesh_last_error().decode()
    cfg = json.dumps({"source": "file://" + sys.argv[2]}).encode()
    out["start"] = lib.amesh_start(cfg)
    out["again"] = lib.amesh_start(cfg)
    buf = (Change * 3)()
    ops, calls, deadline = [], [], time.time() + 20
    while time.time() < deadline and not (ops and ops[-1][0] == 4):
        n = lib.amesh_poll(buf, 3)
        if n > 0:
            calls.append(n)
            ops += [(c.op, c.flags, c.batch, (c.key or b"").decode()) for c in buf[:n]]
        else:
            time.sleep(0.01)
    out["ops"], out["calls"] = ops, calls
    lib.amesh_report(ctypes.c_uint64(ops[-1][2]), 0, b"applied")
    sbuf = ctypes.create_string_buffer(1 << 16)
    while time.time() < deadline:  # until the agent published the report's effect
        length = lib.amesh_status(sbuf, 1 << 16)
        out["status"] = json.loads(sbuf.raw[:length].decode())
        if ((out["status"].get("agent") or {}).get("sink") or {}).get("batches_applied"):
            break
        time.sleep(0.01)
    small = ctypes.create_string_buffer(8)
    out["status_len_small"] = lib.amesh_status(small, 8)
    out["status_small"] = small.value.decode()
    out["stop"] = lib.amesh_stop(200)
    out["poll_after_stop"] = lib.amesh_poll(buf, 3)
    print(json.dumps(out))
""")


def test_abi_in_a_hosting_process() -> None:
    mesh = BUNDLED_MESH
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(LIBRARY), str(mesh)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bad_start"] == -1 and "'source'" in out["bad_error"]
    assert out["start"] == 0
    assert out["again"] == -2  # once per process
    ops = out["ops"]
    assert ops[0][0] == 1 and ops[0][1] == 1  # BEGIN, FULL
    assert ops[-1][0] == 4 and ops[-1][1] == 1  # COMMIT, FULL
    assert {op[2] for op in ops} == {ops[0][2]}  # one batch
    sets = [key for op, _, _, key in ops if op == 2]
    first_route = min(i for i, k in enumerate(sets) if k.startswith("/routes/"))
    last_upstream = max(i for i, k in enumerate(sets) if k.startswith("/upstreams/"))
    assert last_upstream < first_route  # upstreams before the routes that use them
    assert "amesh:sentinel" in sets
    assert max(out["calls"]) <= 3  # bounded work per poll
    status = out["status"]
    assert status["mode"] == "poll" and status["queue_depth"] == 0
    assert status["agent"]["sink"]["batches_applied"] == 1
    assert status["agent"]["resources"]["cds"] == 7
    assert out["status_len_small"] > 8 and len(out["status_small"]) == 7  # truncated, NUL-ended
    assert out["stop"] == 0 and out["poll_after_stop"] == -4
