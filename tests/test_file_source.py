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


GOLDEN = Path(__file__).resolve().parent / "golden" / "istiod"


def _istio_proxy_listener() -> dict:
    """istiod's 17080 listener as istio-proxy gets it: with Istio's own stats filter, an
    access log, RBAC (types amesh never imports or that no xds-protos has)."""
    listener = json.loads((GOLDEN / "features" / "listeners.json").read_text())["resources"][0]
    listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][:0] = [
        {"name": "istio.stats", "typed_config": {
            "@type": "type.googleapis.com/stats.PluginConfig", "disable_host_header_fallback":
            True}},
        {"name": "envoy.filters.http.rbac", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"}}]
    hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/stdout"}}]
    return listener


def test_istio_proxy_json_with_unknown_typed_configs_loads(tmp_path: Path) -> None:
    from amesh_ext.translate import TranslateOptions, translate_listener

    (tmp_path / "lds.json").write_text(json.dumps(_istio_proxy_listener()))
    got: list = []

    class Keep(Recorder):
        def apply(self, type_url, upserts, removed):
            got.extend(r for r in upserts if type_url == LISTENER)
            return super().apply(type_url, upserts, removed)

    src = FileSource(str(tmp_path), Keep())
    assert src.load_once()
    assert src.status()["errors"] == []
    assert src.status()["opaque_types"] == ["type.googleapis.com/stats.PluginConfig"]
    (listener,) = got
    lt = translate_listener(listener.message(), TranslateOptions())
    # The routes keep their listener's port (a rejected listener lost it).
    assert lt.route_config_ports == {"17080": 17080}
    skipped = {s.detail for s in lt.translation.skipped if s.feature == "http_filter"}
    assert "HTTP filter 'istio.stats' is not translated" in skipped
    hcm_any = listener.message().filter_chains[0].filters[0].typed_config
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    hcm = hcm_pb2.HttpConnectionManager()
    assert hcm_any.Unpack(hcm)
    # Carried opaquely: the original type URL, its fields as bytes.
    assert hcm.http_filters[0].typed_config.type_url == "type.googleapis.com/stats.PluginConfig"


def _dump(corpus: str) -> dict:
    """An Envoy admin /config_dump (istioctl proxy-config all -o json) of a golden corpus."""
    docs = {f: json.loads((GOLDEN / corpus / f).read_text())["resources"]
            for f in ("clusters.json", "endpoints.json", "listeners.json", "routes.json")}
    admin = "type.googleapis.com/envoy.admin.v3."
    static = _cluster("xds-grpc")
    return {"configs": [
        {"@type": admin + "BootstrapConfigDump", "bootstrap": {"node": {"id": "x"}}},
        {"@type": admin + "ClustersConfigDump", "version_info": "v1",
         "static_clusters": [{"cluster": static}],
         "dynamic_active_clusters": [
             {"version_info": "v1", "cluster": {"@type": CLUSTER, **c},
              "last_updated": "2026-01-01T00:00:00Z"} for c in docs["clusters.json"]],
         "dynamic_warming_clusters": [{"cluster": _cluster("warming")}]},
        {"@type": admin + "EndpointsConfigDump", "dynamic_endpoint_configs": [
            {"endpoint_config": {"@type": ENDPOINTS, **e}} for e in docs["endpoints.json"]]},
        {"@type": admin + "ListenersConfigDump", "dynamic_listeners": [
            {"name": ln["name"], "active_state": {"listener": {"@type": LISTENER, **ln}}}
            for ln in docs["listeners.json"]]},
        {"@type": admin + "RoutesConfigDump", "dynamic_route_configs": [
            {"route_config": {"@type": ROUTES, **r}} for r in docs["routes.json"]]},
        {"@type": admin + "SecretsConfigDump"},
    ]}


def test_envoy_config_dump_is_read_unchanged(tmp_path: Path) -> None:
    dump = _dump("features")
    (tmp_path / "config_dump.json").write_text(json.dumps(dump))
    rec = Recorder()
    src = FileSource(str(tmp_path), rec)
    assert src.load_once()
    assert src.status()["errors"] == []
    want = {t: sorted(r.get("name") or r.get("cluster_name") for r in json.loads(
        (GOLDEN / "features" / f).read_text())["resources"])
        for t, f in ((CLUSTER, "clusters.json"), (ENDPOINTS, "endpoints.json"),
                     (LISTENER, "listeners.json"), (ROUTES, "routes.json"))}
    for type_url, names in want.items():
        assert rec.last(type_url) == (names, set())  # no static or warming resources
