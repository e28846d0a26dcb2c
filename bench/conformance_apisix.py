"""Conformance of amesh on real Apache APISIX against real Envoy, on the same istiod config.

    /opt/amesh/venv/bin/python bench/conformance_apisix.py --apisix PREFIX

PREFIX is an APISIX installation: a folder holding APISIX's Lua tree (`apisix/init.lua`) and
its Lua dependencies (`deps/share/lua/5.1`, `deps/lib/lua/5.1` as Apache's packages lay them
out, or `deps/lua`, `deps/lib`, `shim/` as ../shared/apisix/setup.sh assembles one on
Debian). For each corpus (the differential corpus `features`, and `bookinfo`) it starts
istiod on the corpus, a real Envoy and the corpus' backends, then stock APISIX fed by amesh
twice: through the stock `initial()` path (libxds.so writes the dicts from its own thread)
and through `require("amesh")` (the Lua consumer writes them). For each run it reports

- objects: what amesh wrote into the dict vs what APISIX's config_xds loaded, every refusal
  with APISIX's own reason from error.log (kinds this APISIX does not read, e.g.
  stream_routes without a stream subsystem, are counted apart);
- requests: APISIX vs Envoy (the same outcome: status, backend's cluster, forwarded path,
  host and tracked headers, Location, delay; a local reply's body when Envoy sends one) and
  the model (tests/apisix_eval.py) vs APISIX; random outcomes are drawn repeatedly and
  compared as frequencies. A disagreement named in KNOWN_DIFFERENCES is a documented nginx
  difference; any other is a bug of amesh (or of the model).

A table goes to stdout, JSON to bench/results/conformance_apisix.json (with APISIX's
version and amesh's git SHA). Not part of `run.sh test`: CI has no APISIX.

On OpenResty (the privileged agent), APISIX's config_xds calls initial() itself and amesh's
Lua consumer runs in the privileged agent. Debian's nginx has no privileged agent: worker 0
makes config_xds' initial() call (as ../shared/apisix's kit does), and runs require("amesh").
One nginx worker: more need lua-resty-events' own nginx module, which Debian lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from benchlib import stop_nginx, work_dir, write_results  # noqa: E402

from amesh_ext.paths import install_dir  # noqa: E402
from apisix_eval import Apisix, Outcome, Request  # noqa: E402
from peers.backends import Backends  # noqa: E402
from peers.dump_xds import CORPORA, PROBE_NODE_ID, probe_corpus, probe_metadata  # noqa: E402
from peers.istiod import Istiod, copy_corpus, ensure_istiod_binary, free_port, wait_for  # noqa: E402
from peers.sds import SdsServer  # noqa: E402
from test_differential_envoy import (  # noqa: E402
    DRAWS,
    KNOWN_DIFFERENCES,
    TOLERANCE,
    ProbeEnvoy,
    compare_seen,
    corpus,
    draws,
    endpoint_addresses,
    label,
    route_names,
    send,
)

RESULTS = HERE / "results" / "conformance_apisix.json"
TEMPLATES = HERE / "conformance"
APISIX_IP = "127.0.0.200"  # Envoy's listeners hold 127.0.0.1:<mesh port>; no backend uses it
MODES = ("initial", "lua")
OBJECT_KINDS = ("/routes/", "/upstreams/", "/ssls/", "/stream_routes/", "/services/",
                "/plugin_configs/", "/global_rules/", "/consumers/", "/plugin_metadata/")
# Where the model (which follows APISIX on OpenResty 1.27) and APISIX on this kit's nginx
# differ for a reason of the nginx build, not of amesh.
KIT_DIFFERENCES = {
    "GET api:17080/headers x-exact=a.b x-exact=a.b": "nginx < 1.23 (Debian 12's 1.22) gives "
    "$http_x-exact the first value of a repeated header; OpenResty 1.27, which APISIX ships "
    "on, joins the values with ', ' (the model's behaviour)",
}
# Requests of the bookinfo checks: every service, the header route, the 80/20 split.
BOOKINFO_PORT = 9080


def bookinfo_requests() -> list[Request]:
    reqs = [Request("GET", BOOKINFO_PORT, h, p) for h in (
        "productpage", "details", "ratings", "reviews", "productpage.default.svc.cluster.local",
        "240.240.0.1", "reviews:9080", "unknown") for p in ("/", "/productpage", "/x?y=1")]
    reqs += [Request("GET", BOOKINFO_PORT, "reviews", "/", (("end-user", "jason"),)),
             Request("GET", BOOKINFO_PORT, "reviews", "/", (("end-user", "JASON"),))]
    return reqs


@dataclass(frozen=True)
class Corpus:
    name: str
    ports: tuple[int, ...]  # the HTTP listener ports APISIX must hold
    requests: tuple[Request, ...]
    mirror: Request | None = None  # a request whose route mirrors (copies seen by backends)


def corpora() -> dict[str, Corpus]:
    return {
        "features": Corpus("features", (17080, 17081), tuple(corpus()),
                           Request("GET", 17080, "web", "/mirror?copy=1")),
        "bookinfo": Corpus("bookinfo", (BOOKINFO_PORT,), tuple(bookinfo_requests())),
    }


# --------------------------------------------------------------------------- APISIX


class ConformanceError(SystemExit):
    pass


@dataclass
class Installation:
    """An APISIX installation (its Lua tree and dependencies) and the nginx to run it on."""

    prefix: Path
    nginx: Path

    def __post_init__(self) -> None:
        if not (self.prefix / "apisix" / "init.lua").is_file():
            raise ConformanceError(
                f"{self.prefix} is no APISIX installation (no apisix/init.lua): pass --apisix "
                "the folder holding APISIX's Lua tree and deps (Apache's packages: "
                "/usr/local/apisix; on Debian, the one ../shared/apisix/setup.sh assembles)")
        if not self.nginx.is_file():
            raise ConformanceError(f"nginx binary {self.nginx} not found (--nginx)")

    @property
    def debian(self) -> bool:
        """Debian's nginx: dynamic lua modules, no privileged agent (not OpenResty)."""
        out = subprocess.run([str(self.nginx), "-V"], capture_output=True, text=True).stderr
        return "openresty" not in out.lower()

    @property
    def version(self) -> str:
        text = (self.prefix / "apisix" / "core" / "version.lua").read_text()
        m = re.search(r"VERSION\s*=\s*\"([^\"]+)\"", text)
        return m.group(1) if m else "unknown"

    def lua_path(self) -> list[str]:
        p = self.prefix
        return [f"{p}/?.lua", f"{p}/?/init.lua", f"{p}/deps/share/lua/5.1/?.lua",
                f"{p}/deps/share/lua/5.1/?/init.lua", f"{p}/deps/lua/?.lua",
                f"{p}/deps/lua/?/init.lua", f"{p}/shim/?.lua", "/usr/share/lua/5.1/?.lua",
                "/usr/share/lua/5.1/?/init.lua"]

    def lua_cpath(self) -> list[str]:
        p = self.prefix
        return [f"{p}/deps/lib/lua/5.1/?.so", f"{p}/deps/lib64/lua/5.1/?.so",
                f"{p}/deps/lib/?.so", "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so"]

    def load_modules(self) -> str:
        if not self.debian:
            return ""
        mods = Path("/usr/lib/nginx/modules")
        names = ("ndk_http_module.so", "ngx_http_lua_module.so",
                 "ngx_http_headers_more_filter_module.so")
        missing = [n for n in names if not (mods / n).is_file()]
        if missing:
            raise ConformanceError(f"Debian nginx lacks {missing}: apt-get install "
                                   "libnginx-mod-http-lua libnginx-mod-http-headers-more-filter")
        return "\n".join(f"load_module {mods / n};" for n in names)

    def mime_types(self) -> Path:
        for cand in (self.prefix / "conf" / "mime.types", Path("/etc/nginx/mime.types")):
            if cand.is_file():
                return cand
        raise ConformanceError("no mime.types in the APISIX prefix's conf/ or /etc/nginx")


