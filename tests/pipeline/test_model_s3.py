"""Loading the original-layout checkpoint from a real S3 server (SeaweedFS), and running the
job with an ``s3://`` model: the same vectors as the local checkpoint."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from tests.pipeline_helpers import real_rows, to_table, vectors_by_id

pytestmark = pytest.mark.pipeline
TEXTS = ["Hello world!", "Die Katze schläft.", "今天天气很好。"]


def _upload_model(s3_server, golden_dir, prefix: str) -> str:
    fs = s3_server.filesystem()
    for path in golden_dir.iterdir():
        if path.is_file():
            fs.put(str(path), f"{s3_server.bucket}/{prefix}/model/{path.name}")
    return s3_server.uri(prefix, "model")


def test_s3_model_equals_local_and_is_cached(s3_server, s3_prefix, golden_dir, tmp_path,
                                             monkeypatch):
    from embedjob.model import load_embedder, load_spec

    monkeypatch.setenv("EMBEDJOB_CACHE", str(tmp_path / "cache"))
    uri = _upload_model(s3_server, golden_dir, s3_prefix)
    fs = s3_server.filesystem()
    remote = load_embedder(uri, filesystem=fs, merge_task="retrieval.query")
    local = load_embedder(str(golden_dir), merge_task="retrieval.query")
    assert np.abs(remote.encode(TEXTS, task="retrieval.query")
                  - local.encode(TEXTS, task="retrieval.query")).max() < 1e-6
    spec = load_spec(uri, filesystem=fs)
    assert spec.fingerprint == load_spec(uri, filesystem=fs).fingerprint  # stable
    assert spec.tasks == local.tasks and spec.local_dir.startswith(str(tmp_path / "cache"))


def test_job_with_an_s3_model(s3_server, s3_prefix, ray_session, golden_dir, tmp_path):
    from embedjob.model import load_embedder

    uri = _upload_model(s3_server, golden_dir, s3_prefix)
    rows = real_rows(8, offset=500)
    pq.write_table(to_table(rows), tmp_path / "in.parquet")
    config = EmbedConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "o.lance"),
                         model=uri, task="classification",
                         storage_options=s3_server.storage_options)
    run(config)
    got = vectors_by_id(lance.dataset(config.output).to_table())
    local = load_embedder(str(golden_dir))
    for r in rows:
        assert np.abs(got[r["id"]] - local.encode([r["text"]], task="classification")[0]
                      ).max() < 1e-5
