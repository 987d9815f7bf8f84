"""Crash safety: a SIGKILLed driver resumes exactly once; a killed encode actor loses nothing.

Real local Ray, real SeaweedFS S3, real Lance, the golden tiny checkpoint. The encode stage
is slowed down (the ENCODE_DELAY_S fault hook, set cluster-wide) so that the kills land
mid-run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from tests.faults import hooks as faults
from tests.faults.hooks import FaultyEncodeActor
from tests.pipeline_helpers import (
    interrupt,
    real_rows,
    recorded_units,
    to_table,
    vectors_by_id,
    write_parts,
)

pytestmark = pytest.mark.pipeline
FILES, ROWS_PER_FILE = 12, 8


def _write_corpus(s3_server, prefix: str) -> list[dict]:
    """FILES parquet files; the last row of each file has an empty text (rejected)."""
    fs = s3_server.filesystem()
    rows = []
    for f in range(FILES):
        part = real_rows(ROWS_PER_FILE, offset=f * ROWS_PER_FILE)
        part[-1] = {**part[-1], "text": ""}
        rows += part
        with fs.open(f"{s3_server.bucket}/{prefix}/in/part-{f:02d}.parquet", "wb") as handle:
            pq.write_table(to_table(part), handle)
    return rows


def _progress(uri: str, options: dict) -> dict | None:
    """The output's progress record, read back from its transaction history."""
    from embedjob.driver.progress import record_from_history

    try:
        record = record_from_history(lance.dataset(uri, storage_options=options))
    except (OSError, ValueError):
        return None
    return None if record is None else {"done": record.done, "complete": record.complete}


def _start_until_a_unit_is_committed(command: list[str], env: dict, out: str, options: dict,
                                     **popen: object) -> tuple[subprocess.Popen, dict]:
    """Start the driver ``command``; once a commit of ``out`` recorded a finished unit
    (within 120 s), the process and that progress record."""
    first = subprocess.Popen(command, env=env, **popen)
    deadline = time.monotonic() + 120
    progress = None
    while time.monotonic() < deadline and first.poll() is None:
        progress = _progress(out, options)
        if progress and progress["done"]:
            break
        time.sleep(0.1)
    assert progress and progress["done"], "no commit recorded a finished unit in time"
    return first, progress


def _command(s3_server, prefix: str, golden_dir, summary: Path) -> list[str]:
    # the embedjob CLI with the fault-injecting encode actor (its delay hook)
    return [sys.executable, "-m", "tests.faults.driver", "embed",
            "--input", s3_server.uri(prefix, "in/"), "--format", "parquet",
            "--output", s3_server.uri(prefix, "out.lance"), "--model", str(golden_dir),
            "--window-rows", "4", "--write-batch-rows", "4", "--commit-interval-s", "0.2",
            "--lease-ttl-s", "15",  # outlasts the refused rerun's start on a busy machine
            "--summary-json", str(summary)]


def _check_exactly_once(s3_server, prefix: str, rows: list[dict], embedder) -> None:
    options = s3_server.storage_options
    table = lance.dataset(s3_server.uri(prefix, "out.lance"), storage_options=options).to_table()
    ids = table.column("id").to_pylist()
    valid = [r for r in rows if r["text"]]
    assert sorted(ids) == sorted(r["id"] for r in valid)  # every valid id exactly once
    rejected = lance.dataset(s3_server.uri(prefix, "out.rejected.lance"),
                             storage_options=options).to_table()
    assert sorted(map(int, rejected.column("id").to_pylist())) == sorted(
        r["id"] for r in rows if not r["text"])
    got = vectors_by_id(table)
    for r in valid[::7]:
        expected = embedder.encode([r["text"]], task="retrieval.passage")[0]
        assert np.abs(got[r["id"]] - expected).max() < 1e-5



