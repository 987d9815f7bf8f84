"""Poison rows: a row that kills the encode actor's process on every try (``os._exit`` in the
fault-injecting encoder, no exception) is isolated after a bounded number of deaths and
rejected with its reason; every other row is embedded exactly once.

Real local Ray (the actor really dies and Ray Data really restarts it and retries the
block), real SeaweedFS S3, real Lance.
"""

from __future__ import annotations

import time

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.stages.crashes import CrashLedger, block_key
from tests.faults import hooks as faults
from tests.faults.hooks import FaultyEncodeActor
from tests.pipeline_helpers import real_rows, to_table, vectors_by_id

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]
TASK = "retrieval.passage"


def test_ledger_counts_a_start_that_never_finished_as_a_death():
    ledger = CrashLedger()
    assert ledger.start("block:a") == 0
    assert ledger.start("block:a") == 1  # the first start never finished: the actor died
    ledger.finish("block:a")
    assert ledger.start("block:a") == 1  # one of the two earlier starts finished
    assert ledger.start("s#3") == 0 and ledger.start("s#3") == 1
    assert ledger.deaths() == 2  # block starts only: a row's start rides in its block's
    keys = ["s#0", "s#1", "s#2"]
    assert block_key(keys, np.array([0, 2])) == block_key(["s#0", "x", "s#2"], np.array([0, 2]))
    assert block_key(keys, np.array([0, 1])) != block_key(keys, np.array([0, 2]))


@pytest.mark.parametrize("retries", [
    1,  # the default suite: 2 actor restarts
    pytest.param(2, marks=pytest.mark.slow),  # the default setting: 4 restarts, minutes here
])
def test_a_row_that_kills_the_encoder_every_time_is_rejected_and_the_rest_embedded_once(
    retries, s3_server, s3_prefix, ray_session, golden_dir, embedder
):
    rows = real_rows(8, offset=700) + real_rows(8, offset=708)
    for name, part in (("a.parquet", rows[:8]), ("b.parquet", rows[8:])):
        with s3_server.filesystem().open(f"{s3_server.bucket}/{s3_prefix}/in/{name}",
                                         "wb") as handle:
            pq.write_table(to_table(part), handle)
    poison = rows[5]["id"]
    out = s3_server.uri(s3_prefix, "out.lance")
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet", output=out,
                         model=str(golden_dir), window_rows=8, encoder_crash_retries=retries,
                         storage_options=s3_server.storage_options)
    started = time.monotonic()
    with faults.injected(faults.CRASH_ON_IDS, str(poison)):
        summary = run(config, encoder=FaultyEncodeActor)
    print(f"poison row: run took {time.monotonic() - started:.1f} s, "
          f"{summary.encoder_deaths} encoder deaths")

    options = s3_server.storage_options
    table = lance.dataset(out, storage_options=options).to_table()
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows if r["id"] != poison)  # each once
    got = vectors_by_id(table)
    for r in rows:
        if r["id"] != poison:
            expected = embedder.encode([r["text"]], task=TASK)[0]
            assert np.abs(got[r["id"]] - expected).max() < 1e-5, r["id"]
    rejected = lance.dataset(config.rejected_uri, storage_options=options).to_table().to_pylist()
    assert [r["id"] for r in rejected] == [str(poison)]
    assert rejected[0]["reason"] == (f"crashes the encoder: the encode actor died {retries} "
                                     "times with this row in flight alone")
    assert (summary.rows_embedded, summary.rows_rejected) == (15, 1)
    # `retries` deaths of the whole block, then as many with the row alone; none after that
    assert summary.encoder_deaths == 2 * retries
    assert EmbedConfig(input="x", output="y.lance").encoder_crash_retries == 2  # the default


@pytest.mark.slow  # two runs, two actor restarts: 52 s here at load ~5 (default suite:
# tests/faults/test_late_faults.py, the same at the encode stage)
def test_late_chunking_a_document_that_kills_the_encoder_is_rejected_whole(
    tmp_path, ray_session, golden_dir
):
    """``--chunking late``: the poison document's windows kill the actor; the block goes
    document by document, the document is rejected with the plain path's reason and none of
    its chunks is written; every other document's chunks equal a run without the fault."""
    rows = real_rows(8, offset=700)
    rows[3] = {**rows[3], "text": " ".join(r["text"] for r in real_rows(6, offset=300))}
    poison = rows[3]["id"]  # several macro-windows
    pq.write_table(to_table(rows), tmp_path / "in.parquet")

    def late(out: str, **extra):
        return EmbedConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / out),
                           model=str(golden_dir), chunking="late", chunk_tokens=16,
                           chunk_window_tokens=128, encoder_crash_retries=1, **extra)

    run(late("normal.lance"))
    config = late("out.lance")
    with faults.injected(faults.CRASH_ON_IDS, str(poison)):
        summary = run(config, encoder=FaultyEncodeActor)
    normal = lance.dataset(str(tmp_path / "normal.lance")).to_table()
    table = lance.dataset(config.output).to_table()
    assert normal.column("doc_id").to_pylist().count(poison) > 8  # it had chunks to lose

    def chunks(t):
        return {(d, c): np.asarray(v, np.float32) for d, c, v in zip(
            t.column("doc_id").to_pylist(), t.column("chunk").to_pylist(),
            t.column("vector").to_pylist(), strict=True)}

    got, want = chunks(table), chunks(normal)
    assert sorted(got) == sorted(k for k in want if k[0] != poison)  # each chunk once
    assert max(np.abs(got[k] - want[k]).max() for k in got) < 1e-5
    rejected = lance.dataset(config.rejected_uri).to_table().to_pylist()
    assert [(r["id"], r["reason"]) for r in rejected] == [(str(poison), (
        "crashes the encoder: the encode actor died 1 times with this row in flight alone"))]
    assert (summary.rows_embedded, summary.rows_rejected) == (7, 1)
    assert summary.encoder_deaths == 2
