"""The tables' vocabulary, declared once: column names, the row status, the output, rejected
and write-result schemas, stamp keys, sibling-table names and the run counters.

Adding a column or a counter touches this module only (and the stage that fills it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import pyarrow as pa

# --- columns that travel between stages (internal: never written as they are) -------------

SOURCE = "_source"  # the file (or Lance fragment) the row came from
ROW = "_row"  # the row's key in that file (its index; stages/read.py for split text files)
UNIT = "_unit"  # the read unit the row came from (a file, a byte range of one, a fragment)
ID = "_id"  # the row's id, cast to the output id type
TEXT = "_text"  # the text (null when not a string); dropped after tokenizing
STATUS = "_status"  # int8 Status
REASON = "_reason"  # why a row is rejected; null otherwise
INPUT_IDS = "input_ids"  # list<int32> token ids, prefix and special tokens included
BATCH = "_batch"  # the forward a row belongs to (bucket stage); -1 for rows not encoded
PROCESSED_TOKENS = "_processed_tokens"  # tokens the encoder processed for the row (padding)
# chunk tables (--chunking late|split): what the tokenize stage adds per chunk or window
CHUNKS = "_chunks"  # late: list<struct> of the chunks pooled from a window row (CHUNK_STRUCT)
COUNTED_TOKENS = "_counted_tokens"  # tokens the summary counts for the row (a chunk table's)
DOC_SHARE = "_doc_share"  # the row's share of its document, DOC_WEIGHT per document
DOC_WEIGHT = 1 << 20  # shares per document: a unit is committed when all its shares are


class Status(enum.IntEnum):
    """What happens to a row; stored in ``STATUS`` as int8."""

    EMBED = 0  # embedded and written to the output
    REJECTED = 1  # set aside in the rejected table with its REASON


STATUS_TYPE = pa.int8()


def status_array(statuses: list[Status] | list[int]) -> pa.Array:
    """An int8 status column."""
    return pa.array([int(s) for s in statuses], STATUS_TYPE)


def token_ids_array(ids: list[np.ndarray | None]) -> pa.Array:
    """list<int32> without a Python round trip per token."""
    lengths = np.array([0 if x is None else len(x) for x in ids], np.int64)
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [x for x in ids if x is not None]
    values = np.concatenate(present).astype(np.int32) if present else np.zeros(0, np.int32)
    mask = pa.array([x is None for x in ids], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


# --- the output table ---------------------------------------------------------------------

OUT_ID = "id"
VECTOR = "vector"  # the full-dim vector; every other stored dim d is vector_<d>
N_TOKENS = "n_tokens"
TRUNCATED = "truncated"
CONTENT_HASH = "content_hash"
SOURCE_FILE = "source_file"  # lineage: resume and refresh delete exactly a unit's rows
SOURCE_ROW = "source_row"
OUTPUT_COLUMNS: tuple[str, ...] = (VECTOR, N_TOKENS, TRUNCATED, CONTENT_HASH, SOURCE_FILE,
                                   SOURCE_ROW)
# output column -> the internal column it is written from
LINEAGE: dict[str, str] = {OUT_ID: ID, SOURCE_FILE: SOURCE, SOURCE_ROW: ROW, "doc_id": ID}
VectorDtype = Literal["float32", "float16"]
VECTOR_DTYPES: tuple[str, ...] = ("float32", "float16")


def vector_column(dim: int, full_dim: int) -> str:
    """``vector`` for the full dim, else ``vector_<dim>``."""
    return VECTOR if dim == full_dim else f"{VECTOR}_{dim}"


def is_vector_column(name: str) -> bool:
    return name == VECTOR or name.startswith(VECTOR + "_")


def vector_type(vector_dtype: str) -> pa.DataType:
    return pa.float16() if vector_dtype == "float16" else pa.float32()


# Quantized columns beside the floats: vector_<d>_int8 (one signed byte per dim, per-dim
# ranges calibrated and stamped) and vector_<d>_bin (the sign bits, packed 8 per byte,
# big-endian as numpy's packbits). The dim is always in the name, the full dim's too.
QUANT_DTYPES: tuple[str, ...] = ("int8", "binary")
QUANT_SUFFIXES: dict[str, str] = {"int8": "int8", "binary": "bin"}
BYTES_PER_VALUE: dict[str, float] = {"float32": 4, "float16": 2, "int8": 1, "binary": 1 / 8}


def quantized_column(dim: int, dtype: str) -> str:
    """``vector_<dim>_int8`` or ``vector_<dim>_bin``."""
    return f"{VECTOR}_{dim}_{QUANT_SUFFIXES[dtype]}"


def quantized_type(dim: int, dtype: str) -> pa.DataType:
    """``fixed_size_list<int8>[dim]`` or ``fixed_size_list<uint8>[dim / 8]``."""
    return pa.list_(pa.int8(), dim) if dtype == "int8" else pa.list_(pa.uint8(), dim // 8)


@dataclass(frozen=True)
class VectorColumn:
    """One stored vector column: its dim (bits for binary) and element type."""

    name: str
    dim: int
    dtype: str  # float32, float16, int8 or binary

    @property
    def bytes_per_row(self) -> int:
        return int(self.dim * BYTES_PER_VALUE[self.dtype])

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANT_DTYPES


_VALUE_DTYPES = {pa.float32(): "float32", pa.float16(): "float16", pa.int8(): "int8",
                 pa.uint8(): "binary"}


def vector_layout(schema: pa.Schema) -> dict[str, VectorColumn]:
    """Every vector column of a schema (float and quantized), read from its arrow type."""
    found = {}
    for f in schema:
        if not (is_vector_column(f.name) and pa.types.is_fixed_size_list(f.type)):
            continue
        dtype = _VALUE_DTYPES.get(f.type.value_type)
        if dtype is not None:
            size = f.type.list_size
            found[f.name] = VectorColumn(f.name, size * 8 if dtype == "binary" else size, dtype)
    return found


def output_schema(id_type: pa.DataType, full_dim: int, dims: tuple[int, ...],
                  vector_dtype: str, keep: list[pa.Field],
                  metadata: Mapping[str, str],
                  quantize: Mapping[int, tuple[str, ...]] | None = None,
                  float_dims: tuple[int, ...] | None = None) -> pa.Schema:
    """The output table's schema, stamped with ``metadata``; ``dims`` full dim first.

    Each dim's columns sit together: the float column (unless the dim is left out of
    ``float_dims``), then its quantized ones (``quantize``: dim -> dtypes).
    """
    value = vector_type(vector_dtype)
    quantize = quantize or {}
    vectors = []
    for d in dict.fromkeys((full_dim, *dims)):
        if float_dims is None or d in float_dims:
            vectors.append(pa.field(vector_column(d, full_dim), pa.list_(value, d)))
        vectors += [pa.field(quantized_column(d, q), quantized_type(d, q))
                    for q in quantize.get(d, ())]
    return pa.schema([
        pa.field(OUT_ID, id_type),
        *vectors,
        pa.field(N_TOKENS, pa.int32()),
        pa.field(TRUNCATED, pa.bool_()),
        pa.field(CONTENT_HASH, pa.string()),
        *keep,
        pa.field(SOURCE_FILE, pa.string()),
        pa.field(SOURCE_ROW, pa.int64()),
    ], metadata=dict(metadata))


# --- the chunk table (--chunking late|split): one row per chunk of a document -------------

DOC_ID = "doc_id"  # the document's id (the input's id column)
CHUNK = "chunk"  # int32: the chunk's index in its document, from 0
CHAR_START, CHAR_END = "char_start", "char_end"  # int64: text[char_start:char_end] is the chunk
TOKEN_START, TOKEN_END = "token_start", "token_end"  # int32: its span in the text's tokens
CHUNK_COLUMNS: tuple[str, ...] = (CHUNK, CHAR_START, CHAR_END, TOKEN_START, TOKEN_END)
POOL_START, POOL_END = "pool_start", "pool_end"  # late: the positions pooled in the window
CHUNK_STRUCT = pa.struct([pa.field(CHUNK, pa.int32()), pa.field(CHAR_START, pa.int64()),
                          pa.field(CHAR_END, pa.int64()), pa.field(TOKEN_START, pa.int32()),
                          pa.field(TOKEN_END, pa.int32()), pa.field(N_TOKENS, pa.int32()),
                          pa.field(POOL_START, pa.int32()), pa.field(POOL_END, pa.int32()),
                          pa.field(COUNTED_TOKENS, pa.int64()),
                          pa.field(DOC_SHARE, pa.int64())])


def chunk_schema(output: pa.Schema) -> pa.Schema:
    """The chunk table's schema from the output schema of the same run: ``id`` becomes
    ``doc_id`` followed by the chunk's index and spans; no ``truncated`` (nothing is cut)."""
    fields = [pa.field(DOC_ID, output.field(OUT_ID).type),
              pa.field(CHUNK, pa.int32()), pa.field(CHAR_START, pa.int64()),
              pa.field(CHAR_END, pa.int64()), pa.field(TOKEN_START, pa.int32()),
              pa.field(TOKEN_END, pa.int32())]
    fields += [f for f in output if f.name not in (OUT_ID, TRUNCATED)]
    return pa.schema(fields, metadata=output.metadata)


