"""Read stage: stream rows out of input units, tagged with where they came from.

A unit is a file up to ``read_unit_bytes``, a half-open byte range ``file#bytes=A-B`` of a
bigger one, or a fragment of a Lance input (``uri#<id>``); unit names come from the listing
alone (no footer is read to plan them) and are stable between runs. A byte range holds:

- JSON lines / CSV: the lines whose first byte lies in ``[A, B)`` (a line straddling B
  belongs to the range it starts in; each CSV range is parsed under the file's header line);
- Parquet: the row groups whose first byte lies in ``[A, B)`` (a row group is never split:
  pyarrow decodes it whole).

Each unit is read in bounded record batches, so no task ever holds a whole file. Every row
leaves this stage with its identity: ``_source`` (the file), ``_row`` (its key in the file:
the row index for Parquet, Lance and unsplit files; for a split text file the range's first
byte plus the row's index in the range: unique, ordered and inside ``[A, B)``) and ``_unit``,
the id cast to the output id type, the text (null when it is not a string), the kept columns,
and ``_reason`` (null, or why the row cannot be embedded; the check stage turns it into a
status).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from embedjob import schema as S
from embedjob.errors import Backoff, CorruptInputError, is_transient
from embedjob.storage import Listed, Storage

logger = logging.getLogger(__name__)

READ_BATCH_ROWS = 8192
FOOTER_GUESS_BYTES = 64 << 10  # one GET of a Parquet file's tail usually holds its footer
PROBE_BYTES = 1 << 20  # the head of a text file read to learn its columns
SUFFIXES: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "csv": (".csv",),
    "lance": (".lance",),
}


@dataclass(frozen=True, kw_only=True)
class ReadSpec:
    """What the read stage needs to know; pickled to every read task."""

    format: str
    id_column: str
    text_column: str
    keep_columns: tuple[str, ...]
    id_type: pa.DataType
    keep_types: tuple[pa.DataType, ...]
    storage: Storage = field(default_factory=Storage)
    # True: a file or JSON line that cannot be parsed fails the job; False: it is recorded as
    # a rejected row (a whole unreadable file as one row) and the rest is processed
    fail_fast: bool = False
    # --limit: the units read only up to a row count (the last unit a limit reaches)
    row_caps: Mapping[str, int] = field(default_factory=dict)
    # True: read only the id column (the duplicate-id scan); texts come back null
    ids_only: bool = False
    # bytes of the file a task reads, from the listing (set per unit by ``sized``): a file
    # of known size opens without a request
    sizes: Mapping[str, int] = field(default_factory=dict)

    def schema(self) -> pa.Schema:
        """The schema of every block this stage yields."""
        keep = [pa.field(n, t) for n, t in zip(self.keep_columns, self.keep_types, strict=True)]
        return pa.schema(
            [
                pa.field(S.SOURCE, pa.string()),
                pa.field(S.ROW, pa.int64()),
                pa.field(S.UNIT, pa.string()),
                pa.field(S.ID, self.id_type),
                pa.field(S.TEXT, pa.string()),
                pa.field(S.REASON, pa.string()),
                *keep,
            ]
        )


def list_inputs(uri: str, fmt: str, storage: Storage) -> list[Listed]:
    """The input files with size and fingerprint from the listing (no request per file), or
    a Lance dataset's fragments as ``uri#<id>`` (fingerprint ``fragment``)."""
    if fmt == "lance":
        dataset = storage.open_lance(uri)
        return [Listed(f"{uri}#{frag.fragment_id}", 0, "fragment")
                for frag in dataset.get_fragments()]
    return storage.list_files(uri, SUFFIXES[fmt])


RANGE_MARK = "#bytes="


def plan_units(inputs: list[Listed], unit_bytes: int) -> list[str]:
    """Read units from the listing alone: a file up to ``unit_bytes`` is one unit named by
    its URI; a bigger one becomes ``uri#bytes=A-B`` ranges of ``unit_bytes`` (the last one
    ends at the file's size). Lance fragments stay as listed."""
    units: list[str] = []
    for listed in inputs:
        if listed.fingerprint == "fragment" or listed.size <= unit_bytes:
            units.append(listed.uri)
            continue
        units += [f"{listed.uri}{RANGE_MARK}{a}-{min(a + unit_bytes, listed.size)}"
                  for a in range(0, listed.size, unit_bytes)]
    return units


