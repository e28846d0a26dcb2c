"""AdsConfig validation, node identity the Istio way, and the pure pieces (backoff, NACK text)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from amesh_ext.sources.ads import AdsConfig
from amesh_ext.xds.backoff import Backoff
from amesh_ext.xds.credentials import TokenFile, channel_options
from amesh_ext.xds.node import identity_from
from amesh_ext.xds.subscriptions import MAX_DETAIL, nack_message
from xds_server import NODE


def conf(**kw: object) -> dict:
    return {"address": "grpc://127.0.0.1:15010", "node": NODE, **kw}


def test_defaults() -> None:
    c = AdsConfig.from_mapping(conf(), env={})
    assert c.target == "127.0.0.1:15010"
    assert c.tls is None
    assert c.protocol == "delta"
    assert c.keepalive_seconds == 30.0
    assert c.max_receive_bytes == 0
    assert (c.backoff_base_seconds, c.backoff_max_seconds) == (0.5, 30.0)
    assert c.node.id == "sidecar~10.1.2.3~web-0.shop~shop.svc.cluster.local"


@pytest.mark.parametrize(
    ("address", "target", "tls"),
    [
        ("grpc://istiod.istio-system.svc", "istiod.istio-system.svc:15010", False),
        ("grpcs://istiod.istio-system.svc", "istiod.istio-system.svc:15012", True),
        ("grpcs://10.0.0.1:9999", "10.0.0.1:9999", True),
        ("grpc://[::1]:15010", "[::1]:15010", False),
        ("grpcs://istiod:15012/", "istiod:15012", True),
    ],
)
def test_address_forms(address: str, target: str, tls: bool) -> None:
    c = AdsConfig.from_mapping(conf(address=address), env={})
    assert c.target == target
    assert (c.tls is not None) is tls


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"address": "istiod:15012"}, "xds.address"),
        ({"address": "http://istiod:15012"}, "xds.address"),
        ({"address": "grpc://:15010"}, "xds.address"),
        ({"address": "grpc://istiod:99999"}, "xds.address"),
        ({"address": "grpc://istiod:15010/path"}, "xds.address"),
        ({"address": 15010}, "xds.address"),
        ({"protocol": "incremental"}, "xds.protocol"),
        ({"keepalive_seconds": 5}, "xds.keepalive_seconds"),
        ({"keepalive_seconds": "30"}, "xds.keepalive_seconds"),
        ({"max_receive_bytes": 4 << 20}, "xds.max_receive_bytes"),
        ({"max_receive_bytes": True}, "xds.max_receive_bytes"),
        ({"backoff": {"base_seconds": 0}}, "xds.backoff"),
        ({"backoff": {"base_seconds": 5, "max_seconds": 1}}, "xds.backoff"),
        ({"backoff": {"jitter": 1}}, "xds.backoff"),
        ({"tls": {"ca_file": "/x"}}, "xds.tls"),  # TLS settings on a plaintext address
        ({"address": "grpcs://i:1", "tls": {"ca_file": "/nonexistent"}}, "xds.tls.ca_file"),
        ({"address": "grpcs://i:1", "tls": {"token": "x"}}, "xds.tls"),
        ({"node": {**NODE, "ip": "not-an-ip"}}, "xds.node.ip"),
        ({"node": {"pod_name": "p", "namespace": "n"}}, "xds.node.ip"),
        ({"node": {**NODE, "interception_mode": "MAGIC"}}, "xds.node.interception_mode"),
        ({"node": {**NODE, "labels": {"a": 1}}}, "xds.node.labels"),
        ({"node": {**NODE, "id": "sidecar~10.0.0.1~x"}}, "xds.node.id"),
        ({"node": {**NODE, "cluster_id": 7}}, "xds.node.cluster_id"),
        ({"node": {**NODE, "podname": "x"}}, "xds.node"),
        ({"node": {**NODE, "instance_ips": ["10.0.0.1", "nope"]}}, "xds.node.instance_ips[1]"),
        ({"unknown": 1}, "xds"),
    ],
)
def test_bad_fields_are_named(patch: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        AdsConfig.from_mapping(conf(**patch), env={})
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_tls_fields(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = AdsConfig.from_mapping(
        conf(
            address="grpcs://10.0.0.1:15012",
            tls={"ca_file": str(ca), "server_name": "istiod.istio-system.svc"},
            max_receive_bytes=64 << 20,
        ),
        env={},
    )
    assert c.tls is not None and c.tls.ca_file == str(ca)
    assert c.tls.server_name == "istiod.istio-system.svc" and c.tls.token_file is None
    opts = dict(channel_options(c.keepalive_seconds, c.max_receive_bytes, c.tls.server_name))
    assert opts["grpc.ssl_target_name_override"] == "istiod.istio-system.svc"
    assert opts["grpc.max_receive_message_length"] == 64 << 20


def test_channel_options() -> None:
    opts = dict(channel_options(30, 0, None))
    assert opts["grpc.keepalive_time_ms"] == 30_000
    assert opts["grpc.keepalive_permit_without_calls"] == 0
    assert opts["grpc.max_receive_message_length"] == -1
    assert "grpc.ssl_target_name_override" not in opts


def test_node_metadata_as_istiod_reads_it() -> None:
    c = AdsConfig.from_mapping(
        conf(
            node={
                **NODE,
                "labels": {"app": "web", "version": "v1"},
                "istio_version": "1.28.0",
                "mesh_id": "mesh1",
                "service_account": "web-sa",
                "workload_name": "web",
                "metadata": {"EXTRA": "x"},
            }
        ),
        env={},
    )
    node = c.node.to_proto()
    meta = json.loads(json_format.MessageToJson(node.metadata))  # what istiod unmarshals
    assert node.id == "sidecar~10.1.2.3~web-0.shop~shop.svc.cluster.local"
    assert len(node.id.split("~")) == 4
    assert meta == {
        "NAMESPACE": "shop",
        "LABELS": {"app": "web", "version": "v1"},
        "INSTANCE_IPS": "10.1.2.3",
        "CLUSTER_ID": "Kubernetes",
        "INTERCEPTION_MODE": "NONE",
        "ISTIO_VERSION": "1.28.0",
        "MESH_ID": "mesh1",
        "SERVICE_ACCOUNT": "web-sa",
        "WORKLOAD_NAME": "web",
        "EXTRA": "x",
    }
    assert all(isinstance(v, str) for k, v in meta.items() if k != "LABELS")


def test_node_from_pilot_agent_environment() -> None:
    env = {
        "POD_NAME": "api-7d9f",
        "POD_NAMESPACE": "prod",
        "INSTANCE_IP": "10.9.8.7",
        "ISTIO_META_CLUSTER_ID": "east",
        "ISTIO_META_MESH_ID": "m",
        "ISTIO_META_INTERCEPTION_MODE": "REDIRECT",
        "ISTIO_META_WORKLOAD_NAME": "api",
        "ISTIO_METAJSON_LABELS": '{"app": "api"}',
        "ISTIO_META_DNS_CAPTURE": "true",
        "SERVICE_ACCOUNT": "api-sa",
        "ISTIO_VERSION": "1.27.1",
        "UNRELATED": "x",
    }
    node = identity_from({"cluster_id": "west"}, env)  # explicit config wins
    assert node.id == "sidecar~10.9.8.7~api-7d9f.prod~prod.svc.cluster.local"
    m = node.metadata
    assert m["CLUSTER_ID"] == "west" and m["MESH_ID"] == "m"
    assert m["INTERCEPTION_MODE"] == "REDIRECT" and m["WORKLOAD_NAME"] == "api"
    assert m["LABELS"] == {"app": "api"} and m["DNS_CAPTURE"] == "true"
    assert m["SERVICE_ACCOUNT"] == "api-sa" and m["ISTIO_VERSION"] == "1.27.1"
    assert "UNRELATED" not in m


def test_node_from_explicit_id() -> None:
    node = identity_from({"id": "sidecar~10.0.0.9~pod-1.team~team.svc.cluster.local"}, {})
    assert (node.ip, node.namespace) == ("10.0.0.9", "team")
    assert node.metadata["NAMESPACE"] == "team"
    assert node.metadata["INSTANCE_IPS"] == "10.0.0.9"


def test_node_instance_ips_from_metadata_env() -> None:
    node = identity_from(NODE, {"ISTIO_META_INSTANCE_IPS": "10.1.2.3,fd00::3"})
    assert node.metadata["INSTANCE_IPS"] == "10.1.2.3,fd00::3"


def test_bad_metajson_env_named() -> None:
    with pytest.raises(ValueError, match="ISTIO_METAJSON_LABELS"):
        identity_from(NODE, {"ISTIO_METAJSON_LABELS": "{nope"})


def test_backoff_full_jitter_and_reset() -> None:
    rolls = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    b = Backoff(0.5, 4.0, lambda: next(rolls))
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next_delay() == 2.0  # half the capped ceiling
    assert b.next_delay() == 0.0
    b.reset()
    assert b.attempts == 0 and b.ceiling == 0.5
    b = Backoff()  # real randomness stays under the ceiling
    for _ in range(200):
        ceiling = b.ceiling
        assert 0 <= b.next_delay() <= ceiling <= 30.0
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_token_file_reread_only_on_change(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    tok = TokenFile(str(path))
    assert tok.read() == "one"
    (tmp_path / "new").write_text("two-longer")
    (tmp_path / "new").replace(path)  # the atomic swap kubelet does
    assert tok.read() == "two-longer"
    path.write_text("")
    with pytest.raises(ValueError):
        tok.read()


def test_nack_message_names_everything_within_bounds() -> None:
    assert nack_message({"b": "bad", "a": "worse"}) == "2 resource(s) rejected: a: worse; b: bad"
    many = {f"cluster-{i:05d}": "x" * 500 for i in range(100)}
    text = nack_message(many)
    assert len(text) <= MAX_DETAIL and "cluster-00000" in text and text.endswith("more")


def test_node_locality_as_pilot_agent_sets_it() -> None:
    """istiod gives failover endpoints priorities relative to Node.locality."""
    env = {"ISTIO_METAJSON_LABELS": '{"app": "api", "istio-locality": "region1.zone1.sub1"}'}
    node = identity_from(NODE, env).to_proto()
    assert (node.locality.region, node.locality.zone, node.locality.sub_zone) == (
        "region1", "zone1", "sub1")
    node = identity_from({**NODE, "locality": "us-east/us-east-1a"}, env).to_proto()
    assert (node.locality.region, node.locality.zone, node.locality.sub_zone) == (
        "us-east", "us-east-1a", "")
    node = identity_from({**NODE, "locality": {"region": "r", "sub_zone": "s"}}, {})
    assert dict(node.locality) == {"region": "r", "sub_zone": "s"}
    assert not identity_from(NODE, {}).to_proto().HasField("locality")
    for bad in ("a/b/c/d", {"region": 1}, {"city": "x"}, 7):
        with pytest.raises(ValueError, match=r"xds\.node\.locality"):
            identity_from({**NODE, "locality": bad}, {}, "xds.node")
