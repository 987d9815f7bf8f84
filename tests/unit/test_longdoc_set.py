"""The long-document eval set: documents from consecutive verses, each query's span holds its
aligned English verse exactly; scoring ranks a chunk table's documents by their best chunk."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.table.eval import longdoc
from embedjob.table.eval.datasets import DATA

pytestmark = pytest.mark.unit


def test_documents_hold_each_verse_at_its_span() -> None:
    data = longdoc.bible_documents(25)
    verses = pq.read_table(DATA / "bible_es_en.parquet").to_pylist()
    texts = dict(zip(data.docs.column("id").to_pylist(), data.docs.column("text").to_pylist(),
                     strict=True))
    assert data.docs.num_rows == 40 and len(data.queries) == 1000
    for verse, doc, (a, b), query in zip(verses, data.doc_of, data.span_of, data.queries,
                                         strict=True):
        assert texts[doc][a:b] == verse["en"] and query == verse["es"]


def test_chunk_table_scores_rank_documents_by_their_best_chunk(tmp_path) -> None:
    import lance
    import pyarrow as pa

    data = longdoc.LongDocSet(pa.table({"id": ["a", "b"], "text": ["x" * 10, "y" * 10]}),
                              ["q0", "q1"], ["a", "b"], [(0, 4), (6, 10)])
    v = np.eye(3, dtype=np.float32)
    rows = pa.table({"doc_id": ["a", "a", "b"], "chunk": pa.array([0, 1, 0], pa.int32()),
                     "char_start": [0, 5, 0], "char_end": [5, 10, 10],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 3)})
    lance.write_dataset(rows, str(tmp_path / "t.lance"))
    # q0 is nearest chunk (a, 0): right document, right chunk; q1 nearest (a, 1): wrong doc
    queries = np.array([[1, 0, 0.5], [0, 1, 0.5]], np.float32)
    got = longdoc.score(data, str(tmp_path / "t.lance"), queries)
    assert got == {"doc@1": 0.5, "doc@5": 1.0, "rows": 3, "chunk@1": 0.5}


def test_report_prints_the_column_table_then_the_longdoc_table() -> None:
    from embedjob.table.eval import format_report

    modes = {"none": {"doc@1": 0.1, "doc@5": 0.3, "rows": 40, "tokens": 9, "processed_tokens": 9},
             "late": {"doc@1": 0.2, "doc@5": 0.4, "chunk@1": 0.05, "rows": 500, "tokens": 9,
                      "processed_tokens": 12}}
    lee = {"columns": {"vector": {"dim": 64, "dtype": "float32", "bytes_per_row": 256,
                                  "pearson": 0.5}}}
    longdoc_only = format_report({"datasets": {"longdoc": {"chunk_tokens": 64, "modes": modes}}})
    assert longdoc_only.splitlines() == [
        "| longdoc (64-token chunks) | doc@1 | doc@5 | chunk@1 | rows | tokens | "
        "processed tokens |", "|---|---|---|---|---|---|---|",
        "| none | 0.100 | 0.300 | - | 40 | 9 | 9 |",
        "| late | 0.200 | 0.400 | 0.050 | 500 | 9 | 12 |"]
    both = format_report({"datasets": {"lee": lee, "longdoc": {"chunk_tokens": 64,
                                                              "modes": modes}}})
    assert both.split("\n\n")[1] == longdoc_only
    assert both.splitlines()[2] == "| lee | vector | 64 | float32 | 256 |  |  |  | 0.500 |  |"
