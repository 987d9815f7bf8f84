"""Writer memory benchmark (not a test): one ``RowWriter`` (the write actor's state) driven in
this process, streaming N rows of full-size vectors into one open file; prints the process's
peak RSS growth over its baseline, per series point. Flat in N means the writer holds the
queue and Lance's buffers, not the file.

    .venv/bin/python benchmarks/writer_memory.py --rows 65536,262144 --dim 1024
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.stages.write import RowWriter, WriteSpec, batch_key


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _batch(start: int, rows: int, dim: int, schema: pa.Schema) -> pa.Table:
    vectors = np.random.default_rng(start).standard_normal((rows, dim), dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
    return pa.table({"id": pa.array(np.arange(start, start + rows)), "vector": column},
                    schema=schema)


def one_point(rows: int, dim: int, batch_rows: int, rows_per_file: int) -> dict:
    """Stream ``rows`` rows through one writer and flush; the figures."""
    schema = pa.schema([pa.field("id", pa.int64()),
                        pa.field("vector", pa.list_(pa.float32(), dim))])
    work = Path(tempfile.mkdtemp(prefix="embedjob-writer-"))
    spec = WriteSpec(output=str(work / "o.lance"), rejected_output=str(work / "r.lance"),
                     schema=schema, rows_per_file=rows_per_file)
    writer = RowWriter(spec)
    empty = pa.table({n: pa.array([], t) for n, t in zip(
        S.REJECTED_SCHEMA.names, S.REJECTED_SCHEMA.types, strict=True)})
    baseline = _rss_kib("VmRSS")
    peak, started = baseline, time.monotonic()
    for start in range(0, rows, batch_rows):
        n = min(batch_rows, rows - start)
        table = _batch(start, n, dim, schema)
        key = batch_key(pa.table({S.UNIT: ["u"] * n, S.ROW: pa.array(range(start, start + n))}))
        writer.append(key, table, empty, ["u"], [n])
        del table
        peak = max(peak, _rss_kib("VmRSS"))
    result = writer.flush().to_pylist()[0]
    peak = max(peak, _rss_kib("VmRSS"))
    wall = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "dim": dim, "batch_rows": batch_rows, "rows_per_file": rows_per_file,
            "files": len(result["main_fragments"]),
            "vector_bytes": rows * dim * 4,
            "rss_growth_mib": round((peak - baseline) / 1024, 1),
            "one_batch_mib": round(batch_rows * dim * 4 / 2**20, 1),
            "wall_s": round(wall, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="65536,262144")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--batch-rows", type=int, default=32768)
    parser.add_argument("--rows-per-file", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    runs = []
    for rows in (int(float(x)) for x in args.rows.split(",")):
        runs.append(one_point(rows, args.dim, args.batch_rows, args.rows_per_file))
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"series": "writer_memory", "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
