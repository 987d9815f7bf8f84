"""``--limit N`` embeds the first N input rows into a real, stamped table; ``--dry-run`` runs
every preflight check and prints the plan without loading a model or writing anything."""

from __future__ import annotations

import lance
import numpy as np
import pytest

from embedjob import cli
from embedjob.config import EmbedConfig
from embedjob.driver.progress import read_record
from embedjob.driver.run import run
from embedjob.storage import Storage
from tests.pipeline_helpers import recorded_units, vectors_by_id, write_parts

pytestmark = pytest.mark.pipeline


def test_limit_embeds_the_first_rows_across_files(tmp_path, ray_session, golden_dir,
                                                  embedder) -> None:
    rows = write_parts(tmp_path / "in", files=3, rows_per_file=6)  # ids 0..17, in file order
    out = tmp_path / "out.lance"
    summary = run(EmbedConfig(input=str(tmp_path / "in"), format="parquet", output=str(out),
                              model=str(golden_dir), limit=8))
    table = lance.dataset(str(out)).to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(8))  # file 1 whole, 2 of file 2
    assert summary.rows_read == summary.rows_embedded == 8
    stamp = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert stamp["embedjob.limit"] == "8"
    assert read_record(str(out), Storage()).complete
    assert len(recorded_units(str(out))[1]) == 2  # both units finished
    got = vectors_by_id(table)
    for row in (rows[0], rows[7]):
        expected = embedder.encode([row["text"]], task="retrieval.passage")[0]
        assert np.abs(got[row["id"]] - expected).max() < 1e-5


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, golden_dir, capsys) -> None:
    write_parts(tmp_path / "in", files=2, rows_per_file=5)
    out = tmp_path / "out.lance"
    code = cli.main(["embed", "--input", str(tmp_path / "in"), "--format", "parquet",
                     "--output", str(out), "--model", str(golden_dir), "--dims", "64,16",
                     "--limit", "7", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.startswith("embedjob embed: 2 parquet input unit(s), 7 rows to read\n")
    assert f"model   {golden_dir} (task retrieval.passage, dims 64,16, float32" in printed
    assert "limit   the first 7 rows only" in printed
    assert printed.rstrip().endswith("dry run: every check passed; no model loaded, nothing "
                                     "written (drop --dry-run to embed the first 7 rows)")
    assert not out.exists() and not (tmp_path / "out.rejected.lance").exists()


def test_dry_run_still_refuses_a_bad_dim(tmp_path, golden_dir, capsys) -> None:
    write_parts(tmp_path / "in", files=1, rows_per_file=3)
    code = cli.main(["embed", "--input", str(tmp_path / "in"), "--format", "parquet",
                     "--output", str(tmp_path / "o.lance"), "--model", str(golden_dir),
                     "--dims", "48", "--dry-run"])
    assert code == 2
    assert "dim 48 not in matryoshka dims [8, 16, 32, 64]" in capsys.readouterr().err