def split_unit(unit: str) -> tuple[str, int, int | None]:
    """``(file, A, B)`` of a byte-range unit; ``(unit, 0, None)`` for a whole one."""
    path, mark, span = unit.rpartition(RANGE_MARK)
    if not mark:
        return unit, 0, None
    start, _, end = span.partition("-")
    return path, int(start), int(end)


def unit_file(unit: str) -> str:
    """The file (or Lance fragment) a unit belongs to."""
    return split_unit(unit)[0]


def sized(spec: ReadSpec, unit: str, size: int | None) -> ReadSpec:
    """``spec`` knowing the size of ``unit``'s file (None: not known, it is asked for)."""
    return spec if size is None else dataclasses.replace(spec, sizes={unit_file(unit): size})


def unit_sizes(batch: pa.Table) -> list[int | None]:
    """The ``size`` column of a batch of units (None where the listing gave none)."""
    if "size" not in batch.column_names:
        return [None] * batch.num_rows
    return batch.column("size").to_pylist()


def read_units(batch: pa.Table, spec: ReadSpec, tracker=None) -> Iterator[pa.Table]:
    """``map_batches`` body: one input row per unit (its file's ``size`` beside it, from
    the listing), yields bounded row blocks.

    When a unit is read to its end, its row count and, for a byte range, the key range its
    rows may occupy (``[lo, hi)`` of ``_row``) go to ``tracker`` (a ReadTracker), so the
    driver can tell when every row of the unit is committed and, on a resume, which rows of
    a partly done file to delete.
    """
    import ray

    for unit, size in zip(batch.column("unit").to_pylist(), unit_sizes(batch), strict=True):
        rows, bounds, unit_spec = 0, {}, sized(spec, unit, size)
        try:
            for raw, first_row in _capped(unit, unit_spec, bounds):
                rows += raw.num_rows
                yield normalize(raw, unit, first_row, unit_spec)
        except (pa.ArrowInvalid, OSError) as exc:  # transient ones were retried already
            reason = _unreadable(unit, rows, spec, exc)
            yield _unit_rejected(unit, reason, spec, bounds, rows)
            rows += 1  # the unit's one rejected row counts toward its rows
        if tracker is not None:
            ray.get(tracker.unit_read.remote(unit, rows, _key_range(unit, bounds)))


def _key_range(unit: str, bounds: dict) -> tuple[int, int] | None:
    """The ``_row`` keys a byte-range unit owns (None for a whole file or fragment)."""
    _, start, end = split_unit(unit)
    if end is None:
        return None
    return bounds.get("lo", start), bounds.get("hi", end)


def _capped(unit: str, spec: ReadSpec, bounds: dict) -> Iterator[tuple[pa.Table, int]]:
    """``_raw_batches`` cut at the unit's row cap (``--limit``), if it has one."""
    cap, seen = spec.row_caps.get(unit), 0
    for raw, first_row in _raw_batches(unit, spec, bounds):
        if cap is not None and seen + raw.num_rows >= cap:
            yield raw.slice(0, cap - seen), first_row
            return
        seen += raw.num_rows
        yield raw, first_row


def limit_units(units: list[str], spec: ReadSpec, limit: int) -> tuple[list[str],
                                                                      dict[str, int]]:
    """The first units holding ``limit`` rows, and the row cap of the last one (its rows
    are counted by reading it up to the cap: ``--limit`` is for small trial runs)."""
    taken: list[str] = []
    left = limit
    for unit in units:
        rows = 0
        for raw, _ in _raw_batches(unit, spec, {}):
            rows += raw.num_rows
            if rows >= left:
                break
        taken.append(unit)
        if rows >= left:
            return taken, {unit: left}
        left -= rows
    return taken, {}


def _unreadable(unit: str, rows: int, spec: ReadSpec, exc: BaseException) -> str:
    """The reason for a file that failed to parse (or raise, under ``fail_fast``)."""
    where = f" after row {rows - 1}" if rows else ""
    reason = f"unreadable {spec.format}{where}: {type(exc).__name__}: {str(exc)[:300]}"
    if spec.fail_fast:
        raise CorruptInputError(f"{unit}: {reason} (fail_fast is set)") from exc
    logger.warning("%s: %s; the file is recorded as rejected", unit, reason)
    return reason