@pytest.mark.slow
def test_sigkill_driver_after_a_commit_then_rerun_resumes_exactly_once(
    s3_server, s3_prefix, ray_session, golden_dir, embedder, tmp_path
):
    rows = _write_corpus(s3_server, s3_prefix)
    out = s3_server.uri(s3_prefix, "out.lance")
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    summary = tmp_path / "summary.json"
    command = _command(s3_server, s3_prefix, golden_dir, summary)
    with faults.injected(faults.ENCODE_DELAY_S, "0.3"):
        first, _ = _start_until_a_unit_is_committed(
            command, env, out, s3_server.storage_options,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.Random().uniform(0, 0.6))  # a random point after that commit
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = _progress(out, s3_server.storage_options)
    assert not killed_at["complete"]
    done_before = len(killed_at["done"])

    # the dead run's lease still stands: a rerun now is refused, naming when it expires
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "is being written by another run" in refused.stderr
    lease = json.loads(s3_server.filesystem().cat(f"{s3_server.bucket}/{s3_prefix}/out.lease.json"))
    time.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.5)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["resumed_units_done"] == done_before >= 1
    # committed work was not redone: only the unfinished files were read again
    assert result["rows_read"] == (FILES - done_before) * ROWS_PER_FILE
    assert _progress(out, s3_server.storage_options)["complete"]
    _check_exactly_once(s3_server, s3_prefix, rows, embedder)


LATE = ["--chunking", "late", "--chunk-tokens", "16", "--chunk-window-tokens", "64"]


@pytest.mark.slow
def test_sigkill_a_late_chunking_run_after_a_commit_then_rerun_writes_every_chunk_once(
    s3_server, s3_prefix, ray_session, golden_dir, tmp_path
):
    """A chunk table: every document's chunks exactly once after the rerun, as an
    uninterrupted run writes them (ids, chunk spans, vectors within 1e-5)."""
    rows = _write_corpus(s3_server, s3_prefix)
    out = s3_server.uri(s3_prefix, "out.lance")
    options = s3_server.storage_options
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    summary = tmp_path / "summary.json"
    command = _command(s3_server, s3_prefix, golden_dir, summary) + LATE
    with faults.injected(faults.ENCODE_DELAY_S, "0.3"):
        first, _ = _start_until_a_unit_is_committed(
            command, env, out, options, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.Random().uniform(0, 0.6))  # a random point after that commit
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = _progress(out, options)
    assert not killed_at["complete"] and killed_at["done"]
    lease = json.loads(s3_server.filesystem().cat(f"{s3_server.bucket}/{s3_prefix}/out.lease.json"))
    time.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.5)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(summary.read_text())["resumed_units_done"] == len(killed_at["done"])
    whole = str(tmp_path / "whole.lance")  # the same job, uninterrupted
    run(EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet", output=whole,
                    model=str(golden_dir), chunking="late", chunk_tokens=16,
                    chunk_window_tokens=64, storage_options=options))

    def chunks(table):
        keys = list(zip(table.column("doc_id").to_pylist(), table.column("chunk").to_pylist(),
                        table.column("char_start").to_pylist(),
                        table.column("char_end").to_pylist(), strict=True))
        assert len(set(keys)) == len(keys)  # (doc_id, chunk) unique
        return dict(zip(keys, np.asarray(table.column("vector").to_pylist()), strict=True))

    got = chunks(lance.dataset(out, storage_options=options).to_table())
    want = chunks(lance.dataset(whole).to_table())
    assert sorted(got) == sorted(want)
    assert {k[0] for k in got} == {r["id"] for r in rows if r["text"]}
    assert len(got) > 2 * len({k[0] for k in got})  # documents of several chunks
    assert max(np.abs(got[k] - want[k]).max() for k in got) < 1e-5
    rejected = lance.dataset(s3_server.uri(s3_prefix, "out.rejected.lance"),
                             storage_options=options).to_table()
    assert sorted(map(int, rejected.column("id").to_pylist())) == sorted(
        r["id"] for r in rows if not r["text"])


def test_killed_encode_actor_is_restarted_and_nothing_is_lost(
    s3_server, s3_prefix, ray_session, golden_dir, embedder
):
    rows = _write_corpus(s3_server, s3_prefix)
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet",
                         output=s3_server.uri(s3_prefix, "out.lance"), model=str(golden_dir),
                         window_rows=4, write_batch_rows=4,
                         storage_options=s3_server.storage_options)
    killed = threading.Event()
    threading.Thread(target=_kill_an_encode_actor, args=(killed,), daemon=True).start()
    with faults.injected(faults.ENCODE_DELAY_S, "0.3"):
        summary = run(config, encoder=FaultyEncodeActor)
    assert killed.is_set(), "no encode actor was found alive to kill"
    assert summary.rows_embedded == len([r for r in rows if r["text"]])
    _check_exactly_once(s3_server, s3_prefix, rows, embedder)


