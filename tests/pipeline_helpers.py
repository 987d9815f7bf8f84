"""Corpus and checks shared by the pipeline-tier tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "embedjob" / "data" / "udhr_sample.parquet"


def real_rows(n: int, offset: int = 0) -> list[dict]:
    """n real multilingual UDHR paragraphs with integer ids offset+0..offset+n-1."""
    table = pq.read_table(SAMPLE).slice(offset, n)
    return [
        {"id": offset + i, "text": row["text"], "lang": row["lang"]}
        for i, row in enumerate(table.to_pylist())
    ]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "id": pa.array([r["id"] for r in rows], pa.int64()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        "lang": pa.array([r.get("lang") for r in rows], pa.string()),
    })


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def vectors_by_id(table: pa.Table, column: str = "vector") -> dict:
    ids = table.column("id").to_pylist()
    values = np.asarray(table.column(column).to_pylist(), dtype=np.float32)
    return dict(zip(ids, values, strict=True))


def write_parts(directory: Path, files: int, rows_per_file: int) -> list[dict]:
    """``files`` parquet files of real rows with consecutive integer ids; returns the rows."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in range(files):
        part = real_rows(rows_per_file, offset=rows_per_file * f)
        pq.write_table(to_table(part), directory / f"p{f}.parquet")
        rows += part
    return rows


def recorded_units(uri: str, storage_options: dict | None = None) -> tuple[str, dict, dict]:
    """(run key, unit -> fingerprint, unit -> key range) that the latest run's commits
    recorded in their transaction properties, complete or not."""
    import lance

    from embedjob.driver import progress

    return progress.committed_units(lance.dataset(uri, storage_options=storage_options))


def interrupt(uri: str, keep, storage_options: dict | None = None) -> tuple[dict, dict]:
    """Make the output look as if its run had died with only the units ``keep(unit)``
    accepts done: one empty commit recording a fresh run start with those units (the newest
    run record wins). Returns every unit the run had recorded and their key ranges."""
    import lance
    from lance.dataset import Transaction

    from embedjob.driver import progress

    key, done, ranges = recorded_units(uri, storage_options)
    finished = {u: (fp, ranges.get(u)) for u, fp in done.items() if keep(u)}
    dataset = lance.dataset(uri, storage_options=storage_options)
    transaction = Transaction(
        read_version=dataset.version, operation=lance.LanceOperation.Append([]),
        transaction_properties=progress.commit_properties(key, finished, first=True,
                                                          last_run=None))
    lance.LanceDataset.commit(uri, transaction, storage_options=storage_options)
    return done, ranges


def write_halves(path: Path, rows: list[dict]) -> None:
    """The corpus at ``path`` (replacing its Parquet files) as two files, a.parquet and
    b.parquet, each holding half of ``rows``."""
    path.mkdir(exist_ok=True)
    for old in path.glob("*.parquet"):
        old.unlink()
    half = len(rows) // 2
    pq.write_table(to_table(rows[:half]), path / "a.parquet")
    pq.write_table(to_table(rows[half:]), path / "b.parquet")
