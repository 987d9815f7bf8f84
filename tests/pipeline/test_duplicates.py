"""Duplicate ids: the first row in (file order, row) order wins, whatever the scheduling.

The first file is much longer than the others, so with parallel reads its late rows reach
the tokenize stage after the later files' rows: a first-come rule would give other winners
from run to run. Winners are checked as exact (id, source_file, source_row) triples against
a plain walk over the files, across actor counts, window sizes, tokenize batch sizes and
shard counts, after an interrupted run is resumed, and with ``assume_unique_ids``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.stages.check import DUPLICATE_ID, EMPTY_TEXT, NULL_ID
from tests.faults import hooks as faults
from tests.faults.hooks import FaultyEncodeActor
from tests.pipeline_helpers import real_rows, vectors_by_id

pytestmark = pytest.mark.pipeline
SIZES = (160, 12, 12, 12, 12)  # rows per file: the first one is the long one
N_IDS = 90
FAIL_AFTER_CALLS = "EMBEDJOB_TEST_FAIL_AFTER_CALLS"


def _write_corpus(directory: Path) -> list[dict]:
    """Files part-0..4 with string ids drawn from N_IDS values (so most ids repeat, within
    and across files), one null id, and an empty text on the first row of one id."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(13)
    texts = real_rows(sum(SIZES))
    rows, offset = [], 0
    for f, size in enumerate(SIZES):
        part = []
        for r in range(size):
            drawn = int(rng.integers(N_IDS))
            # ids of the long file's tail come back in every later file
            part.append({"id": f"id-{drawn}", "text": texts[offset + r]["text"],
                         "file": f"part-{f}.parquet", "row": r})
        offset += size
        rows += part
    rows[3]["id"] = None
    first_of = {}
    for r in rows:
        first_of.setdefault(r["id"], r)
    first_of[rows[150]["id"]]["text"] = ""  # this id's winner is rejected for its text
    for f in range(len(SIZES)):
        part = [r for r in rows if r["file"] == f"part-{f}.parquet"]
        pq.write_table(pa.table({"id": pa.array([r["id"] for r in part], pa.string()),
                                 "text": pa.array([r["text"] for r in part], pa.string())}),
                       directory / f"part-{f}.parquet")
    return rows


def _expected(rows: list[dict]) -> tuple[set, dict]:
    """A plain walk: (id, file, row) of every embedded winner; reason per rejected row."""
    seen, embedded, rejected = set(), set(), {}
    for r in rows:  # rows are in (file, row) order
        where = (r["file"], r["row"])
        if r["id"] is None:
            rejected[where] = NULL_ID
        elif r["id"] in seen:
            rejected[where] = DUPLICATE_ID
        elif not r["text"]:
            seen.add(r["id"])
            rejected[where] = EMPTY_TEXT
        else:
            seen.add(r["id"])
            embedded.add((r["id"], *where))
    return embedded, rejected


def _found(config: EmbedConfig) -> tuple[set, dict]:
    table = lance.dataset(config.output).to_table(
        columns=["id", "source_file", "source_row"]).to_pylist()
    embedded = [(r["id"], Path(r["source_file"]).name, r["source_row"]) for r in table]
    assert len(embedded) == len(set(embedded))
    rejected = lance.dataset(config.rejected_uri).to_table().to_pylist()
    return set(embedded), {(Path(r["source"]).name, r["row"]): r["reason"] for r in rejected}


def _config(corpus: Path, out: Path, golden_dir, **kwargs) -> EmbedConfig:
    return EmbedConfig(input=str(corpus), format="parquet", output=str(out),
                       model=str(golden_dir), **kwargs)


def test_duplicate_id_winners_do_not_depend_on_actors_windows_batches_or_shards(
    ray_session, golden_dir, embedder, tmp_path
):
    rows = _write_corpus(tmp_path / "corpus")
    embedded, rejected = _expected(rows)
    assert len(embedded) < N_IDS < len(rows) - 60  # many duplicates, within and across files
    layouts = [
        dict(num_actors=1, window_rows=8, tokenize_batch_rows=4, write_batch_rows=16,
             id_shards=1),
        # read_tasks=2: the scan and the read each cut the unit list into 2 tasks
        dict(num_actors=2, window_rows=200, tokenize_batch_rows=64, write_batch_rows=64,
             id_shards=3, read_tasks=2),
    ]
    for i, layout in enumerate(layouts):
        config = _config(tmp_path / "corpus", tmp_path / f"o{i}.lance", golden_dir, **layout)
        summary = run(config)
        assert _found(config) == (embedded, rejected), layout
        duplicates = sum(1 for r in rejected.values() if r == DUPLICATE_ID)
        assert (summary.rows_duplicate, summary.rows_embedded) == (duplicates, len(embedded))
    texts = {(r["file"], r["row"]): r["text"] for r in rows}
    got = vectors_by_id(lance.dataset(config.output).to_table())
    for id_value, file, row in sorted(embedded)[::9]:
        expected = embedder.encode([texts[file, row]], task="retrieval.passage")[0]
        assert np.abs(got[id_value] - expected).max() < 1e-5


class FailingEncodeActor(FaultyEncodeActor):
    """Fails the run on its Nth call (``FAIL_AFTER_CALLS`` = "N:output"), once the output
    has a committed version: a crash after some commits."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        calls, _, self.output = (faults.value(FAIL_AFTER_CALLS) or "0:").partition(":")
        self.calls_left = int(calls)

    def __call__(self, table):
        self.calls_left -= 1
        if self.calls_left == 0:
            deadline = time.monotonic() + 120
            while not Path(self.output, "_versions").is_dir() and time.monotonic() < deadline:
                time.sleep(0.2)
            raise RuntimeError("simulated crash of the run")
        return super().__call__(table)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_resume_keeps_the_rule_for_duplicates_across_committed_and_redone_units(
    ray_session, golden_dir, tmp_path
):
    rows = _write_corpus(tmp_path / "corpus")
    config = _config(tmp_path / "corpus", tmp_path / "o.lance", golden_dir, window_rows=4,
                     write_batch_rows=4, commit_interval_s=0.1, id_shards=2)
    # one encode call per file (one read block each): the last one to arrive fails
    with (faults.injected(FAIL_AFTER_CALLS, f"{len(SIZES)}:{config.output}"),
          pytest.raises(Exception, match="simulated crash")):
        run(config, encoder=FailingEncodeActor)
    committed = lance.dataset(config.output).to_table(columns=["source_file"])
    done_files = {Path(f).name for f in committed.column("source_file").to_pylist()}
    assert done_files, "nothing was committed before the simulated crash"
    summary = run(config)
    assert 1 <= summary.resumed_units_done < len(SIZES)
    assert _found(config) == _expected(rows)


def test_assume_unique_ids_runs_no_pass_and_stores_every_repeat(
    ray_session, golden_dir, tmp_path
):
    rows = _write_corpus(tmp_path / "corpus")
    config = _config(tmp_path / "corpus", tmp_path / "o.lance", golden_dir,
                     assume_unique_ids=True)
    summary = run(config)
    stored = lance.dataset(config.output).to_table(columns=["id"]).column("id").to_pylist()
    valid = [r["id"] for r in rows if r["id"] is not None and r["text"]]
    assert sorted(stored) == sorted(valid) and summary.rows_duplicate == 0
    # how to notice: stored rows exceed distinct ids
    assert len(stored) - len(set(stored)) == len(valid) - len(set(valid)) > 0
