"""``embedjob plan``: figures extrapolated from a sample match the corpus they describe."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.ops.plan import size_job
from tests.pipeline_helpers import SAMPLE

pytestmark = pytest.mark.unit


def test_plan_reports_rows_tokens_bytes_and_gpu_hours(golden_dir, tmp_path):
    from embedjob.model import load_spec

    texts = pq.read_table(SAMPLE).column("text").to_pylist()
    pq.write_table(pq.read_table(SAMPLE).slice(0, 400), tmp_path / "a.parquet")
    pq.write_table(pq.read_table(SAMPLE).slice(400), tmp_path / "b.parquet")
    config = EmbedConfig(input=str(tmp_path), format="parquet", output="unused",
                         model=str(golden_dir), dims=(64, 16), vector_dtype="float16")
    report = size_job(config, sample_rows=10_000, tokens_per_s=1000.0)
    lengths = np.array([len(x) for x in load_spec(str(golden_dir)).tokenizer()
                        .tokenize(texts, "retrieval.passage").ids])
    assert (report.files, report.estimated_rows, report.rows_exact) == (2, 759, True)
    assert report.sampled_rows == 759
    assert report.token_percentiles["50"] == int(np.percentile(lengths, 50))
    assert report.estimated_tokens == int(lengths.mean() * 759)
    assert report.bytes_per_column == {"vector (float16)": 759 * 64 * 2,
                                       "vector_16 (float16)": 759 * 16 * 2}
    assert report.gpu_hours == pytest.approx(report.estimated_tokens / 1000 / 3600)
    # the tokenizer was timed on the sample; 1 actor at 1000 tokens/s needs one task
    assert report.tokenizer_tokens_per_s > 1000
    assert report.tokenize_tasks == 1
    assert "to feed 1 encode actor(s): 1 tokenize task(s) (--tokenize-tasks 1)" in report.lines()
    assert "model licence: unknown" in report.lines()  # the golden dir has no model card
    nc = dataclasses.replace(report, model_license="cc-by-nc-4.0")
    assert "model licence: cc-by-nc-4.0 (non-commercial use only)" in nc.lines()


def test_tokenize_tasks_feed_the_actors_with_headroom():
    from embedjob.ops.plan import tokenize_tasks

    # 8 GPUs at 750k tokens/s, a tokenizer task at 400k tokens/s: 8 * 750 * 1.5 / 400 = 22.5
    assert tokenize_tasks(8, 750_000, 400_000) == 23
    assert tokenize_tasks(1, 3_000, 400_000) == 1
    assert tokenize_tasks(2, None, 400_000) is None