def _kill_an_encode_actor(killed: threading.Event) -> None:
    """SIGKILL the first live encode actor of this session's cluster (GCS actor table)."""
    from ray._private.state import state

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        actors = state.actor_table(None).values()
        pids = [a["Pid"] for a in actors if a["State"] == "ALIVE" and a.get("Pid")
                and "EncodeActor" in a["ActorClassName"]]
        if pids:
            time.sleep(1.0)  # let it take a few calls first
            os.kill(pids[0], signal.SIGKILL)
            killed.set()
            return
        time.sleep(0.2)


def test_rerun_of_an_interrupted_run_whose_input_changed_is_refused(
    ray_session, golden_dir, tmp_path
):
    from embedjob.errors import InputError

    corpus = tmp_path / "corpus"
    write_parts(corpus, files=2, rows_per_file=5)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir))
    run(config)
    # as if the run had died after its last data commit, before marking itself complete
    interrupt(config.output, keep=lambda unit: True)
    pq.write_table(to_table(real_rows(6, offset=100)), corpus / "p0.parquet")
    with pytest.raises(InputError, match=r"input changed since the interrupted run .*p0.parquet"):
        run(config)


@pytest.mark.slow
def test_resume_redoes_only_the_unfinished_byte_ranges_of_a_file(
    ray_session, golden_dir, embedder, tmp_path
):
    from embedjob.stages.read import split_unit

    rows = real_rows(96)
    rows[5] = {**rows[5], "text": ""}  # rejected, in the first row group
    rows[90] = {**rows[90], "text": " "}  # rejected, in the last one
    path = tmp_path / "big.parquet"
    pq.write_table(to_table(rows), path, row_group_size=8)  # 12 row groups
    config = EmbedConfig(input=str(path), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), read_unit_bytes=path.stat().st_size // 6,
                         window_rows=8, write_batch_rows=16)
    first = run(config)
    _, done, ranges = recorded_units(config.output)
    units = sorted(done, key=lambda u: split_unit(u)[1])
    assert len(units) >= 6 and all("#bytes=" in u for u in units)
    assert first.rows_read == 96
    # as if the run had died with only the first half of its units done
    kept = units[: len(units) // 2]
    interrupt(config.output, keep=lambda unit: unit in kept)
    second = run(config)
    redone = 96 - sum(hi - lo for lo, hi in (ranges[u] for u in kept))
    assert second.rows_read == redone < 96
    table = lance.dataset(config.output).to_table()
    valid = [r for r in rows if r["text"].strip()]
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in valid]
    assert sorted(table.column("source_row").to_pylist()) == [r["id"] for r in valid]
    rejected = lance.dataset(str(tmp_path / "o.rejected.lance")).to_table()
    assert sorted(rejected.column("row").to_pylist()) == [5, 90]
    got = vectors_by_id(table)
    for r in valid[::11]:
        expected = embedder.encode([r["text"]], task="retrieval.passage")[0]
        assert np.abs(got[r["id"]] - expected).max() < 1e-5


@pytest.mark.slow
def test_a_run_whose_lease_renewals_fail_stops_before_its_next_commit(
    ray_session, golden_dir, embedder, tmp_path, monkeypatch
):
    from embedjob.driver.commit import TableCommitter
    from embedjob.driver.lease import Lease, LeaseLostError

    rows = write_parts(tmp_path / "corpus", files=6, rows_per_file=8)
    config = EmbedConfig(input=str(tmp_path / "corpus"), format="parquet",
                         output=str(tmp_path / "o.lance"), model=str(golden_dir),
                         window_rows=4, write_batch_rows=4, commit_interval_s=0.01,
                         lease_ttl_s=1.5)
    failing_since: list[float] = []
    commits: list[float] = []
    enter, commit = Lease.__enter__, TableCommitter.commit

    def enter_then_lose_the_store(self):
        held = enter(self)

        def unreachable():
            failing_since.append(time.monotonic())
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject")

        self._write = unreachable  # every renewal from now on fails
        return held

    def timed_commit(self, **kwargs):
        if self.uri == config.output and (self.pending or kwargs.get("properties")):
            commits.append(time.monotonic())  # when the output commit starts
        commit(self, **kwargs)

    monkeypatch.setattr(Lease, "__enter__", enter_then_lose_the_store)
    monkeypatch.setattr(TableCommitter, "commit", timed_commit)
    with faults.injected(faults.ENCODE_DELAY_S, "0.3"), pytest.raises(
            LeaseLostError, match="could not be renewed"):
        run(config, encoder=FaultyEncodeActor)
    monkeypatch.undo()
    assert failing_since, "no renewal was attempted"
    # no commit after the lease could have expired (acquired <= first failure - ttl / 3)
    acquired = failing_since[0] - config.lease_ttl_s / 3
    # (the slack: the fence is checked just before the rejected table's commit)
    assert all(t < acquired + config.lease_ttl_s + 1.0 for t in commits)
    summary = run(config)  # the rerun resumes from the last fenced commit
    table = lance.dataset(config.output).to_table()
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    assert summary.rows_read < len(rows) or not commits


