"""Everything checked before any model loads, and the run plan it produces.

A bad configuration fails here with a message naming the value and what is allowed:
unknown task, dim the model does not offer, input missing or empty, unreachable endpoint,
missing columns, output that exists in create mode.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass, field

import pyarrow as pa

from embedjob import schema as S
from embedjob import storage as st
from embedjob.config import EmbedConfig
from embedjob.driver.progress import ProgressRecord, read_record, run_key
from embedjob.errors import ConfigError, InputError, OutputExistsError, UnsupportedDimError
from embedjob.model import ModelSpec, load_spec
from embedjob.stages import read
from embedjob.stages.bucket import BucketSpec
from embedjob.stages.chunks import ChunkSpec
from embedjob.stages.encode import EncodeSpec
from embedjob.stages.tokens import TokenizeSpec
from embedjob.stages.write import WriteSpec
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

SCHEMA_PROBE_UNITS = 8  # empty leading files are skipped when deciding column types


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """A validated config plus everything derived from storage and the model's spec: one
    picklable spec per stage, storage options resolved once (``storage``)."""

    config: EmbedConfig
    storage: Storage = field(repr=False)
    units: list[str]  # still to embed (all of them, unless resuming)
    sources: list[str]  # every unit of the input (done ones too): the duplicate-id scan's
    fingerprints: dict[str, str]  # every input file (or Lance fragment) -> size:mtime
    run_key: str
    resumed: ProgressRecord | None  # the interrupted attempt this run continues
    model: ModelSpec
    task: str | None
    dims: tuple[int, ...]  # every stored dim, the full one first
    quantize: dict[int, tuple[str, ...]]  # dim -> its quantized forms (int8, binary)
    float_dims: tuple[int, ...] | None  # dims that keep their float column; None: all
    schema: pa.Schema  # the output's, stamped
    recreate_output: bool
    recreate_rejected: bool
    # the stages' specs, in data-flow order
    read: read.ReadSpec
    tokenize: TokenizeSpec
    bucket: BucketSpec
    encode: EncodeSpec
    write: WriteSpec
    sizes: dict[str, int] = field(default_factory=dict)  # input file -> bytes, from the listing


def plan_run(config: EmbedConfig) -> RunPlan:
    """Validate against storage and the model's config; never loads weights."""
    storage = Storage.resolve(config.storage_options)
    fmt = config.input_format
    st.validate_output_uri(config.output, input_uri=config.input)
    st.validate_output_uri(config.rejected_uri, input_uri=config.input,
                           label="--rejected-output")
    storage.check_reachable(config.input)
    for uri in (config.output, config.rejected_uri):
        storage.check_writable(uri)
    inputs = read.list_inputs(config.input, fmt, storage)
    if not inputs:
        raise InputError(
            f"--input {config.input!r} matched no {fmt} files "
            f"(looked for names ending in {list(read.SUFFIXES[fmt])})"
        )
    spec, task, dims = model_plan(config, storage)
    chunking = chunk_plan(config, spec, task)
    quantize, float_dims = quantize_plan(config, dims)
    read_spec, keep_fields = read_spec_for(config, fmt, inputs, storage)
    units = read.plan_units(inputs, config.read_unit_bytes)
    if config.limit is not None:  # the first units holding the first `limit` rows
        units, caps = read.limit_units(units, read_spec, config.limit)
        read_spec = dataclasses.replace(read_spec, row_caps=caps)
    settings = {"input": config.input, "format": fmt, "weights": spec.fingerprint,
                "task": task, "dims": dims, "id": config.id_column,
                "text": config.text_column, "keep": config.keep_columns,
                "dtype": config.vector_dtype, "unit_bytes": config.read_unit_bytes}
    if config.limit is not None:  # (only then: older runs' keys stay valid)
        settings["limit"] = config.limit
    if quantize:  # (only then: older runs' keys stay valid)
        settings |= {"quantize": {str(d): f for d, f in quantize.items()},
                     "float_dims": float_dims}
    if chunking is not None:  # (only then: older runs' keys stay valid)
        settings["chunking"] = dataclasses.asdict(chunking)
    key = run_key(settings)
    fingerprints = {i.uri: i.fingerprint for i in inputs}
    resumed = _resumable(config, storage, key, fingerprints)
    recreate_output = resumed is None and _check_output(config, storage)
    appending = config.mode == "append" or resumed is not None
    recreate_rejected = not appending or not storage.lance_exists(config.rejected_uri)
    stamp = _stamp(config, spec, task, dims) | _chunk_stamp(chunking)
    schema = S.output_schema(read_spec.id_type, spec.hidden_size, dims, config.vector_dtype,
                             keep_fields, stamp, quantize, float_dims)
    if chunking is not None:
        schema = S.chunk_schema(schema)
    held, ours = _existing_columns(config, storage), _columns(schema)
    if not recreate_output and held != ours:
        raise ConfigError(
            f"appending to output {config.output!r}, which has columns {held}; "
            f"this run would write {ours}"
        )
    return RunPlan(
        config=config, storage=storage,
        units=[u for u in units if resumed is None or u not in resumed.done], sources=units,
        fingerprints=fingerprints, run_key=key, resumed=resumed, model=spec, task=task,
        dims=dims, quantize=quantize, float_dims=float_dims, schema=schema,
        recreate_output=recreate_output,
        recreate_rejected=recreate_rejected, read=read_spec,
        tokenize=TokenizeSpec(model=spec, task=task, storage=storage, chunking=chunking),
        bucket=BucketSpec(max_tokens=config.max_tokens_per_batch, padded=not config.packed,
                          overhead_tokens=config.overhead_tokens),
        encode=EncodeSpec(model=config.model, task=task, dims=dims,
                          vector_dtype=config.vector_dtype, packed=config.packed,
                          compile=config.compile, use_gpu=config.gpus_per_actor > 0,
                          cpu_threads=int(config.cpus_per_actor), storage=storage,
                          quantize=quantize, float_dims=float_dims,
                          chunking=config.chunking),
        write=WriteSpec(output=config.output, rejected_output=config.rejected_uri,
                        schema=schema, storage=storage, rows_per_file=config.rows_per_file,
                        replace_schema=recreate_output and held is not None and held != ours),
        sizes={i.uri: i.size for i in inputs if i.fingerprint != "fragment"},
    )


