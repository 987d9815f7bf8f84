"""Start-up makes no request per input file: sizes and fingerprints come from the listing.

Every request the clients send to the real S3 server goes through a counting proxy
(``tests/s3_counter.py``), so the figures are the store's, whichever client made them.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.preflight import plan_run
from embedjob.ops.plan import size_job
from tests.pipeline_helpers import real_rows, to_table
from tests.s3_counter import CountingProxy

pytestmark = pytest.mark.pipeline
FILES = 20


@pytest.fixture
def s3_corpus(s3_server, s3_prefix):
    """20 small Parquet files under one prefix; returns their sizes by key."""
    fs = s3_server.filesystem()
    sizes = {}
    for f in range(FILES):
        buffer = io.BytesIO()
        pq.write_table(to_table(real_rows(5, offset=5 * f)), buffer)
        key = f"{s3_server.bucket}/{s3_prefix}/in/p{f:02d}.parquet"
        fs.pipe(key, buffer.getvalue())
        sizes[key] = len(buffer.getvalue())
    return sizes


@pytest.mark.parametrize("pattern", ["in/", "in/*.parquet"])
def test_plan_run_sends_no_head_per_input_file(s3_server, s3_prefix, s3_corpus, golden_dir,
                                               pattern):
    with CountingProxy(s3_server.endpoint) as proxy:
        options = s3_server.storage_options | {"aws_endpoint": proxy.endpoint}
        config = EmbedConfig(input=s3_server.uri(s3_prefix, pattern),
                             output=s3_server.uri(s3_prefix, "out.lance"),
                             model=str(golden_dir), format="parquet",
                             storage_options=options)
        plan = plan_run(config)
        inputs = f"/{s3_server.bucket}/{s3_prefix}/in/"
        assert len(plan.units) == FILES
        # the fingerprints carry the sizes the listing returned
        assert {u.removeprefix("s3://"): int(fp.split(":")[0])
                for u, fp in plan.fingerprints.items()} == s3_corpus
        assert proxy.count("HEAD", inputs) == 0, [r for r in proxy.requests if inputs in r[1]]
        # the only input reads: the first file's footer, probed for the column types
        assert proxy.count("GET", inputs) <= 2, proxy.requests
        # the listing: one page (pyarrow first asks whether the prefix exists: max-keys=1)
        listings = [r for r in proxy.requests if r[0] == "GET" and "list-type" in r[2]
                    and f"prefix={s3_prefix}%2Fin" in r[2]]
        assert 1 <= len(listings) <= 2, listings


def test_plan_samples_parquet_footers_and_marks_estimates(s3_server, s3_prefix, s3_corpus,
                                                          golden_dir, monkeypatch):
    from embedjob.ops import plan

    monkeypatch.setattr(plan, "FOOTER_SAMPLE", 5)
    with CountingProxy(s3_server.endpoint) as proxy:
        options = s3_server.storage_options | {"aws_endpoint": proxy.endpoint}
        config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), output="unused",
                             model=str(golden_dir), format="parquet",
                             storage_options=options)
        report = size_job(config, sample_rows=10, tokens_per_s=1000.0)
        inputs = f"/{s3_server.bucket}/{s3_prefix}/in/"
        assert proxy.count("HEAD", inputs) <= plan.SAMPLE_FILES  # the sampled texts' opens
        opened = {path for m, path, _ in proxy.requests if path.startswith(inputs)}
    # 5 footers + the 8 files sampled for texts, never all 20 files
    assert len(opened) <= 5 + plan.SAMPLE_FILES < FILES
    assert not report.rows_exact
    # every file holds 5 rows of about the same size: the estimate is close to 100
    assert abs(report.estimated_rows - 5 * FILES) <= 10
    lines = report.lines()
    assert lines[0].startswith(f"input: {FILES} files, ~")
    assert any(line.startswith("estimated tokens: ~") for line in lines)


def test_a_whole_run_reads_each_input_file_without_a_head(s3_server, s3_prefix, s3_corpus,
                                                          golden_dir, ray_session, tmp_path):
    """Read tasks and the duplicate-id scan open every file with the listing's size: the
    requests to the inputs are a few ranged GETs per unit, never a HEAD."""
    from embedjob.driver.run import run

    with CountingProxy(s3_server.endpoint) as proxy:
        options = s3_server.storage_options | {"aws_endpoint": proxy.endpoint}
        config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"),
                             output=str(tmp_path / "o.lance"), model=str(golden_dir),
                             format="parquet", storage_options=options)
        summary = run(config)
        inputs = f"/{s3_server.bucket}/{s3_prefix}/in/"
        methods = proxy.methods(inputs)
    assert summary.rows_embedded == 5 * FILES
    assert methods["HEAD"] == 0, methods
    # per file: its footer and id column (scan), its footer and columns (read); one row
    # group each. Proportional to the units, nothing per file beyond reading it.
    assert methods["GET"] <= 8 * FILES, methods
