"""A cluster that never had a node for the encode actors (here: a custom resource no node
offers) fails after ``--node-wait-s``, naming it, with the lease released (``driver/nodes.py``).

Real local Ray (the session's), real SeaweedFS S3; the driver is a subprocess (the CLI).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from embedjob.driver.nodes import NODE_WAIT_EXIT
from tests.pipeline.test_resume import _command, _write_corpus

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]


def test_a_cluster_without_a_node_for_the_encode_actors_fails_after_the_wait_naming_it(
    s3_server, s3_prefix, ray_session, golden_dir, tmp_path
):
    _write_corpus(s3_server, s3_prefix)
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    command = [*_command(s3_server, s3_prefix, golden_dir, tmp_path / "summary.json"),
               "--actor-resources", "no_such_node=1", "--node-wait-s", "3"]
    started = time.monotonic()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    print(f"node wait at start: exit {run.returncode} after {took:.1f} s")
    assert run.returncode == NODE_WAIT_EXIT, run.stderr[-3000:]
    assert ("no live node had the resources for one encode actor (missing no_such_node=1) "
            "for 3 s (--node-wait-s)") in run.stderr
    assert "rerun the same command to resume" in run.stderr
    assert took >= 3  # the wait was waited, not skipped
    fs = s3_server.filesystem()
    assert not fs.exists(f"{s3_server.bucket}/{s3_prefix}/out.lease.json")  # released
