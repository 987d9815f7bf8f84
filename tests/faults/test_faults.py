"""The ``faults`` tier: the job under failures, on real Ray, a real S3 server, real Lance.

Each fault ends with every valid id exactly once in the output, or a clear failure with
nothing half-committed and a rerun that completes. Covered elsewhere, not repeated here:
an encode actor killed mid-run and the driver SIGKILLed mid-run then rerun
(``tests/test_resume.py``); a pickle-only checkpoint refused (``tests/test_model_loading.py``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob import errors, storage
from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.errors import ConfigError, CorruptInputError, StorageError, TransientGiveUpError
from embedjob.ops.compact import compact
from embedjob.stages import read
from embedjob.stages.encode import EncodeSpec
from embedjob.storage import Storage
from tests.conftest import SECRET_KEY
from tests.faults import hooks as faults
from tests.faults.hooks import OOM_ABOVE_TOKENS, FaultyEncodeActor
from tests.pipeline_helpers import real_rows, to_table, vectors_by_id

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]
TASK = "retrieval.passage"



def _upload(s3_server, prefix: str, name: str, table: pa.Table) -> None:
    with s3_server.filesystem().open(f"{s3_server.bucket}/{prefix}/in/{name}", "wb") as handle:
        pq.write_table(table, handle)


def _check_vectors(table: pa.Table, rows: list[dict], embedder) -> None:
    got = vectors_by_id(table)
    for r in rows:
        expected = embedder.encode([r["text"]], task=TASK)[0]
        assert np.abs(got[r["id"]] - expected).max() < 1e-5, r["id"]


# --- out of memory: split in halves, never dropped ------------------------------------------


def _bucketed(golden_dir, rows: list[dict], max_tokens: int) -> pa.Table:
    """The encode stage's input for ``rows``: read, tokenize and bucket, without Ray."""
    from embedjob.model import load_spec
    from embedjob.stages.bucket import BucketSpec, bucket_window
    from embedjob.stages.tokens import TokenizeSpec, tokenize_batch

    spec = read.ReadSpec(format="parquet", id_column="id", text_column="text",
                         keep_columns=(), id_type=pa.int64(), keep_types=())
    table = read.normalize(to_table(rows), "mem://corpus", 0, spec)
    tokens = tokenize_batch(table, spec=TokenizeSpec(model=load_spec(str(golden_dir)), task=TASK))
    return bucket_window(tokens, spec=BucketSpec(max_tokens=max_tokens))


def _actor(golden_dir) -> FaultyEncodeActor:
    return FaultyEncodeActor(EncodeSpec(model=str(golden_dir), task=TASK, dims=(64,)))


def test_out_of_memory_splits_the_batch_and_rejects_only_a_text_that_never_fits(
    golden_dir, embedder, monkeypatch
):
    rows = real_rows(12, offset=100)
    rows[3] = {**rows[3], "text": "word " * 400}  # far longer than the rest
    long_id = rows[3]["id"]
    monkeypatch.setenv(OOM_ABOVE_TOKENS, "300")
    actor = _actor(golden_dir)
    bucketed = _bucketed(golden_dir, rows, max_tokens=4000)
    assert len(set(bucketed.column("_batch").to_pylist())) < len(rows)  # batches to split
    out = actor(bucketed)

    assert out.num_rows == len(rows)  # one output per input
    reasons = dict(zip(out.column("_id").to_pylist(), out.column("_reason").to_pylist(),
                       strict=True))
    statuses = dict(zip(out.column("_id").to_pylist(), out.column("_status").to_pylist(),
                        strict=True))
    assert statuses == {r["id"]: 0 for r in rows} | {long_id: 1}  # EMBED, REJECTED
    n_long = bucketed.column("n_tokens").to_pylist()[reasons_index(bucketed, long_id)]
    assert n_long > 300
    assert reasons == {r["id"]: None for r in rows} | {
        long_id: f"out of memory: 1 text of {n_long} tokens does not fit"}
    table = out.rename_columns(["id" if c == "_id" else c for c in out.column_names])
    kept = table.filter(pa.compute.is_null(table.column("_reason")))
    _check_vectors(kept, [r for r in rows if r["id"] != long_id], embedder)
    assert out.column("vector").null_count == 1
    # each forward that ran held at most the budget
    processed = out.column("_processed_tokens").to_pylist()
    assert max(processed) <= 300 and processed[reasons_index(out, long_id)] == 0


