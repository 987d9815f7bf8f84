"""int8 and binary columns beside the floats: their values against an independent
computation from the stored floats and the stamped ranges, the calibration kept by resume
and refresh, and bad specs refused before any model loads. Real Ray, real Lance,
the golden tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver import calibrate, pipeline
from embedjob.driver.run import run
from embedjob.errors import ConfigError
from embedjob.ops.refresh import refresh
from embedjob.table.info import format_info, table_info
from tests.pipeline_helpers import interrupt, l2, real_rows, to_table, write_halves

pytestmark = pytest.mark.pipeline


def _matrix(table, column: str) -> np.ndarray:
    """A fixed-size-list column as a [rows, width] numpy array of its value type."""
    array = table.column(column).combine_chunks()
    return array.values.to_numpy(zero_copy_only=False).reshape(len(array), -1)


def _int8_expected(vectors: np.ndarray, lo, hi) -> np.ndarray:
    """README's formula, written out again: step = (hi - lo) / 255, q = rint((v - lo) /
    step) - 128, clipped to int8, in float64."""
    lo, hi = np.array(lo, np.float64), np.array(hi, np.float64)
    step = (hi - lo) / 255
    step[step == 0] = 1
    q = np.rint((vectors.astype(np.float64) - lo) / step) - 128
    return np.clip(q, -128, 127).astype(np.int8)


def _ranges(uri: str) -> dict:
    record = json.loads(S.schema_metadata(lance.dataset(uri).schema)[S.INT8_CALIBRATION])
    return record


def _plant(uri: str, lo: float, hi: float) -> dict:
    """Replace the stamped ranges by planted ones (a later run must use exactly these)."""
    dataset = lance.dataset(uri)
    meta = S.schema_metadata(dataset.schema)
    record = json.loads(meta[S.INT8_CALIBRATION])
    for dim, r in record["ranges"].items():
        r["lo"], r["hi"] = [lo] * int(dim), [hi] * int(dim)
    dataset.update_schema_metadata(meta | {S.INT8_CALIBRATION: json.dumps(record)},
                                   replace=True)
    return record


def _check_columns(table, record: dict, dims=(64, 32, 16)) -> None:
    full = _matrix(table, "vector")
    for dim in dims:
        stored = S.vector_column(dim, 64) in table.column_names
        floats = _matrix(table, S.vector_column(dim, 64)) if stored else l2(full[:, :dim])
        if f"vector_{dim}_bin" in table.column_names:
            assert np.array_equal(_matrix(table, f"vector_{dim}_bin"),
                                  np.packbits(floats > 0, axis=1))
        r = record["ranges"][str(dim)]
        got = _matrix(table, f"vector_{dim}_int8")
        assert got.dtype == np.int8 and got.shape == (table.num_rows, dim)
        expected = _int8_expected(floats, r["lo"], r["hi"])
        # a float32 re-normalization may differ in the last bit from the actor's: allow a
        # rounding step on a few values, never more
        assert np.abs(got.astype(int) - expected).max() <= (0 if stored else 1)


def test_quantized_columns_equal_sign_bits_and_the_stamped_int8_formula(ray_session,
                                                                         golden_dir, tmp_path):
    corpus = tmp_path / "corpus"
    write_halves(corpus, real_rows(30))
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), dims=(64, 32, 16), quantize=("int8", "binary"),
                         no_float_dims=(32,))
    run(config)
    dataset = lance.dataset(config.output)
    table = dataset.to_table()
    assert table.num_rows == 30
    types = {f.name: str(f.type) for f in dataset.schema if S.is_vector_column(f.name)}
    assert types == {
        "vector": "fixed_size_list<item: float>[64]",
        "vector_64_int8": "fixed_size_list<item: int8>[64]",
        "vector_64_bin": "fixed_size_list<item: uint8>[8]",
        "vector_32_int8": "fixed_size_list<item: int8>[32]",
        "vector_32_bin": "fixed_size_list<item: uint8>[4]",
        "vector_16": "fixed_size_list<item: float>[16]",
        "vector_16_int8": "fixed_size_list<item: int8>[16]",
        "vector_16_bin": "fixed_size_list<item: uint8>[2]",
    }
    meta = S.schema_metadata(dataset.schema)
    assert json.loads(meta[S.QUANTIZE]) == {d: ["binary", "int8"] for d in ("64", "32", "16")}
    assert json.loads(meta[S.FLOAT_DIMS]) == [64, 16]
    record = _ranges(config.output)
    assert record["rows"] == 30  # the sample: every valid row of this small input
    # calibrated on the run's own rows: the ranges are the stored vectors' per-dim min/max
    full = _matrix(table, "vector")
    for dim in (64, 32, 16):
        floats = l2(full[:, :dim])
        r = record["ranges"][str(dim)]
        np.testing.assert_allclose(r["lo"], floats.min(0), atol=1e-5)
        np.testing.assert_allclose(r["hi"], floats.max(0), atol=1e-5)
    _check_columns(table, record)
    # info: bytes per row and dtype of every vector column, the raw total beside the on-disk
    info = table_info(config.output)
    assert info.bytes_per_row == {"vector": 256, "vector_64_int8": 64, "vector_64_bin": 8,
                                  "vector_32_int8": 32, "vector_32_bin": 4, "vector_16": 64,
                                  "vector_16_int8": 16, "vector_16_bin": 2}
    assert info.vector_dtypes["vector_32_bin"] == "binary"
    assert info.vector_dtypes["vector_16_int8"] == "int8"
    assert ", 4 B/row binary, 120 raw" in format_info(info)
    # the per-dim extremes hit both ends of the int8 range
    codes = _matrix(table, "vector_64_int8")
    assert (codes.min(0) <= -127).all() and (codes.max(0) >= 126).all()


@pytest.mark.slow
def test_resume_and_refresh_keep_the_stamped_calibration(ray_session, golden_dir,
                                                                 tmp_path):
    corpus = tmp_path / "corpus"
    rows = real_rows(24)
    write_halves(corpus, rows)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(tmp_path / "o.lance"),
                         model=str(golden_dir), dims=(64, 16), quantize=("int8", "16:binary"))
    run(config)
    # planted ranges: any later run that re-calibrated would not reproduce them
    planted = _plant(config.output, -0.5, 0.5)

    # resume: pretend the run stopped after committing a.parquet only
    interrupt(config.output, keep=lambda unit: unit.endswith("a.parquet"))
    summary = run(config)
    assert summary.resumed_units_done == 1 and summary.rows_embedded == 12
    table = lance.dataset(config.output).to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(24))
    assert _ranges(config.output) == planted
    resumed = table.filter(pc.ends_with(table.column("source_file"), "b.parquet"))
    assert resumed.num_rows == 12
    _check_columns(resumed, planted, dims=(64, 16))

    # refresh: changed and new rows use the planted ranges; the stamp is unchanged
    v2 = [dict(r) for r in rows]
    v2[3]["text"] += " (amended)"
    v2.append({"id": 100, "text": real_rows(1, offset=200)[0]["text"], "lang": "x"})
    write_halves(corpus, v2)
    summary = refresh(config)
    assert (summary.rows_changed, summary.rows_new) == (1, 1)
    assert _ranges(config.output) == planted
    table = lance.dataset(config.output).to_table()
    assert table.num_rows == 25
    # every row embedded since the planting: b.parquet's (resumed), the changed and new ones
    since = pc.is_in(table.column("id"), pa.array([*range(12, 24), 3, 100]))
    _check_columns(table.filter(since), planted, dims=(64, 16))

    # a stamp change (other quantized columns) re-embeds and calibrates anew
    changed = dataclasses.replace(config, quantize=("int8", "binary"))
    refresh(changed)
    fresh = _ranges(config.output)
    assert fresh != planted and fresh["rows"] == 25
    _check_columns(lance.dataset(config.output).to_table(), fresh, dims=(64, 16))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was about to load: preflight let a bad spec through")

    monkeypatch.setattr(pipeline, "build", refuse)
    monkeypatch.setattr(calibrate, "calibrate", refuse)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quantize": ("1024:int4",)},
     r"--quantize '1024:int4' is not allowed; expected one of \['int8', 'binary'\]"),
    ({"quantize": ("float8",)}, r"--quantize 'float8' is not allowed"),
    ({"quantize": ("32:binary",), "dims": (64, 16)},
     r"--quantize '32:binary': dim 32 is not stored; stored dims are \[64, 16\]"),
    ({"quantize": ("16:int8",), "dims": (64, 16), "no_float_dims": (64,)},
     r"--no-float-dims 64 is not allowed; expected stored, quantized dims \[16\]"),
])
def test_bad_quantize_specs_fail_before_any_model_loads(tmp_path, golden_dir, no_model_load,
                                                        kwargs, message):
    pq.write_table(to_table(real_rows(3)), tmp_path / "in.parquet")
    with pytest.raises(ConfigError, match=message):
        run(EmbedConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o.lance"),
                        model=str(golden_dir), **kwargs))
