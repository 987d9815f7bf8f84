"""Hostile input: every kind is embedded or quarantined as the README documents, with counts.

Real local Ray, real SeaweedFS S3, real Lance, the golden tiny checkpoint. One Parquet run
and one JSON-lines run carry every kind at once, so the tier stays short.
"""

from __future__ import annotations

import io
import time

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.stages import check as validate
from tests.pipeline_helpers import content_hash, real_rows, vectors_by_id

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]
TASK = "retrieval.passage"
MAX_TOKENS = 8194  # jina-v3's limit (the tiny checkpoint keeps it)
TEN_MB = "All human beings are born free and equal in dignity and rights. " * 160_000
NO_SPACES = "x" * 1_000_000

# id -> text of the first Parquet file (int64 ids: the corpus id type), and what happens
EMBEDDED_HOSTILE = {
    100: "NUL\x00inside\x00a sentence",
    101: "\x01\x02\x1b[31mcontrol characters\x07 around words\x7f",
    104: "\u200fمرحبا بالعالم\u200e with direction marks",
    105: "😀🎉👍🏽",
    108: TEN_MB,
    109: NO_SPACES,
}
REJECTED_HOSTILE = {
    102: ("\u200b\u200c\u200d\ufeff\u2060", validate.INVISIBLE_TEXT),  # zero-width only
    103: ("\u200f\u200e\u202b\u202c", validate.INVISIBLE_TEXT),  # direction marks only
    106: ("  \t\n\u3000\u00a0 ", validate.BLANK_TEXT),  # whitespace only (any script)
    107: ("\x00\x00\x1f", validate.INVISIBLE_TEXT),  # NUL and controls only
}