def _unit_rejected(unit: str, reason: str, spec: ReadSpec, bounds: dict,
                   rows: int) -> pa.Table:
    """One rejected row (no id) standing for the unreadable rest of ``unit``: row -1 for a
    whole file, else the key after the unit's last row read (inside the unit's key range)."""
    path, start, end = split_unit(unit)
    row = -1 if end is None else bounds.get("lo", start) + rows
    columns = {field.name: pa.nulls(1, field.type) for field in spec.schema()}
    columns |= {S.SOURCE: pa.array([path]), S.ROW: pa.array([row], pa.int64()),
                S.UNIT: pa.array([unit]), S.REASON: pa.array([reason])}
    return pa.table(columns, schema=spec.schema())


def iter_rows(unit: str, spec: ReadSpec) -> Iterator[pa.Table]:
    """One unit's rows in this stage's schema, up to its row cap (without a tracker)."""
    for raw, first_row in _capped(unit, spec, {}):
        yield normalize(raw, unit, first_row, spec)


def parquet_rows(unit: str, spec: ReadSpec, size: int | None = None) -> int:
    """Row count from a Parquet footer (``size`` from the listing saves a request)."""
    return parquet_metadata(unit, spec, size).num_rows


def parquet_metadata(unit: str, spec: ReadSpec, size: int | None = None):
    """A Parquet file's footer (``pq.FileMetaData``).

    With ``size`` known (from the listing) the file's tail is read with ranged GETs only:
    no HEAD request, usually one GET.
    """
    import pyarrow.parquet as pq

    if size is None:
        with _open(unit, spec) as handle:
            return pq.ParquetFile(handle).metadata
    tail = spec.storage.read_range(unit, max(0, size - FOOTER_GUESS_BYTES), size)
    if len(tail) < 8 or tail[-4:] != b"PAR1":
        raise pa.ArrowInvalid(f"{unit} is not a Parquet file (no PAR1 at its end)")
    needed = int.from_bytes(tail[-8:-4], "little") + 8
    if needed > len(tail):  # a footer bigger than the guess: one more GET for the rest
        tail = spec.storage.read_range(unit, max(0, size - needed), size - len(tail)) + tail
    # the footer parses on its own: its offsets are absolute, nothing else is read
    return pq.ParquetFile(pa.BufferReader(tail[-needed:] if needed <= len(tail) else tail)
                          ).metadata


COUNTED_UNITS = 64  # footers read for a row count; more units are extrapolated by bytes
SAMPLED_BYTES = 1 << 20  # JSON lines / CSV: rows per byte from this much of the first file


def estimate_rows(units: list[str], spec: ReadSpec, sizes: dict[str, int]) -> tuple[int, bool]:
    """Rows in ``units`` and whether the count is exact.

    Exact for Lance fragments and for Parquet up to ``COUNTED_UNITS`` files (their metadata);
    more Parquet files, JSON lines and CSV are extrapolated by bytes from what was counted.

    Args:
        units: The units to count.
        spec: The read spec (format, storage).
        sizes: Bytes per file unit (Lance fragments need none).
    """
    if not units:
        return 0, True
    if spec.format == "lance":
        dataset = spec.storage.open_lance(units[0].rpartition("#")[0])
        wanted = {int(u.rpartition("#")[2]) for u in units}
        return sum(f.count_rows() for f in dataset.get_fragments()
                   if f.fragment_id in wanted), True
    # a byte-range unit counts its range's bytes; footers are read per file
    unit_bytes = {u: (end - start) if end is not None else sizes.get(u, 0)
                  for u, (_, start, end) in ((u, split_unit(u)) for u in units)}
    files = list(dict.fromkeys(unit_file(u) for u in units))
    if spec.format == "parquet":
        counted = files[:COUNTED_UNITS]
        rows = sum(parquet_rows(f, spec, sizes.get(f) or None) for f in counted)
        if len(counted) == len(units):  # every unit a whole file, every file counted
            return rows, True
        counted_bytes = sum(sizes.get(f, 0) for f in counted)
    else:  # lines in the head of the first file (a CSV header is one row too many)
        with _open(files[0], spec) as handle:
            head = handle.read(SAMPLED_BYTES)
        rows, counted_bytes = head.count(b"\n") or 1, len(head)
    total_bytes = sum(unit_bytes.values())
    return int(rows * total_bytes / max(counted_bytes, 1)), False


