"""``embed --chunking late|split`` through the real pipeline (Ray, Lance) into a chunk table:
every chunk vector equals an independent computation (late: one forward over its macro-window,
mean of the span's token states, truncate, normalize; split: the chunk embedded alone), char
spans map back to the text, summary counts are documents / chunks / document tokens; bad
chunk options fail before any model loads, naming the allowed values."""

from __future__ import annotations

import dataclasses
import json

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver import pipeline
from embedjob.driver.run import run
from embedjob.errors import ConfigError
from embedjob.model import matryoshka
from embedjob.stages import chunks as C
from tests.model_fixtures import ATOL_VECTORS, max_err
from tests.model_layouts import write_layout
from tests.pipeline_helpers import content_hash, real_rows, to_table

pytestmark = pytest.mark.pipeline

TASK = "retrieval.passage"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    rows = real_rows(4)
    rows.append({"id": 50, "text": "\n".join(r["text"] for r in real_rows(6, 10)), "lang": "x"})
    rows.append({"id": 51, "text": "   ", "lang": "x"})  # rejected: whitespace only
    return rows


def _run(tmp_path, docs, golden_dir, **chunking):
    path = tmp_path / "in.parquet"
    pq.write_table(to_table(docs), path)
    out = tmp_path / "chunks.lance"
    summary = run(EmbedConfig(input=str(path), output=str(out), model=str(golden_dir),
                              dims=(64, 16), max_tokens_per_batch=512, **chunking))
    return summary, lance.dataset(str(out))


def _rows(dataset) -> dict[tuple[int, int], dict]:
    return {(r["doc_id"], r["chunk"]): r for r in dataset.to_table().to_pylist()}


def _check_spans(rows: dict, docs: list[dict]) -> None:
    texts = {d["id"]: d["text"] for d in docs}
    for doc_id in {k[0] for k in rows}:
        mine = [rows[(doc_id, i)] for i in range(sum(k[0] == doc_id for k in rows))]
        assert mine[0]["char_start"] == 0 and mine[-1]["char_end"] == len(texts[doc_id])
        assert mine[0]["token_start"] == 0
        for a, b in zip(mine, mine[1:], strict=False):
            assert b["char_start"] <= a["char_end"] and b["token_start"] <= a["token_end"]
        assert all(r["content_hash"] == content_hash(texts[doc_id]) for r in mine)


def _window_states(embedder, doc, window: tuple[int, int]) -> np.ndarray:
    """The model's own forward of ``lead + text[ws:we] + trail`` alone: [L, H] float64."""
    ws, we = window
    ids = np.concatenate([doc.lead, doc.text[ws:we], doc.trail]).astype(np.int64)
    return embedder.forward(torch.from_numpy(ids[None]), torch.ones(1, len(ids)),
                            tasks=[TASK]).last_hidden_state[0].double().numpy()


def test_late_chunks_through_the_pipeline_with_macro_windows(
        ray_session, tmp_path, docs, golden_dir, embedder) -> None:
    summary, dataset = _run(tmp_path, docs, golden_dir, chunking="late", chunk_tokens=16,
                            chunk_overlap=4, chunk_window_tokens=64, keep_columns=("text",))
    stamp = json.loads(S.schema_metadata(dataset.schema)[S.CHUNKING])
    assert (stamp["mode"], stamp["tokens"], stamp["overlap"], stamp["window"]) == (
        "late", 16, 4, 64)
    assert dataset.schema.names[:6] == ["doc_id", "chunk", "char_start", "char_end",
                                        "token_start", "token_end"]
    rows = _rows(dataset)
    _check_spans(rows, docs)
    tok = embedder.tokenizer
    doc_tokens, windows_seen = 0, 0
    for d in docs[:5]:
        doc = tok.tokenize_documents([d["text"]], TASK)[0]
        n, lead, trail = len(doc.text), len(doc.lead), len(doc.trail)
        doc_tokens += lead + n + trail
        spans = C.plan_spans(doc.offsets, len(d["text"]), 16, 4, "tokens")
        windows = C.plan_windows(n, 64 - lead - trail, 16)
        windows_seen = max(windows_seen, len(windows))
        assert sorted(k[1] for k in rows if k[0] == d["id"]) == list(range(len(spans)))
        for i, (span, pool) in enumerate(zip(spans, C.late_pools(spans, windows, n, lead, trail),
                                             strict=True)):
            states = _window_states(embedder, doc, windows[pool.window])
            want = states[pool.start:pool.end].mean(0)
            row = rows[(d["id"], i)]
            assert (row["token_start"], row["token_end"]) == (span.token_start, span.token_end)
            assert row["n_tokens"] == pool.end - pool.start
            got = np.asarray(row["vector"], np.float32)
            assert max_err(got, want / np.linalg.norm(want)) < ATOL_VECTORS
            assert max_err(np.asarray(row["vector_16"]), matryoshka(want[None], 16)[0]) < 1e-5
    assert windows_seen >= 3, "the long document runs in several macro-windows"
    assert (summary.rows_embedded, summary.rows_rejected) == (5, 1)
    assert summary.chunks_embedded == len(rows)
    assert summary.tokens == doc_tokens  # document tokens, each counted once
    _check_search(dataset, rows, embedder)


