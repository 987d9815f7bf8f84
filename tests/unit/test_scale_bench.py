"""Smoke test of ``benchmarks/scale_bench.py shard`` (the bytes-per-id figures of
BENCHMARKS.md): the shard state is 20 bytes per row and resolving peaks at 36."""

from __future__ import annotations

import json
import runpy

import pytest

from tests.pipeline_helpers import REPO

pytestmark = pytest.mark.unit


def test_shard_series_prints_20_bytes_per_row_and_a_36_byte_peak(capsys):
    script = runpy.run_path(str(REPO / "benchmarks" / "scale_bench.py"), run_name="scale")
    assert script["main"](["shard", "--rows", "200000"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shard = [r for r in last["runs"] if "numpy_bytes_per_row" in r]
    assert [r["ids"] for r in shard] == ["int64", "string"]
    for r in shard:
        assert r["numpy_bytes_per_row"] == 20.0
        assert 20.0 < r["resolve_peak_bytes_per_row"] <= 37.0
        assert r["losers"] == 10_000 and r["after_bytes_per_row"] == pytest.approx(0.4)
