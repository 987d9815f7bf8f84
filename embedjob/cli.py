"""``embedjob``: a thin CLI over the Python API. Errors are translated here, once."""

from __future__ import annotations

import argparse
import logging
import sys

from embedjob.config import FORMATS, MODES, VECTOR_DTYPES, EmbedConfig, load_yaml
from embedjob.errors import EmbedError
from embedjob.storage import parse_storage_option

logger = logging.getLogger("embedjob")


def _embed_parser(sub: argparse._SubParsersAction, name: str = "embed") -> None:
    """``embed`` and ``refresh`` take the same options (refresh adds --keep-deleted)."""
    helps = {"embed": "embed a corpus into a Lance table",
             "refresh": "re-embed only new and changed rows, delete gone ones",
             "plan": "size a job from a sample of its input (rows, tokens, bytes, GPU-hours)"}
    p = sub.add_parser(name, help=helps[name], argument_default=argparse.SUPPRESS)
    if name == "refresh":
        p.add_argument("--keep-deleted", dest="keep_deleted", action="store_true",
                       help="keep rows whose ids are gone from the corpus")
    if name == "plan":
        p.add_argument("--sample-rows", dest="sample_rows", type=int, default=20000)
        p.add_argument("--tokens-per-s", dest="tokens_per_s", type=float, default=None,
                       help="throughput (default: the last `embedjob bench` here)")
    p.add_argument("--config", help="YAML file with the same keys as these options")
    p.add_argument("--input", help="file, directory/prefix or glob; local or s3://")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from extension)")
    p.add_argument("--output", help="Lance dataset URI, local or s3://")
    p.add_argument("--model", help="local dir, s3:// prefix or hub id "
                   "(default jinaai/jina-embeddings-v3)")
    p.add_argument("--task", help="model task (jina-v3 default: retrieval.passage)")
    p.add_argument("--dims", help="dims to store, e.g. 1024,256,64 (full dim always stored)")
    p.add_argument("--id-column", dest="id_column")
    p.add_argument("--text-column", dest="text_column")
    p.add_argument("--keep-columns", dest="keep_columns", help="comma-separated")
    p.add_argument("--max-tokens-per-batch", dest="max_tokens_per_batch", type=int)
    p.add_argument("--window-rows", dest="window_rows", type=int)
    p.add_argument("--batch-overhead-tokens", dest="batch_overhead_tokens", type=int,
                   help="cost of one more forward when cutting batches (default: 0 on CPU, "
                   "max-tokens-per-batch/16 on GPU)")
    p.add_argument("--num-actors", dest="num_actors", type=int)
    p.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float)
    p.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float)
    p.add_argument("--cpus-per-task", dest="cpus_per_task", type=float)
    p.add_argument("--actor-prefetch", dest="actor_prefetch", type=int,
                   help="blocks queued per encode actor (default 2)")
    p.add_argument("--tokenize-tasks", dest="tokenize_tasks", type=int,
                   help="most tokenize tasks at once (default: as CPUs allow; "
                   "`embedjob plan` measures what the actors need)")
    p.add_argument("--packed", action="store_true", help="pack sequences instead of padding")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--fail-fast", dest="fail_fast", action="store_true",
                   help="stop at the first unreadable file or broken line")
    p.add_argument("--vector-dtype", dest="vector_dtype", choices=VECTOR_DTYPES)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--summary-json", dest="summary_json")
    p.add_argument("--rejected-output", dest="rejected_output")
    p.add_argument("--storage-option", dest="storage_option", action="append",
                   metavar="KEY=VALUE", help="Lance/object_store key, repeatable")
    p.add_argument("--write-batch-rows", dest="write_batch_rows", type=int)
    p.add_argument("--commit-interval-s", dest="commit_interval_s", type=float)
    p.add_argument("--retain-days", dest="retain_days", type=float,
                   help="refresh: drop table versions older than this (default: keep all)")
    p.add_argument("--lease-ttl-s", dest="lease_ttl_s", type=float,
                   help="how long a crashed run's lease blocks a rerun (default 120)")
    p.add_argument("--ray-address", dest="ray_address")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from embedjob.bench import CONFIGS, RUNS, TASKS, BenchConfig

    d = BenchConfig()
    p = sub.add_parser("bench", help="benchmark: this pipeline vs the naive Ray Data recipe vs "
                       "the model-only bound (last line: one JSON object)")
    p.add_argument("--rows", type=int, default=d.rows,
                   help="corpus rows (default: 100 on cpu, 20000 on cuda)")
    p.add_argument("--seed", type=int, default=d.seed, help="corpus seed")
    p.add_argument("--long-fraction", dest="long_fraction", type=float,
                   default=d.long_fraction, help="rows of 7000-8190 tokens")
    p.add_argument("--files", type=int, default=d.files, help="parquet files of the corpus")
    p.add_argument("--model-config", dest="config", choices=list(CONFIGS), default=None,
                   help="random-weight jina-v3 shape (default: small on cpu, full on cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: all)")
    p.add_argument("--task", choices=TASKS, default=d.task)
    p.add_argument("--max-tokens-per-batch", dest="max_tokens_per_batch", type=int,
                   default=d.max_tokens_per_batch)
    p.add_argument("--window-rows", dest="window_rows", type=int, default=d.window_rows)
    p.add_argument("--naive-batch-rows", dest="naive_batch_rows", type=int,
                   default=d.naive_batch_rows)
    p.add_argument("--num-actors", dest="num_actors", type=int, default=d.num_actors)
    p.add_argument("--vector-dtype", dest="vector_dtype", choices=VECTOR_DTYPES,
                   default=d.vector_dtype)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--runs", type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
                   default=d.runs, help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--scaling", action="store_true",
                   help="also: 2 encode actors, and driver RSS at 1x vs 10x rows")
    p.add_argument("--workdir", help="keep corpus and outputs here (default: a temp dir)")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None,
                   help="GPU dense bf16 peak (default: from the device name)")


