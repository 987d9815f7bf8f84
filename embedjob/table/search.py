"""Search an output table with a text query.

The table's schema metadata (the stamp written by ``driver.preflight``) says which model,
task and dims made the vectors. A query is embedded with the same weights and the task that
pairs with the table's (a ``retrieval.passage`` table is queried with ``retrieval.query``),
truncated to the searched column's dim, then searched with Lance: through the column's vector
index when one exists, flat (exact) otherwise. A query model whose weights or dims do not
match the stamp is refused before any search.

Quantized columns (``vector_<d>_bin``, ``vector_<d>_int8``) are searched in two stages:
candidates by Hamming distance (binary: Lance's ``hamming`` metric, flat, or through an
IVF_FLAT index when ``embedjob index`` built one) or by int8 dot product (a flat scan here:
pylance 14 searches and indexes float vectors only), the query quantized exactly as the
rows were (sign bits; the stamped int8 ranges), then the top ``k x rescore_factor``
candidates rescored exactly against a float column (``rescore``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.errors import ConfigError, lance_open_error
from embedjob.model.tasks import QUERY_TASKS
from embedjob.stages import quantize
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

METRIC = "cosine"  # the stored vectors are L2-normalized: cosine distance = 1 - dot
DISTANCE_COLUMN = "_distance"


@dataclass(frozen=True, kw_only=True)
class Stamp:
    """What made a table's vectors, read back from its schema metadata.

    Attributes:
        model_source: The model as given to the job (local dir, ``s3://`` prefix, hub id).
        weights_hash: ``ModelSpec.fingerprint`` of those weights.
        task: The table's task; '' when embedded without an adapter.
        instruction: The prefix the table's texts were embedded with.
        dims: Every stored dim, the full one first.
        vector_dtype: ``float32`` or ``float16``.
    """

    model_source: str
    weights_hash: str
    task: str
    instruction: str
    dims: tuple[int, ...]
    vector_dtype: str
    undeclared_dims: tuple[int, ...] = ()  # stored with --allow-any-dims

    @property
    def query_task(self) -> str | None:
        """The task queries against this table are embedded with."""
        if self.task not in QUERY_TASKS:
            raise ConfigError(
                f"table task {self.task!r} has no query pairing; known: {sorted(QUERY_TASKS)}"
            )
        return QUERY_TASKS[self.task]


def read_stamp(schema: pa.Schema) -> Stamp:
    """Parse the ``embedjob.*`` schema metadata of an output table.

    Raises:
        ConfigError: The table carries no embedjob stamp (not written by ``embedjob embed``).
    """
    meta = S.schema_metadata(schema)
    missing = [k for k in (S.MODEL_SOURCE, S.WEIGHTS_HASH, S.TASK, S.DIMS) if k not in meta]
    if missing:
        raise ConfigError(f"table has no embedjob stamp (missing {missing}); "
                          "was it written by 'embedjob embed'?")
    return Stamp(
        model_source=meta[S.MODEL_SOURCE], weights_hash=meta[S.WEIGHTS_HASH],
        task=meta[S.TASK], instruction=meta.get(S.INSTRUCTION, ""),
        dims=tuple(json.loads(meta[S.DIMS])),
        vector_dtype=meta.get(S.VECTOR_DTYPE, "float32"),
        undeclared_dims=tuple(json.loads(meta.get(S.UNDECLARED_DIMS, "[]"))),
    )


def vector_columns(schema: pa.Schema) -> dict[str, int]:
    """Vector column name -> dim, for ``vector`` and every ``vector_<d>``."""
    return {f.name: f.type.list_size for f in schema
            if S.is_vector_column(f.name) and pa.types.is_fixed_size_list(f.type)}


def layout_column(schema: pa.Schema, column: str) -> S.VectorColumn:
    """The stored vector column ``column`` (float or quantized), refusing other names."""
    layout = S.vector_layout(schema)
    if column not in layout:
        raise ConfigError(f"column {column!r} not in the table's vector columns {list(layout)}")
    return layout[column]


def column_dim(schema: pa.Schema, column: str) -> int:
    """The dim of vector ``column``, refusing names that are not vector columns."""
    columns = vector_columns(schema)
    if column not in columns:
        raise ConfigError(f"column {column!r} not in the table's vector columns {list(columns)}")
    return columns[column]


SNIPPET_COLUMN = "text"  # shown by default when a run kept it (--keep-columns text)


def open_table(uri: str, storage: Storage | None = None, version: int | None = None):
    """The Lance table at ``uri`` (storage: the AWS environment unless given)."""
    try:
        return (storage or Storage.resolve()).open_lance(uri, version=version)
    except (OSError, ValueError) as exc:
        raise lance_open_error(uri, exc) from exc


def check_query_model(spec: Any, stamp: Stamp, dim: int) -> None:
    """Refuse a query model that did not make the table's vectors, or lacks ``dim``.

    Args:
        spec: The query model's ``ModelSpec``.
        stamp: The table's stamp.
        dim: The searched column's dim.

    Raises:
        ConfigError: Naming both values: weights hash, or dim vs stamp / model dims.
    """
    if spec.fingerprint != stamp.weights_hash:
        raise ConfigError(
            f"query model {spec.source!r} has weights hash {spec.fingerprint[:16]}..., the "
            f"table was embedded by {stamp.model_source!r} with weights hash "
            f"{stamp.weights_hash[:16]}...; its vectors are not comparable"
        )
    if dim not in stamp.dims:
        raise ConfigError(f"dim {dim} not in the table's stamped dims {list(stamp.dims)}")
    if dim not in spec.matryoshka_dims and dim not in stamp.undeclared_dims:
        raise ConfigError(
            f"dim {dim} not in query model {spec.source!r} matryoshka dims "
            f"{list(spec.matryoshka_dims)}"
        )


def embed_queries(embedder: Any, stamp: Stamp, texts: Sequence[str], dim: int) -> np.ndarray:
    """Query vectors for a table: paired task, matching weights, truncated to ``dim``.

    Returns:
        float32 [n, dim], L2-normalized (``matryoshka`` of the full vector).
    """
    check_query_model(embedder.spec, stamp, dim)
    task = stamp.query_task
    if task is not None and task not in embedder.tasks:
        raise ConfigError(f"query task {task!r} not in the model's tasks {list(embedder.tasks)}")
    from embedjob.model import matryoshka

    full = embedder.encode(list(texts), task=task)
    return full if dim == embedder.hidden_size else matryoshka(full, dim)


def load_query_embedder(stamp: Stamp, model: str | None = None,
                        storage: Storage | None = None):
    """Load the query model (the stamp's source unless ``model`` overrides it)."""
    from embedjob.model import load_embedder

    source = model or stamp.model_source
    return load_embedder(source, filesystem=(storage or Storage.resolve()).fsspec(source))


def search_vector(dataset: Any, column: str, vector: np.ndarray, *, k: int = 10,
                  columns: Sequence[str] = (), nprobes: int | None = None,
                  refine_factor: int | None = None) -> pa.Table:
    """Nearest rows of ``column`` to ``vector`` (cosine): index if present, flat otherwise.

    Returns:
        Table ``id, score, *columns`` ordered by descending ``score = 1 - cosine distance``.
    """
    if k < 1:
        raise ConfigError(f"k {k} is not allowed; expected an integer >= 1")
    value_type = dataset.schema.field(column).type.value_type
    query = np.asarray(vector, dtype=value_type.to_pandas_dtype())  # float16 columns too
    nearest: dict[str, Any] = {"column": column, "q": query, "k": k, "metric": METRIC}
    if nprobes is not None:
        nearest["nprobes"] = nprobes
    if refine_factor is not None:
        nearest["refine_factor"] = refine_factor
    keys, rest = _wanted(dataset.schema, columns)
    found = dataset.to_table(nearest=nearest, columns=[*keys, *rest, DISTANCE_COLUMN])
    score = pa.array(1.0 - found.column(DISTANCE_COLUMN).to_numpy(), pa.float32())
    return _hits(found, keys, score, rest)


def search(uri: str, query: str, *, column: str = "vector", k: int = 10,
           show: Sequence[str] = (), model: str | None = None,
           storage: Storage | None = None, embedder: Any = None,
           nprobes: int | None = None, refine_factor: int | None = 1,
           rescore: str | None = None, rescore_factor: int = 4,
           collapse: bool = False) -> pa.Table:
    """Embed ``query`` as the table's queries are meant to be embedded, and search ``column``.

    Args:
        uri: The output table, local or ``s3://``.
        query: Raw query text (the paired task's instruction prefix is added).
        column: ``vector``, ``vector_<d>``, or a quantized ``vector_<d>_bin`` /
            ``vector_<d>_int8`` (see ``quantized_candidates`` for its scores).
        k: Rows to return.
        show: Extra columns to return beside ``id`` and ``score``.
        model: Query model source; default the stamp's ``embedjob.model_source``.
        storage: Storage options (default: the AWS environment).
        embedder: An already loaded query model (skips loading; still checked).
        nprobes: IVF partitions to probe (Lance's default when None).
        refine_factor: Re-rank ``k * refine_factor`` index candidates with exact distances;
            the default 1 makes the returned scores exact (PQ distances are approximate).
        rescore: A float column: rescore the quantized ``column``'s top
            ``k * rescore_factor`` candidates exactly (scores are then true cosines).
        rescore_factor: Candidates per returned row for ``rescore``.
        collapse: A chunk table: only the best chunk of each document (``k`` documents).

    Returns:
        Table ``id, score, *show``, best first; for a chunk table ``doc_id, chunk,
        char_start, char_end, score, *show`` (a kept ``text`` cut to the chunk).

    Raises:
        ConfigError: Unknown column or show column, a rescore column that is not a float
            column (or a float column with ``rescore``), or a query model not matching the
            stamp.
    """
    return search_many(uri, [query], column=column, k=k, show=show, model=model,
                       storage=storage, embedder=embedder, nprobes=nprobes,
                       refine_factor=refine_factor, default_show=False, rescore=rescore,
                       rescore_factor=rescore_factor, collapse=collapse)[0]


def search_many(uri: str, queries: Sequence[str], *, column: str = "vector", k: int = 10,
                show: Sequence[str] = (), model: str | None = None,
                storage: Storage | None = None, embedder: Any = None,
                nprobes: int | None = None, refine_factor: int | None = 1,
                default_show: bool = True, rescore: str | None = None,
                rescore_factor: int = 4, collapse: bool = False) -> list[pa.Table]:
    """:func:`search` for several queries: the model loads once, the queries embed as one
    batch. ``default_show``: with no ``show``, return the ``text`` column when the table
    keeps it (the CLI's snippet)."""
    storage = storage or Storage.resolve()
    dataset = open_table(uri, storage)
    stamp = read_stamp(dataset.schema)
    target = layout_column(dataset.schema, column)
    exact = _rescore_column(dataset.schema, target, rescore)
    unknown = [c for c in show if c not in dataset.schema.names]
    if unknown:
        raise ConfigError(f"--show columns {unknown} not in the table's columns "
                          f"{dataset.schema.names}")
    if not show and default_show and SNIPPET_COLUMN in dataset.schema.names:
        show = (SNIPPET_COLUMN,)
    dims = dict.fromkeys(c.dim for c in (target, exact) if c is not None)
    if embedder is None:
        spec = _query_spec(stamp, model, storage)
        for dim in dims:
            check_query_model(spec, stamp, dim)  # before loading any weights
        embedder = load_query_embedder(stamp, model, storage)
    vectors = {d: embed_queries(embedder, stamp, list(queries), d) for d in dims}
    chunked = S.is_chunk_table(dataset.schema)
    if collapse and not chunked:
        raise ConfigError(f"--collapse needs a chunk table (embed --chunking late|split); "
                          f"{uri!r} has one row per document")
    n = k * COLLAPSE_FACTOR if collapse else k
    if not target.quantized:
        found = [search_vector(dataset, column, vector, k=n, columns=show, nprobes=nprobes,
                               refine_factor=refine_factor) for vector in vectors[target.dim]]
    else:
        found = [_two_stage(dataset, target, exact, {d: v[i] for d, v in vectors.items()},
                            k=n, factor=rescore_factor, show=show, nprobes=nprobes)
                 for i in range(len(queries))]
    return [chunk_hits(hits, k, collapse) for hits in found] if chunked else found


def _two_stage(dataset: Any, target: S.VectorColumn, exact: S.VectorColumn | None,
               vectors: dict[int, np.ndarray], *, k: int, factor: int, show: Sequence[str],
               nprobes: int | None) -> pa.Table:
    """Quantized candidates for one query; rescored on ``exact`` when given."""
    n = k * factor if exact is not None else k
    codes = quantize_query(dataset.schema, target, vectors[target.dim])
    rows, scores = quantized_candidates(dataset, target, codes, n, nprobes=nprobes)
    if exact is None:
        return _rows(dataset, rows, scores, show)
    return rescore_rows(dataset, rows, exact.name, vectors[exact.dim], k=k, columns=show)


def _rescore_column(schema: pa.Schema, target: S.VectorColumn,
                    rescore: str | None) -> S.VectorColumn | None:
    if rescore is None:
        return None
    if not target.quantized:
        raise ConfigError(f"--rescore is for a quantized --column (vector_<d>_bin or "
                          f"vector_<d>_int8); {target.name!r} is a float column (see "
                          "--refine-factor)")
    exact = layout_column(schema, rescore)
    if exact.quantized:
        floats = [c for c, v in S.vector_layout(schema).items() if not v.quantized]
        raise ConfigError(f"--rescore {rescore!r} is not allowed; expected a float column "
                          f"{floats}")
    return exact


def quantize_query(schema: pa.Schema, column: S.VectorColumn, vector: np.ndarray) -> np.ndarray:
    """The query as the column's rows were quantized: from the vector cast to the table's
    float dtype, sign bits (binary) or the stamped int8 ranges."""
    stored = np.asarray(vector, read_stamp(schema).vector_dtype)[None, :]
    if column.dtype == "binary":
        return quantize.binary(stored)[0]
    record = S.schema_metadata(schema).get(S.INT8_CALIBRATION)
    ranges = quantize.parse_calibration(record) if record else {}
    if column.dim not in ranges:
        raise ConfigError(f"column {column.name!r} has no stamped int8 calibration "
                          f"({S.INT8_CALIBRATION}); was it written by 'embedjob embed'?")
    return quantize.int8(stored, *ranges[column.dim])[0]


def quantized_candidates(dataset: Any, column: S.VectorColumn, codes: np.ndarray, n: int, *,
                         nprobes: int | None = None,
                         batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best rows of a quantized column: (row ids, scores), best first.

    Binary: Lance's nearest with the ``hamming`` metric (flat, or the column's IVF_FLAT
    index); score ``1 - 2 * hamming / bits`` (the fraction of agreeing signs, rescaled to
    [-1, 1]). int8: a flat scan, ``batch_rows`` rows at a time; score the int8 dot product.
    """
    if column.dtype == "binary":
        nearest: dict[str, Any] = {"column": column.name, "q": codes, "k": n,
                                   "metric": "hamming"}
        if nprobes is not None:
            nearest["nprobes"] = nprobes
        found = dataset.to_table(nearest=nearest, columns=[DISTANCE_COLUMN],
                                 with_row_id=True)
        distance = found.column(DISTANCE_COLUMN).to_numpy().astype(np.float64)
        return (found.column("_rowid").to_numpy(),
                (1.0 - 2.0 * distance / column.dim).astype(np.float32))
    best_rows = np.zeros(0, np.uint64)
    best = np.zeros(0, np.int64)
    for batch in dataset.to_batches(columns=[column.name], with_row_id=True,
                                    batch_size=batch_rows):
        values = batch.column(column.name)
        matrix = values.values.to_numpy(zero_copy_only=False).reshape(len(values), -1)
        rows = np.concatenate([best_rows, batch.column("_rowid").to_numpy()])
        scores = np.concatenate([best, quantize.int8_dot(matrix, codes)])
        keep = np.argsort(-scores, kind="stable")[:n]
        best_rows, best = rows[keep], scores[keep]
    return best_rows, best.astype(np.float32)


def _fetch(dataset: Any, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """Rows by row id (Lance's ``_rowid``), in the order of ``rows``."""
    if len(rows) == 0:
        return dataset.schema.empty_table().select(list(columns))
    found = dataset.to_table(columns=list(dict.fromkeys(columns)), with_row_id=True,
                             filter=f"_rowid IN ({','.join(str(int(r)) for r in rows)})")
    where = {r: i for i, r in enumerate(found.column("_rowid").to_pylist())}
    return found.take([where[int(r)] for r in rows])


def _rows(dataset: Any, rows: np.ndarray, scores: np.ndarray, show: Sequence[str]) -> pa.Table:
    keys, rest = _wanted(dataset.schema, show)
    found = _fetch(dataset, rows, [*keys, *rest])
    return _hits(found, keys, pa.array(scores, pa.float32()), rest)


def rescore_rows(dataset: Any, rows: np.ndarray, column: str, vector: np.ndarray, *, k: int,
                 columns: Sequence[str] = ()) -> pa.Table:
    """The ``k`` best of candidate ``rows`` by exact dot product with ``column`` (cosine:
    the stored vectors are normalized), as ``id, score, *columns``."""
    keys, rest = _wanted(dataset.schema, columns)
    found = _fetch(dataset, rows, [*keys, *rest, column])
    values = found.column(column).combine_chunks()
    matrix = values.values.to_numpy(zero_copy_only=False).reshape(len(values), -1)
    scores = matrix.astype(np.float32) @ np.asarray(vector, np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return _hits(found.take(order), keys, pa.array(scores[order], pa.float32()), rest)


CHUNK_KEYS: tuple[str, ...] = (S.DOC_ID, S.CHUNK, S.CHAR_START, S.CHAR_END)
COLLAPSE_FACTOR = 8  # chunk candidates fetched per returned document when collapsing


def _wanted(schema: pa.Schema, columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """A hit's key columns (``id``; a chunk table's ``doc_id, chunk, char_start, char_end``)
    and the other columns asked for."""
    keys = list(CHUNK_KEYS) if S.is_chunk_table(schema) else [S.OUT_ID]
    return keys, [c for c in dict.fromkeys(columns) if c not in keys]


def _hits(found: pa.Table, keys: list[str], score: pa.Array, rest: list[str]) -> pa.Table:
    return pa.table({**{c: found.column(c) for c in keys}, "score": score,
                     **{c: found.column(c) for c in rest}})


def chunk_hits(hits: pa.Table, k: int, collapse: bool) -> pa.Table:
    """A chunk table's hits: the kept text cut to each chunk's span (the snippet), and with
    ``collapse`` only the best chunk of each document; at most ``k`` rows."""
    if SNIPPET_COLUMN in hits.column_names:
        spans = zip(hits.column(SNIPPET_COLUMN).to_pylist(),
                    hits.column(S.CHAR_START).to_pylist(), hits.column(S.CHAR_END).to_pylist(),
                    strict=True)
        snippets = pa.array([None if t is None else t[a:b] for t, a, b in spans], pa.string())
        hits = hits.set_column(hits.column_names.index(SNIPPET_COLUMN), SNIPPET_COLUMN, snippets)
    if collapse:  # hits are best first: the first row of each document is its best chunk
        seen: dict = {}
        for i, doc in enumerate(hits.column(S.DOC_ID).to_pylist()):
            seen.setdefault(doc, i)
        hits = hits.take(pa.array(sorted(seen.values()), pa.int64()))
    return hits.slice(0, k)


def _query_spec(stamp: Stamp, model: str | None, storage: Storage):
    from embedjob.errors import ModelSourceError
    from embedjob.model import load_spec

    source = model or stamp.model_source
    try:
        return load_spec(source, filesystem=storage.fsspec(source))
    except ModelSourceError as exc:
        if model is not None:
            raise
        raise ModelSourceError(f"the table's stamped model cannot be loaded from here ({exc}); "
                               "pass --model with where that model is now") from exc


def format_results(table: pa.Table, max_chars: int = 80) -> str:
    """An aligned table with a header: rank, id, score, then the shown columns (long values
    cut to ``max_chars``, newlines as spaces)."""
    names = ["rank", *table.column_names]
    rows = [[str(rank), *(f"{v:.4f}" if n == "score" else _cut(v, max_chars)
                          for n, v in row.items())]
            for rank, row in enumerate(table.to_pylist(), start=1)]
    if not rows:
        return "no rows"
    widths = [max(len(r[i]) for r in [names, *rows]) for i in range(len(names))]
    numeric = {0, 2} | ({1} if all(r[1].lstrip("-").isdigit() for r in rows) else set())

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(names), *map(line, rows)])


def _cut(value: Any, max_chars: int) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
