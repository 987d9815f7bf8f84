"""Refresh diff stage: classify the rows of changed input units against the output.

Both sides meet in one distributed pass, partitioned by a hash of the id: the rows read
from the dirty units (``input_keys``: id, content hash, lineage, listing position, the text
kept for the embed) and the output's rows whose lineage is a dirty or vanished file
(``output_keys``: id, content hash, lineage, row address). ``classify`` then decides, per
id, with the duplicate-id rule of a fresh embed (the first row in (listing order, row) wins):

- NEW: no output row has the id; CHANGED: the output's row has another hash;
- UNCHANGED: same hash, same lineage; MOVED: same hash, other lineage (its vector is
  copied with the new lineage, never re-embedded);
- REJECT: an invalid row, or one that loses its id (reason ``DUPLICATE_ID``);
- GONE: an output row whose id no valid corpus row holds any more.

An id of a dirty unit that an *unchanged* unit's row holds is found with one lookup of the
output's id index per partition (only for ids the lineage side did not hold): that held
row is a corpus row too and takes part in the rule at its own position; when it loses, it
is deleted and rejected as a duplicate, exactly what a fresh embed would record.

A chunk table (``DiffSpec.id_column`` = ``doc_id``) holds several rows per id, one per chunk,
all with the document's hash and lineage: the decision is taken on the document (its first
chunk row stands for it) and every other chunk row follows it (``_chunk_rows``): deleted
(``Kind.CHUNK``) when the document is changed, gone or rejected, copied with the new lineage
when it moved, untouched when it is unchanged.
"""

from __future__ import annotations

import enum
import pickle
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedjob import schema as S
from embedjob.stages import check
from embedjob.storage import Storage

HASH = "_hash"  # content hash of a valid text (null otherwise)
SIDE = "_side"  # 0: a corpus row, 1: an output row
POS = "_pos"  # the row's file in the listing order (the duplicate-id rule)
ADDR = "_addr"  # the output row's Lance row address (fragment id << 32 | offset)
PART = "_part"  # hash partition of the id
KIND = "_kind"  # the classification (Kind)
HELD = "_held"  # a row of an unchanged unit, found in the output by its id

INPUT, OUTPUT = 0, 1


class Kind(enum.IntEnum):
    """What the refresh does with a row; one value per diff result row."""

    NEW = 0
    CHANGED = 1
    REJECT = 2
    UNCHANGED = 3
    MOVED = 4
    GONE = 5
    CHUNK = 6  # chunk tables: another chunk row of a document replaced or deleted


EMBED_KINDS = (Kind.NEW, Kind.CHANGED, Kind.REJECT)  # the rows that go on to tokenize


@dataclass(frozen=True, kw_only=True)
class DiffSpec:
    """What the diff stage needs; pickled to every task.

    Attributes:
        output: The output table.
        version: The output's version when the refresh started (every read is pinned).
        read_schema: The read stage's block schema (the rows handed on to tokenize).
        positions: Every listed input file -> its index in the listing order.
        partitions: Hash partitions of the id.
        keep_deleted: Keep output rows whose id is gone from the corpus.
        storage: Resolved storage options.
        id_column: The output's id column (``doc_id`` in a chunk table).
    """

    output: str
    version: int
    read_schema: pa.Schema
    positions: Mapping[str, int]
    partitions: int
    keep_deleted: bool = False
    storage: Storage = field(default_factory=Storage)
    id_column: str = S.OUT_ID

    def schema(self) -> pa.Schema:
        """The schema of both sides' rows and of the result (the read schema plus keys)."""
        return self.read_schema.append(pa.field(HASH, pa.string())).append(
            pa.field(SIDE, pa.int8())).append(pa.field(POS, pa.int64())).append(
            pa.field(ADDR, pa.uint64())).append(pa.field(PART, pa.int32())).append(
            pa.field(HELD, pa.bool_())).append(pa.field(KIND, pa.int8()))


def partition_of(ids: list, partitions: int) -> pa.Array:
    """A stable partition per id (the same on both sides and on every node)."""
    return pa.array([0 if v is None else zlib.crc32(str(v).encode()) % partitions
                     for v in ids], pa.int32())


def input_keys(table: pa.Table, *, spec: DiffSpec) -> pa.Table:
    """``map_batches`` body over read-stage blocks: add hash, position and partition."""
    texts, reasons = table.column(S.TEXT).to_pylist(), table.column(S.REASON).to_pylist()
    ids = table.column(S.ID).to_pylist()
    hashes = [check.content_hash(t) if r is None and i is not None
              and check.text_reason(t) is None else None
              for t, r, i in zip(texts, reasons, ids, strict=True)]
    n = table.num_rows
    positions = [spec.positions[s] for s in table.column(S.SOURCE).to_pylist()]
    return _keyed(table, spec, hashes=pa.array(hashes, pa.string()), side=INPUT,
                  positions=pa.array(positions, pa.int64()), addrs=pa.nulls(n, pa.uint64()))