def _resumable(
    config: EmbedConfig, storage: Storage, key: str, fingerprints: dict[str, str]
) -> ProgressRecord | None:
    """The progress of an interrupted attempt at this same run, if the output holds one."""
    if config.mode == "overwrite":
        return None
    record = read_record(config.output, storage)
    if record is None or record.complete:
        return None
    if record.run_key != key:
        raise OutputExistsError(
            f"output {config.output!r} holds an interrupted run with other settings "
            "(input, model weights, task, dims, columns, vector dtype or read unit bytes "
            "differ); rerun it "
            "with the same settings to resume, or pass --mode overwrite to start over"
        )
    changed = sorted({read.unit_file(u) for u, fp in record.done.items()
                      if fingerprints.get(read.unit_file(u)) != fp})
    if changed:
        raise InputError(
            f"input changed since the interrupted run of {config.output!r}: {changed[:5]} "
            "(finished files changed or disappeared); pass --mode overwrite to start over"
        )
    logger.info("resuming %s: %d of %d input units already done", config.output,
                len(record.done), len(fingerprints))
    return record


def _check_output(config: EmbedConfig, storage: Storage) -> bool:
    """True when this run creates (or replaces) the output table."""
    exists = storage.lance_exists(config.output)
    if exists and config.mode == "create":
        raise OutputExistsError(
            f"output {config.output!r} already exists and mode is 'create'; "
            "pass --mode overwrite to replace it or --mode append to add to it"
        )
    return config.mode == "overwrite" or not exists