def _check_search(dataset, rows: dict, embedder) -> None:
    """Search returns chunks (doc_id, spans, the chunk's text) by exact cosine; collapse keeps
    each document's best chunk."""
    from embedjob.table.search import search

    row = rows[(50, 3)]
    query = row["text"][row["char_start"]:row["char_end"]]
    q = embedder.encode([query], task="retrieval.query")[0]
    scores = {key: float(np.dot(q, np.asarray(r["vector"], np.float32)))
              for key, r in rows.items()}
    hits = search(dataset.uri, query, k=5, show=("text",), embedder=embedder).to_pylist()
    best = sorted(scores, key=scores.get, reverse=True)[:5]
    assert [(h["doc_id"], h["chunk"]) for h in hits] == best
    for h in hits:
        r = rows[(h["doc_id"], h["chunk"])]
        assert (h["char_start"], h["char_end"]) == (r["char_start"], r["char_end"])
        assert h["text"] == r["text"][r["char_start"]:r["char_end"]]
        assert abs(h["score"] - scores[(h["doc_id"], h["chunk"])]) < 1e-5
    collapsed = search(dataset.uri, query, k=3, embedder=embedder, collapse=True).to_pylist()
    per_doc: dict = {}
    for (doc, chunk), score in scores.items():
        if doc not in per_doc or score > scores[(doc, per_doc[doc])]:
            per_doc[doc] = chunk
    want = sorted(per_doc.items(), key=lambda dc: -scores[dc])[:3]
    assert [(h["doc_id"], h["chunk"]) for h in collapsed] == want


def test_split_chunks_are_embedded_alone(ray_session, tmp_path, docs, golden_dir,
                                         embedder) -> None:
    summary, dataset = _run(tmp_path, docs, golden_dir, chunking="split", chunk_tokens=24,
                            chunk_boundaries="sentences")
    rows = _rows(dataset)
    _check_spans(rows, docs)
    tok, chunk_tokens = embedder.tokenizer, 0
    for d in docs[:5]:
        doc = tok.tokenize_documents([d["text"]], TASK)[0]
        mine = [rows[k] for k in sorted(k for k in rows if k[0] == d["id"])]
        ids = [np.concatenate([doc.lead, doc.text[r["token_start"]:r["token_end"]], doc.trail])
               for r in mine]
        want = embedder.encode_ids(ids, task=TASK)
        got = np.asarray([r["vector"] for r in mine], np.float32)
        assert max_err(got, want) < ATOL_VECTORS
        assert [r["n_tokens"] for r in mine] == [len(x) for x in ids]
        chunk_tokens += sum(len(x) for x in ids)
        # without overlap the chunks tile the text exactly
        assert "".join(d["text"][r["char_start"]:r["char_end"]] for r in mine) == d["text"]
    assert summary.tokens == chunk_tokens and summary.rows_embedded == 5


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the pipeline was built: preflight let a bad config through")

    monkeypatch.setattr(pipeline, "build", refuse)


def test_bad_chunk_options_fail_before_any_model_loads(tmp_path, golden_dir,
                                                       no_model_load) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(to_table(real_rows(2)), path)
    base = {"input": str(path), "output": str(tmp_path / "o.lance"), "model": str(golden_dir)}
    with pytest.raises(ConfigError, match=r"--chunk-tokens 0 is not allowed.*an integer >= 1"):
        EmbedConfig(**base, chunking="late", chunk_tokens=0)
    with pytest.raises(ConfigError, match=r"--chunk-overlap 8 is not allowed.*< --chunk-tokens"):
        EmbedConfig(**base, chunking="late", chunk_tokens=8, chunk_overlap=8)
    with pytest.raises(ConfigError, match=r"--chunking 'lat' is not allowed.*'late'"):
        EmbedConfig(**base, chunking="lat")
    with pytest.raises(ConfigError, match=r"--chunk-tokens 9000 is not allowed; expected at most"):
        run(EmbedConfig(**base, chunking="split", chunk_tokens=9000))
    cls = write_layout("bge-m3", tmp_path / "bge")
    with pytest.raises(ConfigError, match=r"pools by 'cls'; expected a model with 'mean'"):
        run(EmbedConfig(**base | {"model": str(cls)}, chunking="late"))
    assert not (tmp_path / "o.lance").exists()


def _doc(doc_id: int, offset: int, n: int) -> dict:
    """A document of ``n`` real paragraphs (several chunks of 16 tokens, several windows)."""
    return {"id": doc_id, "text": "\n".join(r["text"] for r in real_rows(n, offset)),
            "lang": "x"}


def _lineage(dataset) -> dict[tuple[int, int], tuple]:
    """(doc_id, chunk) -> (spans, hash, lineage file name and row, vector)."""
    from pathlib import Path

    return {(r["doc_id"], r["chunk"]): (
        r["char_start"], r["char_end"], r["token_start"], r["token_end"], r["n_tokens"],
        r["content_hash"], Path(r["source_file"]).name, r["source_row"],
        np.asarray(r["vector"], np.float32)) for r in dataset.to_table().to_pylist()}


