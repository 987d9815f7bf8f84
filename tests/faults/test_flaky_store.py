"""A flaky store: every client (pyarrow, s3fs/botocore, Lance's object_store, in the driver
and in every Ray worker) talks to the S3 server through a proxy that answers a seeded
fraction of the requests with 503 SlowDown or 500 InternalError or resets the connection.
A full embed and then a refresh complete exactly once, with the right vectors. A fault that
no client retries fails the run with its message; the rerun resumes. (Seen before
``driver.commit.commit_transaction`` retried commits: a reset on Lance's conditional PUT of
a manifest, which object_store does not repeat.)

Which client retries what, and how often: README "Transient errors".
"""

from __future__ import annotations

import io
import time

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.ops.refresh import refresh
from tests.pipeline_helpers import real_rows, to_table, vectors_by_id
from tests.s3_counter import FAULTS, FlakyProxy

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]
TASK = "retrieval.passage"
SEED = 20
FRACTION = 0.06  # of all requests: 2% each of SlowDown, InternalError, connection reset


def _write_corpus(s3_server, prefix: str, rows: list[dict]) -> None:
    fs = s3_server.filesystem()  # straight to the server: only the job goes through the proxy
    for name, part in (("a.parquet", rows[: len(rows) // 2]), ("b.parquet", rows[len(rows) // 2:])):
        buffer = io.BytesIO()
        pq.write_table(to_table(part), buffer)
        fs.pipe(f"{s3_server.bucket}/{prefix}/in/{name}", buffer.getvalue())


def _check_exactly_once(config: EmbedConfig, s3_server, expected: dict, embedder) -> dict:
    table = lance.dataset(config.output, storage_options=s3_server.storage_options).to_table()
    ids = table.column("id").to_pylist()
    assert len(expected) >= 20 and sorted(ids) == sorted(expected)  # every id once, no other
    got = vectors_by_id(table)
    for i, text in expected.items():
        assert np.abs(got[i] - embedder.encode([text], task=TASK)[0]).max() < 1e-5, i
    return got


def _until_done(call, failures: list[str], attempts: int = 3):
    """``call()``; a failure (a fault no client retried) must say what failed, and the rerun
    (resume) must complete it."""
    for _ in range(attempts - 1):
        try:
            return call()
        except Exception as exc:  # judged here: a message naming the failed request
            assert str(exc), repr(exc)
            failures.append(f"{type(exc).__name__}: {str(exc)[:160]}")
    return call()


@pytest.mark.slow
def test_embed_and_refresh_through_a_flaky_store_complete_exactly_once(
    s3_server, s3_prefix, ray_session, golden_dir, embedder
):
    v1 = real_rows(20, offset=200)
    _write_corpus(s3_server, s3_prefix, v1)
    with FlakyProxy(s3_server.endpoint, seed=SEED, fraction=FRACTION) as proxy:
        config = EmbedConfig(
            input=s3_server.uri(s3_prefix, "in/"), format="parquet",
            output=s3_server.uri(s3_prefix, "out.lance"), model=str(golden_dir),
            window_rows=5, write_batch_rows=5, commit_interval_s=0.5,
            storage_options=s3_server.storage_options | {"aws_endpoint": proxy.endpoint})
        started = time.monotonic()
        failures: list[str] = []
        first = _until_done(lambda: run(config), failures)
        embed_s, embed_requests = time.monotonic() - started, len(proxy.requests)
        embed_faults = dict(proxy.injected)
        before = _check_exactly_once(config, s3_server, {r["id"]: r["text"] for r in v1},
                                     embedder)
        if not failures:  # (a resumed run counts only what it embedded itself)
            assert (first.rows_embedded, first.rows_rejected) == (20, 0)

        v2 = [dict(r) for r in v1 if r["id"] not in (201, 202)]  # 2 gone
        for r in v2:
            if r["id"] in (205, 206):
                r["text"] += " (amended)"  # 2 changed
        v2 += real_rows(3, offset=260)  # 3 new
        _write_corpus(s3_server, s3_prefix, v2)
        started = time.monotonic()
        second = _until_done(lambda: refresh(config), failures)
        refresh_s = time.monotonic() - started
    print(f"flaky store: embed {embed_s:.1f} s, {embed_requests} requests, faults "
          f"{embed_faults}, driver retries {first.transient_retries}; refresh {refresh_s:.1f} "
          f"s, {len(proxy.requests) - embed_requests} requests, faults so far "
          f"{dict(proxy.injected)}, driver retries {second.transient_retries}; failed runs "
          f"rerun: {failures}")
    assert all(proxy.injected[f] > 0 for f in FAULTS), proxy.injected  # each kind was met
    after = _check_exactly_once(config, s3_server, {r["id"]: r["text"] for r in v2}, embedder)
    if not failures:
        assert (second.rows_unchanged, second.rows_changed, second.rows_new,
                second.rows_deleted) == (16, 2, 3, 2)
    for i in (200, 203, 219):  # unchanged rows keep their stored vectors
        assert np.array_equal(after[i], before[i])
    # the driver's own retries can only follow an injected fault
    assert first.transient_retries + second.transient_retries <= sum(proxy.injected.values())