# initial(): what config_xds.load_libxds() does in the privileged agent, made by worker 0
# on Debian's nginx, before APISIX's init_worker (which waits for the first version).
_INITIAL_SHIM = """
        if ngx.worker.id() == 0 then
            local ffi = require "ffi"
            pcall(ffi.cdef, [[ void *ngx_http_lua_ffi_shdict_udata_to_zone(void *zone_udata);
                              void initial(void *config_zone, void *version_zone); ]])
            local lib = ffi.load("@XDS_DIR@/libxds.so")
            local zone = function(name)
                return ffi.C.ngx_http_lua_ffi_shdict_udata_to_zone(ngx.shared[name][1])
            end
            lib.initial(zone("xds-config"), zone("xds-config-version"))
        end"""
# APISIX enables the privileged agent itself on OpenResty: amesh's agent then runs there.
_LUA_FEED = """
        assert(require("amesh").init_worker({config = [==[@CONFIG@]==],
                                            library = "@LIBRARY@",
                                            privileged_agent = @PRIVILEGED@}))"""


class ApisixRun:
    """Stock APISIX on `install`, fed by amesh (`mode`: initial | lua), in `workdir`."""

    def __init__(self, install: Installation, workdir: Path, mode: str,
                 start_config: dict[str, Any], ports: tuple[int, ...]) -> None:
        self.install, self.workdir, self.mode = install, workdir, mode
        self.control = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        for d in ("logs", "conf", "xds"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        config = json.dumps(start_config)
        cpath = install.lua_cpath()
        lua_path = install.lua_path()
        if mode == "initial":
            xds = workdir / "xds"
            link = xds / "libxds.so"
            if not link.exists():
                link.symlink_to(install_dir() / "libxds.so")
            (xds / "amesh.json").write_text(config)
            cpath.insert(0, f"{xds}/?.so")  # where config_xds looks for libxds.so
            feed = _INITIAL_SHIM.replace("@XDS_DIR@", str(xds)) if install.debian else ""
            feed_exit = ""
        else:
            # libxds.so stays off the cpath: config_xds would start a second writer. amesh's
            # Lua goes after APISIX's tree: its apisix/ (issue 9's provider) must not shadow
            # the stock config_xds under test.
            lua_path.append(f"{install_dir() / 'lua'}/?.lua")
            feed = _LUA_FEED.replace("@CONFIG@", config).replace(
                "@LIBRARY@", str(install_dir() / "libamesh.so")).replace(
                "@PRIVILEGED@", "false" if install.debian else "true")
            feed_exit = '        require("amesh").exit_worker()'
        listen = "\n".join(f"        listen {APISIX_IP}:{p};" for p in ports)
        subst = {
            "@LOAD_MODULES@": install.load_modules(), "@LUA_PATH@": ";".join(lua_path),
            "@LUA_CPATH@": ";".join(cpath), "@MIME_TYPES@": str(install.mime_types()),
            "@APISIX@": str(install.prefix), "@FEED_WORKER@": feed, "@FEED_EXIT@": feed_exit,
            "@PREFIX@": str(workdir), "@CONTROL@": str(self.control), "@LISTEN@": listen,
        }
        conf = (TEMPLATES / "nginx.conf.tpl").read_text()
        for k, v in subst.items():
            conf = conf.replace(k, v)
        (workdir / "conf" / "nginx.conf").write_text(conf)
        shutil.copy(TEMPLATES / "config.yaml.tpl", workdir / "conf" / "config.yaml")

    def start(self) -> ApisixRun:
        args = [str(self.install.nginx), "-p", f"{self.workdir}/", "-c", "conf/nginx.conf"]
        test = subprocess.run([*args, "-t", "-q"], capture_output=True, text=True)
        if test.returncode:
            raise ConformanceError(f"nginx -t failed for {self.workdir}: {test.stderr}")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: self._alive() and self.ctl("/loaded") is not None, 60,
                 f"APISIX ({self.mode}) answering on its control port")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ConformanceError(f"APISIX ({self.mode}) exited: {self.error_log()[-3000:]}")
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_nginx(self.proc, 15)
        self.proc = None

    def __enter__(self) -> ApisixRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def error_log(self) -> str:
        path = self.workdir / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ctl(self, path: str) -> Any:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.control, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except OSError:
            return None
        finally:
            conn.close()
        return json.loads(body) if resp.status == 200 else None

    def objects(self) -> dict[str, Any]:
        """The APISIX objects in the dict (amesh's own bookkeeping keys left out)."""
        dump = self.ctl("/dump") or {"keys": {}}
        return {k: json.loads(v) for k, v in dump["keys"].items()
                if k.startswith(OBJECT_KINDS)}

    def wait_synced(self, timeout: float = 90) -> None:
        """Until the dict holds routes, stops changing, and config_xds loaded its version."""
        last: list[Any] = [None]

        def settled() -> bool:
            self._alive()
            loaded, dump = self.ctl("/loaded"), self.ctl("/dump")
            if not loaded or not dump or not any(k.startswith("/routes/") for k in dump["keys"]):
                return False
            now = (dump["version"], sorted(dump["keys"]))
            same, last[0] = now == last[0], now
            versions = {v["conf_version"] for k, v in loaded.items() if k in ("/routes",
                                                                               "/upstreams")}
            return same and versions == {dump["version"]}

        wait_for(settled, timeout, f"APISIX ({self.mode}) loading amesh's config", interval=1.0)


