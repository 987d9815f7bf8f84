"""Every knob, defined once: frozen, keyword-only dataclasses whose fields carry their help.

The CLI (``embedjob.cli``) generates its flags, help texts and defaults from these fields'
metadata (see :func:`knob`); ``--config job.yaml`` and the Python API build the same
objects. Everything that can be checked without touching storage or the model is checked in
``__post_init__``; the rest is checked by ``driver.preflight`` before any model loads.

This module imports nothing heavy (no Ray, torch or Lance), so a bad flag fails in well
under a second.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from embedjob import schema as S
from embedjob.errors import ConfigError, did_you_mean

Format = Literal["parquet", "jsonl", "csv", "lance"]
FORMATS: tuple[str, ...] = ("parquet", "jsonl", "csv", "lance")
MODES: tuple[str, ...] = ("create", "overwrite", "append")
CHUNKINGS: tuple[str, ...] = ("none", "late", "split")
CHUNK_BOUNDARIES: tuple[str, ...] = ("tokens", "sentences")
VECTOR_DTYPES = S.VECTOR_DTYPES
# file suffix -> format, for inference when --format is omitted
SUFFIX_FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".lance": "lance",
}
DEFAULT_MODEL = "jinaai/jina-embeddings-v3"

EMBED, REFRESH, PLAN = "embed", "refresh", "plan"
RUNS = (EMBED, REFRESH)  # options of both kinds of run
ALL = (EMBED, REFRESH, PLAN)


def knob(default: Any = dataclasses.MISSING, *, help: str,
         commands: tuple[str, ...] | None = None, default_factory: Any = dataclasses.MISSING,
         flag: str | None = None, metavar: str | None = None, positional: bool = False,
         repr: bool = True) -> Any:
    """A config field with what the CLI needs to offer it.

    Args:
        default: The default (omit for a required field).
        help: One line for ``--help`` (the default is appended by the CLI).
        commands: Subcommands that offer it (None: every subcommand of its dataclass).
        default_factory: For mutable defaults.
        flag: The flag, when not ``--`` + the field name with dashes.
        metavar: How ``--help`` names the value.
        positional: A positional argument instead of a flag.
        repr: Shown in ``repr`` (False for fields holding secrets).
    """
    metadata = {"help": help, "commands": commands, "flag": flag, "metavar": metavar,
                "positional": positional}
    return field(default=default, default_factory=default_factory, metadata=metadata,
                 repr=repr)


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Everything one ``embedjob embed`` (or ``refresh``) run needs. The fields' help texts
    say what each knob does; README's Options table lists them."""

    input: str = knob(help="a file, a directory/prefix or a glob; local or s3://",
                      commands=ALL)
    output: str = knob(help="the Lance dataset to write; local or s3://", commands=RUNS)
    model: str = knob(DEFAULT_MODEL, help="hub id, local directory or s3:// prefix",
                      commands=ALL)
    format: Format | None = knob(None, help="input format (default: from the extension)",
                                 commands=ALL)
    task: str | None = knob(
        None, commands=ALL,
        help="the model's task (adapter + instruction prefix); default: retrieval.passage "
             "for jina-v3, none for other models")
    prompt_name: str | None = knob(
        None, commands=ALL,
        help="a sentence-transformers model's prompt, by its name in "
             "config_sentence_transformers.json (e.g. query, passage); default: its "
             "default_prompt_name, else none")
    revision: str | None = knob(
        None, commands=ALL, metavar="REV",
        help="hub revision of --model (branch, tag or commit; the same as MODEL@REV), e.g. "
             "one that has safetensors weights")
    allow_any_dims: bool = knob(
        False, commands=ALL,
        help="let --dims truncate to dims the model does not declare (Matryoshka-trained "
             "dims only otherwise); the table stamps them as undeclared")
    dims: tuple[int, ...] = knob(
        (), commands=ALL, metavar="D,D,...",
        help="dims to store, e.g. 1024,256,64: the full dim is always stored as `vector`, "
             "every other dim d as `vector_<d>`; each must be a Matryoshka dim of the model")
    id_column: str = knob("id", help="input column with the row id (kept with its type)",
                          commands=ALL)
    text_column: str = knob("text", help="input column with the text to embed", commands=ALL)
    keep_columns: tuple[str, ...] = knob(
        (), commands=ALL, metavar="C,C,...",
        help="input columns carried through to the output")
    max_tokens_per_batch: int = knob(
        16384, commands=RUNS,
        help="token budget per forward: padded cost is rows x longest row, packed cost the "
             "sum of lengths; 16384 keeps a 24-layer 1024-wide model's activations well inside "
             "a 24 GB GPU at bf16")
    window_rows: int = knob(
        16384, commands=RUNS,
        help="rows sorted together by length before batches are cut: bigger windows pad less "
             "but hold more rows in memory per bucket task")
    batch_overhead_tokens: int | None = knob(
        None, commands=RUNS,
        help="what one more forward costs, in tokens, when batches are cut (stages.batching); "
             "default 0 on CPU actors, max-tokens-per-batch/16 on GPU actors (launch overhead)")
    num_actors: int | str = knob(
        1, commands=ALL, metavar="N|MIN:MAX",
        help="encode actors (one per GPU, or CPU actors with 0 GPUs): N for a fixed pool, "
             "MIN:MAX for a pool Ray Data grows from MIN to MAX while the actors are busy "
             "(and shrinks when they idle); on an autoscaling cluster the pending actors "
             "bring up GPU nodes")
    gpus_per_actor: float = knob(0.0, commands=RUNS,
                                 help="GPUs per encode actor, fractional allowed; 0 = CPU actors")
    cpus_per_actor: float = knob(
        0.5, commands=RUNS,
        help="CPUs reserved per encode actor (its torch threads on CPU actors: at least 1); "
             "0.5 lets a 2-core machine run the CPU stages beside one actor")
    cpus_per_task: float = knob(0.5, commands=RUNS,
                                help="CPUs reserved per read/tokenize/bucket/write task")
    actor_prefetch: int = knob(
        2, commands=RUNS,
        help="blocks queued on each encode actor (Ray's max_tasks_in_flight_per_actor): the "
             "next block's transfer overlaps the current block's forwards")
    actor_resources: tuple[str, ...] = knob(
        (), commands=RUNS, metavar="NAME=AMOUNT,...",
        help="custom Ray resources each encode actor asks for (e.g. encode_node=1 places the "
             "actors only on nodes started with --resources='{\"encode_node\": N}')")
    node_wait_s: float = knob(
        600.0, commands=RUNS,
        help="seconds the run waits while no live node can hold even one encode actor (its "
             "GPUs, CPUs and --actor-resources, by the nodes' totals) before it stops like a "
             "graceful stop: commits what is written, releases the lease, exits 75 naming the "
             "missing resources; counted from the start too. On an autoscaling cluster "
             "(KubeRay) a pending GPU node can take minutes to come up: keep this well above "
             "that")
    encoder_crash_retries: int = knob(
        2, commands=RUNS,
        help="deaths of an encode actor's process one block may cause before its rows are "
             "encoded one by one, and one row alone before it is rejected ('crashes the "
             "encoder'): a row that kills the process costs at most twice this many restarts")
    tokenize_tasks: int | None = knob(
        None, commands=RUNS,
        help="most tokenize tasks at once (default: as CPUs allow; `embedjob plan` measures "
             "how many keep the encode actors fed)")
    read_unit_bytes: int = knob(
        64 * 1024 * 1024, commands=RUNS,
        help="bytes of input per read unit (the unit of parallelism, retry and resume): a "
             "bigger file is read as byte ranges of this size (JSON lines / CSV: the lines "
             "starting in the range; Parquet: the row groups starting in it); 64 MiB is "
             "64k-256k rows of 250-1000 bytes")
    read_tasks: int = knob(
        512, commands=RUNS,
        help="most read (and pre-pass scan) tasks the unit list is cut into, each reading its "
             "units one after another: Ray Data keeps a few KB in the driver per task, so "
             "this bounds the driver's memory however many units there are; it also bounds "
             "how many units are read at once")
    read_memory_bytes: int = knob(
        768 * 1024 * 1024, commands=RUNS,
        help="memory reserved per read task (one unit at a time in 8192-row batches; a Parquet "
             "row group is decoded whole; a read worker peaked at ~600 MiB with 64k-row row "
             "groups in the scale benchmark, of which ~180 MiB is the interpreter and its "
             "libraries)")
    packed: bool = knob(
        False, commands=RUNS,
        help="pack each batch's sequences into one row that attends per sequence (varlen) "
             "instead of padding; batches are cut by the sum of lengths")
    vector_dtype: Literal["float32", "float16"] = knob("float32", commands=ALL,
                                                       help="stored vector element type")
    quantize: tuple[str, ...] = knob(
        (), commands=ALL, metavar="[D:]TYPE,...",
        help="quantized columns beside the floats: int8 and/or binary for every stored dim "
             "(int8,binary) or per dim (1024:binary,256:int8): vector_<d>_int8 (per-dim "
             "ranges calibrated on the run's first rows, stamped) and vector_<d>_bin (sign "
             "bits, packed)")
    no_float_dims: tuple[int, ...] = knob(
        (), commands=ALL, metavar="D,D,...",
        help="stored dims kept only quantized (no float column); each must be quantized")
    chunking: Literal["none", "late", "split"] = knob(
        "none", commands=RUNS,
        help="long documents into a chunk table (one row per chunk): late = one forward per "
             "document (macro-windows past the model's context), each chunk the mean of its "
             "span's token states; split = each chunk embedded alone; none = one vector per "
             "row")
    chunk_tokens: int = knob(256, commands=RUNS,
                             help="most text tokens per chunk (--chunking late|split)")
    chunk_overlap: int = knob(0, commands=RUNS,
                              help="text tokens a chunk shares with the one before it "
                                   "(< --chunk-tokens)")
    chunk_boundaries: Literal["tokens", "sentences"] = knob(
        "tokens", commands=RUNS,
        help="where chunks are cut: every --chunk-tokens tokens, or whole sentences packed up "
             "to --chunk-tokens (after . ! ? and a space, after 。！？ without one, at line "
             "breaks; a longer sentence is cut on token boundaries)")
    chunk_window_tokens: int | None = knob(
        None, commands=RUNS,
        help="--chunking late: tokens per forward (macro-window), special tokens and prefix "
             "included (default: the model's context)")
    compile: bool = knob(False, commands=RUNS,
                         help="torch.compile the encoder (see BENCHMARKS.md for when it pays)")
    mode: Literal["create", "overwrite", "append"] = knob(
        "create", commands=(EMBED,),
        help="create refuses an existing output, overwrite replaces it, append adds to it")
    summary_json: str | None = knob(None, commands=RUNS,
                                    help="also write the run summary as JSON here (local path)")
    rejected_output: str | None = knob(
        None, commands=RUNS,
        help="the rejected-rows table (default: <output>.rejected.lance beside the output)")
    fail_fast: bool = knob(
        False, commands=RUNS,
        help="stop at the first unreadable input file or broken line instead of recording it "
             "as a rejected row")
    storage_options: Mapping[str, str] = knob(
        commands=ALL, default_factory=dict, repr=False, flag="--storage-option",
        metavar="KEY=VALUE",
        help="Lance/object_store storage option (aws_endpoint, aws_region, allow_http, ...), "
             "over the AWS environment variables; repeatable")
    tokenize_batch_rows: int = knob(1024, commands=RUNS, help="rows per tokenizer call")
    assume_unique_ids: bool = knob(
        False, commands=RUNS,
        help="skip the duplicate-id pre-pass (no pass, no state): for corpora whose ids are "
             "known unique; if they are not, every row of a repeated id is stored (count "
             "rows against distinct ids to detect it, README 'Duplicate ids')")
    id_shards: int | None = knob(
        None, commands=RUNS,
        help="actors holding the duplicate-id pre-pass's state, 20 bytes per input row split "
             "among them (default: one per 8 CPUs of the cluster, at least 1)")
    write_batch_rows: int = knob(
        32768, commands=RUNS,
        help="rows per write-stage call, handed to one writer at once (32768 rows of 1024-d "
             "float32 vectors is a 128 MiB block)")
    rows_per_file: int = knob(
        1 << 20, commands=RUNS,
        help="rows per Lance data file, at most: a writer starts a new file after this many "
             "(files also end at every commit, so a short commit interval makes smaller ones)")
    writers: int | None = knob(
        None, commands=RUNS,
        help="writer actors streaming rows into the output's files (default: one per 8 "
             "encode actors, at least 1)")
    commit_interval_s: float = knob(600.0, commands=RUNS,
                                    help="seconds between commits of what is written so far")
    lease_ttl_s: float = knob(
        120.0, commands=RUNS,
        help="lifetime of the output's lease (renewed every third of it while the run lives): "
             "how long a crashed run blocks a rerun")
    retain_days: float | None = knob(
        None, commands=(REFRESH,),
        help="after the refresh, drop table versions older than this many days (default: "
             "keep all)")
    keep_deleted: bool = knob(False, commands=(REFRESH,),
                              help="keep rows whose ids are gone from the corpus")
    limit: int | None = knob(
        None, commands=(EMBED,), metavar="N",
        help="embed only the first N input rows (in listing order) into a real table, to try "
             "a job before paying for it; the stamp records it (embedjob.limit) (default: "
             "every row)")
    dry_run: bool = knob(
        False, commands=(EMBED,),
        help="run every preflight check (input, columns, model config, task, dims, output) and "
             "print the plan, then stop: no model is loaded and no table is written")
    ray_address: str | None = knob(
        None, commands=RUNS,
        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")

    def __post_init__(self) -> None:
        for name in ("dims", "keep_columns", "quantize", "no_float_dims", "actor_resources"):
            object.__setattr__(self, name, as_tuple(name, getattr(self, name)))
        _require(bool(self.input), "input", self.input, "a file, directory, prefix or glob")
        if self.revision is not None:
            object.__setattr__(self, "model", with_revision(self.model, self.revision))
        _require(bool(self.output), "output", self.output, "a Lance dataset URI")
        _require(self.format is None or self.format in FORMATS, "format", self.format, FORMATS)
        _require(self.mode in MODES, "mode", self.mode, MODES)
        _require(self.vector_dtype in VECTOR_DTYPES, "vector_dtype", self.vector_dtype,
                 VECTOR_DTYPES)
        object.__setattr__(self, "num_actors", _actor_count(self.num_actors))
        for name in ("max_tokens_per_batch", "window_rows", "tokenize_batch_rows",
                     "write_batch_rows", "read_memory_bytes", "actor_prefetch",
                     "encoder_crash_retries", "read_unit_bytes", "rows_per_file",
                     "read_tasks"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        _require(self.limit is None or (_is_int(self.limit) and self.limit >= 1), "limit",
                 self.limit, "an integer >= 1")
        for name in ("tokenize_tasks", "id_shards", "writers"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 1), name, value,
                     "an integer >= 1 or None")
        _require(self.window_rows <= 1 << 20, "window_rows", self.window_rows, "<= 1048576")
        _require(self.gpus_per_actor >= 0, "gpus_per_actor", self.gpus_per_actor, "a number >= 0")
        for name in ("cpus_per_actor", "cpus_per_task", "commit_interval_s", "lease_ttl_s",
                     "node_wait_s"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a number > 0")
        for dim in self.dims:
            _require(_is_int(dim) and dim > 0, "dims", self.dims, "positive integers")
        _require(len(set(self.dims)) == len(self.dims), "dims", self.dims, "distinct values")
        for entry in self.quantize:
            _parse_quantize(entry)
        self._check_chunking()
        self.actor_resource_amounts  # noqa: B018  (validates every entry)
        _require(self.id_column != self.text_column, "id_column", self.id_column,
                 f"a column other than --text-column {self.text_column!r}")
        reserved = set(S.OUTPUT_COLUMNS) | {self.id_column}
        if self.chunked:
            reserved |= {S.DOC_ID, *S.CHUNK_COLUMNS}
        clash = [c for c in self.keep_columns if c in reserved or S.is_vector_column(c)]
        _require(not clash, "keep_columns", list(self.keep_columns),
                 f"columns not named like output columns {sorted(S.OUTPUT_COLUMNS)}")

    def _check_chunking(self) -> None:
        """The chunking knobs, alone and together (model-dependent checks: preflight)."""
        _require(self.chunking in CHUNKINGS, "chunking", self.chunking, CHUNKINGS)
        _require(self.chunk_boundaries in CHUNK_BOUNDARIES, "chunk_boundaries",
                 self.chunk_boundaries, CHUNK_BOUNDARIES)
        _require(_is_int(self.chunk_tokens) and self.chunk_tokens >= 1, "chunk_tokens",
                 self.chunk_tokens, "an integer >= 1")
        _require(_is_int(self.chunk_overlap) and 0 <= self.chunk_overlap < self.chunk_tokens,
                 "chunk_overlap", self.chunk_overlap,
                 f"an integer >= 0 and < --chunk-tokens {self.chunk_tokens}")
        window = self.chunk_window_tokens
        _require(window is None or (_is_int(window) and window >= 3), "chunk_window_tokens",
                 window, "an integer >= 3 or None")

    @property
    def chunked(self) -> bool:
        """The output is a chunk table (``--chunking late|split``)."""
        return self.chunking != "none"

    @property
    def input_format(self) -> str:
        """The explicit format, or the one the input's extension implies."""
        if self.format:
            return self.format
        stem = self.input.rstrip("/")
        for suffix, fmt in SUFFIX_FORMATS.items():
            if stem.endswith(suffix) or stem.endswith(suffix + "*"):
                return fmt
        raise ConfigError(
            f"cannot infer the format of input {self.input!r} from its extension; "
            f"pass --format, one of {list(FORMATS)}"
        )

    @property
    def actor_resource_amounts(self) -> dict[str, float]:
        """``actor_resources`` as Ray's ``resources`` argument: name -> amount."""
        amounts = {}
        for entry in self.actor_resources:
            name, _, amount = entry.partition("=")
            try:
                value = float(amount)
            except ValueError:
                value = -1.0
            if not name or value <= 0 or name in ("CPU", "GPU", "memory"):
                raise ConfigError(
                    f"--actor-resources {entry!r} is not allowed; expected NAME=AMOUNT with a "
                    "custom resource name (not CPU, GPU or memory) and an amount > 0, e.g. "
                    "encode_node=1")
            amounts[name] = value
        return amounts

    def quantize_plan(self, dims: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        """``quantize`` resolved against the stored ``dims``: dim -> its quantized forms.

        Raises:
            ConfigError: A dim that is not stored, binary on a dim that is not a multiple
                of 8, or a ``no_float_dims`` dim that is not stored or not quantized.
        """
        forms: dict[int, list[str]] = {}
        for entry in self.quantize:
            dim, form = _parse_quantize(entry)
            if dim is not None and dim not in dims:
                raise ConfigError(f"--quantize {entry!r}: dim {dim} is not stored; stored dims "
                                  f"are {list(dims)}")
            for d in dims if dim is None else (dim,):
                if form == "binary" and d % 8:
                    raise ConfigError(f"--quantize {entry!r}: binary needs a dim that is a "
                                      f"multiple of 8, not {d}")
                if form not in forms.setdefault(d, []):
                    forms[d].append(form)
        for dim in self.no_float_dims:
            if dim not in forms:
                raise ConfigError(
                    f"--no-float-dims {dim} is not allowed; expected stored, quantized dims "
                    f"{sorted(forms)} (a dim needs a --quantize form to drop its floats)")
        return {d: tuple(sorted(forms[d])) for d in dims if d in forms}

    @property
    def overhead_tokens(self) -> int:
        """The per-batch overhead used to cut batches (see batch_overhead_tokens)."""
        from embedjob.stages.batching import default_overhead_tokens

        if self.batch_overhead_tokens is not None:
            return self.batch_overhead_tokens
        return default_overhead_tokens(self.max_tokens_per_batch, self.gpus_per_actor > 0)

    @property
    def actor_range(self) -> tuple[int, int]:
        """(MIN, MAX) encode actors; MIN == MAX for a fixed pool."""
        if isinstance(self.num_actors, int):
            return self.num_actors, self.num_actors
        low, high = self.num_actors.split(":")
        return int(low), int(high)

    @property
    def max_actors(self) -> int:
        """The most encode actors the run may hold at once."""
        return self.actor_range[1]

    @property
    def writer_count(self) -> int:
        """``writers``, or one per 8 encode actors (at least 1)."""
        return self.writers or max(1, self.max_actors // 8)

    @property
    def rejected_uri(self) -> str:
        """``rejected_output``, or ``<output>.rejected.lance`` beside the output."""
        return self.rejected_output or S.sibling_uri(self.output, "rejected")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EmbedConfig:
        """Build from a mapping (YAML file, dict); keys may use ``-`` or ``_``.

        Raises:
            ConfigError: on an unknown key, listing the allowed ones.
        """
        return cls(**_known(cls, values))


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """``embedjob plan``'s own knobs (beside the EmbedConfig fields it reads)."""

    sample_rows: int = knob(20000, help="rows sampled from the first input files")
    tokens_per_s: float | None = knob(
        None, help="encoder throughput for the GPU-hours estimate (default: the last "
                   "`embedjob bench` on this machine)")
    gpu: Literal["h100", "h200", "a100", "l4"] | None = knob(
        None, help="estimate wall-clock and cost on this GPU type (from --tokens-per-s when "
                   "given, else a built-in reference figure whose source is printed) "
                   "(default: no estimate)")
    gpus: int = knob(1, help="GPUs for the --gpu estimate (one encode actor each)")
    gpu_price: str | None = knob(
        None, metavar="USD[-USD]",
        help="$ per GPU-hour for the --gpu estimate, one price or a range (default: a "
             "built-in on-demand range per GPU type)")
    json: bool = knob(False, help="print the plan as JSON")

    def __post_init__(self) -> None:
        _require(_is_int(self.sample_rows) and self.sample_rows >= 1, "sample_rows",
                 self.sample_rows, "an integer >= 1")
        _require(_is_int(self.gpus) and self.gpus >= 1, "gpus", self.gpus, "an integer >= 1")
        if self.gpu_price is not None:
            self.price_range()

    def price_range(self) -> tuple[float, float] | None:
        """``--gpu-price`` as (low, high) $/GPU-hour."""
        if self.gpu_price is None:
            return None
        try:
            parts = [float(p) for p in str(self.gpu_price).split("-")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or min(parts) <= 0 or parts[0] > parts[-1]:
            raise ConfigError(f"--gpu-price {self.gpu_price!r} is not allowed; expected a "
                              "price or a range in $ per GPU-hour, e.g. 2.5 or 2-4")
        return parts[0], parts[-1]


def _known(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``-`` keys normalized; unknown keys refused, naming the allowed ones."""
    return known_keys(values, {f.name for f in dataclasses.fields(cls)})


def known_keys(values: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    """``values`` with ``-`` keys normalized to ``_``.

    Raises:
        ConfigError: on an unknown key: the allowed keys, and the nearest one as a guess.
    """
    normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalized) - allowed)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}{did_you_mean(unknown[0], allowed)}; "
                          f"allowed: {sorted(allowed)}")
    return normalized


def flag_for(name: str) -> str:
    """The command-line flag of the option field ``name`` (messages name flags, which is what a
    user typed; a YAML key or a Python keyword is the same name with ``_``)."""
    for cls in (EmbedConfig, PlanOptions, CompactOptions, InfoOptions, IndexOptions,
                SearchOptions, RejectedOptions):
        found = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        if found is not None:
            if found.metadata.get("positional"):
                return found.metadata.get("metavar") or name.upper()
            return found.metadata.get("flag") or "--" + name.replace("_", "-")
    return "--" + name.replace("_", "-")


def as_tuple(key: str, value: Any) -> tuple:
    """A list field from a tuple, a list or a comma-separated string (the same rule for every
    list field: ``dims="256,64"`` and ``keep_columns="a,b"`` both split)."""
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{flag_for(key)} {value!r} must be a list or a comma-separated "
                          "string")
    if key in ("dims", "no_float_dims"):
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{flag_for(key)} {value!r} must be integers, e.g. "
                              "1024,256,64") from exc
    return tuple(str(v) for v in items)


def _parse_quantize(entry: str) -> tuple[int | None, str]:
    """``int8`` / ``binary`` (every stored dim) or ``D:int8`` / ``D:binary`` -> (D, form)."""
    dim, _, form = entry.rpartition(":")
    ok = form in S.QUANT_DTYPES and (not dim or (dim.isdigit() and int(dim) > 0))
    if not ok:
        raise ConfigError(
            f"--quantize {entry!r} is not allowed; expected one of {list(S.QUANT_DTYPES)}, for "
            "every stored dim or per dim as D:TYPE (e.g. 1024:binary,256:int8)")
    return (int(dim) if dim else None), form


def _actor_count(value: Any) -> int | str:
    """``num_actors`` normalized: an int N (fixed pool) or ``"MIN:MAX"`` with 1 <= MIN < MAX
    (``"4"`` and ``"4:4"`` become 4).

    Raises:
        ConfigError: naming the flag and the two allowed forms.
    """
    text = str(value).strip() if not isinstance(value, bool) else ""
    parts = text.split(":")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        low, high = int(parts[0]), int(parts[-1])
        if 1 <= low <= high:
            return low if low == high else f"{low}:{high}"
    raise ConfigError(f"--num-actors {value!r} is not allowed; expected N (an integer >= 1) "
                      "or MIN:MAX (integers, 1 <= MIN <= MAX), e.g. 4 or 2:8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def with_revision(model: str, revision: str) -> str:
    """``model@revision`` for a hub id (``--revision``); refused for local and s3:// sources.

    Raises:
        ConfigError: ``model`` is no hub id, or names another revision already.
    """
    _require(bool(revision) and "@" not in revision, "revision", revision,
             "a branch, tag or commit")
    repo, _, pinned = model.partition("@")
    if model.startswith("s3://") or os.path.exists(model) or repo.count("/") != 1:
        raise ConfigError(f"--revision {revision!r}: --model {model!r} is not a hub id "
                          "(org/name); revisions apply to hub models only")
    if pinned and pinned != revision:
        raise ConfigError(f"--revision {revision!r} differs from the one in --model {model!r}")
    return f"{repo}@{revision}"


def _require(ok: bool, name: str, value: Any, allowed: Any) -> None:
    if not ok:
        shown = list(allowed) if isinstance(allowed, tuple) else allowed
        guess = did_you_mean(value, allowed) if isinstance(allowed, tuple) else ""
        raise ConfigError(f"{flag_for(name)} {value!r} is not allowed{guess}; expected {shown}")


def load_yaml(path: str) -> dict[str, Any]:
    """Read a ``--config`` YAML file into a mapping."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"--config file {path!r} is not valid YAML{line}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config file {path!r} must hold a mapping of option: value")
    return data


# --- the read side and upkeep: one options class per subcommand --------------------------

IndexType = Literal["IVF_PQ", "IVF_HNSW_SQ"]
INDEX_TYPES: tuple[str, ...] = ("IVF_PQ", "IVF_HNSW_SQ")
_STORAGE_HELP = ("Lance/object_store storage option, over the AWS environment variables; "
                 "repeatable")


def _storage_knob() -> Any:
    return knob(default_factory=dict, repr=False, flag="--storage-option", metavar="KEY=VALUE",
                help=_STORAGE_HELP)


@dataclass(frozen=True, kw_only=True)
class CompactOptions:
    """``embedjob compact``: compact small fragments, drop old versions."""

    output: str = knob(help="the Lance table, local or s3://", positional=True)
    retain_days: float = knob(7.0, help="keep table versions newer than this many days")
    target_rows_per_fragment: int = knob(1024 * 1024, help="rows per fragment after compaction")
    storage_options: Mapping[str, str] = _storage_knob()


@dataclass(frozen=True, kw_only=True)
class InfoOptions:
    """``embedjob info``: what an output table holds."""

    output: str = knob(help="the output Lance table, local or s3://", positional=True)
    json: bool = knob(False, help="print the info as JSON")
    storage_options: Mapping[str, str] = _storage_knob()


@dataclass(frozen=True, kw_only=True)
class IndexOptions:
    """``embedjob index``: a cosine vector index on one vector column."""

    output: str = knob(help="the output Lance table, local or s3://", positional=True)
    column: str = knob("vector", help="the vector column: vector or vector_<d>")
    index_type: IndexType = knob("IVF_PQ", flag="--type", help="the index type")
    num_partitions: int | None = knob(None, help="IVF partitions (default round(sqrt(rows)), "
                                                 "at most rows/256)")
    num_sub_vectors: int | None = knob(None, help="PQ sub-vectors (default dim/16, else dim/8, "
                                                  "...)")
    storage_options: Mapping[str, str] = _storage_knob()


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """``embedjob search``: embed a query as the table's queries are meant to be embedded."""

    output: str = knob(help="the output Lance table, local or s3://", positional=True)
    query: str | None = knob(None, positional=True,
                             help="the query text (default: the lines of --queries)")
    queries: str | None = knob(None, metavar="FILE",
                               help="read queries from FILE, one per line ('-': standard "
                                    "input) (default: the QUERY argument)")
    column: str = knob("vector", help="the vector column: vector, vector_<d>, or a quantized "
                                      "vector_<d>_bin / vector_<d>_int8")
    k: int = knob(10, flag="-k", help="rows to return")
    rescore: str | None = knob(
        None, help="two-stage search: a float column (vector or vector_<d>) that rescores "
                   "the quantized --column's top k x --rescore-factor candidates exactly")
    rescore_factor: int = knob(4, help="candidates per returned row for --rescore")
    collapse: bool = knob(False, help="a chunk table: only the best chunk of each document "
                                      "(k documents, from k x 8 chunk candidates)")
    show: tuple[str, ...] = knob(
        (), metavar="C,C,...",
        help="columns to print beside id, score (default: text, when the table keeps it)")
    json: bool = knob(False, help="print JSON lines: one object per query with its hits")
    model: str | None = knob(None, help="query model (default: the table's stamped model)")
    nprobes: int | None = knob(None, help="IVF partitions to probe (Lance's default)")
    refine_factor: int = knob(1, help="re-rank k x this many index candidates exactly (1: the "
                                      "scores are exact)")
    storage_options: Mapping[str, str] = _storage_knob()

    def __post_init__(self) -> None:
        object.__setattr__(self, "show", as_tuple("show", self.show))
        _require(_is_int(self.k) and self.k >= 1, "k", self.k, "an integer >= 1")
        _require(_is_int(self.rescore_factor) and self.rescore_factor >= 1, "rescore_factor",
                 self.rescore_factor, "an integer >= 1")
        if (self.query is None) == (self.queries is None):
            raise ConfigError("pass one query (QUERY) or a file of queries (--queries FILE, "
                              "'-' for standard input), not both or neither")


@dataclass(frozen=True, kw_only=True)
class RejectedOptions:
    """``embedjob rejected``: the rows a run set aside, with their reasons."""

    output: str = knob(help="the output Lance table whose rejected rows to list (its "
                            "<output>.rejected.lance sibling), local or s3://", positional=True)
    rejected_output: str | None = knob(
        None, help="the rejected-rows table, when the run wrote it elsewhere (default: "
                   "<output>.rejected.lance)")
    sample: int = knob(5, help="rows shown per reason")
    json: bool = knob(False, help="print the counts and samples as JSON")
    storage_options: Mapping[str, str] = _storage_knob()

    def __post_init__(self) -> None:
        _require(_is_int(self.sample) and self.sample >= 0, "sample", self.sample,
                 "an integer >= 0")