def test_sigkill_half_way_through_one_big_file_redoes_only_its_unfinished_units(
    s3_server, s3_prefix, ray_session, golden_dir, embedder, tmp_path
):
    rows = real_rows(96)
    rows[40] = {**rows[40], "text": ""}  # one rejected row mid-file
    fs = s3_server.filesystem()
    with fs.open(f"{s3_server.bucket}/{s3_prefix}/in/big.parquet", "wb") as handle:
        pq.write_table(to_table(rows), handle, row_group_size=8)  # 12 row groups
    size = fs.size(f"{s3_server.bucket}/{s3_prefix}/in/big.parquet")
    out = s3_server.uri(s3_prefix, "out.lance")
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    summary = tmp_path / "summary.json"
    command = _command(s3_server, s3_prefix, golden_dir, summary) + [
        "--read-unit-bytes", str(size // 12 + 1)]
    with faults.injected(faults.ENCODE_DELAY_S, "0.3"):
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline, progress = time.monotonic() + 180, None
        while time.monotonic() < deadline and first.poll() is None:
            progress = _progress(out, s3_server.storage_options)
            if progress and len(progress["done"]) >= 5:  # about half of the units
                break
            time.sleep(0.1)
        assert progress and progress["done"], "no commit recorded a finished unit in time"
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait()
    _, done, ranges = recorded_units(out, s3_server.storage_options)
    assert 0 < len(done) < 12 and all("#bytes=" in u for u in done)
    lease = json.loads(fs.cat(f"{s3_server.bucket}/{s3_prefix}/out.lease.json"))
    time.sleep(max(0.0, lease["expires_at"] - time.time()) + 0.5)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(summary.read_text())
    # re-read: exactly the rows of the units not recorded done at the kill (those in flight
    # and those finished after the last commit), never a finished unit's
    assert result["rows_read"] == 96 - sum(hi - lo for lo, hi in ranges.values()) < 96
    table = lance.dataset(out, storage_options=s3_server.storage_options).to_table()
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows if r["text"]]
    rejected = lance.dataset(s3_server.uri(s3_prefix, "out.rejected.lance"),
                             storage_options=s3_server.storage_options).to_table()
    assert rejected.column("row").to_pylist() == [40]


def test_on_s3_two_racing_runs_cannot_both_acquire_and_a_rewritten_lease_fences(
    s3_server, s3_prefix
):
    """Conditional writes on the test server: If-None-Match refuses the run that wrote
    second; a renewal's If-Match fails once another run rewrote the lease."""
    from embedjob.driver.lease import Lease, LeaseLostError, OutputLockedError
    from embedjob.storage import Storage

    storage = Storage(s3_server.storage_options)
    output = s3_server.uri(s3_prefix, "out.lance")
    first = Lease(output=output, ttl_s=0.9, storage=storage)
    late = Lease(output=output, ttl_s=30, storage=storage)
    late._read = lambda: None  # it read "no lease" just before the first run wrote one
    with first:
        with pytest.raises(OutputLockedError, match=first.owner):
            late.__enter__()
        key = f"{s3_server.bucket}/{s3_prefix}/out.lease.json"
        fs = s3_server.filesystem()
        held = json.loads(fs.cat(key))
        fs.pipe(key, json.dumps(held | {"owner": "intruder"}).encode())
        time.sleep(0.6)  # a renewal (every 0.3 s) meets the intruder's ETag
        with pytest.raises(LeaseLostError, match="rewritten by another run"):
            first.check()
        fs.pipe(key, json.dumps(held).encode())