def refusals(written: dict[str, Any], loaded: dict[str, Any], log: str) -> dict[str, Any]:
    """Objects written vs loaded by config_xds, with APISIX's reason for each refusal."""
    read_kinds = {k + "/" for k in loaded if k.startswith("/")}
    out: dict[str, Any] = {"written": 0, "loaded": 0, "refused": {}, "not_read": {}}
    ids = {k: set(v.get("ids") or []) for k, v in loaded.items() if k.startswith("/")}
    for key in sorted(written):
        kind, _, oid = key[1:].partition("/")
        if f"/{kind}/" not in read_kinds:
            out["not_read"][kind] = out["not_read"].get(kind, 0) + 1
            continue
        out["written"] += 1
        if oid in ids.get(f"/{kind}", set()):
            out["loaded"] += 1
            continue
        lines = [ln for ln in log.splitlines() if key in ln]
        out["refused"][key] = lines[-1][-400:] if lines else "not loaded (no log line names it)"
    return out


# --------------------------------------------------------------------------- comparing


def clusters_by_backend(objs: dict[str, Any]) -> dict[str, frozenset[str]]:
    """backend address -> the upstreams (clusters) holding it."""
    out: dict[str, set[str]] = {}
    for key, up in objs.items():
        if key.startswith("/upstreams/"):
            for n in up.get("nodes") or []:
                host = "127.0.0.1" if n["host"] == "localhost" else n["host"]
                out.setdefault(f"{host}:{n['port']}", set()).add(up["id"])
    return {k: frozenset(v) for k, v in out.items()}