def is_chunk_table(schema: pa.Schema) -> bool:
    return DOC_ID in schema.names and CHUNK in schema.names


# --- the rejected table -------------------------------------------------------------------

REJECTED_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("source", pa.string()),
    pa.field("row", pa.int64()),
])
REJECTED_SOURCE = "source"  # the rejected table's lineage columns (resume deletes by them)
REJECTED_ROW = "row"
REJECTED_ID = "id"  # as a string
REJECTED_REASON = "reason"


# --- stamp: schema metadata saying what made the vectors ----------------------------------

STAMP_PREFIX = "embedjob."
MODEL_SOURCE = "embedjob.model_source"
MODEL_REVISION = "embedjob.model_revision"
WEIGHTS_HASH = "embedjob.weights_hash"
TASK = "embedjob.task"
INSTRUCTION = "embedjob.instruction"
DIMS = "embedjob.dims"
NORMALIZATION = "embedjob.normalization"
VECTOR_DTYPE = "embedjob.vector_dtype"
VERSION = "embedjob.version"
CREATED_AT = "embedjob.created_at"
LIMIT = "embedjob.limit"  # --limit N: the table holds only the first N input rows
LICENSE = "embedjob.license"  # the model's licence (model card front matter / config)
# Only when --allow-any-dims stored dims the model does not declare: JSON [dims]
UNDECLARED_DIMS = "embedjob.undeclared_dims"
# Only in chunk tables: JSON {mode, tokens, overlap, boundaries, window_tokens, pooled}
CHUNKING = "embedjob.chunking"
# Only in tables with quantized columns (so older tables' stamps still match):
QUANTIZE = "embedjob.quantize"  # JSON {dim: [dtypes]}
FLOAT_DIMS = "embedjob.float_dims"  # JSON [dims that keep their float column]
INT8_CALIBRATION = "embedjob.int8_calibration"  # JSON {rows, formula, ranges {dim: [lo, hi]}}
# Keys that must match for old and new vectors to live in one table (refresh). The int8
# ranges are not among them: a refresh reuses the table's.
COMPATIBILITY_KEYS: tuple[str, ...] = (WEIGHTS_HASH, TASK, INSTRUCTION, DIMS, VECTOR_DTYPE,
                                       QUANTIZE, FLOAT_DIMS, CHUNKING)
