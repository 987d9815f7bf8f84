"""The embed job end to end on real components: local Ray, SeaweedFS S3, Lance, the golden
tiny jina-v3 checkpoint. Every stored vector must equal encoding its text alone."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.progress import read_record
from embedjob.driver.run import run
from embedjob.storage import Storage
from embedjob.table.info import last_run_json
from tests.pipeline_helpers import (
    content_hash,
    l2,
    real_rows,
    recorded_units,
    to_table,
    vectors_by_id,
)

pytestmark = pytest.mark.pipeline
TASK = "retrieval.passage"



@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    from embedjob.model import load_spec

    return load_spec(str(golden_dir)).tokenizer()


def _reference(embedder, rows):
    return {r["id"]: embedder.encode([r["text"]], task=TASK)[0] for r in rows}


def _upload(fs, uri: str, table: pa.Table) -> None:
    with fs.open(uri.removeprefix("s3://"), "wb") as handle:
        pq.write_table(table, handle)


def _bad_rows() -> tuple[pa.Table, dict]:
    """Rows that must be rejected, and the reason expected for each id."""
    table = pa.table({
        "id": pa.array([900, 901, 902, None, 5], pa.int64()),
        "text": pa.array([None, "", " \t\n ", "orphan text", "duplicate of id 5"], pa.string()),
        "lang": pa.array(["xx"] * 5, pa.string()),
    })
    reasons = {"900": "text is null", "901": "text is empty", "902": "text is whitespace only",
               None: "id is null", "5": "id already seen in this run"}
    return table, reasons


def test_s3_corpus_to_s3_lance_exactly_once_and_equal_to_encode_alone(
    s3_server, s3_prefix, ray_session, golden_dir, embedder, tokenizer, tmp_path
):
    fs = s3_server.filesystem()
    good_a, good_b = real_rows(40), real_rows(40, offset=40)
    bad, reasons = _bad_rows()
    _upload(fs, s3_server.uri(s3_prefix, "in", "part-0.parquet"), to_table(good_a))
    # the duplicate of id 5 comes in a later file, so the first-seen row wins
    _upload(fs, s3_server.uri(s3_prefix, "in", "part-1.parquet"),
            pa.concat_tables([to_table(good_b), bad]))
    _upload(fs, s3_server.uri(s3_prefix, "in", "part-2-empty.parquet"), to_table([]))
    out = s3_server.uri(s3_prefix, "out", "emb.lance")
    config = EmbedConfig(
        input=s3_server.uri(s3_prefix, "in"), format="parquet", output=out, model=str(golden_dir),
        dims=(64, 16, 8), keep_columns=("lang",), max_tokens_per_batch=600, window_rows=50,
        storage_options=s3_server.storage_options, summary_json=str(tmp_path / "summary.json"),
    )
    summary = run(config)

    options = s3_server.storage_options
    dataset = lance.dataset(out, storage_options=options)
    table = dataset.to_table()
    rows = good_a + good_b
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every valid id exactly once
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 64)
    assert set(table.schema.names) == {"id", "vector", "vector_16", "vector_8", "n_tokens",
                                       "truncated", "content_hash", "lang", "source_file",
                                       "source_row"}
    expected = _reference(embedder, rows)
    got = vectors_by_id(table)
    assert max(np.abs(got[i] - expected[i]).max() for i in expected) < 1e-5
    for dim in (16, 8):
        sub = vectors_by_id(table, f"vector_{dim}")
        assert max(np.abs(sub[i] - l2(got[i][:dim])).max() for i in got) < 1e-6
    by_id = {r["id"]: r for r in rows}
    tokenized = tokenizer.tokenize([by_id[i]["text"] for i in ids], TASK)
    assert table.column("n_tokens").to_pylist() == [len(x) for x in tokenized.ids]
    assert table.column("content_hash").to_pylist() == [content_hash(by_id[i]["text"])
                                                        for i in ids]
    assert table.column("lang").to_pylist() == [by_id[i]["lang"] for i in ids]
    assert not any(table.column("truncated").to_pylist())

    rejected = lance.dataset(config.rejected_uri, storage_options=options).to_table()
    assert dict(zip(rejected.column("id").to_pylist(), rejected.column("reason").to_pylist(),
                    strict=True)) == reasons
    assert set(rejected.column("source").to_pylist()) == {
        s3_server.uri(s3_prefix, "in", "part-1.parquet")}
    assert sorted(rejected.column("row").to_pylist()) == [40, 41, 42, 43, 44]

    stamp = dataset.schema.metadata
    from embedjob.model import load_spec

    assert stamp[b"embedjob.weights_hash"].decode() == load_spec(str(golden_dir)).fingerprint
    assert stamp[b"embedjob.task"] == TASK.encode()
    assert json.loads(stamp[b"embedjob.dims"]) == [64, 16, 8]
    assert stamp[b"embedjob.instruction"] == b"Represent the document for retrieval: "

    assert (summary.rows_read, summary.rows_embedded, summary.rows_rejected) == (85, 80, 5)
    assert summary.tokens == sum(table.column("n_tokens").to_pylist())
    assert 0 < summary.padding_efficiency <= 1
    assert summary.table_version == dataset.version
    # the summary and the progress record travel in the commits' transaction properties
    last_run = json.loads(last_run_json(dataset))
    assert last_run["rows_embedded"] == 80 and last_run["table_version"] == dataset.version
    assert read_record(out, Storage(s3_server.storage_options)).complete
    assert len(recorded_units(out, s3_server.storage_options)[1]) == 3
    assert "embedjob.progress" not in dataset.metadata  # nothing per unit in the manifest
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["rows_embedded"] == 80 and written["output"] == out
    assert written["padding_efficiency"] == pytest.approx(summary.padding_efficiency)


@pytest.mark.parametrize(
    ("max_tokens", "window", "actors", "packed", "prefetch", "tokenize_tasks"),
    [(64, 1, 1, False, 2, None), (5000, 8, 2, False, 1, 1), (700, 30, 1, True, 3, 2)],
    ids=["tiny-budget-window-of-one", "big-window-two-actors", "packed"],
)
def test_vectors_do_not_depend_on_batching(
    ray_session, golden_dir, embedder, tmp_path, max_tokens, window, actors, packed, prefetch,
    tokenize_tasks,
):
    rows = real_rows(30, offset=200)
    pq.write_table(to_table(rows), tmp_path / "in.parquet")
    config = EmbedConfig(
        input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out.lance"),
        model=str(golden_dir), max_tokens_per_batch=max_tokens, window_rows=window,
        num_actors=actors, packed=packed, actor_prefetch=prefetch,
        tokenize_tasks=tokenize_tasks,
    )
    summary = run(config)
    table = lance.dataset(config.output).to_table()
    expected = _reference(embedder, rows)
    got = vectors_by_id(table)
    assert sorted(got) == sorted(expected)
    assert max(np.abs(got[i] - expected[i]).max() for i in expected) < 1e-5
    if window == 1:  # one row per window: nothing is ever padded
        assert summary.padding_efficiency == 1.0
    assert summary.rows_embedded == 30


def test_text_over_budget_is_embedded_alone_and_truncation_reported(
    ray_session, golden_dir, embedder, tokenizer, tmp_path
):
    long_text = " ".join(r["text"] for r in real_rows(60)) * 3
    rows = [{"id": 1, "text": "Short text."}, {"id": 2, "text": long_text},
            {"id": 3, "text": real_rows(1)[0]["text"]}]
    pq.write_table(to_table(rows), tmp_path / "in.parquet")
    config = EmbedConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), max_tokens_per_batch=256, window_rows=16)
    run(config)
    table = lance.dataset(config.output).to_table().sort_by("id")
    assert table.column("truncated").to_pylist() == [False, True, False]
    assert table.column("n_tokens").to_pylist()[1] == 8194
    got = vectors_by_id(table)
    assert np.abs(got[2] - embedder.encode([long_text], task=TASK)[0]).max() < 1e-5


def test_empty_input_file_gives_an_empty_stamped_table(ray_session, golden_dir, tmp_path):
    pq.write_table(to_table([]), tmp_path / "empty.parquet")
    config = EmbedConfig(input=str(tmp_path / "empty.parquet"), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir))
    summary = run(config)
    dataset = lance.dataset(config.output)
    assert dataset.count_rows() == 0
    assert dataset.schema.metadata[b"embedjob.task"] == TASK.encode()
    assert (summary.rows_read, summary.rows_embedded) == (0, 0)


def test_jsonl_bad_lines_and_types_are_rejected_with_reasons(ray_session, golden_dir, tmp_path):
    lines = [
        json.dumps({"doc": "a", "body": "A fine text."}),
        "{broken json",
        json.dumps({"doc": "b", "body": 17}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"doc": "c", "body": "Another fine text.", "extra": 1}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    config = EmbedConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), id_column="doc", text_column="body",
                         task="text-matching")
    summary = run(config)
    table = lance.dataset(config.output).to_table()
    assert sorted(table.column("id").to_pylist()) == ["a", "c"]
    rejected = lance.dataset(config.rejected_uri).to_table().sort_by("row")
    assert rejected.column("row").to_pylist() == [1, 2, 3]
    reasons = rejected.column("reason").to_pylist()
    assert reasons[0].startswith("invalid JSON line")
    assert reasons[1] == "text is not a string (int)"
    assert reasons[2] == "JSON line is a list, not an object"
    assert summary.rows_rejected == 3


def test_lance_input_fragments_are_read_units(ray_session, golden_dir, embedder, tmp_path):
    rows = real_rows(12, offset=600)
    lance.write_dataset(to_table(rows), tmp_path / "in.lance", max_rows_per_file=5)
    assert len(lance.dataset(tmp_path / "in.lance").get_fragments()) == 3
    config = EmbedConfig(input=str(tmp_path / "in.lance"), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), keep_columns=("lang",))
    summary = run(config)
    table = lance.dataset(config.output).to_table()
    assert summary.rows_embedded == 12
    assert sorted(set(table.column("source_file").to_pylist())) == [
        f"{tmp_path / 'in.lance'}#{i}" for i in range(3)]
    got = vectors_by_id(table)
    expected = _reference(embedder, rows)
    assert max(np.abs(got[i] - expected[i]).max() for i in expected) < 1e-5


def test_stage_sizes_reach_ray_data(ray_session, golden_dir, tmp_path):
    """--actor-prefetch and --tokenize-tasks become the stages' compute strategies."""
    from embedjob.driver import pipeline
    from embedjob.driver.preflight import plan_run

    pq.write_table(to_table(real_rows(3)), tmp_path / "in.parquet")
    config = EmbedConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), num_actors=2, actor_prefetch=3,
                         tokenize_tasks=5)
    dataset = pipeline.build(plan_run(config), tracker=None)
    computes, op = {}, dataset._logical_plan.dag
    while op.input_dependencies:
        computes[op.name] = op.compute
        op = op.input_dependencies[0]
    encode = computes["MapBatches(EncodeActor)"]
    assert (encode.min_size, encode.max_size, encode.max_tasks_in_flight_per_actor) == (2, 2, 3)
    assert computes["MapBatches(tokenize_batch)"].size == 5
    assert computes["MapBatches(read_units)"].size is None
