"""The read side at the terminal: ``search`` as an aligned table with the stored text, as
JSON lines, for queries from standard input; ``rejected`` counts and samples; the stamp's
model source works from another directory, and a moved model is answered with --model."""

from __future__ import annotations

import io
import json
import shutil

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob import cli
from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from tests.pipeline_helpers import real_rows, to_table

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def table(tmp_path_factory, ray_session, golden_dir):
    """12 real rows (ids 0..11, texts kept), rows 0 and 1 blank: rejected."""
    root = tmp_path_factory.mktemp("read_cli")
    rows = real_rows(12)
    rows[0]["text"], rows[1]["text"] = "   ", ""
    pq.write_table(to_table(rows), root / "in.parquet")
    model = root / "model"
    shutil.copytree(golden_dir, model)
    # text-matching: queries are embedded like the rows, so a row's own text is its top hit
    run(EmbedConfig(input=str(root / "in.parquet"), output=str(root / "out.lance"),
                    model=str(model), task="text-matching", keep_columns=("text", "lang")))
    return root, rows


def test_search_prints_an_aligned_table_with_the_text(table, capsys, embedder) -> None:
    root, rows = table
    assert cli.main(["search", str(root / "out.lance"), rows[3]["text"], "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "id", "score", "text"]
    first = lines[1]
    assert first.split()[:2] == ["1", "3"]
    assert first.split()[3:6] == rows[3]["text"].replace("\n", " ").split()[:3]
    assert len(lines) == 3
    assert lines[0].index("text") == lines[1].index(rows[3]["text"].split()[0])  # aligned


def test_search_json_scores_equal_the_dot_product(table, capsys, embedder) -> None:
    root, rows = table
    assert cli.main(["search", str(root / "out.lance"), rows[5]["text"], "-k", "3",
                     "--json", "--show", "lang"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["query"] == rows[5]["text"]
    hits = record["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["id"] == 5
    assert hits[0]["lang"] == rows[5]["lang"] and "text" not in hits[0]
    stored = lance.dataset(str(root / "out.lance")).to_table().to_pylist()
    vectors = {r["id"]: np.asarray(r["vector"]) for r in stored}
    query = embedder.encode([rows[5]["text"]], task="text-matching")[0]
    for hit in hits:
        assert hit["score"] == pytest.approx(float(vectors[hit["id"]] @ query), abs=1e-5)


def test_queries_from_standard_input(table, capsys, monkeypatch) -> None:
    root, rows = table
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{rows[4]['text']}\n\n{rows[7]['text']}\n"))
    assert cli.main(["search", str(root / "out.lance"), "--queries", "-", "-k", "1",
                     "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["hits"][0]["id"] for r in records] == [4, 7]
    assert cli.main(["search", str(root / "out.lance"), "q", "--queries", "-"]) == 2
    assert "not both or neither" in capsys.readouterr().err


def test_rejected_counts_reasons_and_samples(table, capsys) -> None:
    root, _ = table
    assert cli.main(["rejected", str(root / "out.lance"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 2
    assert report["by_reason"] == {"text is whitespace only": 1, "text is empty": 1}
    ids = sorted(s["id"] for kind in report["samples"].values() for s in kind)
    assert ids == ["0", "1"]
    assert cli.main(["rejected", str(root / "out.lance")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"2 rejected rows in {root / 'out.rejected.lance'}\n"
                           "  1  text is whitespace only\n  1  text is empty\n")
    assert f"  id 0            {root / 'in.parquet'} row 0: text is whitespace only" in text
    assert cli.main(["rejected", str(root / "nothing.lance")]) == 2
    assert "no rejected-rows table at" in capsys.readouterr().err


def test_stamp_source_is_absolute_and_a_moved_model_asks_for_model(table, capsys,
                                                                   monkeypatch) -> None:
    root, rows = table
    stamp = lance.dataset(str(root / "out.lance")).schema.metadata
    assert stamp[b"embedjob.model_source"].decode() == str(root / "model")
    monkeypatch.chdir("/")  # from anywhere
    moved = root / "model-moved"
    (root / "model").rename(moved)
    try:
        assert cli.main(["search", str(root / "out.lance"), "x"]) == 2
        err = capsys.readouterr().err
        assert "pass --model with where that model is now" in err
        assert cli.main(["search", str(root / "out.lance"), rows[2]["text"], "-k", "1",
                         "--model", str(moved), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == 2
    finally:
        moved.rename(root / "model")
