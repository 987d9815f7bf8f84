"""Read units below the file: byte ranges of JSON lines and CSV, row groups of Parquet.

Every line or row belongs to exactly one unit (the one whose range holds its first byte),
whatever the unit size, including boundaries that fall exactly on a line start, inside a
line, or on a newline.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from embedjob import schema as S
from embedjob.stages import read
from embedjob.storage import Storage

pytestmark = pytest.mark.unit


def _spec(fmt: str) -> read.ReadSpec:
    return read.ReadSpec(format=fmt, id_column="id", text_column="text", keep_columns=(),
                         id_type=pa.int64(), keep_types=(), storage=Storage())


def _rows_of(units: list[str], fmt: str) -> list[tuple[str, int, int, str]]:
    """(unit, row key, id, text) of every row every unit yields."""
    out = []
    for unit in units:
        for table in read.iter_rows(unit, _spec(fmt)):
            out += [(unit, k, i, t) for k, i, t in zip(
                table.column(S.ROW).to_pylist(), table.column(S.ID).to_pylist(),
                table.column(S.TEXT).to_pylist(), strict=True)]
    return out


def _texts(n: int) -> list[str]:
    # lengths vary from 1 to 40 characters, so boundaries land everywhere in a line
    return [f"t{i}" + "x" * (i * 7 % 40) for i in range(n)]


@pytest.mark.parametrize("unit_bytes", [1, 7, 64, 100, 333, 10_000])
def test_jsonl_lines_belong_to_exactly_one_byte_range(tmp_path, unit_bytes):
    texts = _texts(60)
    lines = [json.dumps({"id": i, "text": t}).encode() for i, t in enumerate(texts)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(lines[:30]) + b"\n\n" + b"\n".join(lines[30:]))  # blank line
    starts, pos = [], 0  # each line's first byte
    for i, line in enumerate(lines):
        starts.append(pos)
        pos += len(line) + 1 + (1 if i == 29 else 0)
    listed = Storage().list_files(str(path), (".jsonl",))
    units = read.plan_units(listed, unit_bytes)
    assert len(units) == -(-path.stat().st_size // unit_bytes)
    rows = _rows_of(units, "jsonl")
    assert sorted(r[2] for r in rows) == list(range(60))  # every line exactly once
    for unit, key, id_, text in rows:
        _, start, end = read.split_unit(unit)
        assert text == texts[id_]
        if end is not None:  # the unit whose range holds the line's first byte
            assert start <= starts[id_] < end and start <= key < end
    keys = [r[1] for r in rows]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("unit_bytes", [5, 50, 128, 10_000])
def test_csv_ranges_are_parsed_under_the_header(tmp_path, unit_bytes):
    texts = _texts(40)
    path = tmp_path / "a.csv"
    pcsv.write_csv(pa.table({"id": list(range(40)), "text": texts}), path)
    units = read.plan_units(Storage().list_files(str(path), (".csv",)), unit_bytes)
    rows = _rows_of(units, "csv")
    assert sorted((r[2], r[3]) for r in rows) == list(enumerate(texts))
    if len(units) == 1:  # an unsplit file keeps row indices
        assert [r[1] for r in rows] == list(range(40))


def test_parquet_row_groups_belong_to_the_range_holding_their_first_byte(tmp_path):
    path = tmp_path / "a.parquet"
    texts = _texts(1000)
    pq.write_table(pa.table({"id": list(range(1000)), "text": texts}), path, row_group_size=64)
    metadata = pq.read_metadata(path)
    listed = Storage().list_files(str(path), (".parquet",))
    units = read.plan_units(listed, listed[0].size // 5)
    assert len(units) >= 5
    rows = _rows_of(units, "parquet")
    # row keys are the rows' indices in the file, each row exactly once
    assert sorted((r[1], r[2]) for r in rows) == [(i, i) for i in range(1000)]
    assert all(texts[i] == t for _, _, i, t in rows)
    per_unit = [len(read.row_groups_in(metadata, *read.split_unit(u)[1:])) for u in units]
    assert sum(per_unit) == metadata.num_row_groups == 16


def test_small_files_are_one_unit_named_by_their_uri(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text('{"id": 1, "text": "x"}\n')
    listed = Storage().list_files(str(tmp_path), (".jsonl",))
    assert read.plan_units(listed, 1 << 20) == [str(tmp_path / "a.jsonl"),
                                                str(tmp_path / "b.jsonl")]
    assert read.split_unit(f"{tmp_path}/a.jsonl#bytes=10-20") == (f"{tmp_path}/a.jsonl", 10, 20)
