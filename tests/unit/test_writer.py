"""The writer actor's state, driven in-process (no Ray): big files cut at rows_per_file,
rejected rows written once per flush, a retried batch taken once, rows per unit handed over
with the fragments that hold them."""

from __future__ import annotations

import os
from collections import Counter

import lance
import pyarrow as pa
import pytest

from embedjob import schema as S
from embedjob.stages.write import RowWriter, WriteSpec, batch_key, load_fragments

SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("x", pa.float32())])


def _main(ids: range) -> pa.Table:
    return pa.table({"id": pa.array(list(ids), pa.int64()),
                     "x": pa.array([i / 2 for i in ids], pa.float32())}, schema=SCHEMA)


def _rejected(ids: list[int]) -> pa.Table:
    return pa.table({"id": [str(i) for i in ids], "reason": ["text is empty"] * len(ids),
                     "source": ["f"] * len(ids), "row": ids}, schema=S.REJECTED_SCHEMA)


def _key(unit: str, rows: range) -> bytes:
    return batch_key(pa.table({S.UNIT: [unit] * len(rows), S.ROW: pa.array(list(rows))}))


def _commit(uri: str, pickled: list[bytes], schema: pa.Schema) -> lance.LanceDataset:
    operation = lance.LanceOperation.Overwrite(schema, load_fragments(pickled))
    return lance.LanceDataset.commit(uri, operation)


def test_writer_cuts_files_at_rows_per_file_and_writes_rejected_rows_once(tmp_path):
    spec = WriteSpec(output=str(tmp_path / "o.lance"), rejected_output=str(tmp_path / "r.lance"),
                     schema=SCHEMA, rows_per_file=5)
    writer = RowWriter(spec)
    # three batches of 4 rows (units a and b), each with one rejected row
    for start in (0, 4, 8):
        assert writer.append(_key("a", range(start, start + 4)), _main(range(start, start + 4)),
                             _rejected([100 + start]), ["a", "b"], [3, 2])
    # a retried task hands the second batch over again: it is ignored
    assert not writer.append(_key("a", range(4, 8)), _main(range(4, 8)), _rejected([104]),
                             ["a", "b"], [3, 2])
    result = writer.flush().to_pylist()[0]
    assert dict(zip(result["units"], result["unit_rows"], strict=True)) == {"a": 9, "b": 6}
    assert sum(result[c] for c in S.COUNTERS) == 0  # counters travel with the stage's results
    main = _commit(spec.output, result["main_fragments"], SCHEMA)
    assert [f.count_rows() for f in main.get_fragments()] == [5, 5, 2]
    assert len(os.listdir(tmp_path / "o.lance" / "data")) == 3
    assert sorted(main.to_table().column("id").to_pylist()) == list(range(12))
    rejected = _commit(spec.rejected_output, result["rejected_fragments"], S.REJECTED_SCHEMA)
    assert len(rejected.get_fragments()) == 1  # one file for the flush, not one per batch
    assert sorted(rejected.to_table().column("row").to_pylist()) == [100, 104, 108]
    # a flush with nothing handed over since the last one hands over nothing
    assert writer.flush().to_pylist()[0] | {"units": [], "unit_rows": []} == {
        "main_fragments": [], "rejected_fragments": [], "units": [], "unit_rows": [],
        **dict.fromkeys(S.COUNTERS, 0)}


def test_a_failed_file_write_reaches_the_caller(tmp_path):
    (tmp_path / "o.lance").write_text("a file, not a directory: no data file fits in it")
    spec = WriteSpec(output=str(tmp_path / "o.lance"), rejected_output=str(tmp_path / "r.lance"),
                     schema=SCHEMA, rows_per_file=5)
    writer = RowWriter(spec)
    writer.append(_key("a", range(4)), _main(range(4)), _rejected([]), ["a"], [4])
    with pytest.raises(OSError):
        writer.flush()


def test_batch_key_names_values_not_buffers():
    rows = pa.table({S.UNIT: ["a"] * 8, S.ROW: pa.array(range(8))})
    assert batch_key(rows.slice(0, 4)) != batch_key(rows.slice(4, 4))
    assert batch_key(rows.slice(4, 4)) == batch_key(pa.table({S.UNIT: ["a"] * 4,
                                                              S.ROW: pa.array(range(4, 8))}))
    assert Counter([batch_key(rows.slice(i, 1)) for i in range(8)]).most_common(1)[0][1] == 1


def test_batch_key_tells_chunks_of_one_row_apart():
    first = pa.table({S.UNIT: ["a"] * 2, S.ROW: pa.array([7, 7]), S.CHUNK: pa.array([0, 1])})
    second = pa.table({S.UNIT: ["a"] * 2, S.ROW: pa.array([7, 7]), S.CHUNK: pa.array([2, 3])})
    assert batch_key(first) != batch_key(second)
