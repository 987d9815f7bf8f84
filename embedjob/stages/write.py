"""Write stage: Lance fragments through ``lance_ray``'s fragment writer; commits on the driver.

Each call writes the embedded rows to the output table and the rejected rows to the
rejected table as uncommitted fragments, and returns one row (``schema.RESULT_SCHEMA``) with
the pickled fragment metadata and the call's counters. Unchanged rows (refresh) are only
counted. The driver commits what it has collected (periodically and at the end), so what a
reader sees is always a whole commit.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from embedjob import schema as S
from embedjob.schema import Status
from embedjob.stages.check import DUPLICATE_ID
from embedjob.storage import Storage


@dataclass(frozen=True, kw_only=True)
class WriteSpec:
    """Where and how the write stage writes.

    Attributes:
        output: The output table.
        rejected_output: The rejected-rows table.
        schema: The output's stamped schema.
        replace_schema: The output is being recreated over a table with another schema.
        storage: Resolved storage options.
    """

    output: str
    rejected_output: str
    schema: pa.Schema
    replace_schema: bool = False
    storage: Storage = field(default_factory=Storage)


def write_block(table: pa.Table, *, spec: WriteSpec) -> pa.Table:
    """``map_batches`` body: write both fragments, return one result row."""
    status = table.column(S.STATUS)
    accepted = table.filter(pc.equal(status, int(Status.EMBED)))
    rejected = table.filter(pc.equal(status, int(Status.REJECTED)))
    main = _write(_to_main(accepted, spec.schema), spec.output, spec.schema, spec,
                  spec.replace_schema)
    rejects = _write(_to_rejected(rejected), spec.rejected_output, S.REJECTED_SCHEMA, spec)
    counts = S.Counts(
        rows_embedded=accepted.num_rows,
        rows_rejected=rejected.num_rows,
        rows_duplicate=_sum(pc.equal(rejected.column(S.REASON), DUPLICATE_ID)),
        rows_unchanged=_sum(pc.equal(status, int(Status.UNCHANGED))),
        rows_changed=_sum(accepted.column(S.CHANGED)),
        rows_truncated=_sum(accepted.column(S.TRUNCATED)),
        tokens=_sum(accepted.column(S.N_TOKENS)),
        processed_tokens=_sum(accepted.column(S.PROCESSED_TOKENS)),
    )
    if S.CHUNK in table.column_names:  # a chunk table: documents, chunks, documents' tokens
        counts.rows_embedded = _sum(pc.equal(accepted.column(S.CHUNK), 0))
        counts.chunks_embedded = accepted.num_rows
        counts.tokens = _sum(accepted.column(S.COUNTED_TOKENS))
    units, unit_rows = _unit_rows(table)
    row = {
        "main_fragments": [main],
        "rejected_fragments": [rejects],
        **{name: [value] for name, value in counts.counters().items()},
        "units": [units],
        "unit_rows": [unit_rows],
    }
    return pa.table(row, schema=S.RESULT_SCHEMA)


def _unit_rows(table: pa.Table) -> tuple[list[str], list[int]]:
    """Rows written per unit; a chunk table counts each row's share of its document
    (``schema.DOC_SHARE``, ``DOC_WEIGHT`` per document)."""
    if not table.num_rows:
        return [], []
    if S.DOC_SHARE not in table.column_names:
        units = pc.value_counts(table.column(S.UNIT)).to_pylist()
        return [u["values"] for u in units], [u["counts"] for u in units]
    sums = table.group_by(S.UNIT).aggregate([(S.DOC_SHARE, "sum")])
    return sums.column(S.UNIT).to_pylist(), sums.column(f"{S.DOC_SHARE}_sum").to_pylist()


def _sum(values: pa.ChunkedArray | pa.Array) -> int:
    """Sum of an int or bool column (0 when empty)."""
    if pa.types.is_boolean(values.type):
        values = values.cast(pa.int64())
    return int(pc.sum(values).as_py() or 0)


def _write(table: pa.Table, uri: str, schema: pa.Schema, spec: WriteSpec,
           replace_schema: bool = False) -> list[bytes]:
    """Uncommitted fragments, pickled. lance_ray's writer always writes in append mode,
    which refuses a schema other than the existing table's; when the run replaces that
    schema (overwrite, stamp migration), pylance's own writer is told so."""
    if table.num_rows == 0:
        return []
    options = spec.storage.lance_options()
    if replace_schema:
        from lance.fragment import write_fragments

        fragments = write_fragments(table, uri, schema=schema, mode="overwrite",
                                    storage_options=options)
        return [pickle.dumps(fragment) for fragment in fragments]
    from lance_ray import LanceFragmentWriter

    writer = LanceFragmentWriter(uri, schema=schema, storage_options=options)
    return writer(table).column("fragment").to_pylist()


def _to_main(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = {name: table.column(S.LINEAGE.get(name, name)) for name in schema.names}
    return pa.table(columns).cast(schema)


def _to_rejected(table: pa.Table) -> pa.Table:
    ids = [None if v is None else str(v) for v in table.column(S.ID).to_pylist()]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "reason": table.column(S.REASON),
            "source": table.column(S.SOURCE),
            "row": table.column(S.ROW),
        },
        schema=S.REJECTED_SCHEMA,
    )


def load_fragments(pickled: list[bytes]) -> list:
    """Pickled ``FragmentMetadata`` from the write stage -> objects to commit."""
    return [pickle.loads(blob) for blob in pickled]