# Envoy's own local replies (no config sets them); APISIX words its 404/502/503 differently.
ENVOY_GENERIC_BODIES = ("no healthy upstream", "upstream connect error",
                        "no healthy upstream for", "upstream request timeout")


def signature(o: Outcome, clusters: dict[str, frozenset[str]], with_body: bool) -> tuple:
    """What two proxies must agree on. A backend counts by the clusters that hold it (both
    may pick another endpoint of the same set); a local reply's body only when Envoy sent
    one that the config chose (a direct response, a fault abort), not one of its own."""
    backend = next(iter(o.backends), None)
    where = clusters.get(backend, frozenset([backend])) if backend else frozenset()
    return (o.status, where, o.path, o.host, o.headers, o.response_headers, o.location,
            o.delayed, o.body if with_body and not o.backends else None)


def compare_proxies(apisix: list[Outcome], envoy: list[Outcome],
                    clusters: dict[str, frozenset[str]]) -> str | None:
    """None when APISIX's outcomes are Envoy's (as frequencies when drawn repeatedly)."""
    with_body = any(o.body and not o.body.startswith(ENVOY_GENERIC_BODIES) for o in envoy)
    a = Counter(signature(o, clusters, with_body) for o in apisix)
    e = Counter(signature(o, clusters, with_body) for o in envoy)
    if len(apisix) == 1:
        return None if a == e else f"APISIX {apisix[0]} vs Envoy {envoy[0]}"
    for sig in set(a) | set(e):
        fa, fe = a[sig] / len(apisix), e[sig] / len(envoy)
        if abs(fa - fe) > TOLERANCE or (min(fa, fe) == 0 and max(fa, fe) >= 0.1):
            return f"{sig}: APISIX {fa:.2f}, Envoy {fe:.2f} of {len(apisix)} draws"
    return None


