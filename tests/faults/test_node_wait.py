"""A cluster that never had a node for the encode actors (here: a custom resource no node
offers) fails after ``--node-wait-s``, naming it, with the lease released (``driver/nodes.py``);
a refresh stops the same way, with nothing committed, and its rerun completes.

Real local Ray (the session's), real SeaweedFS S3; the driver is a subprocess (the CLI).
"""

from __future__ import annotations

import os
import subprocess
import time

import lance
import pyarrow.parquet as pq
import pytest

from embedjob.driver.nodes import NODE_WAIT_EXIT
from tests.pipeline.test_resume import _command, _write_corpus
from tests.pipeline_helpers import real_rows, to_table

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


@pytest.mark.slow
def test_a_refresh_without_a_node_for_the_encode_actors_stops_after_the_wait_then_resumes(
    s3_server, s3_prefix, ray_session, golden_dir, tmp_path
):
    rows = _write_corpus(s3_server, s3_prefix)
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    embed = _command(s3_server, s3_prefix, golden_dir, tmp_path / "summary.json")
    first = subprocess.run(embed, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    new = real_rows(3, offset=len(rows))  # a new file: the refresh has rows to embed
    fs = s3_server.filesystem()
    with fs.open(f"{s3_server.bucket}/{s3_prefix}/in/part-new.parquet", "wb") as handle:
        pq.write_table(to_table(new), handle)
    out = s3_server.uri(s3_prefix, "out.lance")
    refresh = [*embed[:3], "refresh", *embed[4:]]
    started = time.monotonic()
    stopped = subprocess.run([*refresh, "--actor-resources", "no_such_node=1",
                              "--node-wait-s", "3"], env=env, capture_output=True, text=True,
                             timeout=300)
    print(f"refresh node wait: exit {stopped.returncode} after {time.monotonic() - started:.1f} s")
    assert stopped.returncode == NODE_WAIT_EXIT, stopped.stderr[-3000:]
    assert ("no live node had the resources for one encode actor (missing no_such_node=1) "
            "for 3 s (--node-wait-s)") in stopped.stderr
    assert "nothing committed" in stopped.stderr
    assert "rerun the same command to resume" in stopped.stderr
    assert not fs.exists(f"{s3_server.bucket}/{s3_prefix}/out.lease.json")  # released
    # (the refresh's id indexes may be committed before the diff; no row was)
    assert sorted(_ids(out, s3_server)) == sorted(r["id"] for r in rows if r["text"])
    rerun = subprocess.run(refresh, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(_ids(out, s3_server)) == sorted(r["id"] for r in rows + new if r["text"])


def _ids(uri: str, s3_server) -> list[int]:
    return lance.dataset(uri, storage_options=s3_server.storage_options).to_table(
        columns=["id"]).column("id").to_pylist()
