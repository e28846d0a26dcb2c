"""A minimal ADS (state-of-the-world) probe client for the istiod peer, and the golden dumper.

``fetch_sotw(address)`` subscribes like a sidecar (CDS+LDS wildcard, then EDS for the EDS
clusters and RDS for the HCM route names), ACKs everything, and returns what istiod sent.
``python -m tests.peers.dump_xds [--corpus NAME] [--out DIR]`` (from the repo root) starts
istiod on a corpus (``CORPORA``: bookinfo, features) and writes one JSON file per type,
deterministic (sorted by name, no version_info/nonce), to ``tests/golden/istiod/<corpus>/``
for the translator's golden tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory, struct_pb2

from .istiod import (
    BOOKINFO_DIR,
    CLUSTER_ID,
    ISTIO_VERSION,
    MESH_DIR,
    Istiod,
    copy_corpus,
    istio_module_version,
)

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_FILES = {
    CDS: "clusters.json",
    EDS: "endpoints.json",
    LDS: "listeners.json",
    RDS: "routes.json",
}
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

PROBE_NODE_ID = "sidecar~127.0.0.1~amesh-probe.default~default.svc.cluster.local"
GOLDEN_ROOT = Path(__file__).resolve().parents[1] / "golden" / "istiod"
GOLDEN_DIR = GOLDEN_ROOT / "bookinfo"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A directory of Istio YAML, where its goldens live, and the probe's locality (istiod
    orders endpoints into priorities relative to it when a DestinationRule enables
    locality load balancing)."""

    name: str
    config_dir: Path
    golden_dir: Path
    locality: dict[str, str] = dataclasses.field(default_factory=dict)


CORPORA = {
    "bookinfo": Corpus("bookinfo", BOOKINFO_DIR, GOLDEN_DIR),
    "features": Corpus(
        "features",
        MESH_DIR / "features",
        GOLDEN_ROOT / "features",
        {"region": "region1", "zone": "zone1", "sub_zone": "sub1"},
    ),
}


def probe_metadata() -> dict[str, Any]:
    return {
        "NAMESPACE": "default",
        "ISTIO_VERSION": ISTIO_VERSION,
        "CLUSTER_ID": CLUSTER_ID,
        "INTERCEPTION_MODE": "NONE",
        "LABELS": {},
    }


