"""``embedjob``: a thin CLI over the Python API. Errors are translated here, once."""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.config import FORMATS, MODES, VECTOR_DTYPES, EmbedConfig, load_yaml
from jobs.storage import parse_storage_option
from model.errors import EmbedError

logger = logging.getLogger("embedjob")


def _embed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed a corpus into a Lance table",
                       argument_default=argparse.SUPPRESS)
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
    p.add_argument("--num-actors", dest="num_actors", type=int)
    p.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float)
    p.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float)
    p.add_argument("--cpus-per-task", dest="cpus_per_task", type=float)
    p.add_argument("--packed", action="store_true", help="pack sequences instead of padding")
    p.add_argument("--vector-dtype", dest="vector_dtype", choices=VECTOR_DTYPES)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--summary-json", dest="summary_json")
    p.add_argument("--rejected-output", dest="rejected_output")
    p.add_argument("--storage-option", dest="storage_option", action="append",
                   metavar="KEY=VALUE", help="Lance/object_store key, repeatable")
    p.add_argument("--write-batch-rows", dest="write_batch_rows", type=int)
    p.add_argument("--commit-interval-s", dest="commit_interval_s", type=float)
    p.add_argument("--ray-address", dest="ray_address")


def embed_config(args: argparse.Namespace) -> EmbedConfig:
    """YAML values first, explicit flags over them."""
    values = vars(args).copy()
    values.pop("command", None)
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "embed":
            from jobs.run import run

            summary = run(embed_config(args))
            print(summary.line())
            print(_how_to_read(summary.output))
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
