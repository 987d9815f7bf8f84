"""Write stage: Lance fragments through ``lance_ray``'s fragment writer; commits on the driver.

Each call writes the embedded rows to the output table and the rejected rows to the
rejected table as uncommitted fragments, and returns one row with the pickled fragment
metadata and the call's counts. The driver commits what it has collected (periodically
and at the end), so what a reader sees is always a whole commit.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc
from lance_ray import LanceFragmentWriter

from embedjob import storage
from embedjob.ops.refresh import UNCHANGED

RESULT_SCHEMA = pa.schema(
    [
        pa.field("main_fragments", pa.list_(pa.binary())),
        pa.field("rejected_fragments", pa.list_(pa.binary())),
        pa.field("rows_embedded", pa.int64()),
        pa.field("rows_rejected", pa.int64()),
        pa.field("rows_unchanged", pa.int64()),
        pa.field("rows_changed", pa.int64()),
        pa.field("rows_truncated", pa.int64()),
        pa.field("tokens", pa.int64()),
        pa.field("processed_tokens", pa.int64()),
        pa.field("units", pa.list_(pa.string())),
        pa.field("unit_rows", pa.list_(pa.int64())),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
    ]
)


def main_schema(
    id_type: pa.DataType,
    hidden: int,
    dims: tuple[int, ...],
    vector_dtype: str,
    keep: list[pa.Field],
    metadata: Mapping[str, str],
) -> pa.Schema:
    """The output table's schema, stamped with ``metadata``."""
    value = pa.float16() if vector_dtype == "float16" else pa.float32()
    vectors = [pa.field("vector", pa.list_(value, hidden))] + [
        pa.field(f"vector_{d}", pa.list_(value, d)) for d in dims if d != hidden
    ]
    fields = [
        pa.field("id", id_type),
        *vectors,
        pa.field("n_tokens", pa.int32()),
        pa.field("truncated", pa.bool_()),
        pa.field("content_hash", pa.string()),
        *keep,
        # lineage: lets a resumed run delete exactly the rows of unfinished input units
        pa.field("source_file", pa.string()),
        pa.field("source_row", pa.int64()),
    ]
    return pa.schema(fields, metadata=dict(metadata))


def write_block(
    table: pa.Table,
    *,
    output: str,
    rejected_output: str,
    schema: pa.Schema,
    storage_options: Mapping[str, str],
    replace_schema: bool = False,
) -> pa.Table:
    """``map_batches`` body: write both fragments, return one result row.

    ``replace_schema``: the output is being recreated over a table with another schema.
    """
    options = storage.lance_options(storage_options)
    reason = table.column("_reject")
    unchanged = pc.fill_null(pc.equal(reason, UNCHANGED), False)
    is_rejected = pc.and_(pc.is_valid(reason), pc.invert(unchanged))
    accepted = table.filter(pc.is_null(reason))
    rejected = table.filter(is_rejected)
    main = _write(_to_main(accepted, schema), output, schema, options, replace_schema)
    rejects = _write(_to_rejected(rejected), rejected_output, REJECTED_SCHEMA, options)
    tokens = pc.sum(accepted.column("n_tokens")).as_py() or 0
    processed = pc.sum(accepted.column("_processed_tokens")).as_py() or 0
    truncated = pc.sum(accepted.column("truncated").cast(pa.int64())).as_py() or 0
    units = pc.value_counts(table.column("_source")).to_pylist() if table.num_rows else []
    row = {
        "main_fragments": [main],
        "rejected_fragments": [rejects],
        "rows_embedded": [accepted.num_rows],
        "rows_rejected": [rejected.num_rows],
        "rows_unchanged": [pc.sum(unchanged.cast(pa.int64())).as_py() or 0],
        "rows_changed": [pc.sum(accepted.column("_changed").cast(pa.int64())).as_py() or 0],
        "rows_truncated": [truncated],
        "tokens": [tokens],
        "processed_tokens": [processed],
        "units": [[u["values"] for u in units]],
        "unit_rows": [[u["counts"] for u in units]],
    }
    return pa.table(row, schema=RESULT_SCHEMA)


def _write(
    table: pa.Table, uri: str, schema: pa.Schema, options: dict, replace_schema: bool = False
) -> list[bytes]:
    """Uncommitted fragments, pickled. lance_ray's writer always writes in append mode,
    which refuses a schema other than the existing table's; when the run replaces that
    schema (overwrite, stamp migration), pylance's own writer is told so."""
    if table.num_rows == 0:
        return []
    if replace_schema:
        from lance.fragment import write_fragments

        fragments = write_fragments(table, uri, schema=schema, mode="overwrite",
                                    storage_options=options)
        return [pickle.dumps(fragment) for fragment in fragments]
    writer = LanceFragmentWriter(uri, schema=schema, storage_options=options)
    return writer(table).column("fragment").to_pylist()


LINEAGE = {"id": "_id", "source_file": "_source", "source_row": "_row"}


def _to_main(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = {name: table.column(LINEAGE.get(name, name)) for name in schema.names}
    return pa.table(columns).cast(schema)


def _to_rejected(table: pa.Table) -> pa.Table:
    ids = [None if v is None else str(v) for v in table.column("_id").to_pylist()]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "reason": table.column("_reject"),
            "source": table.column("_source"),
            "row": table.column("_row"),
        },
        schema=REJECTED_SCHEMA,
    )


def load_fragments(pickled: list[bytes]) -> list:
    """Pickled ``FragmentMetadata`` from the write stage -> objects to commit."""
    return [pickle.loads(blob) for blob in pickled]