@dataclass
class RunResult:
    corpus: str
    mode: str
    objects: dict[str, Any]
    requests: int = 0
    not_served: list[str] = field(default_factory=list)
    apisix_vs_envoy: dict[str, str] = field(default_factory=dict)
    model_vs_apisix: dict[str, str] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    mirror: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        served = self.requests - len(self.not_served)
        return {"corpus": self.corpus, "mode": self.mode, "objects": self.objects,
                "requests": self.requests, "not_served": self.not_served,
                "apisix_vs_envoy": _split(self.apisix_vs_envoy, KNOWN_DIFFERENCES, served,
                                          self.labels),
                "model_vs_apisix": _split(self.model_vs_apisix, KIT_DIFFERENCES, served,
                                          self.labels),
                "mirror": self.mirror}


def _split(diffs: dict[str, str], known: dict[str, str], served: int,
           labels: set[str]) -> dict[str, Any]:
    """Agreements, documented differences (re-checked: a documented one that agrees on this
    APISIX is listed as such), unexplained ones."""
    documented = {k: known[k] for k in diffs if k in known}
    return {"agree": served - len(diffs), "disagree": len(diffs),
            "documented": documented,
            "documented_but_agree": sorted(k for k in known if k in labels and k not in diffs),
            "unexplained": {k: v for k, v in diffs.items() if k not in known}}


MIRROR_REQUESTS = 80


def mirrored(req: Request, backends: Backends, address: str,
             clusters: dict[str, frozenset[str]]) -> dict[str, Any]:
    """Send `req` MIRROR_REQUESTS times; the copies are the backend hits beyond the answers
    (fire and forget: counted once the backends stop receiving)."""
    start = len(backends.hits)
    answered = Counter(next(iter(o.backends), "") for o in
                       (send(req, address) for _ in range(MIRROR_REQUESTS)))
    last = [-1]

    def quiet() -> bool:
        now = len(backends.hits)
        settled = now == last[0] and now >= start + MIRROR_REQUESTS
        last[0] = now
        return settled

    wait_for(quiet, 30, f"the mirrored copies through {address} to stop", interval=0.5)
    hits = [h for h in backends.hits[start:] if h[1] == req.path]
    copies = Counter(b for b, _, _ in hits) - answered
    where = [clusters.get(b, frozenset()) for b in copies.elements()]
    return {"requests": MIRROR_REQUESTS, "copies": sum(copies.values()),
            "share": round(sum(copies.values()) / MIRROR_REQUESTS, 3),
            "to_backends": dict(copies),
            "to_clusters": sorted(frozenset.intersection(*where)) if where else [],
            "hosts": sorted({h for b, _, h in hits if b in copies})}


