"""``embedjob``: batch-embed a text corpus into Lance tables, refresh them nightly, read them.

The flags of every subcommand are generated from the fields of its options dataclass
(``config.knob`` metadata: help, which subcommands offer it, flag, metavar), so each knob is
defined once. Errors the project raises on purpose are printed as one line, here, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from embedjob.config import (
    CompactOptions,
    EmbedConfig,
    IndexOptions,
    InfoOptions,
    PlanOptions,
    RejectedOptions,
    SearchOptions,
    known_keys,
    load_yaml,
)
from embedjob.console import Console, RunView, setup_logging
from embedjob.errors import (
    BugError,
    ConfigError,
    EmbedError,
    RunStopped,
    did_you_mean,
    without_rust_paths,
)
from embedjob.model.weights import ConvertWeightsOptions
from embedjob.storage import Storage, parse_storage_option

logger = logging.getLogger("embedjob")
PLAN_OUTPUT = "(plan writes nothing)"
YAML_DEST = "yaml_config"  # where --config lands (bench has a field named config)
LOG_DIR_ENV = "EMBEDJOB_LOG_DIR"  # where the log files go (default: <tmp>/embedjob)
VERSION_DEPS = ("torch", "ray", "pylance", "lance-ray", "transformers", "peft", "pyarrow")
DESCRIPTION = """\
Embed a text corpus (Parquet, JSON lines, CSV or Lance; local or s3://) into a Lance table
of vectors with a transformer embedding model (jina-embeddings-v3 by default), on one machine
or a Ray cluster. Runs resume where they stopped; `refresh` re-embeds only what changed;
`search`, `info` and `eval` read the result."""
EPILOG = """\
start here:
  embedjob plan --input corpus.parquet --model sentence-transformers/all-MiniLM-L6-v2
  embedjob embed --input corpus.parquet --output vectors.lance \\
      --model sentence-transformers/all-MiniLM-L6-v2 --keep-columns text
  embedjob search vectors.lance "what the query is about" -k 5 --show text

`embedjob COMMAND --help` lists a command's options, each with its default."""


# --- flags from dataclass fields ------------------------------------------------------------


def options_of(cls: type, command: str) -> list[dataclasses.Field]:
    """The fields of ``cls`` that ``command`` offers."""
    return [f for f in dataclasses.fields(cls)
            if f.metadata.get("commands") is None or command in f.metadata["commands"]]


def flag_of(f: dataclasses.Field) -> str:
    """The flag of a field: its ``flag`` metadata, else ``--`` + the name with dashes."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    kind, choices = _kind(hint)
    meta = f.metadata
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    help_text = meta["help"] + _default_note(f, required, kind)
    if meta.get("positional"):
        parser.add_argument(f.name, help=help_text, metavar=meta.get("metavar") or f.name.upper(),
                            **({} if required else {"nargs": "?"}))
        return
    kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
    if kind is bool:
        kwargs["action"] = "store_true"
    elif kind in (tuple, dict):  # repeatable; tuples also take comma-separated values
        kwargs |= {"action": "append", "metavar": meta.get("metavar")}
    else:
        kwargs |= {"type": kind, "choices": choices, "metavar": meta.get("metavar")}
    parser.add_argument(flag_of(f), **kwargs)


def _kind(hint: Any) -> tuple[type, list | None]:
    """(python type the flag parses to, allowed values) from a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        # several value types (``int | str``): the flag takes text, __post_init__ parses it
        return _kind(kinds[0]) if len(kinds) == 1 else (str, None)
    if origin is typing.Literal:
        values = list(typing.get_args(hint))
        return type(values[0]), values
    if origin is tuple:
        return tuple, None
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        return dict, None
    return hint, None


def _default_note(f: dataclasses.Field, required: bool, kind: type) -> str:
    if required:
        return " (required)" if f.metadata.get("positional") else " (required; or in --config)"
    if "default" in f.metadata["help"]:  # the help says what the default is
        return ""
    if kind is bool:
        return " (default: off)"
    default = f.default
    if f.default_factory is not dataclasses.MISSING or default in (None, ()):
        return " (default: none)"
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f" (default: {shown})"


def add_options(parser: argparse.ArgumentParser, cls: type, command: str) -> None:
    """Add a flag (or positional) for each field of ``cls`` that ``command`` offers."""
    hints = typing.get_type_hints(cls)
    for f in options_of(cls, command):
        _add_field(parser, f, hints[f.name])


def build_options(cls: type, values: Mapping[str, Any], command: str,
                  fixed: Mapping[str, Any] | None = None) -> Any:
    """An options object from parsed flags (and YAML values under them), with the repeated
    flags joined: tuples by comma, ``KEY=VALUE`` pairs into a dict. ``fixed``: values of
    fields the command does not offer."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in options_of(cls, command)}
    kwargs: dict[str, Any] = dict(fixed or {})
    for name, value in values.items():
        if name not in fields or value is None:
            continue
        kind, _ = _kind(hints[name])
        if kind is tuple and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif kind is dict and isinstance(value, list):
            value = dict(parse_storage_option(p) for p in value)
        kwargs[name] = value
    missing = [flag_of(f) for f in fields.values() if f.name not in kwargs
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (pass the flag or set it in --config)")
    return cls(**kwargs)


# --- the subcommands -----------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, the options classes it reads, and what it runs."""

    help: str
    options: tuple[type, ...]
    run: Callable[..., int | None]
    yaml: bool = False  # takes --config job.yaml (keys = the options' fields)
    examples: tuple[str, ...] = ()  # command lines that work, shown at the end of --help


def _embed(config: EmbedConfig) -> None:
    from embedjob.driver.run import run

    view = RunView(console())
    summary = run(config, reporter=view)
    if summary is not None:  # None: a dry run, its plan already shown
        view.ended(summary, _how_to_read(config.output))


def _refresh(config: EmbedConfig) -> None:
    from embedjob.ops.refresh import refresh

    view = RunView(console(), "refresh")
    view.ended(refresh(config, reporter=view), _how_to_read(config.output))


def _plan(config: EmbedConfig, options: PlanOptions) -> None:
    from embedjob.ops.plan import size_job

    report = size_job(config, sample_rows=options.sample_rows,
                      tokens_per_s=options.tokens_per_s, gpu=options.gpu, gpus=options.gpus,
                      price=options.price_range())
    print(report.to_json() if options.json else "\n".join(report.lines()))


def _compact(options: CompactOptions) -> None:
    from embedjob.ops.compact import compact

    print(compact(options.output, Storage.resolve(options.storage_options),
                  retain_days=options.retain_days,
                  target_rows_per_fragment=options.target_rows_per_fragment).line())


def _bench(config: Any) -> None:
    import json

    from embedjob.bench import bench
    from embedjob.ops.plan import record_bench

    result = bench(config)
    record_bench(result)
    print(json.dumps(result))


def _info(options: InfoOptions) -> None:
    from embedjob.table.info import format_info, table_info

    info = table_info(options.output, Storage.resolve(options.storage_options))
    print(info.to_json() if options.json else format_info(info))


def _index(options: IndexOptions) -> None:
    from embedjob.table.index import build_index

    plan = build_index(options.output, column=options.column, index_type=options.index_type,
                       num_partitions=options.num_partitions,
                       num_sub_vectors=options.num_sub_vectors,
                       storage=Storage.resolve(options.storage_options))
    print(f"built {plan.index_type} ({plan.metric}) on {plan.column} (dim {plan.dim}, "
          f"{plan.rows} rows): {plan.num_partitions} partitions, "
          f"{plan.num_sub_vectors} sub-vectors")


def _search(options: SearchOptions) -> None:
    import json

    from embedjob.table.search import format_results, search_many

    queries = [options.query] if options.query is not None else _read_queries(options.queries)
    results = search_many(options.output, queries, column=options.column, k=options.k,
                          show=options.show, model=options.model,
                          storage=Storage.resolve(options.storage_options),
                          nprobes=options.nprobes, refine_factor=options.refine_factor,
                          rescore=options.rescore, rescore_factor=options.rescore_factor,
                          collapse=options.collapse)
    for query, found in zip(queries, results, strict=True):
        if options.json:
            hits = [{"rank": rank, **row} for rank, row in enumerate(found.to_pylist(), 1)]
            print(json.dumps({"query": query, "hits": hits}, ensure_ascii=False, default=str))
        else:
            print((f"query: {query}\n" if len(queries) > 1 else "") + format_results(found))


def _read_queries(path: str | None) -> list[str]:
    """The non-empty lines of ``path`` ('-': standard input)."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        if not path or not os.path.isfile(path):
            raise ConfigError(f"--queries file {path!r} does not exist")
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise ConfigError(f"--queries {path!r} holds no query (one per line)")
    return queries


def _rejected(options: RejectedOptions) -> None:
    from embedjob.schema import sibling_uri
    from embedjob.table.rejected import format_rejected, rejected_report

    uri = options.rejected_output or sibling_uri(options.output, "rejected")
    report = rejected_report(uri, Storage.resolve(options.storage_options),
                             sample=options.sample)
    print(report.to_json() if options.json else format_rejected(report))


def _convert_weights(options: ConvertWeightsOptions) -> None:
    from embedjob.model.weights import convert_weights

    pairs = convert_weights(options.src, options.dst)
    print(f"wrote {options.dst}: " + ", ".join(f"{a} -> {b}" for a, b in pairs))


def _eval(config: Any) -> None:
    from embedjob.table.eval import evaluate, format_report

    print(format_report(evaluate(config)))


def commands() -> dict[str, Command]:
    """The subcommand table (the bench's and eval's options classes import on first use)."""
    from embedjob.bench.config import BenchConfig
    from embedjob.table.eval import EvalConfig

    return {
        "embed": Command("embed a corpus into a Lance table", (EmbedConfig,), _embed, True, (
            "embedjob embed --input corpus.parquet --output vectors.lance "
            "--model sentence-transformers/all-MiniLM-L6-v2 --keep-columns text",
            "embedjob embed --input 's3://corpus/docs/*.parquet' --output "
            "s3://vectors/docs.lance --dims 1024,256 --num-actors 8 --gpus-per-actor 1",
            "embedjob embed --config job.yaml --limit 1000 --dry-run",
        )),
        "refresh": Command("re-embed only new and changed rows, delete gone ones",
                           (EmbedConfig,), _refresh, True, (
            "embedjob refresh --input s3://corpus/docs/ --format parquet --output "
            "s3://vectors/docs.lance",
            "embedjob refresh --config job.yaml --retain-days 7",
        )),
        "plan": Command("size a job from a sample of its input (rows, tokens, bytes, "
                        "GPU-hours)", (EmbedConfig, PlanOptions), _plan, True, (
            "embedjob plan --input 's3://corpus/docs/*.parquet' --num-actors 8",
            "embedjob plan --config job.yaml --gpu h100 --gpus 8 --gpu-price 2-3.5",
            "embedjob plan --input corpus.parquet --gpu a100 --gpus 4 --json",
        )),
        "compact": Command("compact small fragments and drop old table versions",
                           (CompactOptions,), _compact, examples=(
            "embedjob compact vectors.lance",
            "embedjob compact s3://vectors/docs.lance --retain-days 3",
        )),
        "bench": Command("benchmark: this pipeline vs the naive Ray Data recipe vs the "
                         "model-only bound (last line: one JSON object)", (BenchConfig,),
                         _bench, examples=(
            "embedjob bench",
            "embedjob bench --rows 400 --runs pipeline,model_only --workdir bench_out",
            "embedjob bench --device cuda --model-config full --scaling",
        )),
        "info": Command("rows, versions, stamp, bytes per column, rejected rows, last run of "
                        "an output table", (InfoOptions,), _info, examples=(
            "embedjob info demo_out/udhr.lance",
            "embedjob info s3://vectors/docs.lance --json",
        )),
        "index": Command("build a cosine vector index on a vector column", (IndexOptions,),
                         _index, examples=(
            "embedjob index s3://vectors/docs.lance",
            "embedjob index s3://vectors/docs.lance --column vector_256 --type IVF_HNSW_SQ",
        )),
        "search": Command("embed a query as the table's queries are meant to be embedded and "
                          "print the nearest rows", (SearchOptions,), _search, examples=(
            'embedjob search demo_out/udhr.lance "Everyone has the right to life, liberty '
            'and security of person." -k 3 --show lang,article',
            'embedjob search s3://vectors/docs.lance "battery recycling" --column '
            'vector_1024_bin --rescore vector -k 20 --json',
            "embedjob search demo_out/udhr.lance --queries questions.txt -k 3",
        )),
        "rejected": Command("the rows a run set aside: counts by reason and a sample of each",
                            (RejectedOptions,), _rejected, examples=(
            "embedjob rejected demo_out/udhr.lance",
            "embedjob rejected s3://vectors/docs.lance --sample 20 --json",
        )),
        "convert-weights": Command(
            "rewrite a model directory's pickle weights as safetensors (read with "
            "torch.load(weights_only=True)); the job itself loads safetensors only",
            (ConvertWeightsOptions,), _convert_weights, examples=(
                "embedjob convert-weights ./bge-m3 ./bge-m3-safetensors",
                "embedjob convert-weights /models/old-bert /models/old-bert-safetensors -q",
            )),
        "eval": Command("retrieval quality of every vector column on real data (eval.json + "
                        "eval.png)", (EvalConfig,), _eval, examples=(
            "embedjob eval --dataset lee --model tests/data/jina-v3-tiny --output-dir out/tiny",
            "embedjob eval --dataset lee,udhr --model jinaai/jina-embeddings-v3 --dims 1024,64 "
            "--output-dir out/jina",
            "embedjob eval --dataset longdoc --chunk-tokens 64 --model tests/data/jina-v3-tiny "
            "--output-dir out/longdoc",
        )),
    }


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and a guess for near misses."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self.guess(message)}; see "
                     f"'{self.prog} --help'\n")

    def guess(self, message: str) -> str:
        """`` (did you mean ...)`` for a bad choice or an unknown flag."""
        import re

        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            return did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            flags = [s for a in self._actions for s in a.option_strings]
            return did_you_mean(unknown.group(1).split("=")[0], flags)
        return ""


class _Version(argparse.Action):
    """``--version``: this package's version and the key dependencies' (from their metadata,
    nothing imported)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version of embedjob and of its key dependencies")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        parser.exit(0, version_text() + "\n")


def version_text() -> str:
    """``embedjob X (torch A, ray B, pylance C, transformers D, ...)``."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {of(d)}" for d in VERSION_DEPS)
    return f"embedjob {of('embedjob')} ({deps}; python {sys.version.split()[0]})"


def parser(table: Mapping[str, Command] | None = None) -> argparse.ArgumentParser:
    """The whole ``embedjob`` argument parser."""
    table = table or commands()
    top = Parser(prog="embedjob", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action=_Version)
    sub = top.add_subparsers(dest="command", required=True, parser_class=Parser,
                             metavar="COMMAND", title="commands")
    for name, command in table.items():
        examples = "\n".join(f"  {line}" for line in command.examples)
        p = sub.add_parser(name, help=command.help, description=command.help,
                           epilog=f"examples:\n{examples}" if examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS, allow_abbrev=False)
        loud = p.add_mutually_exclusive_group()
        loud.add_argument("-q", "--quiet", dest="verbosity", action="store_const",
                          const="quiet", help="print only the result (default: off)")
        loud.add_argument("-v", "--verbose", dest="verbosity", action="store_const",
                          const="verbose", help="let Ray's, Lance's and the job's own logs "
                          "through to the terminal (default: off: they go to the log file)")
        if command.yaml:
            p.add_argument("--config", dest=YAML_DEST, metavar="JOB.YAML",
                           help="YAML file whose keys are these options (- or _); flags "
                                "override it (default: none)")
        for cls in command.options:
            add_options(p, cls, name)
    return top


def configs_from(args: argparse.Namespace, command: Command, name: str) -> list[Any]:
    """The options objects of a parsed command line: YAML values first, flags over them."""
    values = vars(args).copy()
    values.pop("command", None)
    values.pop("verbosity", None)
    merged = load_yaml(values.pop(YAML_DEST)) if YAML_DEST in values else {}
    if merged:
        allowed = {f.name for cls in command.options for f in options_of(cls, name)}
        merged = known_keys(merged, allowed)
    merged.update(values)
    # plan reads an EmbedConfig but writes nothing: it has no --output
    fixed = {"output": PLAN_OUTPUT} if name == "plan" else {}
    return [build_options(cls, merged, name, fixed if cls is EmbedConfig else {})
            for cls in command.options]


def embed_config(args: argparse.Namespace, name: str = "embed") -> EmbedConfig:
    """The EmbedConfig of a parsed ``embed``/``refresh``/``plan`` command line."""
    return configs_from(args, commands()[name], name)[0]


def main(argv: list[str] | None = None, *, table: Mapping[str, Command] | None = None) -> int:
    """The CLI; ``table`` replaces the subcommand table (tests wrap a command).

    Returns:
        0 on success; 2 for a user error (a bad flag, value, input or output: one line naming
        the flag and what is allowed); 1 for a failure at run time (one line and the log
        file that holds the details); 130 when interrupted; 128 + the signal (130 SIGINT,
        143 SIGTERM) when a run was stopped by a signal and committed what it had (resumable).
    """
    table = table or commands()
    top = parser(table)
    args, extra = top.parse_known_args(argv)
    if extra:  # an unknown flag is reported by its subcommand, which knows the near misses
        subcommand = top._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
        subcommand.error(f"unrecognized arguments: {' '.join(extra)}")
    command = table[args.command]
    try:
        configs = configs_from(args, command, args.command)
    except EmbedError as exc:
        return _user_error(exc)
    verbosity = getattr(args, "verbosity", "normal")
    log_path = _log_path(args.command)
    setup_logging(log_path, verbosity)
    if not sys.stdout.isatty():  # no colour codes in piped worker logs (--verbose)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    _CONSOLE.append(Console(verbosity, log_path))
    try:
        with _CONSOLE[-1].capture():
            command.run(*configs)
    except KeyboardInterrupt:
        print(f"embedjob: interrupted (log: {log_path})", file=sys.stderr)
        return 130
    except RunStopped as exc:  # SIGTERM / SIGINT: stopped cleanly, resumable
        print(f"embedjob: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        _log_traceback(log_path)
        if isinstance(exc, EmbedError) and not isinstance(exc, BugError):
            return _user_error(exc)
        print(f"embedjob: {args.command} failed: {without_rust_paths(_failure(exc))} "
              f"(details: {log_path})", file=sys.stderr)
        return 1
    finally:
        _CONSOLE.pop().stop_progress()
    return 0


# "SomeError: message" lines of a nested traceback (Ray carries a worker's as text)
_CAUSE_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (\S.*)$")


def _failure(exc: BaseException) -> str:
    """A runtime failure in one line: the innermost ``XError: message`` of the exception's
    text (a Ray error names the worker's own exception last: an actor that died loading its
    weights says why), else the exception's type and first line."""
    text = str(exc).strip()
    causes = [m.groups() for m in map(_CAUSE_LINE.match, text.splitlines()) if m]
    if causes:
        name, message = causes[-1]
        return f"{name.rsplit('.', 1)[-1]}: {message}"
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0]}"


