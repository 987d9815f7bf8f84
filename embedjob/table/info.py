"""``embedjob info``: what an output table holds, read from Lance alone (no model, no Ray).

Rows, versions, the stamp (model, task, dims), bytes on disk per column, fragments, indices,
the rejected table's row count and the last run's summary (table metadata key
``embedjob.last_run``, a JSON string).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from embedjob import schema as S
from embedjob.storage import Storage
from embedjob.table.search import open_table, vector_columns

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TableInfo:
    """A summary of one output table.

    Attributes:
        uri: The table.
        rows: Rows in the latest version.
        version: The latest version number.
        versions: How many versions are kept.
        fragments: Fragments in the latest version.
        stamp: The ``embedjob.*`` schema metadata (prefix stripped).
        vector_columns: Vector column -> dim.
        column_bytes: Column -> bytes on disk.
        bytes_per_row: Vector column (float and quantized) -> bytes one row of it takes
            (dim x element size; binary: dim / 8).
        vector_dtypes: Vector column -> float32, float16, int8 or binary.
        indices: Index name -> ``{"type", "columns"}``.
        rejected_uri: The rejected table next to it.
        rejected_rows: Rows in the rejected table; None when there is none.
        last_run: The last run's summary; None when the table carries none.
    """

    uri: str
    rows: int
    version: int
    versions: int
    fragments: int
    stamp: dict[str, str]
    vector_columns: dict[str, int]
    column_bytes: dict[str, int]
    bytes_per_row: dict[str, int]
    vector_dtypes: dict[str, str]
    indices: dict[str, dict[str, Any]]
    rejected_uri: str
    rejected_rows: int | None
    last_run: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


def table_info(uri: str, storage: Storage | None = None,
               rejected_uri: str | None = None) -> TableInfo:
    """Read a table's summary.

    Args:
        uri: The output table, local or ``s3://``.
        storage: Storage options (default: the AWS environment).
        rejected_uri: The rejected table; default ``<output>.rejected.lance`` as the job names it.
    """
    storage = storage or Storage.resolve()
    dataset = open_table(uri, storage)
    schema = dataset.schema
    stamp = {k.removeprefix(S.STAMP_PREFIX): v for k, v in S.schema_metadata(schema).items()
             if k.startswith(S.STAMP_PREFIX)}
    vectors = vector_columns(schema)
    layout = S.vector_layout(schema)
    rejected = rejected_uri or S.sibling_uri(uri, "rejected")
    return TableInfo(
        uri=uri, rows=dataset.count_rows(), version=dataset.version,
        versions=len(dataset.versions()), fragments=len(dataset.get_fragments()), stamp=stamp,
        vector_columns=vectors, column_bytes=_column_bytes(dataset),
        bytes_per_row={c: v.bytes_per_row for c, v in layout.items()},
        vector_dtypes={c: v.dtype for c, v in layout.items()},
        indices=_indices(dataset), rejected_uri=rejected,
        rejected_rows=_rejected_rows(rejected, storage),
        last_run=_last_run(dataset),
    )


def _column_bytes(dataset: Any) -> dict[str, int]:
    """Top-level column -> bytes on disk (Lance's per-field data statistics)."""
    names = {field.id(): field.name() for field in dataset.lance_schema.fields()}
    stats = dataset.stats.data_stats().fields
    return {names[s.id]: s.bytes_on_disk for s in stats if s.id in names}


def _indices(dataset: Any) -> dict[str, dict[str, Any]]:
    found = {}
    for index in dataset.describe_indices():
        found[index.name] = {"type": index.index_type, "columns": list(index.field_names)}
    return found


def _rejected_rows(uri: str, storage: Storage) -> int | None:
    if not storage.lance_exists(uri):
        return None
    return open_table(uri, storage).count_rows()


def last_run_json(dataset: Any) -> str | None:
    """The newest run summary: a transaction property of the commit that ended the run
    (``embedjob.last_run``), found walking back from the latest version past compactions,
    deletes and index builds; older tables kept it in the table metadata."""
    for version in sorted((v["version"] for v in dataset.versions()), reverse=True):
        transaction = dataset.read_transaction(version)
        props = (transaction.transaction_properties or {}) if transaction else {}
        if S.LAST_RUN_KEY in props:
            return props[S.LAST_RUN_KEY]
    return dataset.metadata.get(S.LAST_RUN_KEY)


def _last_run(dataset: Any) -> dict[str, Any] | None:
    raw = last_run_json(dataset)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("table metadata %s is not JSON: %.200s", S.LAST_RUN_KEY, raw)
        return {"raw": raw}


def format_info(info: TableInfo) -> str:
    """The human-readable ``embedjob info`` report."""
    stamp = info.stamp
    lines = [
        f"table      {info.uri}",
        f"rows       {info.rows}",
        f"version    {info.version} ({info.versions} versions kept)",
        f"fragments  {info.fragments}",
        f"model      {stamp.get('model_source', '?')} "
        f"(weights {stamp.get('weights_hash', '?')[:16]})",
        f"licence    {stamp.get('license', 'unknown')}",
        f"task       {stamp.get('task') or '(none)'}"
        + (f", instruction {stamp['instruction']!r}" if stamp.get("instruction") else ""),
        f"dims       {stamp.get('dims', '?')} as {stamp.get('vector_dtype', '?')}",
        f"created    {stamp.get('created_at', '?')} by embedjob {stamp.get('version', '?')}",
        f"rejected   {_rejected_line(info)}",
        "columns    bytes on disk" + ("" if info.rows else " (empty table)"),
    ]
    for name, size in info.column_bytes.items():
        per_row = ""
        if name in info.bytes_per_row:  # on disk, then what the rows hold raw
            raw = info.bytes_per_row[name] * info.rows
            per_row = (f", {info.bytes_per_row[name]} B/row {info.vector_dtypes[name]}, "
                       f"{raw:,d} raw")
        lines.append(f"  {name:<18} {size:>14,d}{per_row}")
    for name, index in info.indices.items():
        lines.append(f"index      {name}: {index['type']} on {index['columns']}")
    lines.append("last run   " + (json.dumps(info.last_run) if info.last_run else "(not stored)"))
    return "\n".join(lines)


def _rejected_line(info: TableInfo) -> str:
    if info.rejected_rows is None:
        return f"(no table at {info.rejected_uri})"
    return f"{info.rejected_rows} rows in {info.rejected_uri}"
