"""The ``embedjob`` console script against S3, with credentials only in the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow.parquet as pq
import pytest

from tests.conftest import SECRET_KEY
from tests.pipeline_helpers import real_rows, to_table

pytestmark = pytest.mark.pipeline


def _embedjob() -> str:
    return str(Path(sys.executable).parent / "embedjob")


def test_cli_embeds_from_s3_and_never_prints_the_secret(
    s3_server, s3_prefix, ray_session, golden_dir, tmp_path
):
    fs = s3_server.filesystem()
    with fs.open(f"{s3_server.bucket}/{s3_prefix}/in/corpus.parquet", "wb") as handle:
        pq.write_table(to_table(real_rows(6)), handle)
    out = s3_server.uri(s3_prefix, "out.lance")
    summary_path = tmp_path / "summary.json"
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
    }
    proc = subprocess.run(
        [_embedjob(), "embed", "--input", s3_server.uri(s3_prefix, "in/"), "--format", "parquet",
         "--output", out, "--model", str(golden_dir), "--task", "separation",
         "--dims", "64,32", "--vector-dtype", "float16", "--summary-json", str(summary_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("embedded 6/6 rows (0 rejected, 0 of them duplicate ids, 0 truncated, 0 unchanged, "
            "0 deleted)") in proc.stdout
    assert "lance.dataset(" in proc.stdout  # tells the user how to read the table
    summary = json.loads(summary_path.read_text())
    dataset = lance.dataset(out, storage_options=s3_server.storage_options)
    assert summary["rows_embedded"] == 6 == dataset.count_rows()
    assert dataset.schema.field("vector_32").type.value_type.bit_width == 16
    metadata = json.dumps({k.decode(): v.decode() for k, v in dataset.schema.metadata.items()})
    for text in (proc.stdout, proc.stderr, summary_path.read_text(), metadata):
        assert SECRET_KEY not in text


def test_cli_bad_config_exits_2_with_message(tmp_path, golden_dir):
    pq.write_table(to_table(real_rows(2)), tmp_path / "in.parquet")
    proc = subprocess.run(
        [_embedjob(), "embed", "--input", str(tmp_path / "in.parquet"),
         "--output", str(tmp_path / "o.lance"), "--model", str(golden_dir), "--dims", "48"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "embedjob: error: dim 48" in proc.stderr
    assert "[8, 16, 32, 64]" in proc.stderr
    assert "Traceback" not in proc.stderr
