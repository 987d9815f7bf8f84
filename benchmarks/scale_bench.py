"""Scale benchmark (not a test): the pipeline's own costs per 10x of rows, with a no-op
encoder (``--encoder tiny`` for the random-weight 2 x 64 model).

    .venv/bin/python benchmarks/scale_bench.py rows --rows 100000,1000000
    .venv/bin/python benchmarks/scale_bench.py files --files 2000,20000 --rows-per-file 10
    .venv/bin/python benchmarks/scale_bench.py bigfile --rows 2000000 --row-group-rows 65536
    .venv/bin/python benchmarks/scale_bench.py shard --rows 1000000,10000000

``shard``: the duplicate-id state alone (one ``IdShard`` in this process, no Ray): numpy
bytes and RSS growth per row while scanning, the peak while resolving, and the former
single registry's dict for comparison.

``rows``: short rows in files of ``--rows-per-file`` (10,000, the issue's 1e9-row shape);
``files``: many small files; ``bigfile``: one Parquet file of 64k-row row groups. Each run
prints wall time, rows/s, the driver's and the largest Ray worker's peak RSS (VmRSS of every
process sampled every 0.5 s, also printed per role: IdShard, read, tokenize, encode actor,
write, raylet, ...), the duplicate-id shards' numpy bytes per row, the requests to the store
per input file (``--store s3``: counted by a proxy in front of a SeaweedFS server; ``local``:
n/a),
the last manifest's bytes and the data files written. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from embedjob.bench import model_dir
from embedjob.bench.scale import (
    HeapSnapshots,
    NoopEncodeActor,
    ProcessSampler,
    counting_s3,
    dict_bytes_per_id,
    output_figures,
    record,
    shard_bytes_per_row,
    upload,
    write_short_corpus,
)
from embedjob.config import EmbedConfig
from embedjob.driver import run as run_module


def one_run(name: str, corpus: Path, files: int, args, s3=None) -> dict:
    """Embed ``corpus`` once; the figures of that run."""
    out = Path(tempfile.mkdtemp(prefix="embedjob-scale-out-")) / "out.lance"
    options: dict[str, str] = {}
    source = str(corpus)
    if s3 is not None:
        source = upload(s3, sorted(corpus.glob("*.parquet")), "corpus", name)
        options = s3.options
        before = s3.requests("corpus")
    config = EmbedConfig(input=source, format="parquet", output=str(out),
                         model=str(model_dir("tiny")), num_actors=1, cpus_per_actor=1.0,
                         storage_options=options, id_shards=args.id_shards,
                         assume_unique_ids=args.assume_unique_ids,
                         read_unit_bytes=args.read_unit_bytes, read_tasks=args.read_tasks)
    shard_bytes: list[int] = []
    encoder = NoopEncodeActor if args.encoder == "noop" else None
    with ProcessSampler() as sampler, HeapSnapshots(enabled=args.tracemalloc) as heap:
        summary, index = run_module.run_with_index(config, encoder=encoder)
        if index is not None:
            shard_bytes = index.nbytes()
    heap.show()
    extra = output_figures(str(out)) | {
        "shard_bytes_after": sum(shard_bytes), "rows_duplicate": summary.rows_duplicate,
        "rows_embedded": summary.rows_embedded}
    if s3 is not None:
        after = s3.requests("corpus")
        spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        extra |= {"input_requests": spent,
                  "input_requests_per_file": round(sum(spent.values()) / files, 2)}
    else:
        extra["input_requests_per_file"] = "n/a (local files)"
    shutil.rmtree(out.parent, ignore_errors=True)
    return record(name, summary, sampler, files, extra)


def show(r: dict) -> None:
    print(f"{r['run']:>22}  rows {r['rows']:>9,}  files {r['files']:>6,}  "
          f"{r['wall_s']:>8.1f} s  {r['rows_per_s']:>9,.0f} rows/s  "
          f"driver {r['driver_peak_mib']:>7.1f} MiB  "
          f"largest worker {r['largest_worker_peak_mib']:>7.1f} MiB ({r['largest_worker']}), "
          f"private {r['largest_worker_private_mib']:>7.1f} MiB "
          f"({r['largest_worker_private']})  "
          f"req/file {r['input_requests_per_file']}  "
          f"manifest {r['manifest_bytes']:,} B  data files {r['data_files']}", flush=True)
    print("    driver peak MiB by kind: " + ", ".join(
        f"{k} {v}" for k, v in r["driver_peak_kinds_mib"].items())
        + f"; MiB by tenth of the run {r['driver_mib_by_tenth']}", flush=True)
    print("    peak MiB by role: " + ", ".join(f"{k} {v}" for k, v in
                                               r["peak_mib_by_role"].items()), flush=True)
    for p in r["largest_processes"]:
        print(f"    pid {p['pid']}: peak {p['peak_mib']} MiB as {p['role_at_peak']} (private "
              f"{p['private_peak_mib']} MiB); roles {' -> '.join(p['roles'])}; MiB by tenth "
              f"of its life {p['rss_mib_by_tenth']}, private {p['private_mib_by_tenth']}",
              flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("series", choices=["rows", "files", "bigfile", "shard"])
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--files", default="2000,20000")
    parser.add_argument("--row-group-rows", type=int, default=65536)
    parser.add_argument("--read-unit-bytes", type=int, default=64 << 20,
                        help="the run's --read-unit-bytes (bigfile: below the file's size "
                             "to read it as several units)")
    parser.add_argument("--read-tasks", type=int, default=EmbedConfig.read_tasks,
                        help="the run's --read-tasks (blocks of the unit list)")
    parser.add_argument("--store", choices=["local", "s3"], default="local")
    parser.add_argument("--encoder", choices=["noop", "tiny"], default="noop")
    parser.add_argument("--id-shards", type=int, default=None)
    parser.add_argument("--assume-unique-ids", action="store_true")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the driver's Python heap; print its largest holders at "
                             "the traced peak")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: the machine's)")
    args = parser.parse_args(argv)
    if args.series == "shard":
        return shard_series(args)

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    work = Path(tempfile.mkdtemp(prefix="embedjob-scale-"))
    results = []
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    store = counting_s3(weed) if args.store == "s3" else None
    try:
        s3 = store.__enter__() if store is not None else None
        for name, corpus, files in _corpora(args, work):
            started = time.monotonic()
            results.append(one_run(name, corpus, files, args, s3))
            show(results[-1])
            shutil.rmtree(corpus, ignore_errors=True)
            print(f"    ({time.monotonic() - started:.0f} s with the upload)", flush=True)
    finally:
        if store is not None:
            store.__exit__(None, None, None)
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"series": args.series, "store": args.store, "encoder": args.encoder,
                      "cpus": os.cpu_count(), "runs": results}))
    return 0


def shard_series(args) -> int:
    runs = []
    for rows in (int(float(x)) for x in args.rows.split(",")):
        for string_ids in (False, True):
            runs.append(shard_bytes_per_row(rows, string_ids=string_ids)
                        | {"ids": "string" if string_ids else "int64"})
            print(json.dumps(runs[-1]), flush=True)
        runs.append({"rows": rows, "former_dict_registry_bytes_per_id": dict_bytes_per_id(rows)})
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"series": "shard", "runs": runs}))
    return 0


def _write_apart(directory: Path, **kwargs) -> None:
    """``write_short_corpus`` in a child process: the driver's memory figures are the run's,
    not the heap of building 2e6 texts (which glibc keeps after they are freed)."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=write_short_corpus, args=(directory,), kwargs=kwargs)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"writing the corpus {directory} failed (exit {child.exitcode})")


def _corpora(args, work: Path):
    """(name, directory, files) of each corpus of the series, written just before its run
    (in a child process)."""
    if args.series == "rows":
        for rows in (int(float(x)) for x in args.rows.split(",")):
            files = max(1, rows // args.rows_per_file)
            corpus = work / f"rows-{rows}"
            _write_apart(corpus, rows=rows, files=files)
            yield f"rows={rows:.0e}", corpus, files
    elif args.series == "files":
        for files in (int(float(x)) for x in args.files.split(",")):
            corpus = work / f"files-{files}"
            _write_apart(corpus, rows=files * args.rows_per_file, files=files)
            yield f"files={files}", corpus, files
    else:
        rows = int(float(args.rows.split(",")[0]))
        corpus = work / "bigfile"
        _write_apart(corpus, rows=rows, files=1, row_group_rows=args.row_group_rows)
        yield f"one file, {rows:.0e} rows", corpus, 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