def read_spec_for(
    config: EmbedConfig, fmt: str, inputs: list[st.Listed], storage: Storage
) -> tuple[read.ReadSpec, list[pa.Field]]:
    probe = read.ReadSpec(
        format=fmt, id_column=config.id_column, text_column=config.text_column,
        keep_columns=config.keep_columns, id_type=pa.null(), keep_types=(), storage=storage,
    )
    schema = pa.schema([])
    for listed in inputs[:SCHEMA_PROBE_UNITS]:
        schema = read.probe_schema(listed.uri, probe, listed.size or None)
        if len(schema):
            break
    names = schema.names
    if names:
        for label, column in (("--id-column", config.id_column),
                              ("--text-column", config.text_column)):
            if column not in names:
                raise ConfigError(f"{label} {column!r} not in the input's columns {names}")
    missing = [c for c in config.keep_columns if c not in names]
    if missing:
        raise ConfigError(f"--keep-columns {missing} not in the input's columns {names}")
    id_type = _id_type(schema.field(config.id_column).type if names else pa.string())
    keep_fields = [pa.field(c, _plain(schema.field(c).type)) for c in config.keep_columns]
    spec = read.ReadSpec(
        format=fmt, id_column=config.id_column, text_column=config.text_column,
        keep_columns=config.keep_columns, id_type=id_type,
        keep_types=tuple(f.type for f in keep_fields), storage=storage,
        fail_fast=config.fail_fast,
    )
    return spec, keep_fields


def _id_type(found: pa.DataType) -> pa.DataType:
    """The output id type: the input's, with string flavours and nulls made plain string."""
    if pa.types.is_null(found) or pa.types.is_large_string(found) or pa.types.is_string_view(found):
        return pa.string()
    if pa.types.is_dictionary(found):
        return _id_type(found.value_type)
    return found


