"""file:// source: forms of files, reload on change, bad input kept apart."""

from __future__ import annotations

import json
from pathlib import Path

from amesh_ext.resources import CLUSTER, ENDPOINTS, LISTENER, ROUTES
from amesh_ext.sources.file import FileSource


class Recorder:
    def __init__(self, reject: set[str] | None = None) -> None:
        self.calls: list[tuple[str, list[str], set[str]]] = []
        self.reject = reject or set()

    def apply(self, type_url, upserts, removed):
        self.calls.append((type_url, sorted(r.name for r in upserts), set(removed)))
        return {r.name: "rejected by test" for r in upserts if r.name in self.reject}

    def last(self, type_url: str) -> tuple[list[str], set[str]]:
        for t, names, removed in reversed(self.calls):
            if t == type_url:
                return names, removed
        raise KeyError(type_url)


def _cluster(name: str, **extra) -> dict:
    return {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name,
            "type": "EDS", **extra}


def test_forms_single_list_discovery_response_and_yaml_multidoc(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_cluster("a")))
    (tmp_path / "b.yaml").write_text(
        "version_info: '1'\nresources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3"
        ".Cluster\n  name: b\n")
    (tmp_path / "c.yml").write_text(
        "'@type': type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n"
        "cluster_name: a\n---\n- '@type': type.googleapis.com/envoy.config.route.v3."
        "RouteConfiguration\n  name: '80'\n")
    (tmp_path / "ignored.txt").write_text("not a config")
    rec = Recorder()
    src = FileSource(str(tmp_path), rec)
    assert src.load_once()
    assert rec.last(CLUSTER) == (["a", "b"], set())
    assert rec.last(ENDPOINTS) == (["a"], set())
    assert rec.last(ROUTES) == (["80"], set())
    assert rec.last(LISTENER) == ([], set())
    assert src.status()["errors"] == []
    assert not src.load_once()  # nothing changed: no reload


def test_removal_and_a_bad_resource_keeps_its_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps([_cluster("a"), _cluster("b")]))
    rec = Recorder()
    src = FileSource(str(path), rec)
    src.load_once()
    # b turns invalid: it is reported and NOT removed; a disappears: it is removed.
    path.write_text(json.dumps([_cluster("b", connect_timeout="soon"), _cluster("c")]))
    src.load_once()
    names, removed = rec.last(CLUSTER)
    assert names == ["c"] and removed == {"a"}
    errors = src.status()["errors"]
    assert len(errors) == 1 and "'b'" in errors[0] and "connect_timeout" in errors[0]


def test_unparseable_file_keeps_its_resources_and_handler_rejections_are_reported(
        tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: a\n"
                    "- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: x\n")
    rec = Recorder(reject={"x"})
    src = FileSource(str(path), rec)
    src.load_once()
    assert src.status()["rejected"] == {"x": "rejected by test"}
    path.write_text("- [unclosed")
    src.load_once()
    names, removed = rec.last(CLUSTER)
    assert names == ["a", "x"] and removed == set()
    assert "cannot load" in src.status()["errors"][0]


def test_duplicate_names_first_wins_and_is_reported(tmp_path: Path) -> None:
    (tmp_path / "1.json").write_text(json.dumps(_cluster("a", connect_timeout="1s")))
    (tmp_path / "2.json").write_text(json.dumps(_cluster("a", connect_timeout="2s")))
    rec = Recorder()
    src = FileSource(str(tmp_path), rec)
    src.load_once()
    assert rec.last(CLUSTER) == (["a"], set())
    assert any("duplicate" in e for e in src.status()["errors"])


def test_missing_path_is_an_error_not_a_crash(tmp_path: Path) -> None:
    rec = Recorder()
    src = FileSource(str(tmp_path / "nope"), rec)
    src.load_once()
    assert "no .json/.yaml/.yml file found" in src.status()["errors"][0]
