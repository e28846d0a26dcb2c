"""The agent's failure paths (issue: one source of truth in the agent): translator bugs on
removal and join paths, the loser of a key collision, names refused before the agent saw
them, objects too large for the dict, a bounded status."""

from __future__ import annotations

import json

from google.protobuf.any_pb2 import Any as AnyMsg

from amesh_ext import translate
from amesh_ext.agent import Agent
from amesh_ext.agent.keys import KeyOwnership
from amesh_ext.config import parse_start_config
from amesh_ext.native import MemoryQueue
from amesh_ext.resources import CLUSTER, ENDPOINTS, Resource, parse_json_resource
from amesh_ext.xds.subscriptions import Batch, Subscriptions
from xds_server import FakeHandler, cluster, endpoints

START = '{"source": "file:///dev/null"}'


def _agent(start: str = START, capacity: int = 0) -> tuple[Agent, MemoryQueue]:
    queue = MemoryQueue()
    queue.capacity = capacity
    agent = Agent(parse_start_config(start), queue)
    agent._first_sync.done = True  # these tests are not about the first-sync gate
    return agent, queue


def _upstreams(queue: MemoryQueue) -> dict[str, dict]:
    return {k: json.loads(v) for k, v in queue.data.items() if k.startswith("/upstreams/")}


def test_a_translator_crash_on_a_join_keeps_the_last_good_upstream(monkeypatch) -> None:
    """Removing an endpoint set re-translates the clusters that read it; a translator bug
    there neither escapes apply() (the client would mark every upsert rejected) nor loses
    the cluster's last good upstream."""
    agent, queue = _agent()
    res = [Resource.from_message(CLUSTER, cluster("c1"))]
    assert agent.apply(CLUSTER, res, []) == {}
    assert agent.apply(ENDPOINTS, [Resource.from_message(ENDPOINTS, endpoints("c1",
                                                                                "10.0.0.1"))],
                       []) == {}
    agent.tick(now=10)
    before = _upstreams(queue)
    assert [n["host"] for u in before.values() for n in u["nodes"]] == ["10.0.0.1"]

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(translate, "translate_cluster", broken)
    assert agent.apply(ENDPOINTS, [], ["c1"]) == {}  # no exception out of apply
    agent.tick(now=11)
    assert _upstreams(queue) == before
    assert agent.status()["resources"]["eds"] == 0


def test_the_loser_of_a_key_collision_takes_the_key_when_the_winner_goes() -> None:
    kept: dict[str, bytes] = {}  # what the sink holds

    class Sink:
        def put(self, key: str, value: bytes) -> None:
            kept[key] = value

        def delete(self, key: str) -> None:
            kept.pop(key, None)

    keys = KeyOwnership(Sink())
    keys.set(("cluster", "a"), {"/upstreams/x": b"from a", "/upstreams/a": b"a"})
    keys.set(("cluster", "b"), {"/upstreams/x": b"from b"})
    assert kept["/upstreams/x"] == b"from a" and "/upstreams/x" in keys.collisions
    keys.set(("cluster", "a"), {"/upstreams/a": b"a"})  # a no longer wants x
    assert kept["/upstreams/x"] == b"from b" and keys.collisions == {}
    keys.set(("cluster", "b"), {})
    assert "/upstreams/x" not in kept and len(keys) == 1


def test_a_name_twice_in_one_response_is_listed_in_status() -> None:
    handler = FakeHandler()
    subs = Subscriptions(handler)
    st = subs.states[CLUSTER]
    item = AnyMsg()
    item.Pack(cluster("dup"))
    batch = Batch(st, "v1")
    batch.add(item, "response")
    batch.add(item, "response")
    rejected = subs.commit(batch, [])
    assert rejected == {"dup": "appears twice in one response"}
    assert handler.noted == {"dup": "appears twice in one response"}
    agent, _ = _agent()
    agent.note_rejected(CLUSTER, rejected)
    assert agent.status()["rejected"] == {"cds": rejected}


def test_an_object_that_can_never_fit_rejects_its_resource_alone() -> None:
    agent, queue = _agent(capacity=64 * 1024)  # objects up to 16 KiB
    big = {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "big",
           "type": "STATIC", "load_assignment": {"cluster_name": "big", "endpoints": [
               {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                   "address": f"10.0.{j // 250}.{j % 250}", "port_value": 80}}}}
                   for j in range(1000)]}]}}
    small = dict(big, name="small", load_assignment={"cluster_name": "small"})
    rejected = agent.apply(CLUSTER, [parse_json_resource(big, "t"),
                                     parse_json_resource(small, "t")], [])
    assert list(rejected) == ["big"] and "16384 bytes" in rejected["big"]
    agent.tick(now=10)
    assert [u["name"] for u in _upstreams(queue).values()] == ["small"]
    assert agent.status()["resources"]["cds"] == 1


def test_status_lists_the_first_rejections_and_counts_them_all() -> None:
    agent, _ = _agent('{"source": "file:///dev/null", "limits": {"status_max_rejected": 3}}')
    agent.note_rejected(CLUSTER, {f"c{i}": "bad" for i in range(10)})
    status = agent.status()
    assert len(status["rejected"]["cds"]) == 3
    assert status["rejected_counts"] == {"cds": 10} and status["rejected_count"] == 10