def _plain(found: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(found):
        return found.value_type
    return pa.string() if pa.types.is_null(found) else found


def model_plan(
    config: EmbedConfig, storage: Storage
) -> tuple[ModelSpec, str | None, tuple[int, ...]]:
    """The model's spec, the task (default filled in) and every stored dim, full one first."""
    spec = load_spec(config.model, filesystem=storage.fsspec(config.model))
    task = _task(config, spec)
    for dim in config.dims:
        if not (config.allow_any_dims and 1 <= dim <= spec.hidden_size):
            _check_dim(spec, dim)
    return spec, task, (spec.hidden_size, *(d for d in config.dims if d != spec.hidden_size))


def chunk_plan(config: EmbedConfig, spec: ModelSpec, task: str | None) -> ChunkSpec | None:
    """The chunking settings checked against the model (reads only its tokenizer); None for
    ``--chunking none``.

    Raises:
        ConfigError: ``late`` with a model that does not pool by mean or with ``--packed``;
            a window over the model's context; a chunk that does not fit in one forward.
    """
    if not config.chunked:
        return None
    if config.chunking == "late" and spec.pooling != "mean":
        raise ConfigError(f"--chunking late pools each chunk by the mean of its token states; "
                          f"--model {config.model!r} pools by {spec.pooling!r}; expected a "
                          "model with 'mean' pooling, or --chunking one of ['none', 'split']")
    if config.chunking == "late" and config.packed:
        raise ConfigError("--packed is not available with --chunking late (windows run as "
                          "padded forwards); expected --chunking one of ['none', 'split']")
    window = config.chunk_window_tokens or spec.max_tokens
    if window > spec.max_tokens:
        raise ConfigError(f"--chunk-window-tokens {window} is not allowed; expected at most "
                          f"the model's context, {spec.max_tokens} tokens")
    doc = spec.tokenizer().tokenize_documents(["x"], task)[0]
    extra = len(doc.lead) + len(doc.trail)  # special tokens and prefix in every forward
    room = (window if config.chunking == "late" else spec.max_tokens) - extra
    if config.chunk_tokens > room:
        raise ConfigError(f"--chunk-tokens {config.chunk_tokens} is not allowed; expected at "
                          f"most {room} (a forward of {room + extra} tokens less {extra} "
                          "special and prefix tokens)")
    return ChunkSpec(mode=config.chunking, tokens=config.chunk_tokens,
                     overlap=config.chunk_overlap, boundaries=config.chunk_boundaries,
                     window=window)


def _chunk_stamp(chunking: ChunkSpec | None) -> dict[str, str]:
    """The chunk table's stamp (none for other tables)."""
    if chunking is None:
        return {}
    settings = dataclasses.asdict(chunking) | {
        "pooled": "late: mean of the span's token states from one forward per window; the "
                  "first chunk also pools the leading special token and prefix, the last "
                  "the closing special token; split: each chunk embedded alone as "
                  "lead + chunk tokens + trail"}
    return {S.CHUNKING: json.dumps(settings)}


def quantize_plan(
    config: EmbedConfig, dims: tuple[int, ...]
) -> tuple[dict[int, tuple[str, ...]], tuple[int, ...] | None]:
    """dim -> quantized forms, and the dims that keep a float column (None: all of them)."""
    quantize = config.quantize_plan(dims)
    if not config.no_float_dims:
        return quantize, None
    return quantize, tuple(d for d in dims if d not in config.no_float_dims)


def _check_dim(spec: ModelSpec, dim: int) -> None:
    try:
        spec.check_dim(dim)
    except UnsupportedDimError as e:
        raise UnsupportedDimError(
            f"{e}; other truncations (1..{spec.hidden_size}) need --allow-any-dims "
            "(the model was not trained for them)") from e


def _task(config: EmbedConfig, spec: ModelSpec) -> str | None:
    """``--prompt-name`` (a generic model's named prompt) or ``--task``, default filled in."""
    if config.prompt_name is None:
        task = config.task if config.task is not None else spec.default_task
        spec.check_task(task)
        return task
    prompts = [t for t in spec.tasks if t in spec.instructions] if spec.kind == "generic" else []
    if config.prompt_name not in prompts:
        raise ConfigError(f"--prompt-name {config.prompt_name!r} not in the model's prompts "
                          f"{prompts} (config_sentence_transformers.json)")
    if config.task is not None and config.task != config.prompt_name:
        raise ConfigError(f"--task {config.task!r} and --prompt-name {config.prompt_name!r} "
                          "differ: give one")
    return config.prompt_name


def plan_stamp(config: EmbedConfig) -> dict[str, str]:
    """The stamp a run of ``config`` would write (reads the model's config, no weights)."""
    spec, task, dims = model_plan(config, Storage.resolve(config.storage_options))
    return _stamp(config, spec, task, dims) | _chunk_stamp(chunk_plan(config, spec, task))


def portable_source(model: str) -> str:
    """The model source as it works from any directory: a local path made absolute; a hub
    id or ``s3://`` prefix as given (the revision is stamped beside it)."""
    import os

    if "://" not in model and os.path.exists(model):
        return os.path.abspath(model)
    return model


def _stamp(
    config: EmbedConfig, spec: ModelSpec, task: str | None, dims: tuple[int, ...]
) -> dict[str, str]:
    """Schema metadata: what produced these vectors (read back by refresh and search). The
    int8 calibration is added by ``driver.calibrate`` once the run knows it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("embedjob")
    except PackageNotFoundError:
        package_version = "unknown"
    return {
        S.MODEL_SOURCE: portable_source(config.model),
        S.MODEL_REVISION: spec.revision or "",
        S.WEIGHTS_HASH: spec.fingerprint,
        S.TASK: task or "",
        S.INSTRUCTION: spec.instructions.get(task or "", ""),
        S.LICENSE: spec.license,
        **_undeclared_stamp(spec, dims),
        S.DIMS: json.dumps(list(dims)),
        S.NORMALIZATION: "l2; vector_<d> = l2(truncate(vector, d))",
        S.VECTOR_DTYPE: config.vector_dtype,
        S.VERSION: package_version,
        S.CREATED_AT: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    } | _quantize_stamp(config, dims) | (
        {S.LIMIT: str(config.limit)} if config.limit is not None else {})


def _undeclared_stamp(spec: ModelSpec, dims: tuple[int, ...]) -> dict[str, str]:
    undeclared = [d for d in dims if d not in spec.matryoshka_dims]
    return {S.UNDECLARED_DIMS: json.dumps(undeclared)} if undeclared else {}


def _quantize_stamp(config: EmbedConfig, dims: tuple[int, ...]) -> dict[str, str]:
    """The quantized columns' stamp keys; none for a table without them."""
    quantize, float_dims = quantize_plan(config, dims)
    if not quantize:
        return {}
    return {S.QUANTIZE: json.dumps({str(d): list(f) for d, f in quantize.items()}),
            S.FLOAT_DIMS: json.dumps(list(dims if float_dims is None else float_dims))}


def _existing_columns(
    config: EmbedConfig, storage: Storage
) -> list[tuple[str, pa.DataType]] | None:
    """The output's columns, or None when there is no output yet."""
    if not storage.lance_exists(config.output):
        return None
    return _columns(storage.open_lance(config.output).schema)


def _columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]
