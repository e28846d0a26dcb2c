"""Property test in real APISIX: radixtree_host_uri_incremental selects exactly as
APISIX's stock radixtree_host_uri does.

One APISIX (1 worker, amesh's config_xds; this runner is the dicts' writer) holds a random
route set: hosts exact, `*.x` and `*x` wildcards, `*` and none (also `host`), uris exact,
`/p*` and `/p/*` prefixes, one or two uris, priorities from a small set (many ties, so the
values order decides), methods, vars, status 0. Each step changes one to three routes
(add, update — hosts too —, delete) in one change-log batch; the incremental router
applies only those, the stock router rebuilds from the same config object. After every
step, random requests (host, uri, method, a header) go through both (control endpoint
/router_check): the matched route id, `_host` and `_path` must be equal.

    APISIX_HOME=/root/.cache/amesh/apisix /opt/amesh/venv/bin/python \
        bench/apisix_router_property.py --trials 20 --steps 25 --requests 200

Exits 1 on the first mismatch, naming the seed, the step, the request and both answers.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from apisix_run import ApisixRun, DictWriter, apisix_home  # noqa: E402
from benchlib import work_dir  # noqa: E402

HOSTS = ["a.com", "b.a.com", "x.b.a.com", "*.a.com", "*.b.a.com", "*a.com", "*", "c.org",
         "*.org", "A.Com"]
URIS = ["/", "/a", "/a/b", "/*", "/a*", "/a/*", "/a/b*", "/ab", "/b/*", "/a/b/*"]
REQ_HOSTS = ["a.com", "b.a.com", "x.b.a.com", "y.x.b.a.com", "za.com", "c.org", "d.c.org",
             "other.net", "a.com.org"]
REQ_URIS = ["/", "/a", "/a/", "/a/b", "/a/bc", "/a/b/", "/a/b/c", "/ab", "/b/", "/b/x", "/c"]
UPSTREAM = {"nodes": {"127.0.0.1:1980": 1}, "type": "roundrobin"}


def random_route(rng: random.Random, rid: str, step: int) -> dict[str, Any]:
    r: dict[str, Any] = {"id": rid, "desc": f"s{step}", "upstream": UPSTREAM}
    if rng.random() < 0.2:
        r["uris"] = rng.sample(URIS, 2)
    else:
        r["uri"] = rng.choice(URIS)
    k = rng.random()
    if k < 0.2:
        pass                                  # no host
    elif k < 0.35:
        r["host"] = rng.choice(HOSTS)
    else:
        r["hosts"] = rng.sample(HOSTS, rng.randint(1, 3))
    if rng.random() < 0.6:
        r["priority"] = rng.choice([0, 0, 1, 2, -1])
    if rng.random() < 0.2:
        r["methods"] = rng.choice([["GET"], ["POST", "PUT"]])
    if rng.random() < 0.2:
        r["vars"] = [["http_x", "==", "1"]]
    if rng.random() < 0.05:
        r["status"] = 0
    return r


def random_request(rng: random.Random) -> dict[str, Any]:
    req: dict[str, Any] = {"host": rng.choice(REQ_HOSTS), "uri": rng.choice(REQ_URIS),
                           "method": rng.choice(["GET", "GET", "POST", "PUT"])}
    if rng.random() < 0.3:
        req["headers"] = {"x": "1"}
    return req


def wait_applied(run: ApisixRun, expected: dict[str, str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = run.ctl("/routes")["ids"]
        if (got or {}) == expected:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the provider did not apply the batch: {got} != {expected}")
        time.sleep(0.005)


def trial(run: ApisixRun, writer: DictWriter, seed: int, steps: int, n_requests: int,
          size: int) -> int:
    rng = random.Random(seed)
    # start from a fresh random set (everything earlier deleted in the same batch)
    old = [k for k in writer.keys if k.startswith("/routes/")]
    routes = {f"r{seed}-{i}": random_route(rng, f"r{seed}-{i}", 0) for i in range(size)}
    writer.batch({f"/routes/{k}": v for k, v in routes.items()}, old)
    next_id = size
    checked = 0
    for step in range(steps + 1):
        if step:
            sets: dict[str, Any] = {}
            deletes: list[str] = []
            for _ in range(rng.randint(1, 3)):
                op = rng.random()
                live = [k for k in routes if f"/routes/{k}" not in deletes]
                if op < 0.35 or not live:
                    rid = f"r{seed}-{next_id}"
                    next_id += 1
                    routes[rid] = random_route(rng, rid, step)
                    sets[f"/routes/{rid}"] = routes[rid]
                elif op < 0.75:
                    rid = rng.choice(live)
                    routes[rid] = random_route(rng, rid, step)
                    sets[f"/routes/{rid}"] = routes[rid]
                else:
                    rid = rng.choice(live)
                    del routes[rid]
                    sets.pop(f"/routes/{rid}", None)
                    deletes.append(f"/routes/{rid}")
            writer.batch(sets, deletes)
        wait_applied(run, {k: v["desc"] for k, v in routes.items()})
        reqs = [random_request(rng) for _ in range(n_requests)]
        answers = run.ctl("/router_check", reqs)
        for req, ans in zip(reqs, answers, strict=True):
            if ans.get("stock") != ans.get("incremental"):
                print(f"MISMATCH seed {seed} step {step}: {req}\n  stock: {ans.get('stock')}"
                      f"\n  incremental: {ans.get('incremental')}")
                return -1
        checked += len(reqs)
    return checked


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--routes", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    apisix_home()
    run = ApisixRun(work_dir("amesh-router-prop-") / "apisix", "amesh", {"source": "file:///x"},
                    workers=1, writer="none", dict_size="16m")
    with run:
        deadline = time.monotonic() + 30
        while True:
            try:
                run.ctl("/routes")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        writer = DictWriter(run)
        total = 0
        for t in range(args.trials):
            seed = args.seed + t
            n = trial(run, writer, seed, args.steps, args.requests, args.routes)
            if n < 0:
                return 1
            total += n
        print("incremental router:", run.ctl("/router_stats"))
        errors = [line for line in run.error_log().splitlines()
                  if "[error]" in line and "events" not in line and "_clients" not in line]
        print(f"{args.trials} trials x {args.steps} steps: {total} requests, stock and "
              f"incremental routers agreed on every one; error.log errors: {len(errors)}")
        for line in errors[:5]:
            print("  ", line[:300])
    return 0


if __name__ == "__main__":
    sys.exit(main())
