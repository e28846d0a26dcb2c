"""Golden tests of the features mesh (tests/peers/mesh/features/: every Istio traffic
feature of issue 4): istiod's output is pinned in tests/golden/istiod/features/, amesh's
reviewed translation of it in tests/golden/apisix/features/ (routes, upstreams, stream
routes, and the Skips). Regenerate and review the diff (commands in golden_apisix.py).
"""

from __future__ import annotations

import json

import pytest

from apisix_schema import validate_all
from golden_apisix import (
    APISIX_GOLDEN,
    ISTIOD_GOLDEN,
    apisix_documents,
    load_istiod,
    objects,
    translate_documents,
)
from peers.dump_xds import CORPORA, probe_corpus
from peers.istiod import Istiod, copy_corpus

CORPUS = CORPORA["features"]
REGENERATE = "PYTHONPATH=src python tests/golden_apisix.py features"


@pytest.fixture(scope="module")
def agent():
    return translate_documents(load_istiod(ISTIOD_GOLDEN / "features"))


def test_translation_matches_apisix_golden(agent) -> None:
    for name, doc in apisix_documents(agent).items():
        golden = APISIX_GOLDEN / "features" / name
        assert golden.is_file(), f"missing {golden}: run {REGENERATE}"
        assert json.loads(json.dumps(doc)) == json.loads(golden.read_text()), (
            f"{golden} differs from the translation: review, then run {REGENERATE}")


def test_every_object_is_valid_for_apisix(agent) -> None:
    objs = objects(agent)
    validate_all(objs)
    kinds = {key.split("/")[1] for key in objs}
    assert kinds == {"routes", "upstreams", "stream_routes"}


def test_features_reach_the_translation(agent) -> None:
    """Each feature the corpus exercises shows up in amesh's objects (a guard against a
    corpus edit that silently stops covering one)."""
    text = json.dumps(objects(agent))
    for needle in ('"traffic-split"', '"fault-injection"', '"redirect"', '"cors"',
                   '"proxy-mirror"', '"response-rewrite"', '"regex_uri"', '"host": "rewr',
                   '"hash_on": "cookie"', '"hash_on": "header"', '"key": "remote_addr"',
                   '"key": "arg_uid"', '"priority": -1', '"scheme": "https"',
                   '"scheme": "grpc"', '"checks"', '"methods": ["POST"]', '"~*"',
                   '"http_host"', '"server_port": 17090', '"localhost"', '"weight": 3',
                   '"connect": 0.75', '"read": 1.5'):
        assert needle in text, needle
    features = {s.feature for s in agent.skips()}
    assert {"circuit_breakers", "fault_percentage_rounded", "upstream_client_cert"} <= features


def test_istiod_still_generates_the_golden(tmp_path, istiod_binary) -> None:
    """tests/golden/istiod/features/ is what this istiod sends the probe node (regenerate:
    ``PYTHONPATH=src python -m tests.peers.dump_xds --corpus features``)."""
    with Istiod(tmp_path / "istiod", binary=istiod_binary) as istiod:
        istiod.start(copy_corpus(CORPUS.config_dir, tmp_path / "config"))
        docs = probe_corpus(istiod.xds_address, CORPUS)
        assert probe_corpus(istiod.xds_address, CORPUS) == docs  # deterministic
    for name, doc in docs.items():
        golden = CORPUS.golden_dir / name
        assert golden.is_file(), f"missing {golden}"
        assert json.loads(golden.read_text()) == doc, (
            f"{golden} is stale: run python -m tests.peers.dump_xds --corpus features, "
            "then review the APISIX golden")
