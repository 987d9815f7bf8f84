"""Nightly refresh: only new and changed rows are embedded, gone ids are deleted, a changed
stamp re-embeds everything. Real Ray, real Lance, the golden tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json

import lance
import numpy as np
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.ops.refresh import refresh
from embedjob.table.info import last_run_json
from tests.pipeline_helpers import content_hash, real_rows, vectors_by_id, write_halves

pytestmark = pytest.mark.pipeline
TASK = "retrieval.passage"



def _table(uri):
    return lance.dataset(uri).to_table()


def test_refresh_embeds_only_new_and_changed_rows_and_deletes_gone_ids(
    ray_session, golden_dir, embedder, tmp_path
):
    corpus = tmp_path / "corpus"
    v1 = real_rows(30)
    write_halves(corpus, v1)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), dims=(64, 16),
                         summary_json=str(tmp_path / "summary.json"))
    run(config)
    before = vectors_by_id(_table(config.output))

    v2 = [dict(r) for r in v1 if r["id"] not in (3, 4)]             # 2 ids gone
    for r in v2:
        if r["id"] in (5, 6, 7):
            r["text"] = r["text"] + " (amended)"                      # 3 changed
        if r["id"] == 8:
            r["text"] = "   "                                         # now invalid: rejected
    v2 += [{"id": 100 + i, "text": t["text"], "lang": t["lang"]}      # 4 new
           for i, t in enumerate(real_rows(4, offset=300))]
    write_halves(corpus, v2)
    summary = refresh(config)

    assert (summary.rows_unchanged, summary.rows_changed, summary.rows_new,
            summary.rows_deleted, summary.rows_rejected) == (24, 3, 4, 3, 1)
    table = _table(config.output)
    valid = {r["id"]: r["text"] for r in v2 if r["text"].strip()}
    assert sorted(table.column("id").to_pylist()) == sorted(valid)
    got = vectors_by_id(table)
    for i in (5, 6, 7, 100, 103):
        assert np.abs(got[i] - embedder.encode([valid[i]], task=TASK)[0]).max() < 1e-5
    for i in (0, 1, 2, 9, 29):                                        # untouched rows
        assert np.array_equal(got[i], before[i])
    hashes = dict(zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist(),
                      strict=True))
    assert all(hashes[i] == content_hash(t) for i, t in valid.items())
    sub = vectors_by_id(table, "vector_16")
    assert np.abs(sub[5] - got[5][:16] / np.linalg.norm(got[5][:16])).max() < 1e-6
    dataset = lance.dataset(config.output)
    assert json.loads(last_run_json(dataset))["rows_deleted"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["rows_changed"] == 3
    assert summary.table_version == dataset.version

    again = refresh(config)                                           # nothing changed
    assert (again.rows_embedded, again.rows_unchanged, again.rows_deleted) == (0, 31, 0)


def test_refresh_keep_deleted_and_stamp_change_reembeds_everything(
    ray_session, golden_dir, tmp_path
):
    corpus = tmp_path / "corpus"
    rows = real_rows(12, offset=100)
    write_halves(corpus, rows)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir))
    run(config)
    write_halves(corpus, rows[:10])
    kept = refresh(dataclasses.replace(config, keep_deleted=True))
    assert (kept.rows_deleted, kept.rows_unchanged) == (0, 10)
    assert lance.dataset(config.output).count_rows() == 12

    migrated = refresh(EmbedConfig(**{**config.__dict__, "dims": (64, 32)}))
    assert (migrated.rows_embedded, migrated.rows_new) == (10, 10)
    dataset = lance.dataset(config.output)
    assert dataset.count_rows() == 10 and "vector_32" in dataset.schema.names
    assert json.loads(dataset.schema.metadata[b"embedjob.dims"]) == [64, 32]