def output_keys(table: pa.Table, *, spec: DiffSpec, held: bool = False) -> pa.Table:
    """Output rows (id or doc_id, content_hash, source_file, source_row, _rowaddr) in the diff
    schema."""
    n = table.num_rows
    columns = {S.SOURCE: table.column(S.SOURCE_FILE), S.ROW: table.column(S.SOURCE_ROW),
               S.ID: table.column(spec.id_column)}
    rows = pa.table({name: columns.get(name, pa.nulls(n, f.type))
                     for name, f in zip(spec.read_schema.names, spec.read_schema,
                                        strict=True)}).cast(spec.read_schema)
    positions = [spec.positions.get(s, -1) for s in table.column(S.SOURCE_FILE).to_pylist()]
    keyed = _keyed(rows, spec, hashes=table.column(S.CONTENT_HASH), side=OUTPUT,
                   positions=pa.array(positions, pa.int64()), addrs=table.column("_rowaddr"))
    return keyed.set_column(keyed.schema.get_field_index(HELD), HELD, pa.array([held] * n))


def _keyed(table: pa.Table, spec: DiffSpec, *, hashes, side: int, positions, addrs
           ) -> pa.Table:
    n = table.num_rows
    return (table.append_column(HASH, hashes)
            .append_column(SIDE, pa.array(np.full(n, side, np.int8)))
            .append_column(POS, positions)
            .append_column(ADDR, pa.array(addrs, pa.uint64()))
            .append_column(PART, partition_of(table.column(S.ID).to_pylist(), spec.partitions))
            .append_column(HELD, pa.array(np.zeros(n, bool)))
            .append_column(KIND, pa.nulls(n, pa.int8()))).cast(spec.schema())


def classify(group: pa.Table, *, spec: DiffSpec) -> pa.Table:
    """``map_groups`` body: one id partition of both sides -> one result row per decision.

    Rows handed on to tokenize (NEW, CHANGED, REJECT) keep their text; every other
    result row is only counted or applied (addresses of rows to delete, moved lineage).
    """
    side = group.column(SIDE).to_numpy()
    rows = group.to_pylist()
    outputs = [r for r, s in zip(rows, side, strict=True) if s == OUTPUT]
    by_id, extra = _first_per_id(outputs + [{**r, SIDE: OUTPUT} for r in _held_rows(group, spec)])
    held = [r for r in by_id.values() if r[HELD]]
    corpus = [r for r, s in zip(rows, side, strict=True) if s == INPUT] + held
    winners: dict = {}
    for row in corpus:
        if row[S.ID] is not None:
            best = winners.get(row[S.ID])
            if best is None or (row[POS], row[S.ROW]) < (best[POS], best[S.ROW]):
                winners[row[S.ID]] = row
    out = [_decide(row, winners, by_id) for row in corpus]
    out += [{**row, KIND: Kind.GONE} for key, row in by_id.items()
            if not spec.keep_deleted and _gone(winners.get(key))]
    out = [r for r in out if r is not None]
    return pa.Table.from_pylist(out + _chunk_rows(out, by_id, extra), schema=spec.schema())


