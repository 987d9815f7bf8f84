"""Compaction and version retention keep every row and vector as they were."""

import lance
import numpy as np
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.ops.compact import compact
from embedjob.storage import Storage
from embedjob.table.info import last_run_json
from tests.pipeline_helpers import vectors_by_id, write_parts

pytestmark = pytest.mark.pipeline


def test_compact_merges_small_fragments_and_drops_old_versions(
    ray_session, golden_dir, tmp_path
):
    corpus = tmp_path / "corpus"
    write_parts(corpus, files=4, rows_per_file=10)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), window_rows=5, write_batch_rows=5,
                         rows_per_file=10, commit_interval_s=0.01)  # >= 4 small fragments
    run(config)
    before = lance.dataset(config.output)
    vectors = vectors_by_id(before.to_table())
    assert len(before.get_fragments()) >= 4 and len(before.versions()) >= 3

    summary = last_run_json(before)
    report = compact(config.output, Storage(), retain_days=0)
    after = lance.dataset(config.output)
    assert report.fragments_before == len(before.get_fragments())
    assert report.fragments_after == len(after.get_fragments()) == 1
    assert report.versions_removed >= 2 and len(after.versions()) == 1
    compacted = vectors_by_id(after.to_table())
    assert sorted(compacted) == sorted(vectors) == list(range(40))
    assert all(np.array_equal(compacted[i], vectors[i]) for i in vectors)
    assert last_run_json(after) == summary is not None  # the run summary survives compaction