def compare_mirrors(apisix: dict[str, Any], envoy: dict[str, Any]) -> dict[str, Any]:
    """Agree when as many requests are mirrored (within TOLERANCE), every APISIX copy lands
    in the clusters all of Envoy's do (APISIX mirrors to one node of the cluster, Envoy
    balances over its endpoints) and the copies carry the same Host."""
    same_share = abs(apisix["share"] - envoy["share"]) <= TOLERANCE
    same_place = bool(envoy["to_clusters"]) and set(envoy["to_clusters"]) <= set(
        apisix["to_clusters"])
    return {"agree": same_share and same_place and apisix["hosts"] == envoy["hosts"],
            "apisix": apisix, "envoy": envoy}


def observe(reqs: tuple[Request, ...], model: Apisix, address: str) -> dict[str, list[Outcome]]:
    out = {}
    for req in reqs:
        out[label(req)] = [send(req, address) for _ in range(draws(model.decide(req)))]
    return out


# --------------------------------------------------------------------------- running


def start_config(xds_address: str, locality: dict[str, str], cert_dir: Path) -> dict[str, Any]:
    """amesh as the probe node Envoy is (identity, metadata, locality)."""
    meta = probe_metadata()
    return {
        "source": f"grpc://{xds_address}",
        "xds": {"node": {"id": PROBE_NODE_ID, "cluster_id": meta["CLUSTER_ID"],
                         "istio_version": meta["ISTIO_VERSION"], "interception_mode": "NONE",
                         "labels": {}, **({"locality": locality} if locality else {})}},
        "translate": {"istio_cert_dir": str(cert_dir)},
        "log_level": "info",
    }


@contextlib.contextmanager
def mesh(name: str, work: Path, istiod_binary: Path) -> Iterator[tuple[Any, Path, Backends]]:
    """istiod on a corpus, its backends, a real Envoy on it: (istiod, amesh's certificate
    directory, the backends)."""
    spec = CORPORA[name]
    with contextlib.ExitStack() as stack:
        istiod = stack.enter_context(Istiod(work / "istiod", binary=istiod_binary))
        istiod.start(copy_corpus(spec.config_dir, work / "config"))
        docs = probe_corpus(istiod.xds_address, spec)
        backends = stack.enter_context(Backends(endpoint_addresses(docs)))
        sds = stack.enter_context(SdsServer(work / "sds"))
        certs = work / "certs"
        certs.mkdir(exist_ok=True)
        (certs / "cert-chain.pem").write_text(sds.cert)
        (certs / "key.pem").write_text(sds.key)
        envoy = stack.enter_context(ProbeEnvoy(work / "envoy", istiod.xds_address, sds.address,
                                               spec.locality))
        envoy.start()
        want = route_names({r["name"]: r for r in docs["routes.json"]["resources"]})
        envoy.wait_for(lambda: route_names(envoy.route_configs()) == want, 60,
                       "Envoy's route configurations")
        envoy.wait_for(lambda: set(envoy.listeners()) == {
            ln["name"] for ln in docs["listeners.json"]["resources"]}, 60, "Envoy's listeners")
        yield istiod, certs, backends


def run_corpus(c: Corpus, install: Installation, modes: list[str], work: Path,
               istiod_binary: Path) -> list[RunResult]:
    results = []
    spec = CORPORA[c.name]
    with mesh(c.name, work, istiod_binary) as (istiod, certs, backends):
        config = start_config(istiod.xds_address, spec.locality, certs)
        envoy_seen: dict[str, list[Outcome]] | None = None
        envoy_mirror: dict[str, Any] | None = None
        for mode in modes:
            with ApisixRun(install, work / f"apisix-{mode}", mode, config, c.ports) as run:
                run.wait_synced()
                written = run.objects()
                result = RunResult(c.name, mode, refusals(written, run.ctl("/loaded") or {},
                                                          run.error_log()))
                model = Apisix(written)
                clusters = clusters_by_backend(written)
                http_reqs = tuple(r for r in c.requests if r.port in c.ports)
                result.requests = len(c.requests)
                result.labels = {label(r) for r in http_reqs}
                result.not_served = [label(r) for r in c.requests if r.port not in c.ports]
                if envoy_seen is None:  # Envoy once per corpus, the same for both modes
                    envoy_seen = observe(http_reqs, model, "127.0.0.1")
                apisix_seen = observe(http_reqs, model, APISIX_IP)
                for req in http_reqs:
                    key = label(req)
                    diff = compare_proxies(apisix_seen[key], envoy_seen[key], clusters)
                    if diff:
                        result.apisix_vs_envoy[key] = diff
                    diff = compare_seen(apisix_seen[key], model.decide(req), "APISIX")
                    if diff:
                        result.model_vs_apisix[key] = diff
                if c.mirror is not None:
                    if envoy_mirror is None:
                        envoy_mirror = mirrored(c.mirror, backends, "127.0.0.1", clusters)
                    result.mirror = compare_mirrors(
                        mirrored(c.mirror, backends, APISIX_IP, clusters), envoy_mirror)
                results.append(result)
                (work / f"error-{c.name}-{mode}.log").write_text(run.error_log())
    return results