def _raw_batches(unit: str, spec: ReadSpec, bounds: dict) -> Iterator[tuple[pa.Table, int]]:
    """Yield (raw table, key of its first row; keys are consecutive within a table).

    A transient storage error (errors.TRANSIENT_ERRORS) reopens the unit (never the whole
    file) after a backoff and goes on after the last row yielded, so an outage of the store
    costs no row twice. ``bounds`` receives the unit's key range when the reader learns it.
    """
    done, backoff = 0, Backoff(f"reading {unit}")
    while True:
        try:
            position = 0  # rows of the unit seen in this attempt
            for table, first in _READERS[spec.format](unit, spec, bounds):
                end = position + table.num_rows
                if end > done:
                    skip = max(0, done - position)
                    yield (table.slice(skip) if skip else table), first + skip
                    done = end
                position = end
            return
        except (pa.ArrowInvalid, OSError) as exc:
            backoff.wait(exc)  # re-raises what is not transient


def _open(unit: str, spec: ReadSpec):
    return spec.storage.open_input(unit, spec.sizes.get(unit))


def _read_parquet(unit: str, spec: ReadSpec, bounds: dict) -> Iterator[tuple[pa.Table, int]]:
    import pyarrow.parquet as pq

    path, start, end = split_unit(unit)
    with _open(path, spec) as handle:
        parquet = pq.ParquetFile(handle)
        wanted = [c for c in _wanted(spec) if c in parquet.schema_arrow.names]
        groups = row_groups_in(parquet.metadata, start, end)
        if groups:
            last, last_first = groups[-1]
            bounds.update(lo=groups[0][1],
                          hi=last_first + parquet.metadata.row_group(last).num_rows)
        else:
            bounds.update(lo=0, hi=0)
        for group, row in groups:
            for record_batch in parquet.iter_batches(READ_BATCH_ROWS, row_groups=[group],
                                                     columns=wanted):
                yield pa.Table.from_batches([record_batch]), row
                row += record_batch.num_rows


def row_groups_in(metadata, start: int, end: int | None) -> list[tuple[int, int]]:
    """``(row group, index of its first row)`` for the row groups whose first byte lies in
    ``[start, end)`` (every row group when ``end`` is None)."""
    groups, first_row = [], 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        chunk = group.column(0)
        offset = (chunk.dictionary_page_offset if chunk.has_dictionary_page
                  else chunk.data_page_offset)
        if end is None or start <= offset < end:
            groups.append((index, first_row))
        first_row += group.num_rows
    return groups


def _read_csv(unit: str, spec: ReadSpec, bounds: dict) -> Iterator[tuple[pa.Table, int]]:
    """A whole CSV file streamed; a byte range's lines parsed under the file's header line
    (the range's bytes are held in memory: at most ``read_unit_bytes`` plus one line).
    Splitting assumes no newline inside a quoted field."""
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(column_types={spec.text_column: pa.string()})
    path, start, end = split_unit(unit)
    with _open(path, spec) as handle:
        if end is None:
            source = handle
        else:
            lines = _lines(handle, 0, None)
            header = next(lines, b"")
            body = list(_lines(handle, start, end))
            if start == 0:
                body = body[1:]  # the header line is the first line of range 0
            source = pa.BufferReader(b"\n".join([header, *body]) + b"\n")
        row = start
        for record_batch in pcsv.open_csv(source, convert_options=convert):
            yield pa.Table.from_batches([record_batch]), row
            row += record_batch.num_rows


def _lines(handle, start: int, end: int | None) -> Iterator[bytes]:
    """The lines (without their newline) whose first byte lies in ``[start, end)``."""
    handle.seek(max(0, start - 1))
    skip = start > 0  # the tail of the line before start (or the newline at start - 1)
    pos, pending = max(0, start - 1), b""  # pos: first byte of ``pending``
    while chunk := handle.read(1 << 20):
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            if not skip:
                if end is not None and pos >= end:
                    return
                yield line
            skip = False
            pos += len(line) + 1
        if end is not None and pos >= end:
            return
    if pending and not skip and (end is None or pos < end):
        yield pending