def _pb():
    # Imported lazily: the generated Envoy API modules are many and slow to load.
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    for mod in (
        "envoy.config.cluster.v3.cluster_pb2",
        "envoy.config.endpoint.v3.endpoint_pb2",
        "envoy.config.listener.v3.listener_pb2",
        "envoy.config.route.v3.route_pb2",
        "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    ):
        importlib.import_module(mod)
    return base_pb2, discovery_pb2, ads_pb2_grpc


def make_node(
    node_id: str = PROBE_NODE_ID,
    metadata: dict[str, Any] | None = None,
    locality: dict[str, str] | None = None,
):
    base_pb2, _, _ = _pb()
    node = base_pb2.Node(id=node_id)
    if locality:
        node.locality.CopyFrom(base_pb2.Locality(**locality))
    md = struct_pb2.Struct()
    md.update(probe_metadata() if metadata is None else metadata)
    node.metadata.CopyFrom(md)
    return node


# --------------------------------------------------------------------------- Any types

_POOL = descriptor_pool.Default()
_imported_packages: set[str] = set()


def message_class(full_name: str):
    """The generated class for ``full_name``, importing its xds-protos package when needed."""
    try:
        desc = _POOL.FindMessageTypeByName(full_name)
    except KeyError:
        package = full_name.rsplit(".", 1)[0]
        if package in _imported_packages:
            raise
        _imported_packages.add(package)
        try:
            pkg = importlib.import_module(package)
        except ImportError as exc:
            raise KeyError(f"no python module for {full_name}") from exc
        for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{info.name}")
        desc = _POOL.FindMessageTypeByName(full_name)
    return message_factory.GetMessageClass(desc)


def _is_repeated(field) -> bool:
    # protobuf >= 6 has is_repeated; FieldDescriptor.label is gone in 7.
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == field.LABEL_REPEATED


def load_any_types(msg) -> None:
    """Import the message types of every (nested) Any so json_format can print them."""
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            vfield = field.message_type.fields_by_name["value"]
            items = list(value.values()) if vfield.message_type is not None else []
        elif _is_repeated(field):
            items = list(value)
        else:
            items = [value]
        for item in items:
            if item.DESCRIPTOR.full_name == "google.protobuf.Any":
                inner = message_class(item.type_url.rsplit("/", 1)[-1])()
                item.Unpack(inner)
                load_any_types(inner)
            else:
                load_any_types(item)


def to_dict(msg) -> dict:
    load_any_types(msg)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


# --------------------------------------------------------------------------- the client


def _hcm_route_names(listener) -> set[str]:
    names = set()
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url.endswith("/" + HCM):
                hcm = message_class(HCM)()
                f.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    names.add(hcm.rds.route_config_name)
    return names


def _eds_names(cluster) -> set[str]:
    if cluster.type != cluster.EDS:
        return set()
    return {cluster.eds_cluster_config.service_name or cluster.name}


def fetch_sotw(
    address: str,
    node=None,
    timeout: float = 30.0,
    settle: float = 0.5,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Subscribe over ADS SotW and return ``{type_url: {name: message}}`` once complete.

    Complete = CDS and LDS answered, and every EDS/RDS name they imply answered; then
    ``settle`` seconds with no further response (istiod may push twice at start).
    ``credentials`` selects TLS (e.g. istiod's secure port, ``server_name`` =
    ``istiod.istio-system.svc`` as in istiod's certificate).
    """
    _, discovery_pb2, ads_pb2_grpc = _pb()
    node = node or make_node()
    requests: queue.Queue = queue.Queue()
    responses: queue.Queue = queue.Queue()
    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

    def request_iter():
        while True:
            req = requests.get()
            if req is None:
                return
            yield req

    call = stub.StreamAggregatedResources(request_iter())

    def reader():
        try:
            for resp in call:
                responses.put(resp)
        except grpc.RpcError as exc:
            responses.put(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()

    state: dict[str, dict[str, Any]] = {t: {} for t in TYPE_FILES}
    names: dict[str, set[str]] = {EDS: set(), RDS: set()}
    nonce: dict[str, str] = {}
    version: dict[str, str] = {}
    answered: set[str] = set()
    first = True

    def send(type_url: str, resource_names: set[str] | None = None) -> None:
        nonlocal first
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=version.get(type_url, ""),
            response_nonce=nonce.get(type_url, ""),
            resource_names=sorted(resource_names or []),
        )
        if first:  # istiod reads the node from the first request only
            req.node.CopyFrom(node)
            first = False
        requests.put(req)

    try:
        send(CDS)
        send(LDS)
        deadline = time.monotonic() + timeout
        last_change = time.monotonic()
        while True:
            complete = {CDS, LDS} <= answered and all(
                not names[t] or (t in answered and names[t] <= state[t].keys()) for t in (EDS, RDS)
            )
            if complete and time.monotonic() - last_change >= settle:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"ADS probe incomplete after {timeout}s: answered={sorted(answered)} "
                    f"eds={len(names[EDS])} rds={sorted(names[RDS])}"
                )
            try:
                resp = responses.get(timeout=min(left, settle))
            except queue.Empty:
                continue
            if isinstance(resp, grpc.RpcError):
                raise resp
            last_change = time.monotonic()
            t = resp.type_url
            cls = message_class(t.rsplit("/", 1)[-1])
            got = {}
            for res in resp.resources:
                msg = cls()
                res.Unpack(msg)
                got[getattr(msg, "cluster_name", None) or msg.name] = msg
            if t in (CDS, LDS):
                state[t] = got  # SotW: the full set
            else:
                state.setdefault(t, {}).update(got)
            answered.add(t)
            nonce[t], version[t] = resp.nonce, resp.version_info
            send(t, names.get(t))  # ACK
            if t == CDS:
                new = set().union(*(_eds_names(c) for c in got.values())) if got else set()
                if new != names[EDS]:
                    names[EDS] = new
                    state[EDS] = {k: v for k, v in state[EDS].items() if k in new}
                    send(EDS, new)
            elif t == LDS:
                new = set().union(*(_hcm_route_names(v) for v in got.values())) if got else set()
                if new != names[RDS]:
                    names[RDS] = new
                    state[RDS] = {k: v for k, v in state[RDS].items() if k in new}
                    send(RDS, new)
    finally:
        requests.put(None)
        call.cancel()
        channel.close()


# --------------------------------------------------------------------------- golden files


def golden_documents(
    state: dict[str, dict[str, Any]], corpus: Corpus = CORPORA["bookinfo"]
) -> dict[str, dict]:
    """``{file name: JSON document}``: resources sorted by name, nothing volatile."""
    docs = {}
    for type_url, file_name in TYPE_FILES.items():
        resources = [
            to_dict(state.get(type_url, {})[name]) for name in sorted(state.get(type_url, {}))
        ]
        docs[file_name] = {"type_url": type_url, "resources": resources}
    docs["node.json"] = {
        "node_id": PROBE_NODE_ID,
        "metadata": probe_metadata(),
        "istio_module": f"istio.io/istio@{istio_module_version()}",
        "corpus": f"tests/peers/mesh/{corpus.config_dir.name}",
    }
    if corpus.locality:
        docs["node.json"]["locality"] = corpus.locality
    return docs


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write_golden(docs: dict[str, dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (out / name).write_text(dumps(doc), encoding="utf-8")


def probe_corpus(address: str, corpus: Corpus) -> dict[str, dict]:
    """The golden documents of what istiod at ``address`` sends the corpus' probe node."""
    node = make_node(locality=corpus.locality)
    return golden_documents(fetch_sotw(address, node=node), corpus)


def dump_corpus(corpus: Corpus, out: Path | None = None) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="amesh-istiod-") as tmp:
        istiod = Istiod(Path(tmp))
        with istiod:
            istiod.start(copy_corpus(corpus.config_dir, Path(tmp) / "config"))
            docs = probe_corpus(istiod.xds_address, corpus)
    write_golden(docs, out or corpus.golden_dir)
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="bookinfo")
    ap.add_argument("--out", type=Path, help="default: tests/golden/istiod/<corpus>")
    args = ap.parse_args()
    corpus = CORPORA[args.corpus]
    out = args.out or corpus.golden_dir
    docs = dump_corpus(corpus, out)
    for name, doc in sorted(docs.items()):
        count = len(doc.get("resources", []))
        print(f"{out / name}: {count} resources" if "resources" in doc else out / name)


if __name__ == "__main__":
    main()