def git_sha() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| corpus | feed | objects written / loaded / refused | not read by APISIX "
          "| requests | APISIX vs Envoy: agree / documented / unexplained "
          "| model vs APISIX: agree / documented / unexplained | mirror (share mirrored) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, ae, ma = r["objects"], r["apisix_vs_envoy"], r["model_vs_apisix"]
        not_read = ", ".join(f"{n} {k}" for k, n in o["not_read"].items()) or "-"
        mirror = r.get("mirror")
        print(f"| {r['corpus']} | {r['mode']} | {o['written']} / {o['loaded']} / "
              f"{len(o['refused'])} | {not_read} | {r['requests']} "
              f"({len(r['not_served'])} TCP not served) | {ae['agree']} / "
              f"{len(ae['documented'])} / {len(ae['unexplained'])} | {ma['agree']} / "
              f"{len(ma['documented'])} / {len(ma['unexplained'])} | " + (
                  "-" if not mirror else f"{'agree' if mirror['agree'] else 'DISAGREE'} "
                  f"(APISIX {mirror['apisix']['share']}, Envoy {mirror['envoy']['share']})")
              + " |")
    for r in rows:
        for what in ("apisix_vs_envoy", "model_vs_apisix"):
            for k, v in r[what]["unexplained"].items():
                print(f"  {r['corpus']}/{r['mode']} {what}: {k}: {v[:300]}")
            for k in r[what]["documented_but_agree"]:
                print(f"  {r['corpus']}/{r['mode']} {what}: documented but agrees: {k}")
        for k, v in r["objects"]["refused"].items():
            print(f"  {r['corpus']}/{r['mode']} refused {k}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--apisix", type=Path, default=os.environ.get("APISIX_HOME"),
                    help="APISIX installation prefix (default: $APISIX_HOME)")
    ap.add_argument("--nginx", type=Path, default=Path(shutil.which("openresty") or
                                                       "/usr/sbin/nginx"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--corpora", default="features,bookinfo")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.apisix is None:
        raise ConformanceError("--apisix PREFIX (or APISIX_HOME) is required")
    install = Installation(args.apisix.resolve(), args.nginx)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        raise ConformanceError(f"--modes: {sorted(set(modes) - set(MODES))} unknown; "
                               f"known: {list(MODES)}")
    wanted = [n for n in args.corpora.split(",") if n]
    known = corpora()
    if set(wanted) - set(known):
        raise ConformanceError(f"--corpora: {sorted(set(wanted) - set(known))} unknown")
    istiod_binary = ensure_istiod_binary()
    work = work_dir("amesh-conformance-")
    rows = []
    for name in wanted:
        for result in run_corpus(known[name], install, modes, work / name, istiod_binary):
            rows.append(result.row())
    print_table(rows)
    write_results(args.out, rows, apisix_version=install.version, apisix_prefix=str(
        install.prefix), nginx=str(args.nginx), amesh_git_sha=git_sha(), draws=DRAWS,
        tolerance=TOLERANCE, work_dir=str(work))


if __name__ == "__main__":
    main()