def _read_jsonl(unit: str, spec: ReadSpec, bounds: dict) -> Iterator[tuple[pa.Table, int]]:
    """JSON lines parsed one by one, so a broken line is one rejected row, not a dead file."""
    path, start, end = split_unit(unit)
    with _open(path, spec) as handle:
        rows: list[dict] = []
        done = start
        for line in _lines(handle, start, end):
            if line.strip():
                rows.append(_parse_json_line(line))
            if len(rows) >= READ_BATCH_ROWS:
                yield _rows_to_table(_checked(rows, done, unit, spec), spec), done
                done, rows = done + len(rows), []
        if rows:
            yield _rows_to_table(_checked(rows, done, unit, spec), spec), done


def _checked(rows: list[dict], first_row: int, unit: str, spec: ReadSpec) -> list[dict]:
    """``rows`` as they are, or under ``fail_fast`` an error naming the first broken line."""
    if spec.fail_fast:
        for i, row in enumerate(rows):
            if "__reject" in row:
                raise CorruptInputError(
                    f"{unit}: row {first_row + i}: {row['__reject']} (fail_fast is set)"
                )
    return rows


def _parse_json_line(line: bytes) -> dict:
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return {"__reject": f"invalid JSON line: {exc}"}
    if not isinstance(value, dict):
        return {"__reject": f"JSON line is a {type(value).__name__}, not an object"}
    return value


def _rows_to_table(rows: list[dict], spec: ReadSpec) -> pa.Table:
    """Python rows -> table; texts that are not strings become null with a reason.

    A wanted column that no row has is left out, so a missing column is reported as missing.
    """
    seen = set().union(*rows)
    names = [name for name in _wanted(spec) if name in seen]
    columns: dict[str, list] = {name: [row.get(name) for row in rows] for name in names}
    reasons = [row.get("__reject") for row in rows]
    for name, values in columns.items():
        _drop_unencodable(name, values, reasons)
    if spec.text_column in columns:
        texts = columns[spec.text_column]
        for i, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                reasons[i] = reasons[i] or f"text is not a string ({type(text).__name__})"
                texts[i] = None
    columns["__reject"] = reasons
    return pa.table({name: _py_array(values) for name, values in columns.items()})


