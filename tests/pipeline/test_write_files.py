"""Fewer, bigger files: the writers stream rows into data files of ``rows_per_file`` rows
(whatever the write-stage batch size) and write the rejected rows once per commit."""

from __future__ import annotations

import os

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from tests.pipeline_helpers import real_rows, to_table, vectors_by_id

pytestmark = pytest.mark.pipeline


def test_small_rows_per_file_gives_that_many_data_files_each_row_once(
        ray_session, golden_dir, embedder, tmp_path):
    rows = real_rows(30)
    for bad in (3, 20):
        rows[bad] = {**rows[bad], "text": ""}
    (tmp_path / "in").mkdir()
    pq.write_table(to_table(rows[:15]), tmp_path / "in" / "a.parquet")
    pq.write_table(to_table(rows[15:]), tmp_path / "in" / "b.parquet")
    out = tmp_path / "o.lance"
    config = EmbedConfig(input=str(tmp_path / "in"), format="parquet", output=str(out),
                         model=str(golden_dir), window_rows=4, write_batch_rows=4,
                         rows_per_file=8, writers=1)
    summary = run(config)
    assert (summary.rows_embedded, summary.rows_rejected) == (28, 2)
    dataset = lance.dataset(str(out))
    # one writer, one flush (the last commit): 28 rows in files of 8 -> 8, 8, 8, 4 rows,
    # where one fragment per 4-row write call would have made 7
    assert sorted(f.count_rows() for f in dataset.get_fragments()) == [4, 8, 8, 8]
    assert len(os.listdir(out / "data")) == 4
    table = dataset.to_table()
    good = [r for i, r in enumerate(rows) if i not in (3, 20)]
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in good)
    got = vectors_by_id(table)
    for r in good:
        expected = embedder.encode([r["text"]], task="retrieval.passage")[0]
        assert np.abs(got[r["id"]] - expected).max() < 1e-5
    rejected = lance.dataset(config.rejected_uri)
    assert len(rejected.get_fragments()) == 1  # rejected rows: once per flush, per writer
    assert sorted(rejected.to_table().column("id").to_pylist()) == sorted(
        str(rows[i]["id"]) for i in (3, 20))
