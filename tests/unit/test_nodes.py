"""The node watch (``driver/nodes.py``): whether any live node can hold one encode actor, the
wait before the run stops, and the stop it asks for from its own thread."""

from __future__ import annotations

import threading
import time

import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.nodes import NODE_WAIT_EXIT, NodeWatch, actor_needs, missing
from embedjob.driver.stop import StopRequested, stop_on_signal
from embedjob.errors import ConfigError

pytestmark = pytest.mark.unit

HEAD = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}
WORKER = {"Alive": True, "Resources": {"CPU": 1.0, "encode_node": 1.0}}
GPU_NODE = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "encode_node": 1.0}}
NEEDS = {"CPU": 1.0, "encode_node": 1.0}


def _dead(node: dict) -> dict:
    return node | {"Alive": False}


def test_actor_needs_are_the_cpus_the_gpus_and_the_custom_resources():
    cfg = EmbedConfig(input="a.parquet", output="o.lance", cpus_per_actor=1.5,
                      gpus_per_actor=0.5, actor_resources="encode_node=1")
    assert actor_needs(cfg) == {"CPU": 1.5, "GPU": 0.5, "encode_node": 1.0}
    assert actor_needs(EmbedConfig(input="a.parquet", output="o.lance")) == {"CPU": 0.5}


@pytest.mark.parametrize(("nodes", "short"), [
    ([HEAD, WORKER], {}),
    ([HEAD, _dead(WORKER)], {"encode_node": 1.0}),  # a dead node's resources do not count
    ([HEAD], {"encode_node": 1.0}),
    ([], NEEDS),
    # each need is somewhere, but no one node has both: the actor fits nowhere
    ([HEAD, {"Alive": True, "Resources": {"CPU": 0.5, "encode_node": 1.0}}], NEEDS),
])
def test_missing_names_what_no_live_node_can_give_one_actor(nodes, short):
    assert missing(nodes, NEEDS) == short


def test_missing_counts_totals_and_fractions():
    assert missing([GPU_NODE], {"CPU": 1.0, "GPU": 0.25}) == {}
    assert missing([HEAD, WORKER], {"CPU": 1.0, "GPU": 0.25}) == {"GPU": 0.25}


def test_the_watch_stops_only_after_the_wait_and_a_returning_node_resets_it():
    cluster = [HEAD]
    with stop_on_signal() as stop:
        watch = NodeWatch(NEEDS, 15.0, stop, nodes=lambda: cluster)
        assert watch.poll(100.0) is None and watch.since == 100.0
        assert watch.poll(114.0) is None
        cluster.append(WORKER)  # a node joins: the clock resets
        assert watch.poll(120.0) is None and watch.since is None
        cluster.pop()
        assert watch.poll(130.0) is None
        reason = watch.poll(145.0)
    assert reason == ("the node watch: no live node had the resources for one encode actor "
                      "(missing encode_node=1) for 15 s (--node-wait-s)")


def test_a_request_from_another_thread_interrupts_the_wait_with_its_reason_and_code():
    with stop_on_signal() as stop, pytest.raises(StopRequested) as raised, stop.waiting():
        threading.Timer(0.2, stop.request, args=("the node watch: gone", NODE_WAIT_EXIT)).start()
        time.sleep(5)  # interrupted long before this ends
        pytest.fail("the wait was not interrupted")
    assert raised.value.exit_code == NODE_WAIT_EXIT and str(raised.value) == "the node watch: gone"


def test_node_wait_must_be_positive():
    with pytest.raises(ConfigError, match="--node-wait-s"):
        EmbedConfig(input="a.parquet", output="o.lance", node_wait_s=0)
