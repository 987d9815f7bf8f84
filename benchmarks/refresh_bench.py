"""Refresh cost benchmark (not a test): a nightly refresh with 1% of rows changed against
the full embed of the same corpus, plus how the unchanged-row check scales.

    .venv/bin/python benchmarks/refresh_bench.py [--rows 4000] [--model-config small]

Prints the two wall times and their ratio (goal: refresh <= 1/20 of the full embed), then
the per-batch lookup cost of the unchanged-row check on tables of 10k and 100k rows (a BTREE
index on ``id``; only ``id`` and ``content_hash`` are read, never the vectors), and ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from embedjob.bench import make_corpus, model_dir
from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.ops.refresh import ExistingRows, ensure_id_index, refresh


def change_one_percent(corpus: Path, seed: int) -> int:
    """Rewrite 1% of the rows' texts in place (same files, same ids)."""
    rng = np.random.default_rng(seed)
    changed = 0
    for path in sorted(corpus.glob("*.parquet")):
        table = pq.read_table(path)
        texts = table.column("text").to_pylist()
        picks = rng.choice(len(texts), max(1, len(texts) // 100), replace=False)
        for i in picks:
            texts[i] = texts[i] + " (revised)"
        changed += len(picks)
        table = table.set_column(table.schema.get_field_index("text"), "text",
                                 pa.array(texts, pa.string()))
        pq.write_table(table, path)
    return changed


def lookup_cost(rows: int, workdir: Path, batch: int = 1024) -> dict:
    """Seconds per ``batch``-row unchanged check on a table of ``rows`` rows."""
    uri = str(workdir / f"lookup-{rows}.lance")
    rng = np.random.default_rng(rows)
    vectors = rng.standard_normal((rows, 1024), dtype=np.float32)
    table = pa.table({
        "id": pa.array(np.arange(rows), pa.int64()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 1024),
        "content_hash": pa.array([f"{i:032x}" for i in range(rows)], pa.string()),
    })
    lance.write_dataset(table, uri, mode="overwrite", max_rows_per_file=65536)
    ensure_id_index(lance.dataset(uri))
    existing = ExistingRows(uri=uri, version=lance.dataset(uri).version, storage_options={})
    ids = rng.choice(rows, batch, replace=False).tolist()
    hashes = [f"{i:032x}" for i in ids]
    existing.mark(ids, hashes, [None] * batch)  # warm the dataset handle and index cache
    started = time.perf_counter()
    for _ in range(5):
        existing.mark(ids, hashes, [None] * batch)
    return {"table_rows": rows, "batch_rows": batch,
            "seconds_per_batch": round((time.perf_counter() - started) / 5, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--model-config", default="small")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="refresh-bench-"))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    model = str(model_dir(args.model_config))
    corpus = make_corpus(workdir / "corpus", rows=args.rows, long_fraction=0.0, seed=0,
                         files=8)
    config = EmbedConfig(input=corpus.path, format="parquet", output=str(workdir / "o.lance"),
                         model=model, mode="overwrite", cpus_per_actor=2.0, dims=())
    full = run(config)
    changed = change_one_percent(Path(corpus.path), seed=1)
    started = time.perf_counter()
    again = refresh(EmbedConfig(**{**config.__dict__, "mode": "create"}))
    refresh_s = time.perf_counter() - started
    result = {
        "rows": args.rows, "changed_rows": changed, "model_config": args.model_config,
        "full_embed_wall_s": full.wall_s, "refresh_wall_s": round(refresh_s, 3),
        "ratio": round(refresh_s / full.wall_s, 4),
        "refresh_rows": {"unchanged": again.rows_unchanged, "changed": again.rows_changed,
                         "new": again.rows_new, "deleted": again.rows_deleted},
        "unchanged_check": [lookup_cost(n, workdir) for n in (10_000, 100_000)],
    }
    print(f"full embed {full.wall_s:.1f} s, refresh ({changed} changed rows) "
          f"{refresh_s:.1f} s: ratio {result['ratio']:.3f} (goal <= 0.05)")
    for item in result["unchanged_check"]:
        print(f"unchanged check on {item['table_rows']:,} rows: "
              f"{item['seconds_per_batch'] * 1000:.1f} ms per {item['batch_rows']}-row batch")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