def _put(fs, path: str, payload: bytes) -> None:
    with fs.open(path, "wb") as handle:
        handle.write(payload)


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _parquet_corpus(s3_server, prefix: str) -> dict[str, str]:
    """Six Parquet files; returns the expected embedded text per id."""
    fs, root = s3_server.filesystem(), f"{s3_server.bucket}/{prefix}/in"
    good = real_rows(10)
    texts = {r["id"]: r["text"] for r in good} | EMBEDDED_HOSTILE
    hostile = {**EMBEDDED_HOSTILE, **{i: t for i, (t, _) in REJECTED_HOSTILE.items()}}
    ids = [r["id"] for r in good] + list(hostile)
    part0 = pa.table({"id": pa.array(ids, pa.int64()),
                      "text": [r["text"] for r in good] + list(hostile.values()),
                      "lang": ["en"] * len(ids)})
    _put(fs, f"{root}/part-0.parquet", _parquet(part0))
    # schema drift: string ids, an extra column, no "lang"; "5" repeats an id of part-0
    more = real_rows(2, offset=200)
    _put(fs, f"{root}/part-1.parquet", _parquet(pa.table({
        "id": ["200", "201", "abc", "5"], "extra": [1, 2, 3, 4],
        "text": [more[0]["text"], more[1]["text"], "an id that is not a number", "again"]})))
    texts |= {200: more[0]["text"], 201: more[1]["text"]}
    _put(fs, f"{root}/part-2.parquet", _parquet(pa.table({  # no id column at all
        "doc_id": [1, 2], "text": ["no id here", "nor here"], "lang": ["en", "en"]})))
    _put(fs, f"{root}/part-3.parquet", _parquet(pa.table({  # float ids
        "id": [300.0, 301.5], "text": ["a whole float id", "a fractional float id"]})))
    texts[300] = "a whole float id"
    _put(fs, f"{root}/part-4.parquet", _parquet(pa.table({"id": [400], "body": ["x"]})))
    whole = _parquet(pa.table({"id": list(range(500, 600)), "text": ["lost"] * 100}))
    _put(fs, f"{root}/part-5-truncated.parquet", whole[: len(whole) // 2])
    return texts


def test_hostile_parquet_corpus_is_embedded_or_quarantined_with_counts(
    s3_server, s3_prefix, ray_session, golden_dir, embedder
):
    texts = _parquet_corpus(s3_server, s3_prefix)
    out = s3_server.uri(s3_prefix, "out.lance")
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet", output=out,
                         model=str(golden_dir), keep_columns=("lang",),
                         storage_options=s3_server.storage_options)
    summary = run(config)

    options = s3_server.storage_options
    table = lance.dataset(out, storage_options=options).to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(texts)  # each exactly once
    by_id = {row["id"]: row for row in table.select(
        ["id", "truncated", "n_tokens", "content_hash", "lang"]).to_pylist()}
    assert {i for i, r in by_id.items() if r["truncated"]} == {108, 109}
    assert by_id[108]["n_tokens"] == by_id[109]["n_tokens"] == MAX_TOKENS
    assert by_id[108]["content_hash"] == content_hash(TEN_MB)  # of the text as read
    assert by_id[200]["lang"] is None and by_id[0]["lang"] == "en"  # a missing kept column
    got = vectors_by_id(table)
    for i in (0, 100, 101, 104, 105, 200, 300):
        expected = embedder.encode([texts[i]], task=TASK)[0]
        assert np.abs(got[i] - expected).max() < 1e-5, i

    rejected = lance.dataset(config.rejected_uri, storage_options=options).to_table()
    found = sorted((r["id"] or "", r["reason"], r["source"].rsplit("/", 1)[-1], r["row"])
                   for r in rejected.to_pylist())
    prefix_of = [f[:3] for f in found if not f[1].startswith("unreadable")]
    assert prefix_of == sorted([
        ("", "id column 'id' missing in this file", "part-2.parquet"),
        ("", "id column 'id' missing in this file", "part-2.parquet"),
        ("102", validate.INVISIBLE_TEXT, "part-0.parquet"),
        ("103", validate.INVISIBLE_TEXT, "part-0.parquet"),
        ("106", validate.BLANK_TEXT, "part-0.parquet"),
        ("107", validate.INVISIBLE_TEXT, "part-0.parquet"),
        ("", "id 'abc' is not a int64", "part-1.parquet"),
        ("5", validate.DUPLICATE_ID, "part-1.parquet"),
        ("", "id 301.5 is not a int64", "part-3.parquet"),
        ("400", "text column 'text' missing in this file", "part-4.parquet"),
    ])
    corrupt = [f for f in found if f[1].startswith("unreadable")]
    assert len(corrupt) == 1
    assert corrupt[0][0] == "" and corrupt[0][2:] == ("part-5-truncated.parquet", -1)
    assert corrupt[0][1].startswith("unreadable parquet: ArrowInvalid: ")
    assert "magic bytes" in corrupt[0][1]
    assert (summary.rows_read, summary.rows_embedded, summary.rows_rejected) == (30, 19, 11)
    assert summary.rows_truncated == 2


JSONL_A = [  # the first file: string ids, so the corpus id type is string
    b'{"id": "j0", "text": "The first ordinary line."}',
    b'{"id": "j1", "text": "\\u0000 a JSON-escaped NUL leads this text"}',
    b'{"id": "j2", "text": "unterminated',
    b'{"id": "j3", "text": "raw bytes \xff\xfe are not UTF-8"}',
    b'{"id": "j4", "text": "a lone \\ud800 surrogate"}',
    b'{"id": "\\udc00", "text": "a fine text under a broken id"}',
    b"[1, 2]",
    b'{"id": "j5", "text": 42}',
    b'{"id": "j6", "text": "raw control \x01 byte inside a JSON string"}',
    b'{"id": "j7", "text": "extra keys are ignored", "extra": {"nested": [1, 2]}}',
    b"   ",
]
JSONL_B = [  # int ids in a string-id corpus are cast to strings; the last line is cut short
    b'{"id": 10, "text": "An integer id."}',
    b'{"id": "j0", "text": "a duplicate id from another file"}',
    b'{"id": 12, "te',
]


def test_hostile_jsonl_lines_are_rejected_one_by_one_and_the_rest_embedded(
    s3_server, s3_prefix, ray_session, golden_dir, embedder
):
    fs, root = s3_server.filesystem(), f"{s3_server.bucket}/{s3_prefix}/in"
    _put(fs, f"{root}/a.jsonl", b"\n".join(JSONL_A) + b"\n")
    _put(fs, f"{root}/b.jsonl", b"\n".join(JSONL_B))
    out = s3_server.uri(s3_prefix, "out.lance")
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="jsonl", output=out,
                         model=str(golden_dir), storage_options=s3_server.storage_options)
    summary = run(config)

    options = s3_server.storage_options
    table = lance.dataset(out, storage_options=options).to_table()
    assert table.schema.field("id").type == pa.string()
    assert sorted(table.column("id").to_pylist()) == ["10", "j0", "j1", "j7"]
    got = vectors_by_id(table)
    nul = "\x00 a JSON-escaped NUL leads this text"
    assert np.abs(got["j1"] - embedder.encode([nul], task=TASK)[0]).max() < 1e-5

    rejected = lance.dataset(config.rejected_uri, storage_options=options).to_table()
    rows = sorted((r["source"].rsplit("/", 1)[-1], r["row"], r["id"], r["reason"])
                  for r in rejected.to_pylist())
    assert [r[:3] for r in rows] == [
        ("a.jsonl", 2, None), ("a.jsonl", 3, None), ("a.jsonl", 4, "j4"), ("a.jsonl", 5, None),
        ("a.jsonl", 6, None), ("a.jsonl", 7, "j5"), ("a.jsonl", 8, None),
        ("b.jsonl", 1, "j0"), ("b.jsonl", 2, None),
    ]
    reasons = [r[3] for r in rows]
    assert reasons[0].startswith("invalid JSON line: Unterminated string")
    assert reasons[1].startswith("invalid JSON line: 'utf-8' codec can't decode byte 0xff")
    assert reasons[2] == "text is not valid Unicode (lone surrogate)"
    assert reasons[3] == "id is not valid Unicode (lone surrogate)"
    assert reasons[4] == "JSON line is a list, not an object"
    assert reasons[5] == "text is not a string (int)"
    assert reasons[6].startswith("invalid JSON line: Invalid control character")
    assert reasons[7] == validate.DUPLICATE_ID
    assert reasons[8].startswith("invalid JSON line: ")
    assert (summary.rows_read, summary.rows_embedded, summary.rows_rejected) == (13, 4, 9)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("😀", None), ("\x00a", None), ("\u200b", validate.INVISIBLE_TEXT),
     ("\u202e\u2066\u2069", validate.INVISIBLE_TEXT), (" \u3000", validate.BLANK_TEXT),
     ("\x00", validate.INVISIBLE_TEXT), ("\u0301", None), ("", validate.EMPTY_TEXT)],
    ids=["emoji", "nul-then-letter", "zero-width", "bidi-controls", "ideographic-space",
         "nul", "combining-mark", "empty"],
)
def test_text_reason_by_kind(text, reason):
    assert validate.text_reason(text) == reason


def test_huge_texts_are_cut_fast(golden_dir):
    from embedjob.model import load_spec

    tokenizer = load_spec(str(golden_dir)).tokenizer()
    for text in (TEN_MB, NO_SPACES):
        started = time.monotonic()
        tokenized = tokenizer.tokenize([text], TASK)
        assert validate.text_reason(text) is None
        assert time.monotonic() - started < 5.0
        assert len(tokenized.ids[0]) == MAX_TOKENS and tokenized.truncated[0]
    started = time.monotonic()
    assert validate.text_reason("\u200b" * 1_000_000) == validate.INVISIBLE_TEXT
    assert time.monotonic() - started < 5.0