def reasons_index(table: pa.Table, id_value) -> int:
    return table.column("_id").to_pylist().index(id_value)


def test_out_of_memory_in_a_run_splits_batches_and_loses_no_row(
    s3_server, s3_prefix, ray_session, golden_dir, embedder
):
    rows = real_rows(24, offset=300)
    _upload(s3_server, s3_prefix, "a.parquet", to_table(rows))
    out = s3_server.uri(s3_prefix, "out.lance")
    with faults.injected(OOM_ABOVE_TOKENS, "400"):  # read by the actors of this run
        summary = run(EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet",
                                  output=out, model=str(golden_dir), max_tokens_per_batch=4000,
                                  window_rows=24, storage_options=s3_server.storage_options),
                      encoder=FaultyEncodeActor)
    table = lance.dataset(out, storage_options=s3_server.storage_options).to_table()
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    assert (summary.rows_embedded, summary.rows_rejected) == (24, 0)
    # the split shows in the padding cost: less than the planned batches would have cost
    planned = _bucketed(golden_dir, rows, max_tokens=4000)
    batches, lengths = planned.column("_batch").to_pylist(), planned.column("n_tokens")
    longest = {b: max(n for c, n in zip(batches, lengths.to_pylist(), strict=True) if c == b)
               for b in set(batches)}
    assert max(longest[b] * batches.count(b) for b in longest) > 400  # would not fit
    assert summary.processed_tokens < sum(longest[b] for b in batches)
    _check_vectors(table, rows[::5], embedder)


@pytest.mark.slow
def test_out_of_memory_on_one_text_in_a_run_rejects_it_with_its_reason(
    s3_server, s3_prefix, ray_session, golden_dir
):
    """The rejected text's id stays with it: the pre-pass decided each id's winner."""
    rows = real_rows(10, offset=400)
    rows[4] = {**rows[4], "text": "word " * 600}
    _upload(s3_server, s3_prefix, "a.parquet", to_table(rows))
    out = s3_server.uri(s3_prefix, "out.lance")
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet", output=out,
                         model=str(golden_dir), storage_options=s3_server.storage_options)
    with faults.injected(OOM_ABOVE_TOKENS, "500"):
        summary = run(config, encoder=FaultyEncodeActor)
    options = s3_server.storage_options
    table = lance.dataset(out, storage_options=options).to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows
                                                            if r["id"] != rows[4]["id"])
    rejected = lance.dataset(config.rejected_uri, storage_options=options).to_table().to_pylist()
    assert len(rejected) == 1 and rejected[0]["id"] == str(rows[4]["id"])
    assert rejected[0]["reason"].startswith("out of memory: 1 text of ")
    assert rejected[0]["reason"].endswith(" tokens does not fit")
    assert (summary.rows_read, summary.rows_embedded, summary.rows_rejected) == (10, 9, 1)


# --- corrupt input: recorded with file and reason, the rest processed (or fail fast) --------


def _spec(fmt: str, *, fail_fast: bool = False) -> read.ReadSpec:
    return read.ReadSpec(format=fmt, id_column="id", text_column="text", keep_columns=(),
                         id_type=pa.int64(), keep_types=(), fail_fast=fail_fast)


