"""Node loss: a real two-node Ray cluster on this machine (``ray start --head`` and a worker
node ``ray start --address=...`` with a custom ``encode_node`` resource); the encode actors
ask for that resource (``--actor-resources encode_node=1``), so they run only on the worker
node. The worker node's raylet and every process it started are SIGKILLed mid-run and a
replacement worker node joins. Outcome: every id exactly once, either from the run itself or,
when the run fails (seen here: the encode actor's in-flight call ended in Ray's
``ActorUnavailableError``, which Ray Data did not retry; or an ``IdShard`` of the duplicate-id
pre-pass had been placed on the worker node and died with it), from a clear failure message
and a rerun that resumes from the last commit.

When no replacement joins, the node watch (``driver/nodes.py``, ``--node-wait-s``) stops the
run like a graceful stop once no live node could hold an encode actor for that long: what is
written is committed, the lease released, exit 75 with one line naming the missing resource;
a rerun after a node joins completes. The driver-side actors (read tracker, writers, crash
ledger) are pinned to the driver's node so that a lost worker node does not take them along.

The driver is a subprocess (the CLI with the fault-injecting encode actor, slowed by the
``ENCODE_DELAY_S`` hook, set in the worker nodes' environment: Ray workers inherit their
raylet's). Slow: two extra raylets and a node-death detection on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lance
import pytest

from embedjob.driver.nodes import NODE_WAIT_EXIT
from tests.faults import hooks as faults
from tests.pipeline.test_resume import (
    _check_exactly_once,
    _command,
    _progress,
    _start_until_a_unit_is_committed,
    _write_corpus,
)

pytestmark = [pytest.mark.pipeline, pytest.mark.faults, pytest.mark.slow]
RAY = str(Path(sys.executable).parent / "ray")
JOIN_TIMEOUT_S = 120  # a node counts as joined once the cluster shows its resource


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_ports() -> list[str]:
    """Ports of their own for one node: two nodes on one machine must not share them."""
    names = ["node-manager-port", "object-manager-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port"]
    return [f"--{name}={port}" for name, port in zip(names, _free_ports(len(names)),
                                                      strict=True)]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in a session of its own: killpg ends the node and all it
    started (raylet, object store, workers)."""
    with open(log, "ab") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args,
                                 *_node_ports()], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_for_nodes(address: str, env: dict, resource: str, count: int) -> None:
    """Until ``count`` live nodes offer ``resource`` (asked in a subprocess: this test
    process is connected to the session's own cluster). A probe that hangs (the head not up
    yet on a loaded machine: ``ray.init`` retries) is killed and asked again."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive'] and "
             "n['Resources'].get(sys.argv[2])))")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            out = subprocess.run([sys.executable, "-c", probe, address, resource], env=env,
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip().endswith(str(count)):
            return
        time.sleep(1)
    raise AssertionError(f"no {count} node(s) with {resource} within {JOIN_TIMEOUT_S} s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class Cluster:
    """A head (2 CPUs) and a worker node (1 CPU, ``encode_node``) started with ``ray start``,
    and the driver running on them."""

    address: str
    env: dict  # the head's and the driver's environment
    worker_env: dict  # the worker nodes' (the encode delay)
    worker_args: list[str]  # ``ray start`` arguments of a worker node (for a replacement)
    command: list[str]  # the driver's
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    driver: subprocess.Popen | None = None

    def join(self, name: str, log_dir: Path) -> None:
        """Start a worker node (``encode_node``) named ``name`` (its log: ``name.log``)."""
        self.nodes[name] = _start(self.worker_args, self.worker_env, log_dir / f"{name}.log")

    def rerun(self) -> subprocess.CompletedProcess:
        """The same command once a worker node is up, to its end."""
        _wait_for_nodes(self.address, self.env, "encode_node", 1)
        return subprocess.run(self.command, env=self.env | {"RAY_ADDRESS": self.address},
                              capture_output=True, text=True, timeout=400)


@contextmanager
def _running(s3_server, s3_prefix, golden_dir, tmp_path, *flags: str) -> Iterator[Cluster]:
    """The cluster up and the driver (``flags`` added) started on it until a unit is
    committed (its output in ``driver.log``); every process killed on the way out."""
    # (Linux: the check that refuses multi-node clusters on Windows and macOS does not apply)
    env = os.environ | s3_server.env | {"RAY_AUTH_MODE": "disabled",
                                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    gcs_port = _free_ports(1)[0]
    address = f"127.0.0.1:{gcs_port}"
    command = [*_command(s3_server, s3_prefix, golden_dir, tmp_path / "summary.json"),
               "--actor-resources", "encode_node=1", "--cpus-per-actor", "1", *flags]
    cluster = Cluster(address=address, env=env, worker_env=env | {faults.ENCODE_DELAY_S: "0.5"},
                      worker_args=[f"--address={address}", "--num-cpus=1",
                                   '--resources={"encode_node": 1}'], command=command)
    temp_dir = tempfile.mkdtemp(prefix="ejnl-", dir="/tmp")  # short: unix socket paths
    try:
        cluster.nodes["head"] = _start(
            ["--head", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=false",
             f"--temp-dir={temp_dir}", "--ray-client-server-port", str(_free_ports(1)[0])],
            env, tmp_path / "head.log")
        _wait_for_nodes(address, env, "CPU", 1)  # a worker node needs the head registered
        cluster.join("worker", tmp_path)
        _wait_for_nodes(address, env, "encode_node", 1)
        with open(tmp_path / "driver.log", "wb") as driver_log:
            cluster.driver, _ = _start_until_a_unit_is_committed(
                command, env | {"RAY_ADDRESS": address}, s3_server.uri(s3_prefix, "out.lance"),
                s3_server.storage_options, stdout=driver_log, stderr=subprocess.STDOUT)
        assert cluster.driver.poll() is None, "the run ended before the node was lost"
        yield cluster
    finally:
        if cluster.driver is not None and cluster.driver.poll() is None:
            cluster.driver.kill()
        for node in reversed(cluster.nodes.values()):
            _stop(node)


def test_worker_node_lost_mid_run_then_a_replacement_joins_every_id_is_written_once(
    s3_server, s3_prefix, golden_dir, embedder, tmp_path
):
    rows = _write_corpus(s3_server, s3_prefix)
    started = time.monotonic()
    with _running(s3_server, s3_prefix, golden_dir, tmp_path) as cluster:
        _stop(cluster.nodes["worker"])  # its raylet, object store and encode actor, at once
        lost = time.monotonic()
        time.sleep(5)
        cluster.join("replacement", tmp_path)
        cluster.driver.wait(timeout=400)
        log = (tmp_path / "driver.log").read_text(errors="replace")
        print(f"node loss: first run ended with {cluster.driver.returncode} after "
              f"{time.monotonic() - started:.1f} s, {time.monotonic() - lost:.1f} s after the "
              "worker node was killed")
        if cluster.driver.returncode != 0:  # a clear failure, then a rerun that resumes
            assert "embedjob: embed failed: " in log, log[-4000:]
            print("node loss: " + next(line for line in log.splitlines()
                                       if "embed failed" in line)[:300])
            rerun = cluster.rerun()  # once the replacement joined
            assert rerun.returncode == 0, rerun.stderr[-4000:]
            print(f"node loss: the rerun completed, {time.monotonic() - started:.1f} s in all")
    _check_exactly_once(s3_server, s3_prefix, rows, embedder)


NODE_WAIT_S = 15


def test_worker_node_lost_and_none_joins_the_run_stops_within_the_node_wait_then_resumes(
    s3_server, s3_prefix, golden_dir, embedder, tmp_path
):
    rows = _write_corpus(s3_server, s3_prefix)
    with _running(s3_server, s3_prefix, golden_dir, tmp_path,
                  "--node-wait-s", str(NODE_WAIT_S)) as cluster:
        _stop(cluster.nodes["worker"])  # and no replacement
        lost = time.monotonic()
        cluster.driver.wait(timeout=NODE_WAIT_S + 300)
        took = time.monotonic() - lost
        log = (tmp_path / "driver.log").read_text(errors="replace")
        print(f"node wait: the run ended with {cluster.driver.returncode} {took:.1f} s after "
              f"the worker node was killed (--node-wait-s {NODE_WAIT_S})")
        # Ray marks the node dead after its health checks fail (~15 s here), the wait runs
        # from then, the stop's commit is bounded by STOP_GRACE_S: generous on a busy machine
        assert NODE_WAIT_S <= took <= NODE_WAIT_S + 120, log[-4000:]
        assert cluster.driver.returncode == NODE_WAIT_EXIT, log[-4000:]
        message = next(line for line in log.splitlines() if line.startswith("embedjob: stopped"))
        print("node wait: " + message[:400])
        assert ("no live node had the resources for one encode actor (missing encode_node=1) "
                f"for {NODE_WAIT_S} s (--node-wait-s)") in message
        assert "rerun the same command to resume" in message
        _check_stopped_cleanly(s3_server, s3_prefix, rows)
        cluster.join("replacement", tmp_path)
        rerun = cluster.rerun()
        assert rerun.returncode == 0, rerun.stderr[-4000:]
    _check_exactly_once(s3_server, s3_prefix, rows, embedder)


def _check_stopped_cleanly(s3_server, prefix: str, rows: list[dict]) -> None:
    """The lease is released, the output not complete, every committed id valid and once."""
    out = s3_server.uri(prefix, "out.lance")
    assert not s3_server.filesystem().exists(f"{s3_server.bucket}/{prefix}/out.lease.json")
    assert not _progress(out, s3_server.storage_options)["complete"]
    ids = lance.dataset(out, storage_options=s3_server.storage_options).to_table(
        columns=["id"]).column("id").to_pylist()
    assert ids and len(ids) == len(set(ids))
    assert set(ids) <= {r["id"] for r in rows if r["text"]}