# Table metadata (not schema metadata): the progress record and the last run's summary.
PROGRESS_KEY = "embedjob.progress"  # (older tables; now in the transaction properties)
LAST_RUN_KEY = "embedjob.last_run"  # also the last commit's transaction property
# Transaction properties of every output commit of a run (driver/progress.py).
TX_RUN_KEY = "embedjob.run_key"
TX_UNITS = "embedjob.units"  # JSON: the units this commit finishes, per file
TX_RUN_START = "embedjob.run_start"  # on a fresh run's first commit
TX_COMPLETE = "embedjob.complete"  # on the run's last commit
TX_GONE = "embedjob.gone"  # JSON list: units a refresh delta removes from the record
# a refresh writes a full record (a checkpoint) after this many deltas: bounds the walk
REFRESH_CHECKPOINT_EVERY = 64


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """A schema's metadata as str -> str."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


# --- sibling tables and files beside an output ---------------------------------------------

SiblingRole = Literal["rejected", "lease"]
SIBLING_SUFFIXES: dict[str, str] = {
    "rejected": ".rejected.lance",  # rows set aside, with their reasons
    "lease": ".lease.json",  # who is writing the output, until when
}


def sibling_uri(output: str, role: SiblingRole) -> str:
    """``<output without .lance><suffix of role>``, e.g. ``out.lance`` -> ``out.rejected.lance``."""
    base = output.rstrip("/")
    return base.removesuffix(".lance") + SIBLING_SUFFIXES[role]


# --- the run counters ------------------------------------------------------------------------


@dataclass(kw_only=True)
class Counts:
    """Figures summed over every write-stage result; the summary reports each one."""

    rows_embedded: int = 0
    rows_rejected: int = 0
    rows_duplicate: int = 0  # of rows_rejected: their id belongs to an earlier row
    rows_unchanged: int = 0
    rows_changed: int = 0
    rows_truncated: int = 0
    chunks_embedded: int = 0  # chunk tables: chunk rows written (rows_embedded: documents)
    tokens: int = 0  # real tokens embedded (prefix and special tokens included)
    processed_tokens: int = 0  # tokens the encoder processed (padding included)

    def add(self, result: pa.Table) -> None:
        """Add the counters of write-stage result rows (``RESULT_SCHEMA``)."""
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + sum(result.column(name).to_pylist()))

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(Counts))

# One row per write-stage call: the uncommitted fragments, the counters, and the rows written
# per input unit (so the driver knows when a unit is wholly committed).
RESULT_SCHEMA = pa.schema([
    pa.field("main_fragments", pa.list_(pa.binary())),
    pa.field("rejected_fragments", pa.list_(pa.binary())),
    *(pa.field(name, pa.int64()) for name in COUNTERS),
    pa.field("units", pa.list_(pa.string())),
    pa.field("unit_rows", pa.list_(pa.int64())),
])