def _corrupt_mid_file(path: Path) -> int:
    """A Parquet file whose second row group is damaged; returns the rows before it."""
    rows = 3 * read.READ_BATCH_ROWS
    table = pa.table({"id": list(range(rows)), "text": [f"row {i} text" for i in range(rows)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=read.READ_BATCH_ROWS)
    data = bytearray(buf.getvalue())
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(1)
    start = meta.data_page_offset
    data[start + 20 : start + 220] = b"\x00" * 200
    path.write_bytes(bytes(data))
    return read.READ_BATCH_ROWS


def test_parquet_damaged_mid_file_keeps_the_rows_before_and_records_the_rest(tmp_path):
    path = tmp_path / "damaged.parquet"
    before = _corrupt_mid_file(path)
    tables = list(read.read_units(pa.table({"unit": [str(path)]}), _spec("parquet")))
    out = pa.concat_tables(tables)
    good = out.filter(pa.compute.is_null(out.column("_reason")))
    assert good.column("_row").to_pylist() == list(range(before))
    bad = out.filter(pa.compute.is_valid(out.column("_reason"))).to_pylist()
    assert len(bad) == 1 and bad[0]["_row"] == -1 and bad[0]["_id"] is None
    assert bad[0]["_source"] == str(path)
    assert bad[0]["_reason"].startswith(f"unreadable parquet after row {before - 1}: ")


def test_fail_fast_stops_at_a_corrupt_file_or_a_broken_json_line(tmp_path):
    path = tmp_path / "damaged.parquet"
    _corrupt_mid_file(path)
    with pytest.raises(CorruptInputError, match=r"damaged\.parquet: unreadable parquet"):
        list(read.read_units(pa.table({"unit": [str(path)]}), _spec("parquet", fail_fast=True)))
    lines = tmp_path / "a.jsonl"
    lines.write_bytes(b'{"id": 1, "text": "fine"}\n{"id": 2, "te\n')
    with pytest.raises(CorruptInputError, match=r"a\.jsonl: row 1: invalid JSON line"):
        list(read.read_units(pa.table({"unit": [str(lines)]}), _spec("jsonl", fail_fast=True)))
    # without fail_fast the same line is one rejected row
    out = pa.concat_tables(read.read_units(pa.table({"unit": [str(lines)]}), _spec("jsonl")))
    assert out.column("_reason").null_count == 1


def test_a_transient_error_mid_unit_resumes_the_unit_after_the_last_row_read(
    tmp_path, monkeypatch
):
    pq.write_table(pa.table({"id": list(range(30)), "text": ["t"] * 30}),
                   tmp_path / "a.parquet", row_group_size=10)
    real = read._READERS["parquet"]
    failures = []

    def flaky(unit, spec, bounds):
        for i, (table, first) in enumerate(real(unit, spec, bounds)):
            if i == 1 and len(failures) < 2:  # the store drops twice, mid-file
                failures.append(i)
                raise OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7")
            yield table, first

    monkeypatch.setattr(read, "READ_BATCH_ROWS", 10)
    monkeypatch.setitem(read._READERS, "parquet", flaky)
    monkeypatch.setattr(errors.Backoff, "__init__", _fast_backoff(errors.Backoff.__init__))
    out = pa.concat_tables(read.read_units(pa.table({"unit": [str(tmp_path / "a.parquet")]}),
                                           _spec("parquet")))
    assert len(failures) == 2
    assert out.column("_row").to_pylist() == list(range(30))  # each row once, in order
    assert out.column("_id").to_pylist() == list(range(30))
    assert out.column("_reason").null_count == 30


def _fast_backoff(init):
    def fast(self, what, **kwargs):
        init(self, what, **kwargs | {"first_delay_s": 0.01})
    return fast


def test_corrupt_first_file_does_not_break_the_schema_probe(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(to_table(real_rows(2)), tmp_path / "b.parquet")
    spec = _spec("parquet")
    assert len(read.probe_schema(str(tmp_path / "a.parquet"), spec)) == 0  # next one probed
    assert "id" in read.probe_schema(str(tmp_path / "b.parquet"), spec).names


# --- a commit that fails after the fragment files were written ------------------------------


def _data_files(s3_server, uri: str) -> set[str]:
    fs = s3_server.filesystem()
    root = uri.removeprefix("s3://") + "/data"
    return {p.rsplit("/", 1)[-1] for p in fs.find(root)} if fs.exists(root) else set()


def _referenced(dataset: lance.LanceDataset) -> set[str]:
    return {f.path.rsplit("/", 1)[-1] for frag in dataset.get_fragments()
            for f in frag.data_files()}


@pytest.mark.slow
def test_failed_commit_leaves_nothing_visible_and_the_rerun_completes_and_cleans_up(
    s3_server, s3_prefix, ray_session, golden_dir, embedder, monkeypatch
):
    rows = real_rows(16, offset=500)
    _upload(s3_server, s3_prefix, "a.parquet", to_table(rows[:8]))
    _upload(s3_server, s3_prefix, "b.parquet", to_table(rows[8:]))
    out = s3_server.uri(s3_prefix, "out.lance")
    options = s3_server.storage_options
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet", output=out,
                         model=str(golden_dir), window_rows=4, write_batch_rows=4,
                         storage_options=options)
    real_commit = lance.LanceDataset.commit

    def failing_commit(uri, operation, **kwargs):
        if str(uri) == out:
            raise OSError("injected: the commit of the output failed")
        return real_commit(uri, operation, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(failing_commit))
    with pytest.raises(OSError, match="injected"):
        run(config)
    monkeypatch.undo()

    orphans = _data_files(s3_server, out)
    assert orphans, "the write stage wrote no fragment files before the commit"
    assert not Storage(options).lance_exists(out)  # nothing visible: no version committed
    with pytest.raises((OSError, ValueError)):
        lance.dataset(out, storage_options=options)

    summary = run(config)  # the rerun completes
    assert summary.rows_embedded == 16
    dataset = lance.dataset(out, storage_options=options)
    table = dataset.to_table()
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    _check_vectors(table, rows[::6], embedder)
    assert orphans <= _data_files(s3_server, out)  # the failed run's files are still there...
    assert not orphans & _referenced(dataset)  # ...but not part of any version

    compact(out, Storage(options), retain_days=0)  # embedjob compact removes the orphans
    assert _data_files(s3_server, out) == _referenced(lance.dataset(out, storage_options=options))
    assert lance.dataset(out, storage_options=options).count_rows() == 16


# --- output not writable or bucket missing: fails before any model loads -------------------


def _model_without_weights(golden_dir: Path, tmp_path: Path) -> str:
    """A model directory without weights: planning the run would fail on it."""
    model = tmp_path / "no-weights"
    shutil.copytree(golden_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "*.npz"))
    return str(model)


def _model_with_broken_weights(golden_dir: Path, tmp_path: Path) -> str:
    """Truncated weights: planning works, loading the model in an encode actor fails."""
    model = tmp_path / "broken-weights"
    shutil.copytree(golden_dir, model)
    (model / "model.safetensors").write_bytes(
        (golden_dir / "model.safetensors").read_bytes()[:100])
    return str(model)


def _missing_bucket() -> str:
    """A bucket name no test creates (SeaweedFS creates a bucket on a first write to it)."""
    return f"no-such-bucket-{uuid.uuid4().hex[:8]}"


def test_missing_output_bucket_fails_before_any_model_loads(
    s3_server, s3_prefix, ray_session, golden_dir, tmp_path
):
    _upload(s3_server, s3_prefix, "a.parquet", to_table(real_rows(2)))
    bucket = _missing_bucket()
    config = EmbedConfig(input=s3_server.uri(s3_prefix, "in/"), format="parquet",
                         output=f"s3://{bucket}/out.lance",
                         model=_model_without_weights(golden_dir, tmp_path),
                         storage_options=s3_server.storage_options)
    with pytest.raises(StorageError, match=f"bucket '{bucket}'.*does not exist"):
        run(config)


def test_check_writable_refuses_unwritable_locations(s3_server, s3_prefix, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot write to the location of"):
        Storage().check_writable(str(blocker / "out.lance"))
    options = s3_server.storage_options
    with pytest.raises(StorageError, match="does not exist"):
        Storage(options).check_writable(f"s3://{_missing_bucket()}/out.lance")
    wrong = options | {"aws_secret_access_key": "wrong-" + SECRET_KEY}
    with pytest.raises(StorageError, match="cannot (reach|write)") as caught:
        Storage(wrong).check_writable(s3_server.uri(s3_prefix, "out.lance"))
    assert SECRET_KEY not in str(caught.value)
    Storage(options).check_writable(s3_server.uri(s3_prefix, "out.lance"))  # writable: fine
    Storage().check_writable(str(tmp_path / "new" / "out.lance"))
    assert not [p for p in s3_server.filesystem().find(f"{s3_server.bucket}/{s3_prefix}")
                if ".embedjob-probe" in p]  # the probe cleans up after itself


# --- output paths stay where they were pointed ----------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [("s3://b/vectors/../../other/out.lance", "'..' key segment"),
     ("s3://b/vectors/./out.lance", "'.' key segment"),
     ("s3://b//out.lance", "'empty' key segment"),
     ("s3://b", "is a bucket"),
     ("s3://b/", "is a bucket"),
     ("gs://b/out.lance", "scheme 'gs://'"),
     ("file:///tmp/out.lance", "scheme 'file://'"),
     ("s3://b/out\x00.lance", "control characters"),
     ("s3://b/out\\..\\x.lance", "backslashes"),
     ("s3://b/corpus/out.lance", "overlaps the input"),
     ("s3://b/corpus", "overlaps the input")],
)
def test_validate_output_uri_refuses_paths_outside_what_was_named(uri, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        storage.validate_output_uri(uri, input_uri="s3://b/corpus/")


def test_validate_output_uri_accepts_plain_outputs(tmp_path):
    for uri, source in [("s3://b/vectors/out.lance", "s3://b/corpus/"),
                        ("s3://b/corpus-vectors.lance", "s3://b/corpus/*.parquet"),
                        ("s3://b/out.rejected.lance", "s3://b/in/part-*.parquet"),
                        (str(tmp_path / "out.lance"), str(tmp_path / "in.parquet")),
                        ("../out.lance", "in/")]:
        assert storage.validate_output_uri(uri, input_uri=source) == uri
    with pytest.raises(ConfigError, match="overlaps"):
        storage.validate_output_uri(str(tmp_path / "in" / "o.lance"), input_uri=str(tmp_path))
    with pytest.raises(ConfigError, match="overlaps"):  # a glob's directory is the input
        storage.validate_output_uri("s3://b/in/o.lance", input_uri="s3://b/in/part-*.parquet")


# --- transient errors: one named list, bounded retries --------------------------------------


def test_retry_transient_retries_only_transient_errors_and_gives_up_in_bounded_time():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject: curlCode: 7")
        return "ok"

    assert errors.retry_transient(flaky, what="put", first_delay_s=0.01) == "ok"
    assert len(calls) == 3

    def broken():
        raise OSError("Parquet magic bytes not found")

    with pytest.raises(OSError, match="magic"):  # not transient: raised at once
        errors.retry_transient(broken, what="read", first_delay_s=0.01)

    started = time.monotonic()
    with pytest.raises(TransientGiveUpError, match=r"commit of s3://b/o\.lance still failing"):
        errors.retry_transient(lambda: (_ for _ in ()).throw(ConnectionRefusedError("down")),
                               what="commit of s3://b/o.lance", budget_s=0.5,
                               first_delay_s=0.05)
    assert time.monotonic() - started < 2.0


# --- security: secrets never printed; checkpoints never unpickled ---------------------------


class _Marker:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_pickle_beside_the_safetensors_is_never_loaded(golden_dir, tmp_path):
    from embedjob.model import load_embedder

    model = tmp_path / "model"
    shutil.copytree(golden_dir, model)
    marker = tmp_path / "pickle-was-loaded"
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (model / name).write_bytes(pickle.dumps(_Marker(str(marker))))
    embedder = load_embedder(str(model))
    assert embedder.encode(["still works"], task=TASK).shape == (1, 64)
    assert not marker.exists()


def _read_bounded(path: Path, limit: int = 8 << 20) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", "replace")


def _logs_with(logs_dir: Path, secret: str) -> list[str]:
    found = []
    for path in sorted(logs_dir.rglob("*")):
        if path.is_file() and not path.is_symlink() and secret in _read_bounded(path):
            found.append(str(path))
    return found


@pytest.mark.slow
def test_the_secret_key_appears_in_no_log_summary_message_or_metadata(
    s3_server, s3_prefix, ray_session, golden_dir, tmp_path
):
    _upload(s3_server, s3_prefix, "a.parquet", to_table(real_rows(6)))
    env = os.environ | s3_server.env | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    embedjob = str(Path(sys.executable).parent / "embedjob")
    out = s3_server.uri(s3_prefix, "out.lance")
    summary = tmp_path / "summary.json"
    base = [embedjob, "embed", "--input", s3_server.uri(s3_prefix, "in/"), "--format",
            "parquet", "--summary-json", str(summary)]
    ok = subprocess.run(base + ["--output", out, "--model", str(golden_dir)], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # failures: one at planning (missing bucket), one inside a Ray actor (no weights)
    bucket = _missing_bucket()
    no_bucket = subprocess.run(
        base + ["--output", f"s3://{bucket}/o.lance", "--model", str(golden_dir)],
        env=env, capture_output=True, text=True, timeout=300)
    assert no_bucket.returncode != 0 and f"bucket {bucket!r}" in no_bucket.stderr
    broken = subprocess.run(
        base + ["--output", s3_server.uri(s3_prefix, "broken.lance"), "--model",
                _model_with_broken_weights(golden_dir, tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "deserializing header" in broken.stderr

    texts = [ok.stdout, ok.stderr, no_bucket.stdout, no_bucket.stderr, broken.stdout,
             broken.stderr, summary.read_text()]
    for uri in (out, s3_server.uri(s3_prefix, "out.rejected.lance")):
        dataset = lance.dataset(uri, storage_options=s3_server.storage_options)
        texts.append(json.dumps({k.decode(): v.decode()
                                 for k, v in (dataset.schema.metadata or {}).items()}))
        texts.append(json.dumps(dataset.metadata))
    for text in texts:
        assert SECRET_KEY not in text
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    assert any(logs.iterdir())
    assert _logs_with(logs, SECRET_KEY) == []


# --- the S3 server stopped mid-run and restarted --------------------------------------------


class _Weed:
    """A SeaweedFS of this test's own (the session server must keep running)."""

    def __init__(self, root: Path) -> None:
        from tests import conftest

        self.root, self.conftest = root, conftest
        creds = root / "s3.json"
        creds.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": conftest.ACCESS_KEY,
                                             "secretKey": conftest.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        base = conftest._free_base()
        ports = {"master": base, "volume": base + 1, "filer": base + 2, "s3": base + 3,
                 "admin": base + 4, "webdav": base + 5}
        (root / "data").mkdir()
        self.cmd = [conftest._weed(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1", f"-s3.config={creds}"] + [
            f"-{name}.port={port}" for name, port in ports.items()]
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        self.server = conftest.S3Server(
            endpoint=endpoint, bucket=conftest.BUCKET,
            storage_options={"aws_access_key_id": conftest.ACCESS_KEY,
                             "aws_secret_access_key": conftest.SECRET_KEY,
                             "aws_endpoint": endpoint, "aws_region": "us-east-1",
                             "allow_http": "true"}, env={})
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.root / "weed.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.root)
        self.conftest._wait_ready(self.server, self.proc, log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)


@pytest.mark.slow
def test_s3_server_restarted_mid_run_ends_exactly_once_or_fails_clearly_and_reruns(
    ray_session, golden_dir, embedder, tmp_path
):
    import threading

    weed = _Weed(tmp_path)
    weed.start()
    try:
        server, options = weed.server, weed.server.storage_options
        rows = []
        for f in range(8):
            part = real_rows(6, offset=600 + 6 * f)
            rows += part
            _upload(server, "outage", f"part-{f}.parquet", to_table(part))
        out = server.uri("outage", "out.lance")
        config = EmbedConfig(input=server.uri("outage", "in/"), format="parquet", output=out,
                             model=str(golden_dir), window_rows=3, write_batch_rows=3,
                             commit_interval_s=0.2, storage_options=options)
        outcome: dict = {}

        def first_run() -> None:
            try:
                outcome["summary"] = run(config, encoder=FaultyEncodeActor)
            except Exception as exc:  # judged below: it must be a clear message
                outcome["error"] = exc

        with faults.injected(faults.ENCODE_DELAY_S, "0.4"):
            thread = threading.Thread(target=first_run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and thread.is_alive():
                if Storage(options).lance_exists(out):
                    break
                time.sleep(0.2)
            assert thread.is_alive(), f"the run ended before the outage: {outcome}"
            weed.stop()
            time.sleep(3)
            weed.start()
            thread.join(timeout=240)
        assert not thread.is_alive(), "the run neither finished nor failed within 4 minutes"
        if "error" in outcome:  # a clear failure; then a rerun resumes and completes
            assert str(outcome["error"]), outcome["error"]
            print(f"outage: the run failed ({outcome['error']!r}); rerunning")
            run(config)
        else:
            print("outage: the run survived it")
        table = lance.dataset(out, storage_options=options).to_table()
        assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
        _check_vectors(table, rows[::9], embedder)
    finally:
        weed.stop()