def _drop_unencodable(name: str, values: list, reasons: list[str | None]) -> None:
    """Strings that are not valid Unicode (JSON escapes of lone surrogates such as
    ``"\\ud800"``) cannot be stored as UTF-8: the value becomes null and the row gets a reason.
    """
    for i, value in enumerate(values):
        if isinstance(value, str) and not _encodable(value):
            reasons[i] = reasons[i] or f"{name} is not valid Unicode (lone surrogate)"
            values[i] = None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _py_array(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        # mixed types become strings (an id column of 1 and "a" is cast per value later)
        strings = [None if v is None else str(v) for v in values]
        return pa.array([s if s is None or _encodable(s) else None for s in strings], pa.string())


def _read_lance(unit: str, spec: ReadSpec, bounds: dict) -> Iterator[tuple[pa.Table, int]]:
    uri, _, fragment_id = unit.rpartition("#")
    dataset = spec.storage.open_lance(uri)
    fragment = dataset.get_fragment(int(fragment_id))
    wanted = [c for c in _wanted(spec) if c in dataset.schema.names]
    row = 0
    for record_batch in fragment.to_batches(batch_size=READ_BATCH_ROWS, columns=wanted):
        yield pa.Table.from_batches([record_batch]), row
        row += record_batch.num_rows


_READERS = {
    "parquet": _read_parquet,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "lance": _read_lance,
}


def _wanted(spec: ReadSpec) -> list[str]:
    if spec.ids_only:
        return [spec.id_column]
    return [spec.id_column, spec.text_column, *spec.keep_columns]


def normalize(raw: pa.Table, unit: str, first_row: int, spec: ReadSpec) -> pa.Table:
    """Raw file columns -> this stage's fixed schema, with per-row reject reasons."""
    n = raw.num_rows
    reasons: list[str | None] = (
        raw.column("__reject").to_pylist() if "__reject" in raw.column_names else [None] * n
    )
    ids = _column_or_reason(raw, spec.id_column, spec.id_type, "id", reasons)
    text = _text_column(raw, spec.text_column, reasons)
    keep = [
        _cast_or_null(raw.column(c), t) if c in raw.column_names else pa.nulls(n, t)
        for c, t in zip(spec.keep_columns, spec.keep_types, strict=True)
    ]
    return pa.Table.from_arrays(
        [
            pa.array([unit_file(unit)] * n, pa.string()),
            pa.array(range(first_row, first_row + n), pa.int64()),
            pa.array([unit] * n, pa.string()),
            ids,
            text,
            pa.array(reasons, pa.string()),
            *keep,
        ],
        schema=spec.schema(),
    )


def _column_or_reason(
    raw: pa.Table, name: str, target: pa.DataType, label: str, reasons: list[str | None]
) -> pa.Array:
    """The id column cast to the output id type; rows that cannot be cast get a reason."""
    n = raw.num_rows
    if name not in raw.column_names:
        _fill(reasons, range(n), f"{label} column {name!r} missing in this file")
        return pa.nulls(n, target)
    column = raw.column(name).combine_chunks()
    try:
        return pc.cast(column, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = []
        for i, value in enumerate(column.to_pylist()):
            try:
                values.append(pa.scalar(value).cast(target).as_py() if value is not None else None)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                _fill(reasons, [i], f"{label} {value!r} is not a {target}")
                values.append(None)
        return pa.array(values, target)


def _text_column(raw: pa.Table, name: str, reasons: list[str | None]) -> pa.Array:
    n = raw.num_rows
    if name not in raw.column_names:
        _fill(reasons, range(n), f"text column {name!r} missing in this file")
        return pa.nulls(n, pa.string())
    column = raw.column(name).combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_null(column.type):
        return column.cast(pa.string())
    valid = column.is_valid().to_pylist()
    _fill(reasons, [i for i in range(n) if valid[i]], f"text is not a string ({column.type})")
    return pa.nulls(n, pa.string())


def _cast_or_null(column: pa.ChunkedArray, target: pa.DataType) -> pa.Array:
    try:
        return pc.cast(column.combine_chunks(), target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(len(column), target)


def _fill(reasons: list[str | None], rows, reason: str) -> None:
    for i in rows:
        if reasons[i] is None:
            reasons[i] = reason


def probe_schema(unit: str, spec: ReadSpec, size: int | None = None) -> pa.Schema:
    """Every column of a unit with its type (decides the id and kept column types).

    An empty schema means the unit holds no rows or cannot be parsed (the next unit is
    probed; the read stage records an unparsable unit as rejected).
    """
    try:
        return _probe_schema(unit, spec, size)
    except (pa.ArrowInvalid, OSError) as exc:
        if is_transient(exc):
            raise
        logger.warning("%s: cannot read its schema (%s); probing the next file", unit, exc)
        return pa.schema([])


def _probe_schema(unit: str, spec: ReadSpec, size: int | None) -> pa.Schema:
    if spec.format == "parquet":
        metadata = parquet_metadata(unit, spec, size)
        return metadata.schema.to_arrow_schema() if metadata.num_rows else pa.schema([])
    if spec.format == "lance":
        return spec.storage.open_lance(unit.rpartition("#")[0]).schema
    head = _head(unit, spec, size)
    if spec.format == "jsonl":
        for table in _jsonl_all_keys(head):
            return table.schema
        return pa.schema([])
    import pyarrow.csv as pcsv

    whole = len(head) < PROBE_BYTES or (size is not None and len(head) >= size)
    complete = head if whole else head[: head.rfind(b"\n") + 1]  # no cut-off last line
    for record_batch in pcsv.open_csv(pa.BufferReader(complete)):
        return record_batch.schema
    return pa.schema([])


def _head(unit: str, spec: ReadSpec, size: int | None) -> bytes:
    """The first ``PROBE_BYTES`` of a file (a ranged GET when the size is known)."""
    if size is not None:
        return spec.storage.read_range(unit, 0, min(size, PROBE_BYTES))
    with _open(unit, spec) as handle:
        return handle.read(PROBE_BYTES)


def _jsonl_all_keys(head: bytes) -> Iterator[pa.Table]:
    """The first JSON-lines batch with every key any row has."""
    lines = head.split(b"\n")[:READ_BATCH_ROWS]
    rows = [r for r in (_parse_json_line(line) for line in lines if line.strip())
            if "__reject" not in r]
    if rows:
        keys = sorted(set().union(*rows))
        yield pa.table({k: _py_array([r.get(k) for r in rows]) for k in keys})
