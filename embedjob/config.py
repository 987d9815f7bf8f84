"""The embed job's configuration: one frozen, keyword-only dataclass, each knob defined once.

The CLI, ``--config job.yaml`` and the Python API all build an :class:`EmbedConfig`.
Everything that can be checked without touching storage or the model is checked in
``__post_init__``; the rest is checked by ``embedjob.driver.preflight`` before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from embedjob.errors import ConfigError

Format = Literal["parquet", "jsonl", "csv", "lance"]
FORMATS: tuple[str, ...] = ("parquet", "jsonl", "csv", "lance")
MODES: tuple[str, ...] = ("create", "overwrite", "append")
VECTOR_DTYPES: tuple[str, ...] = ("float32", "float16")
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


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """Everything one ``embedjob embed`` run needs.

    Attributes:
        input: A file, a directory/prefix or a glob; local or ``s3://``.
        output: The Lance dataset to write; local or ``s3://``.
        model: Anything ``model.load_embedder`` accepts (local dir, ``s3://`` prefix, hub id).
        format: Input format; inferred from the input's extension when None.
        task: The model's task (adapter); None means the model's default
            (``retrieval.passage`` for jina-v3, no adapter for generic encoders).
        dims: Dims to store. The full dim is always stored as ``vector``; every other
            dim d as ``vector_<d>``. Empty means only the full dim.
        id_column: Input column with the row id (kept with its type).
        text_column: Input column with the text to embed.
        keep_columns: Input columns carried through to the output.
        max_tokens_per_batch: Token budget per forward: padded cost is rows x longest row,
            packed cost the sum of lengths. 16384 keeps a 24-layer 1024-wide model's
            activations well inside a 24 GB GPU at bf16.
        window_rows: Rows sorted together by length before cutting batches. Bigger windows
            pad less but hold more rows in memory per bucket task.
        batch_overhead_tokens: What one more forward costs, in tokens, when batches are cut
            (see embedjob.stages.batching). None: 0 on CPU actors (a CPU forward costs what its tokens
            cost), max_tokens_per_batch // 16 on GPU actors (launch overhead).
        num_actors: Encode actors (one per GPU, or CPU actors when gpus_per_actor is 0).
        gpus_per_actor: GPUs per encode actor; fractional allowed; 0 means CPU actors.
        cpus_per_actor: CPUs reserved per encode actor (its torch threads on CPU actors:
            at least 1). 0.5 lets a 2-core machine run the CPU stages beside one actor.
        cpus_per_task: CPUs reserved per read/tokenize/bucket/write task.
        actor_prefetch: Blocks queued on each encode actor (Ray's
            ``max_tasks_in_flight_per_actor``): the next block's transfer to the actor
            overlaps the current block's forwards, so the encoder never waits on the object
            store between blocks.
        tokenize_tasks: Most tokenize tasks at once; None lets Ray Data run as many as
            CPUs allow. ``embedjob plan`` measures the tokenizer on a sample of the input and
            prints how many tasks keep the encode actors fed.
        read_memory_bytes: Memory reserved per read task (one input file at a time, in
            8192-row batches; a Parquet row group is decoded whole, so 512 MiB leaves room
            for row groups of a few hundred MB).
        packed: Concatenate each batch's sequences into one row that attends per sequence
            (varlen: PyTorch's fused kernel on CUDA in bf16/fp16, SDPA per sequence length
            elsewhere; a block-diagonal mask for generic models) instead of padding: no
            padding, and batches cut by the sum of lengths.
        vector_dtype: Stored vector element type.
        compile: ``torch.compile`` the encoder (dynamic shapes, compiled by each actor on its
            first forwards); see BENCHMARKS.md for when it pays.
        mode: ``create`` refuses an existing output, ``overwrite`` replaces it, ``append``
            adds to it.
        summary_json: Where to write the run summary as JSON (local path); None: beside
            nothing (the summary line is always logged).
        rejected_output: Lance table for rejected rows; None means ``<output>.rejected.lance``
            next to the output (``.lance`` suffix of the output replaced).
        fail_fast: Stop at the first unreadable input file or broken line instead of
            recording it as a rejected row.
        storage_options: ``--storage-option`` pairs (Lance keys), merged over the AWS env.
        tokenize_batch_rows: Rows per tokenizer call on the CPU stage.
        write_batch_rows: Rows per written Lance fragment (at most); 32768 rows of
            1024-d float32 vectors is a 128 MiB block.
        commit_interval_s: Seconds between commits of what has been written so far.
        retain_days: After a refresh, drop table versions older than this many days
            (None keeps every version); ``embedjob compact`` takes the same.
        lease_ttl_s: Lifetime of the output's lease (renewed every third of it while the
            run lives): how long a crashed run blocks a rerun.
        ray_address: Ray cluster to join; None uses ``RAY_ADDRESS`` or starts a local one.
    """

    input: str
    output: str
    model: str = DEFAULT_MODEL
    format: Format | None = None
    task: str | None = None
    dims: tuple[int, ...] = ()
    id_column: str = "id"
    text_column: str = "text"
    keep_columns: tuple[str, ...] = ()
    max_tokens_per_batch: int = 16384
    window_rows: int = 16384
    batch_overhead_tokens: int | None = None
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.5
    cpus_per_task: float = 0.5
    actor_prefetch: int = 2
    tokenize_tasks: int | None = None
    read_memory_bytes: int = 512 * 1024 * 1024
    packed: bool = False
    vector_dtype: Literal["float32", "float16"] = "float32"
    compile: bool = False
    mode: Literal["create", "overwrite", "append"] = "create"
    summary_json: str | None = None
    rejected_output: str | None = None
    fail_fast: bool = False
    storage_options: Mapping[str, str] = field(default_factory=dict, repr=False)
    tokenize_batch_rows: int = 1024
    write_batch_rows: int = 32768
    commit_interval_s: float = 600.0
    lease_ttl_s: float = 120.0
    retain_days: float | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.input), "input", self.input, "a file, directory, prefix or glob")
        _require(bool(self.output), "output", self.output, "a Lance dataset URI")
        _require(self.format is None or self.format in FORMATS, "format", self.format, FORMATS)
        _require(self.mode in MODES, "mode", self.mode, MODES)
        _require(self.vector_dtype in VECTOR_DTYPES, "vector_dtype", self.vector_dtype,
                 VECTOR_DTYPES)
        for name in ("max_tokens_per_batch", "window_rows", "num_actors", "tokenize_batch_rows",
                     "write_batch_rows", "read_memory_bytes", "actor_prefetch"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _require(self.tokenize_tasks is None or (isinstance(self.tokenize_tasks, int)
                                                 and self.tokenize_tasks >= 1),
                 "tokenize_tasks", self.tokenize_tasks, "an integer >= 1 or None")
        _require(self.window_rows <= 1 << 20, "window_rows", self.window_rows, "<= 1048576")
        _require(self.gpus_per_actor >= 0, "gpus_per_actor", self.gpus_per_actor, "a number >= 0")
        for name in ("cpus_per_actor", "cpus_per_task", "commit_interval_s", "lease_ttl_s"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a number > 0")
        for dim in self.dims:
            _require(isinstance(dim, int) and dim > 0, "dims", self.dims, "positive integers")
        _require(len(set(self.dims)) == len(self.dims), "dims", self.dims, "distinct values")
        _require(self.id_column != self.text_column, "id_column", self.id_column,
                 f"a column other than text_column {self.text_column!r}")
        reserved = set(OUTPUT_COLUMNS) | {self.id_column}
        clash = [c for c in self.keep_columns if c in reserved or c.startswith("vector_")]
        _require(not clash, "keep_columns", list(self.keep_columns),
                 f"columns not named like output columns {sorted(OUTPUT_COLUMNS)}")

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
    def overhead_tokens(self) -> int:
        """The per-batch overhead used to cut batches (see batch_overhead_tokens)."""
        from embedjob.stages.batching import default_overhead_tokens

        if self.batch_overhead_tokens is not None:
            return self.batch_overhead_tokens
        return default_overhead_tokens(self.max_tokens_per_batch, self.gpus_per_actor > 0)

    @property
    def rejected_uri(self) -> str:
        if self.rejected_output:
            return self.rejected_output
        base = self.output.rstrip("/")
        base = base[: -len(".lance")] if base.endswith(".lance") else base
        return base + ".rejected.lance"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EmbedConfig:
        """Build from a mapping (YAML file, dict); keys may use ``-`` or ``_``.

        Raises:
            ConfigError: on an unknown key, listing the allowed ones.
        """
        allowed = {f.name for f in dataclasses.fields(cls)}
        normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalized) - allowed)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; allowed: {sorted(allowed)}")
        for key in ("dims", "keep_columns"):
            if key in normalized:
                normalized[key] = _as_tuple(key, normalized[key])
        return cls(**normalized)


# Columns the job writes besides the id and the kept ones.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "vector", "n_tokens", "truncated", "content_hash", "source_file", "source_row",
)


def _as_tuple(key: str, value: Any) -> tuple:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{key} {value!r} must be a list or a comma-separated string")
    if key == "dims":
        try:
            return tuple(int(v) for v in items)
        except ValueError as exc:
            raise ConfigError(f"dims {value!r} must be integers, e.g. 1024,256,64") from exc
    return tuple(str(v) for v in items)


def _require(ok: bool, name: str, value: Any, allowed: Any) -> None:
    if not ok:
        shown = list(allowed) if isinstance(allowed, tuple) else allowed
        raise ConfigError(f"{name} {value!r} is not allowed; expected {shown}")


def load_yaml(path: str) -> dict[str, Any]:
    """Read a ``--config`` YAML file into a mapping."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return data
