"""Graceful stop: SIGTERM / SIGINT to the driver (what ``ray job stop``, Kubernetes and Ctrl-C
send) commits what the writers finished, releases the lease, says how to resume and exits
128 + the signal; the rerun starts at once and reads only what was not committed.

Real local Ray, real SeaweedFS S3, real Lance; the driver is a subprocess (the CLI with the
fault-injecting encode actor), slowed down by the ENCODE_DELAY_S hook so the signal lands
mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from embedjob.driver.stop import STOP_GRACE_S
from tests.faults import hooks as faults
from tests.pipeline.test_resume import (
    FILES,
    ROWS_PER_FILE,
    _check_exactly_once,
    _command,
    _progress,
    _start_until_a_unit_is_committed,
    _write_corpus,
)

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"])
def test_signal_commits_releases_the_lease_and_the_rerun_resumes_at_once(
    signum, s3_server, s3_prefix, ray_session, golden_dir, embedder, tmp_path
):
    rows = _write_corpus(s3_server, s3_prefix)
    out = s3_server.uri(s3_prefix, "out.lance")
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    summary = tmp_path / "summary.json"
    # a long lease: a rerun that had to wait for it would time out below
    command = [*_command(s3_server, s3_prefix, golden_dir, summary), "--lease-ttl-s", "600"]
    with faults.injected(faults.ENCODE_DELAY_S, "0.3"):
        first, progress = _start_until_a_unit_is_committed(
            command, env, out, s3_server.storage_options,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert first.poll() is None, "the first run ended before the signal"
        first.send_signal(signum)
        signalled = time.monotonic()
        _, stderr = first.communicate(timeout=STOP_GRACE_S + 60)
    took = time.monotonic() - signalled
    print(f"{signal.Signals(signum).name}: stopped in {took:.1f} s")
    assert first.returncode == 128 + signum, stderr[-3000:]
    assert "rerun the same command to resume" in stderr, stderr[-3000:]
    fs = s3_server.filesystem()
    assert not fs.exists(f"{s3_server.bucket}/{s3_prefix}/out.lease.json")  # released
    stopped = _progress(out, s3_server.storage_options)
    assert not stopped["complete"]
    done = len(stopped["done"])
    assert done >= len(progress["done"])  # the stop's own commit lost nothing committed

    started = time.monotonic()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "is being written by another run" not in second.stderr
    result = json.loads(summary.read_text())
    print(f"rerun: {time.monotonic() - started:.1f} s, resumed {result['resumed_units_done']} "
          f"of {FILES} units, read {result['rows_read']} rows")
    assert result["resumed_units_done"] == done
    # nothing committed is read again: only the units the stopped run had not finished
    assert result["rows_read"] == (FILES - done) * ROWS_PER_FILE
    assert _progress(out, s3_server.storage_options)["complete"]
    _check_exactly_once(s3_server, s3_prefix, rows, embedder)