def _read_side_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the output Lance table, local or s3://")
    p.add_argument("--storage-option", dest="storage_option", action="append", default=[],
                   metavar="KEY=VALUE", help="Lance/object_store key, repeatable")


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="rows, versions, stamp, bytes per column, rejected rows, "
                       "last run of an output table")
    _read_side_options(p)
    p.add_argument("--json", action="store_true", help="print the info as JSON")


def _index_parser(sub: argparse._SubParsersAction) -> None:
    from embedjob.table.search import INDEX_TYPES

    p = sub.add_parser("index", help="build a cosine vector index on a vector column")
    _read_side_options(p)
    p.add_argument("--column", default="vector", help="vector or vector_<d>")
    p.add_argument("--type", dest="index_type", choices=INDEX_TYPES, default="IVF_PQ")
    p.add_argument("--num-partitions", dest="num_partitions", type=int,
                   help="IVF partitions (default round(sqrt(rows)))")
    p.add_argument("--num-sub-vectors", dest="num_sub_vectors", type=int,
                   help="PQ sub-vectors (default dim/16, else dim/8, ...)")


def _search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="embed a query as the table's queries are meant to be "
                       "embedded and print the nearest rows")
    _read_side_options(p)
    p.add_argument("query", help="query text")
    p.add_argument("--column", default="vector", help="vector or vector_<d>")
    p.add_argument("-k", type=int, default=10, help="rows to return")
    p.add_argument("--show", default="", help="comma-separated columns to print")
    p.add_argument("--model", help="query model (default: the table's embedjob.model_source)")
    p.add_argument("--nprobes", type=int, help="IVF partitions to probe")
    p.add_argument("--refine-factor", dest="refine_factor", type=int, default=1,
                   help="re-rank k x this many index candidates exactly (default 1: exact "
                   "scores)")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    from embedjob.table.eval import DATASETS

    p = sub.add_parser("eval", help="retrieval quality of every vector column on real data "
                       "(eval.json + eval.png)")
    p.add_argument("--dataset", action="append", choices=list(DATASETS), required=True,
                   help="repeatable")
    p.add_argument("--model", required=True, help="local dir, s3:// prefix or hub id")
    p.add_argument("--output-dir", dest="output_dir", required=True)
    p.add_argument("--work-dir", dest="work_dir", help="keep corpus tables here")
    p.add_argument("--dims", default="", help="dims to store (default: every Matryoshka dim)")
    p.add_argument("--vector-dtype", dest="vector_dtype", choices=VECTOR_DTYPES,
                   default="float32")
    p.add_argument("--num-actors", dest="num_actors", type=int, default=1)


def _storage(args: argparse.Namespace) -> dict[str, str]:
    return dict(parse_storage_option(p) for p in args.storage_option)


def _info(args: argparse.Namespace) -> None:
    from embedjob.table.info import format_info, table_info

    info = table_info(args.output, _storage(args))
    print(info.to_json() if args.json else format_info(info))