def _first_per_id(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Output rows -> (id -> its first row, the other rows of an id): a chunk table's other
    chunk rows of a document (a plain table holds one row per id)."""
    first: dict = {}
    extra: list[dict] = []
    for row in rows:
        if row[S.ID] in first:
            extra.append(row)
        else:
            first[row[S.ID]] = row
    return first, extra


def _chunk_rows(out: list[dict], by_id: dict, extra: list[dict]) -> list[dict]:
    """A chunk table's other chunk rows follow their document's first row: copied with the
    new lineage when it MOVED, deleted (CHUNK) when it is replaced or deleted (the decision
    holds its address and is not UNCHANGED); untouched otherwise."""
    if not extra:
        return []
    fate: dict = {}
    for row in out:
        first = by_id.get(row[S.ID])
        if (first is None or row[ADDR] is None or row[ADDR] != first[ADDR]
                or row[KIND] == Kind.UNCHANGED):
            continue
        if row[S.ID] not in fate or row[KIND] == Kind.MOVED:  # a moved document keeps them
            fate[row[S.ID]] = row
    added = []
    for row in extra:
        decided = fate.get(row[S.ID])
        if decided is not None and decided[KIND] == Kind.MOVED:
            added.append({**decided, ADDR: row[ADDR], SIDE: OUTPUT})  # (not a row read)
        elif decided is not None:
            added.append({**row, KIND: Kind.CHUNK})
    return added


def _gone(winner: dict | None) -> bool:
    """An output row's id is gone: no corpus row holds it, or the one that wins it is
    invalid now (it is rejected for its text)."""
    return winner is None or winner[HASH] is None


def _decide(row: dict, winners: dict, by_id: dict) -> dict | None:
    """The decision for one corpus row (None: a held row that keeps its id, unchanged)."""
    key = row[S.ID]
    if key is not None and winners[key] is not row:
        if row[HELD]:  # an unchanged unit's row loses its id to a dirty unit's earlier row
            return {**row, S.REASON: check.DUPLICATE_ID, KIND: Kind.REJECT}
        return {**row, S.REASON: check.DUPLICATE_ID, KIND: Kind.REJECT, ADDR: None}
    if row[HELD]:
        return None
    held = by_id.get(key) if key is not None else None
    if row[HASH] is None or held is None:
        return {**row, KIND: Kind.REJECT if row[HASH] is None else Kind.NEW}
    if held[HASH] != row[HASH]:
        return {**row, KIND: Kind.CHANGED, ADDR: held[ADDR]}
    same = (held[S.SOURCE], held[S.ROW]) == (row[S.SOURCE], row[S.ROW])
    return {**row, S.TEXT: None, KIND: Kind.UNCHANGED if same else Kind.MOVED,
            ADDR: held[ADDR]}


def _held_rows(group: pa.Table, spec: DiffSpec) -> list[dict]:
    """Output rows outside the dirty lineage whose id a corpus row of this partition has
    and the lineage side does not: one lookup of the id index for the whole partition."""
    side = group.column(SIDE)
    ids = group.column(S.ID)
    known = set(ids.filter(pc.equal(side, OUTPUT)).to_pylist())
    wanted = sorted({v for v in ids.filter(pc.equal(side, INPUT)).to_pylist()
                     if v is not None and v not in known})
    if not wanted:
        return []
    dataset = spec.storage.open_lance(spec.output, version=spec.version)
    found = dataset.to_table(
        columns=[spec.id_column, S.CONTENT_HASH, S.SOURCE_FILE, S.SOURCE_ROW],
        filter=pc.field(spec.id_column).isin(pa.array(wanted, ids.type)), with_row_address=True)
    return output_keys(found, spec=spec, held=True).to_pylist()


def to_tokenize(table: pa.Table, *, spec: DiffSpec) -> pa.Table:
    """``map_batches`` body: the rows tokenize takes (NEW, CHANGED, REJECT), as read blocks."""
    kinds = table.column(KIND)
    wanted = pc.is_in(kinds, pa.array([int(k) for k in EMBED_KINDS], pa.int8()))
    return table.filter(wanted).select(spec.read_schema.names)


def delete_rows(fragment_id: int, addrs: np.ndarray, *, spec: DiffSpec) -> bytes:
    """Deletion vector of one output fragment: its rows at ``addrs`` (pickled metadata;
    None when no row is left, so the commit removes the fragment)."""
    dataset = spec.storage.open_lance(spec.output, version=spec.version)
    listed = ",".join(str(int(a)) for a in np.sort(addrs))
    return pickle.dumps(dataset.get_fragment(fragment_id).delete(f"_rowaddr IN ({listed})"))


def copy_moved(table: pa.Table, *, spec: DiffSpec, schema: pa.Schema) -> pa.Table:
    """``map_batches`` body over MOVED rows: their output rows (vectors as stored) with the
    new lineage, written as uncommitted fragments; returns the pickled fragment metadata."""
    from lance_ray import LanceFragmentWriter

    dataset = spec.storage.open_lance(spec.output, version=spec.version)
    held = dataset._take_rows(table.column(ADDR).to_pylist(), columns=schema.names)
    moved = (held.set_column(schema.get_field_index(S.SOURCE_FILE), S.SOURCE_FILE,
                             table.column(S.SOURCE))
             .set_column(schema.get_field_index(S.SOURCE_ROW), S.SOURCE_ROW,
                         table.column(S.ROW))).cast(schema)
    writer = LanceFragmentWriter(spec.output, schema=schema,
                                 storage_options=spec.storage.lance_options())
    return writer(moved).select(["fragment"])


def lineage_filter(files: list[str]) -> str:
    """The Lance (SQL) filter of the output rows whose ``source_file`` is one of ``files``."""
    quoted = ",".join("'" + f.replace("'", "''") + "'" for f in sorted(files))
    return f"{S.SOURCE_FILE} IN ({quoted})"
