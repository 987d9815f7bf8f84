"""Nightly refresh: unchanged files are not read, only new and changed rows are embedded,
gone ids are deleted, everything lands in one version; a changed stamp re-embeds everything.
Every state is checked row by row against the new corpus (ids, content hashes, lineage) and
vectors from an independent computation (the reference embedder, and once a fresh embed).
Real Ray, real Lance, the golden tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.ops.refresh import refresh
from embedjob.table.info import last_run_json
from tests.pipeline_helpers import (
    content_hash,
    real_rows,
    recorded_units,
    to_table,
    vectors_by_id,
)

pytestmark = pytest.mark.pipeline
TASK = "retrieval.passage"
FILES, ROWS_PER_FILE = 8, 6


def write_files(corpus: Path, files: dict[str, list[dict]]) -> None:
    """Write (or rewrite) the named Parquet files; files not named are left as they are."""
    corpus.mkdir(exist_ok=True)
    for name, rows in files.items():
        pq.write_table(to_table(rows), corpus / name)


def corpus_rows(corpus: Path) -> list[tuple[str, int, dict]]:
    """Every (file uri as the listing names it, row index, row) of the corpus, listing order."""
    out = []
    for path in sorted(corpus.glob("*.parquet")):
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            out.append((str(path), i, row))
    return out


def expected_rows(corpus: Path) -> dict:
    """id -> (text, source_file, source_row) of a fresh embed: the first row of an id wins."""
    expected: dict = {}
    for source, i, row in corpus_rows(corpus):
        expected.setdefault(row["id"], (row["text"], source, i))
    return {k: v for k, v in expected.items() if v[0].strip()}


def check_table(uri: str, corpus: Path, embedder) -> dict:
    """The table holds exactly the fresh embed's rows: ids, hashes, lineage, vectors."""
    table = lance.dataset(uri).to_table()
    expected = expected_rows(corpus)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected)
    lineage = list(zip(ids, table.column("content_hash").to_pylist(),
                       table.column("source_file").to_pylist(),
                       table.column("source_row").to_pylist(), strict=True))
    for key, digest, source, row in lineage:
        text, want_source, want_row = expected[key]
        assert (digest, Path(source).name, row) == (content_hash(text),
                                                    Path(want_source).name, want_row)
    got = vectors_by_id(table)
    keys = sorted(expected)
    want = embedder.encode([expected[k][0] for k in keys], task=TASK)
    assert np.abs(np.stack([got[k] for k in keys]) - want).max() < 1e-5
    return got


def data_versions_since(uri: str, version: int) -> list[dict]:
    """Transaction properties of each version after ``version``, index builds left out."""
    dataset = lance.dataset(uri)
    out = []
    for v in range(version + 1, dataset.version + 1):
        transaction = dataset.read_transaction(v)
        if type(transaction.operation).__name__ != "CreateIndex":
            out.append(transaction.transaction_properties or {})
    return out


def _refresh_once(config: EmbedConfig) -> tuple:
    before = lance.dataset(config.output).version
    summary = refresh(config)
    versions = data_versions_since(config.output, before)
    assert len(versions) == 1 and S.TX_COMPLETE in versions[0]   # one version, whole
    return summary, versions[0]


