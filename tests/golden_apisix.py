"""What amesh makes of an istiod golden (tests/golden/istiod/<corpus>/): the APISIX objects
and Skips, computed by the real Agent (its joins: EDS, listener ports, hash policies), and
their reviewed copies under tests/golden/apisix/<corpus>/.

Regenerate (after reviewing what changed, feature by feature), from the repo root:
    PYTHONPATH=src python -m tests.peers.dump_xds --corpus features   # istiod's output
    PYTHONPATH=src python tests/golden_apisix.py features              # amesh's translation
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson

from amesh_ext.agent import Agent
from amesh_ext.config import parse_start_config
from amesh_ext.native import MemoryQueue
from amesh_ext.resources import TYPE_ORDER
from amesh_ext.sources.file import parse_resource

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # `peers` when run as a script
ISTIOD_GOLDEN = TESTS / "golden" / "istiod"
APISIX_GOLDEN = TESTS / "golden" / "apisix"
# xDS type -> istiod golden file (tests/peers/dump_xds.TYPE_FILES, without importing grpc).
TYPE_FILES = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "clusters.json",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "endpoints.json",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "listeners.json",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "routes.json",
}
KINDS = ("routes", "upstreams", "stream_routes")


def load_istiod(corpus_dir: Path) -> dict[str, dict]:
    return {f: json.loads((corpus_dir / f).read_text()) for f in TYPE_FILES.values()}


def translate_documents(docs: dict[str, dict], translate: dict | None = None) -> Agent:
    """An Agent fed every resource of the documents, in Envoy's push order; raises if the
    agent rejects any (a golden corpus must translate)."""
    config = parse_start_config(json.dumps({"source": "file:///dev/null",
                                            "translate": translate or {}}))
    agent = Agent(config, MemoryQueue())
    for type_url in TYPE_ORDER:
        # The file source's parser: istiod's JSON as a file:// source would read it.
        resources = [parse_resource({"@type": type_url, **d}, TYPE_FILES[type_url])[0]
                     for d in docs[TYPE_FILES[type_url]]["resources"]]
        rejected = agent.apply(type_url, resources, ())
        if rejected:
            raise AssertionError(f"agent rejected {type_url}: {rejected}")
    return agent


def objects(agent: Agent) -> dict[str, dict]:
    """'/<kind>/<id>' -> the object as APISIX reads it from the dict."""
    return {k: orjson.loads(agent.sink.get(k)) for k in sorted(agent.sink.keys())
            if k.startswith("/")}


def apisix_documents(agent: Agent) -> dict[str, object]:
    """{file name: document} of the APISIX golden: one file per object kind, plus skips."""
    objs = objects(agent)
    docs: dict[str, object] = {
        f"{kind}.json": {k: v for k, v in objs.items() if k.startswith(f"/{kind}/")}
        for kind in KINDS
    }
    docs["skips.json"] = sorted({(s.feature, s.resource, s.detail) for s in agent.skips()})
    return docs


def dumps(doc: object) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(corpus: str) -> dict[str, object]:
    docs = apisix_documents(translate_documents(load_istiod(ISTIOD_GOLDEN / corpus)))
    out = APISIX_GOLDEN / corpus
    out.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        (out / name).write_text(dumps(doc), encoding="utf-8")
    return docs


if __name__ == "__main__":
    for name in sys.argv[1:] or ["features"]:
        for file, doc in write(name).items():
            print(f"{APISIX_GOLDEN / name / file}: {len(doc)} entries")
