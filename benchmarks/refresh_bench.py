"""Refresh cost benchmark (not a test): a full embed, then four nightly refreshes in turn.

    .venv/bin/python benchmarks/refresh_bench.py [--rows 100000] [--files 100]
        [--model-config small | --noop] [--texts real|short]

Scenarios (each on the corpus the previous one left):

- ``nothing``: nothing changed;
- ``changed``: 1% of the texts changed, all in 1% of the files (every text of those files);
- ``deleted``: 1% of the ids deleted (half the rows of 2% of the files);
- ``new``: 1% new rows, in new files (1% more files).

Per scenario it prints the wall time, the rows through the encode stage, the bytes read from
the input (the listed sizes of the files the refresh read: it reads a file whole or not at
all), the bytes read from the output (Lance's own ``bytes_read`` of the diff's two output
scans, replayed with ``analyze_plan`` at the version the refresh started from), and the
versions created (all, and data versions: those carrying a run record), then one JSON line.
``--noop`` uses the scale benchmark's no-op encoder and the tiny shape (the pipeline's own
costs), the default the random-weight 6 x 384 ``small`` shape. ``--texts short`` gives that
model the scale benchmark's short rows (about 10 tokens each; the no-op encoder always gets
them) instead of real corpus text (about 90 tokens a row on average).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from embedjob import schema as S
from embedjob.bench import make_corpus, model_dir
from embedjob.bench.scale import NoopEncodeActor, write_short_corpus
from embedjob.config import EmbedConfig
from embedjob.driver import preflight, progress
from embedjob.driver.run import run
from embedjob.ops.refresh import dirty_units, refresh
from embedjob.stages.diff import lineage_filter
from embedjob.stages.read import unit_file

SIZE = re.compile(r"bytes_read=([0-9.]+)\s*([KMGT]?)")
SCALE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def change_texts(corpus: Path, files: list[Path]) -> int:
    """Every text of ``files`` changed (same ids, same rows)."""
    for path in files:
        _rewrite(path, lambda t: t.set_column(
            t.schema.get_field_index("text"), "text",
            pc.binary_join_element_wise(t.column("text"), " (revised)", "")))
    return sum(pq.read_metadata(p).num_rows for p in files)


def delete_half(files: list[Path]) -> int:
    """Drop every second row of ``files``."""
    deleted = 0
    for path in files:
        table = pq.read_table(path)
        deleted += table.num_rows - (table.num_rows + 1) // 2
        pq.write_table(table.take(np.arange(0, table.num_rows, 2)), path)
    return deleted


def add_files(corpus: Path, rows: int, files: int, first_id: int, short: bool) -> int:
    """``files`` new files holding ``rows`` new rows (ids from ``first_id``)."""
    staging = corpus.parent / "new-files"
    if short:
        paths = write_short_corpus(staging, rows=rows, files=files, first_id=first_id)
    else:
        made = make_corpus(staging, rows=rows, long_fraction=0.0, seed=7, files=files)
        paths = sorted(Path(made.path).glob("*.parquet"))
        for path in paths:
            _rewrite(path, lambda t: t.set_column(0, "id", pc.add(t.column("id"), first_id)))
    for i, path in enumerate(paths):
        path.rename(corpus / f"zz-new-{first_id}-{i:04d}.parquet")
    return rows


def output_bytes(config: EmbedConfig, version: int, files: list[str], new_ids) -> int:
    """Bytes Lance reads for the diff's output scans: the lineage rows of ``files`` and the
    id-index lookup of the ids not held under that lineage."""
    dataset = lance.dataset(config.output, version=version)
    scans = []
    if files:
        scans.append(dataset.scanner(columns=[S.OUT_ID, S.CONTENT_HASH, S.SOURCE_FILE,
                                              S.SOURCE_ROW], filter=lineage_filter(files),
                                     with_row_address=True))
    if len(new_ids):
        scans.append(dataset.scanner(columns=[S.OUT_ID, S.CONTENT_HASH, S.SOURCE_FILE,
                                              S.SOURCE_ROW],
                                     filter=pc.field(S.OUT_ID).isin(new_ids),
                                     with_row_address=True))
    return int(sum(float(n) * SCALE[u] for scan in scans
                   for n, u in SIZE.findall(scan.analyze_plan())))


def scenario(name: str, config: EmbedConfig, encoder, new_ids=()) -> dict:
    """One refresh, measured."""
    plan = preflight.plan_run(EmbedConfig(**{**config.__dict__, "mode": "append"}))
    dataset = lance.dataset(config.output)
    _, done, ranges = progress.committed_units(dataset)
    dirty = dirty_units(plan.sources, plan.fingerprints, done, ranges)
    sizes = {str(p): p.stat().st_size for p in Path(config.input).glob("*.parquet")}
    read_files = sorted({unit_file(u) for u in dirty.units})
    before = dataset.version
    started = time.perf_counter()
    summary = refresh(config, encoder=encoder)
    wall = time.perf_counter() - started
    after = lance.dataset(config.output)
    data_versions = sum(
        1 for v in range(before + 1, after.version + 1)
        if S.TX_RUN_KEY in (after.read_transaction(v).transaction_properties or {}))
    ids = pa.array(list(new_ids), pa.int64())
    return {"scenario": name, "wall_s": round(wall, 2), "rows_encoded": summary.rows_embedded,
            "rows_read": summary.rows_read, "rows_deleted": summary.rows_deleted,
            "input_files_read": len(read_files),
            "input_bytes_read": sum(sizes.get(f, 0) for f in read_files),
            "output_bytes_read": output_bytes(config, before, dirty.files, ids),
            "versions": after.version - before, "data_versions": data_versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--model-config", default="small")
    parser.add_argument("--noop", action="store_true", help="no-op encoder, tiny shape")
    parser.add_argument("--texts", choices=["real", "short"], default="real",
                        help="real corpus text or the scale benchmark's short rows")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="refresh-bench-"))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    encoder = NoopEncodeActor if args.noop else None
    model = str(model_dir("tiny" if args.noop else args.model_config))
    corpus = workdir / "corpus"
    short = args.noop or args.texts == "short"
    if short:
        write_short_corpus(corpus, rows=args.rows, files=args.files)
    else:
        make_corpus(corpus, rows=args.rows, long_fraction=0.0, seed=0, files=args.files)
    config = EmbedConfig(input=str(corpus), format="parquet", output=str(workdir / "o.lance"),
                         model=model, cpus_per_actor=2.0, dims=(), lease_ttl_s=600)
    started = time.perf_counter()
    full = run(config, encoder=encoder)
    full_s = time.perf_counter() - started
    files = sorted(corpus.glob("*.parquet"))
    step = max(1, args.files // 100)
    results = [scenario("nothing", config, encoder)]
    change_texts(corpus, files[:step])
    results.append(scenario("changed", config, encoder))
    delete_half(files[step:step + 2 * step])
    results.append(scenario("deleted", config, encoder))
    first = args.rows * 10
    added = add_files(corpus, args.rows // 100, step, first, short)
    results.append(scenario("new", config, encoder, new_ids=range(first, first + added)))
    table_bytes = sum(f.stat().st_size for f in (workdir / "o.lance").rglob("*") if f.is_file())
    print(f"full embed of {args.rows:,} rows in {args.files} files: {full_s:.1f} s "
          f"({full.rows_embedded:,} rows encoded); output {table_bytes / 2**20:,.1f} MiB; "
          f"load average {os.getloadavg()[0]:.1f}")
    for r in results:
        print(f"{r['scenario']:8s} {r['wall_s']:7.1f} s ({r['wall_s'] / full_s:.3f} of the "
              f"full embed), {r['rows_encoded']:,} rows encoded, {r['input_files_read']} "
              f"files / {r['input_bytes_read'] / 2**20:,.2f} MiB read from the input, "
              f"{r['output_bytes_read'] / 2**20:,.2f} MiB from the output, {r['versions']} "
              f"versions ({r['data_versions']} data)")
    print(json.dumps({"rows": args.rows, "files": args.files, "noop": args.noop,
                      "texts": "short" if short else "real",
                      "full_embed_s": round(full_s, 2), "output_bytes": table_bytes,
                      "scenarios": results}))


if __name__ == "__main__":
    main()