def _index(args: argparse.Namespace) -> None:
    from embedjob.table.search import build_index

    plan = build_index(args.output, column=args.column, index_type=args.index_type,
                       num_partitions=args.num_partitions, num_sub_vectors=args.num_sub_vectors,
                       storage_options=_storage(args))
    print(f"built {plan.index_type} ({plan.metric}) on {plan.column} (dim {plan.dim}, "
          f"{plan.rows} rows): {plan.num_partitions} partitions, "
          f"{plan.num_sub_vectors} sub-vectors")


def _search(args: argparse.Namespace) -> None:
    from embedjob.table.search import format_results, search

    show = tuple(c.strip() for c in args.show.split(",") if c.strip())
    found = search(args.output, args.query, column=args.column, k=args.k, show=show,
                   model=args.model, storage_options=_storage(args), nprobes=args.nprobes,
                   refine_factor=args.refine_factor)
    print(format_results(found))


def _eval(args: argparse.Namespace) -> None:
    from embedjob.table.eval import EvalConfig, evaluate, format_report

    report = evaluate(EvalConfig(
        datasets=tuple(args.dataset), model=args.model, output_dir=args.output_dir,
        work_dir=args.work_dir, dims=tuple(int(d) for d in args.dims.split(",") if d.strip()),
        vector_dtype=args.vector_dtype, num_actors=args.num_actors,
    ))
    print(format_report(report))


def _compact_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="compact small fragments and drop old table versions")
    p.add_argument("output", help="Lance table URI")
    p.add_argument("--retain-days", dest="retain_days", type=float, default=7.0,
                   help="keep table versions newer than this many days (default 7)")
    p.add_argument("--target-rows-per-fragment", dest="target_rows", type=int,
                   default=1024 * 1024)
    p.add_argument("--storage-option", dest="storage_option", action="append", default=[],
                   metavar="KEY=VALUE")


def embed_config(args: argparse.Namespace) -> EmbedConfig:
    """YAML values first, explicit flags over them."""
    values = vars(args).copy()
    values.pop("command", None)
    for key in ("keep_deleted", "sample_rows", "tokens_per_s"):
        values.pop(key, None)
    merged = load_yaml(values.pop("config")) if "config" in values else {}
    pairs = values.pop("storage_option", [])
    merged.update(values)
    if pairs:
        merged["storage_options"] = dict(parse_storage_option(p) for p in pairs)
    return EmbedConfig.from_mapping(merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedjob", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _embed_parser(sub)
    _embed_parser(sub, "refresh")
    _embed_parser(sub, "plan")
    _compact_parser(sub)
    _bench_parser(sub)
    _info_parser(sub)
    _index_parser(sub)
    _search_parser(sub)
    _eval_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "embed":
            from embedjob.driver.run import run

            summary = run(embed_config(args))
            print(summary.line())
            print(_how_to_read(summary.output))
        elif args.command == "compact":
            from embedjob.ops.compact import compact
            from embedjob.storage import resolve_storage_options

            options = resolve_storage_options(
                dict(parse_storage_option(p) for p in args.storage_option))
            print(compact(args.output, options, retain_days=args.retain_days,
                          target_rows_per_fragment=args.target_rows).line())
        elif args.command == "plan":
            from embedjob.ops.plan import size_job

            config = embed_config(argparse.Namespace(
                **{"output": "(not written by plan)", **vars(args)}))
            report = size_job(config, sample_rows=args.sample_rows,
                              tokens_per_s=args.tokens_per_s)
            print("\n".join(report.lines()))
        elif args.command == "refresh":
            from embedjob.ops.refresh import refresh

            summary = refresh(embed_config(args), keep_deleted=getattr(args, "keep_deleted",
                                                                       False))
            print(summary.line())
        elif args.command == "bench":
            import json

            from embedjob.bench import BenchConfig, bench
            from embedjob.ops.plan import record_bench

            values = {k: v for k, v in vars(args).items() if k != "command"}
            result = bench(BenchConfig(**values))
            record_bench(result)
            print(json.dumps(result))
        elif args.command == "info":
            _info(args)
        elif args.command == "index":
            _index(args)
        elif args.command == "search":
            _search(args)
        elif args.command == "eval":
            _eval(args)
    except EmbedError as exc:
        print(f"embedjob: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _how_to_read(output: str) -> str:
    return (
        "read it with:\n"
        f"  python -c \"import lance; t = lance.dataset('{output}').to_table(); "
        "print(t.num_rows, t.schema); print(t.slice(0, 3).to_pandas())\""
    )


if __name__ == "__main__":
    sys.exit(main())
