"""``embedjob bench`` end to end with a tiny model: the JSON line and its invariants.

Not a timed test: it checks that the three runs see the same corpus and report sane
figures, not how fast they are.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedjob import bench
from embedjob.cli import main

RUN_KEYS = {"tokens", "wall_s", "tokens_per_s", "padding_efficiency", "peak_rss_bytes"}


@pytest.mark.slow
@pytest.mark.pipeline
def test_bench_prints_one_json_line_with_consistent_runs(ray_session, tmp_path, capsys):
    # no long-tail rows: a 32 x 8000 padded naive batch alone takes over a minute
    code = main(["bench", "--rows", "60", "--long-fraction", "0", "--model-config", "tiny",
                 "--threads", "1", "--window-rows", "64", "--workdir", str(tmp_path)])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"pipeline", "naive", "model_only", "speedup", "pipeline_efficiency",
            "device"} <= set(record)
    runs = [record[k] for k in ("pipeline", "naive", "model_only")]
    for run in runs:
        assert set(run) >= RUN_KEYS
        assert 0 < run["padding_efficiency"] <= 1
        assert run["wall_s"] > 0 and run["peak_rss_bytes"] > 0
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"] > 0
    # the pipeline and the model-only bound cut the same batches
    assert runs[0]["padding_efficiency"] == runs[2]["padding_efficiency"]
    assert runs[1]["padding_efficiency"] < runs[0]["padding_efficiency"]
    assert record["speedup"] > 0 and record["pipeline_efficiency"] > 0
    assert record["device"].startswith("cpu")
    # the tokenizer was timed on the corpus: far faster than a CPU encoder needs
    assert runs[2]["tokenizer_tokens_per_s"] > runs[2]["tokens_per_s"]


@pytest.mark.unit
def test_corpus_is_seeded_and_long_tailed():
    lengths = bench.target_lengths(1000, 0.01, seed=3)
    assert np.array_equal(lengths, bench.target_lengths(1000, 0.01, seed=3))
    assert int((lengths >= bench.LONG_TOKENS[0]).sum()) == 10
    body = lengths[lengths < bench.LONG_TOKENS[0]]
    assert 45 <= np.median(body) <= 75 and 150 <= np.quantile(body, 0.9) <= 260


@pytest.mark.unit
def test_random_checkpoint_loads_with_the_original_layout():
    from embedjob.model import load_embedder

    embedder = load_embedder(str(bench.model_dir("tiny")), merge_task="retrieval.passage")
    shape = bench.CONFIGS["tiny"]
    assert bench.nonembedding_params(embedder.model) == bench.shape_params(shape)
    assert embedder.model.get_input_embeddings().weight.shape == (bench.VOCAB, shape.hidden)