def _log_traceback(path: str) -> None:
    """The current exception's traceback, into the log file only (the terminal gets one line)."""
    import traceback

    with open(path, "a", encoding="utf-8") as handle:
        traceback.print_exc(file=handle)


def _user_error(exc: EmbedError) -> int:
    text = " ".join(without_rust_paths(str(exc)).split())  # one line, whatever it wrapped
    print(f"embedjob: error: {text}", file=sys.stderr)
    return 2


def _log_path(command: str) -> str:
    """A new log file for this command: ``$EMBEDJOB_LOG_DIR`` (default ``<tmp>/embedjob``)."""
    import tempfile
    import time

    folder = os.environ.get(LOG_DIR_ENV) or os.path.join(tempfile.gettempdir(), "embedjob")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


_CONSOLE: list[Console] = []  # the console of the command main() runs


def console() -> Console:
    """The running command's console (a plain one outside main())."""
    return _CONSOLE[-1] if _CONSOLE else Console("normal", os.devnull)


def _how_to_read(output: str) -> str:
    return (
        "read it with:\n"
        f"  python -c \"import lance; t = lance.dataset('{output}').to_table(); "
        "print(t.num_rows, t.schema); print(t.slice(0, 3).to_pandas())\""
    )


if __name__ == "__main__":
    sys.exit(main())