def test_refresh_scenarios_row_by_row_against_a_fresh_embed(
    ray_session, golden_dir, embedder, tmp_path
):
    corpus = tmp_path / "corpus"
    rows = real_rows(FILES * ROWS_PER_FILE)
    files = {f"p{f}.parquet": rows[f * ROWS_PER_FILE:(f + 1) * ROWS_PER_FILE]
             for f in range(FILES)}
    write_files(corpus, files)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), dims=(64, 16), window_rows=16,
                         lease_ttl_s=30)
    run(config)
    first = check_table(config.output, corpus, embedder)

    # nothing changed: no input unit is read, nothing reaches the encoder
    same, _ = _refresh_once(config)
    assert (same.rows_read, same.rows_embedded, same.rows_deleted) == (0, 0, 0)
    assert same.rows_unchanged == FILES * ROWS_PER_FILE

    # one file of eight changed: one text amended, one id deleted, one row moved within it
    p2 = [dict(r) for r in files["p2.parquet"]]
    p2[1]["text"] += " (amended)"
    moved = p2.pop(4)
    del p2[0]
    p2.insert(1, moved)          # id 16 now at row 1, same text: moved, not re-embedded
    write_files(corpus, {"p2.parquet": p2})
    changed, props = _refresh_once(config)
    assert (changed.rows_read, changed.rows_embedded, changed.rows_changed,
            changed.rows_new, changed.rows_deleted) == (5, 1, 1, 0, 1)
    # the commit records only the file it read again (no tombstones); the fold has them all
    assert [Path(f).name for f in json.loads(props[S.TX_UNITS])] == ["p2.parquet"]
    assert json.loads(props[S.TX_GONE]) == []
    assert len(recorded_units(config.output)[1]) == FILES
    got = check_table(config.output, corpus, embedder)
    assert np.array_equal(got[moved["id"]], first[moved["id"]])    # copied, bit for bit
    assert np.array_equal(got[0], first[0])                        # unread file: untouched

    # new rows in a new file, one of them with an id an unchanged file holds (it loses)
    fresh = [{"id": 1000 + i, **{k: r[k] for k in ("text", "lang")}}
             for i, r in enumerate(real_rows(3, offset=400))]
    fresh.append({"id": 7, "text": "a later row cannot take id 7", "lang": "en"})
    write_files(corpus, {"p9.parquet": fresh})
    added, _ = _refresh_once(config)
    assert (added.rows_read, added.rows_embedded, added.rows_new, added.rows_duplicate,
            added.rows_deleted) == (4, 3, 3, 1, 0)
    check_table(config.output, corpus, embedder)

    # a file vanished: its rows are deleted through their lineage; it is not read
    (corpus / "p5.parquet").unlink()
    dropped, _ = _refresh_once(config)
    assert (dropped.rows_read, dropped.rows_embedded, dropped.rows_deleted) == (0, 0, 6)
    after = check_table(config.output, corpus, embedder)
    dataset = lance.dataset(config.output)
    assert json.loads(last_run_json(dataset))["rows_deleted"] == 6
    rejected = lance.dataset(config.rejected_uri).to_table().to_pylist()
    assert [(r["id"], Path(r["source"]).name, r["row"]) for r in rejected] == [
        ("7", "p9.parquet", 3)]

    # a fresh embed of the final corpus holds the same rows (and the same vectors)
    again = dataclasses.replace(config, output=str(tmp_path / "fresh.lance"),
                                rejected_output=None)
    run(again)
    fresh_vectors = check_table(again.output, corpus, embedder)
    assert all(np.abs(after[k] - fresh_vectors[k]).max() < 1e-5 for k in after)


@pytest.mark.slow
def test_refresh_keep_deleted_and_stamp_change_reembeds_everything(
    ray_session, golden_dir, tmp_path
):
    corpus = tmp_path / "corpus"
    rows = real_rows(12, offset=100)
    write_files(corpus, {"a.parquet": rows[:6], "b.parquet": rows[6:]})
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir))
    run(config)
    write_files(corpus, {"b.parquet": rows[6:10]})
    kept = refresh(dataclasses.replace(config, keep_deleted=True))
    assert (kept.rows_deleted, kept.rows_read, kept.rows_embedded) == (0, 4, 0)
    assert lance.dataset(config.output).count_rows() == 12

    migrated = refresh(EmbedConfig(**{**config.__dict__, "dims": (64, 32)}))
    assert (migrated.rows_embedded, migrated.rows_new) == (10, 10)
    dataset = lance.dataset(config.output)
    assert dataset.count_rows() == 10 and "vector_32" in dataset.schema.names
    assert json.loads(dataset.schema.metadata[b"embedjob.dims"]) == [64, 32]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["diff", "commit"])
def test_refresh_sigkilled_then_rerun_ends_in_the_same_table(
    point, ray_session, golden_dir, embedder, tmp_path
):
    corpus = tmp_path / "corpus"
    rows = real_rows(24, offset=200)
    write_files(corpus, {f"p{f}.parquet": rows[f * 6:(f + 1) * 6] for f in range(4)})
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), lease_ttl_s=10)
    run(config)
    p1 = [dict(r) for r in rows[6:12]]
    p1[2]["text"] += " (amended)"
    (corpus / "p3.parquet").unlink()
    write_files(corpus, {"p1.parquet": p1, "p9.parquet": [
        {"id": 900, "text": "a new row", "lang": "en"},
        {"id": 201, "text": "a later row cannot take id 201", "lang": "en"}]})
    before = lance.dataset(config.output).version

    marker = tmp_path / "at-kill-point"
    command = [sys.executable, "-m", "tests.pipeline.refresh_driver", point, str(marker),
               "refresh", "--input", str(corpus), "--format", "parquet",
               "--output", config.output, "--model", str(golden_dir), "--lease-ttl-s", "10"]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the refresh never reached its kill point"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert data_versions_since(config.output, before) == []   # nothing of it is visible

    time.sleep(config.lease_ttl_s + 1)                         # the dead run's lease expires
    summary, _ = _refresh_once(config)
    assert (summary.rows_embedded, summary.rows_deleted, summary.rows_duplicate) == (2, 6, 1)
    check_table(config.output, corpus, embedder)
    rejected = lance.dataset(config.rejected_uri).to_table().to_pylist()
    assert [(r["id"], Path(r["source"]).name) for r in rejected] == [("201", "p9.parquet")]