@pytest.mark.slow  # four runs: ~170 s on the shared 2-core box (load ~5)
def test_refresh_of_a_chunk_table_per_document(ray_session, tmp_path, golden_dir) -> None:
    """A changed document's chunks all replaced, a deleted one's all deleted, a moved one's
    copied bit for bit, unchanged ones untouched, a new one's added: in one version, row by
    row what a fresh chunk embed of the new corpus holds. Changed chunk settings re-embed
    everything as a new version (a stamp change)."""
    from embedjob.ops.refresh import refresh
    from tests.pipeline.test_refresh import data_versions_since, write_files

    corpus = tmp_path / "corpus"
    docs = [_doc(i, 3 * i, 2 + i % 2) for i in range(6)]
    write_files(corpus, {"a.parquet": docs[:3], "b.parquet": docs[3:]})
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), dims=(64, 16), max_tokens_per_batch=512,
                         chunking="late", chunk_tokens=16, chunk_overlap=4,
                         chunk_window_tokens=64, lease_ttl_s=30)
    run(config)
    before = _lineage(lance.dataset(config.output))

    changed = dict(docs[1], text=docs[1]["text"] + " (amended)")
    write_files(corpus, {"a.parquet": [docs[0], changed, docs[2]],
                         "b.parquet": [docs[3], docs[5]],      # doc 4 deleted, doc 5 moved
                         "c.parquet": [_doc(9, 40, 3)]})
    version = lance.dataset(config.output).version
    summary = refresh(config)
    versions = data_versions_since(config.output, version)
    assert len(versions) == 1 and S.TX_COMPLETE in versions[0]
    after = _lineage(lance.dataset(config.output))
    fresh = dataclasses.replace(config, output=str(tmp_path / "fresh.lance"),
                                rejected_output=None)
    run(fresh)
    want = _lineage(lance.dataset(fresh.output))
    assert sorted(after) == sorted(want)
    for key, row in after.items():
        assert row[:8] == want[key][:8], key
        assert max_err(row[8], want[key][8]) < 1e-5
    for key in (k for k in before if k[0] in (0, 2, 3, 5)):  # not re-embedded
        assert np.array_equal(after[key][8], before[key][8]), key
    assert after[(5, 0)][6:8] == ("b.parquet", 1)            # moved: the new lineage
    new_chunks = sum(k[0] in (1, 9) for k in after)
    assert (summary.rows_embedded, summary.chunks_embedded, summary.rows_changed,
            summary.rows_new, summary.rows_deleted, summary.rows_read) == (
        2, new_chunks, 1, 1, 1, 6)
    assert summary.rows_unchanged == len(after) - new_chunks

    migrated = refresh(dataclasses.replace(config, chunk_tokens=24))
    stamp = json.loads(S.schema_metadata(lance.dataset(config.output).schema)[S.CHUNKING])
    assert (migrated.rows_embedded, stamp["tokens"]) == (6, 24)


def test_refresh_stamp_holds_the_chunk_settings(tmp_path, golden_dir, no_model_load) -> None:
    """refresh compares the chunk settings as part of the stamp: other settings (or none)
    than the table's are a stamp change (everything re-embedded as a new version)."""
    from embedjob.driver.preflight import plan_stamp

    path = tmp_path / "in.parquet"
    pq.write_table(to_table(real_rows(2)), path)
    base = {"input": str(path), "output": str(tmp_path / "o.lance"), "model": str(golden_dir)}
    late = plan_stamp(EmbedConfig(**base, chunking="late", chunk_tokens=16, chunk_overlap=4))
    held = json.loads(late[S.CHUNKING])
    assert (held["mode"], held["tokens"], held["overlap"]) == ("late", 16, 4)
    other = plan_stamp(EmbedConfig(**base, chunking="late", chunk_tokens=24))
    assert json.loads(other[S.CHUNKING])["tokens"] == 24
    assert S.CHUNKING not in plan_stamp(EmbedConfig(**base))


def test_refresh_of_a_chunk_table_without_chunk_flags_is_refused(tmp_path, golden_dir) -> None:
    """A refresh that forgot --chunking must not rewrite a chunk table as a plain one."""
    import pyarrow as pa

    from embedjob.ops.refresh import refresh

    path = tmp_path / "in.parquet"
    pq.write_table(to_table(real_rows(2)), path)
    held = json.dumps({"mode": "late", "tokens": 16})
    table = pa.table({S.DOC_ID: ["a"]}).replace_schema_metadata({S.CHUNKING: held})
    lance.write_dataset(table, str(tmp_path / "o.lance"))
    config = EmbedConfig(input=str(path), output=str(tmp_path / "o.lance"),
                         model=str(golden_dir))
    with pytest.raises(ConfigError, match="is a chunk table .*--chunking"):
        refresh(config)
    assert lance.dataset(str(tmp_path / "o.lance")).version == 1
