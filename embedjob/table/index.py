"""Vector indexes on an output table: cosine IVF_PQ or IVF_HNSW_SQ, defaults from rows and dim.

Binary columns (``vector_<d>_bin``) get an IVF_FLAT index with the ``hamming`` metric
(whatever ``--type`` says: the one index pylance 14 builds on uint8 vectors); int8 columns
are refused (pylance 14 indexes float vectors only; search scans them flat)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from embedjob.config import INDEX_TYPES
from embedjob.errors import ConfigError
from embedjob.storage import Storage
from embedjob.table.search import METRIC, layout_column, open_table

logger = logging.getLogger(__name__)

# IVF_PQ trains 2^8 = 256 centroids per sub-vector codebook: fewer rows cannot train it,
# and below this size a flat scan is exact and takes milliseconds anyway. Lance also trains
# at most rows/256 IVF partitions (pylance 14 warns "training 19 of the 71 requested IVF
# partitions" on 5,000 rows), so the default partitions are capped the same way.
BINARY_INDEX, BINARY_METRIC = "IVF_FLAT", "hamming"
MIN_INDEX_ROWS = 256
ROWS_PER_PARTITION_MIN = 256
MAX_PARTITIONS = 4096
# From this many rows an IVF_PQ index is built by ``lance_ray.create_index`` (segments
# trained and assigned on Ray workers, one per cluster CPU, then merged); below, one
# process builds it in minutes and a Ray pool's start would cost more than it saves.
DISTRIBUTED_INDEX_ROWS = 10_000_000
DISTRIBUTED_TYPES = ("IVF_PQ",)


@dataclass(frozen=True, kw_only=True)
class IndexPlan:
    """The parameters an index is built with (defaults derived from rows and dim)."""

    column: str
    index_type: str
    metric: str
    num_partitions: int
    num_sub_vectors: int | None
    rows: int
    dim: int


def index_defaults(rows: int, dim: int, index_type: str = "IVF_PQ",
                   num_partitions: int | None = None,
                   num_sub_vectors: int | None = None) -> tuple[int, int | None]:
    """Default IVF partitions and PQ sub-vectors for a table of ``rows`` vectors of ``dim``.

    Partitions: round(sqrt(rows)) (lance-ray's own default), at most rows/256 (what Lance
    trains) and 4096. PQ sub-vectors: dim/16 when 16 divides dim,
    else dim/8, dim/4, ... (Lance's SIMD path wants sub-vectors of 8 or 16 values).

    Raises:
        ConfigError: ``rows`` below MIN_INDEX_ROWS, an unknown index type, or
            ``num_sub_vectors`` that does not divide ``dim``.
    """
    if index_type not in (*INDEX_TYPES, BINARY_INDEX):
        raise ConfigError(f"index type {index_type!r} not in {list(INDEX_TYPES)}")
    if rows < MIN_INDEX_ROWS:
        raise ConfigError(
            f"table has {rows} rows; a vector index needs at least {MIN_INDEX_ROWS} to train "
            "(IVF centroids and 256-entry PQ codebooks); search without one is exact and fast "
            "at this size"
        )
    cap = min(MAX_PARTITIONS, rows // ROWS_PER_PARTITION_MIN)
    partitions = num_partitions or max(1, min(cap, round(math.sqrt(rows))))
    if index_type != "IVF_PQ":
        return partitions, None
    if num_sub_vectors is None:
        sub_dim = next(s for s in (16, 8, 4, 2, 1) if dim % s == 0)
        num_sub_vectors = dim // sub_dim
    if dim % num_sub_vectors:
        raise ConfigError(f"num_sub_vectors {num_sub_vectors} must divide the column dim {dim}")
    return partitions, num_sub_vectors


def build_index(uri: str, *, column: str, index_type: str = "IVF_PQ",
                num_partitions: int | None = None, num_sub_vectors: int | None = None,
                storage: Storage | None = None) -> IndexPlan:
    """Build (or replace) a cosine vector index on ``column`` of the table at ``uri``.

    Returns:
        The parameters used; the table gains a new version holding the index.
    """
    dataset = open_table(uri, storage)
    layout = layout_column(dataset.schema, column)
    dim, metric = layout.dim, METRIC
    if layout.dtype == "int8":
        raise ConfigError(f"column {column!r} is int8: pylance 14 builds vector indexes on "
                          "float and binary (uint8) vectors only; `embedjob search` scans int8 "
                          "columns flat")
    if layout.dtype == "binary":
        index_type, metric = BINARY_INDEX, BINARY_METRIC
    rows = dataset.count_rows()
    partitions, sub_vectors = index_defaults(rows, dim, index_type, num_partitions,
                                             num_sub_vectors)
    kwargs: dict[str, Any] = {"num_partitions": partitions}
    if sub_vectors is not None:
        kwargs["num_sub_vectors"] = sub_vectors
    logger.info("building %s (%s) on %s of %s: %d rows, dim %d, %s", index_type, metric,
                column, uri, rows, dim, kwargs)
    if rows >= DISTRIBUTED_INDEX_ROWS and index_type in DISTRIBUTED_TYPES:
        _create_distributed(uri, column, index_type, metric, kwargs, storage)
    else:
        dataset.create_index(column, index_type=index_type, metric=metric, replace=True,
                             name=f"{column}_idx", **kwargs)
    return IndexPlan(column=column, index_type=index_type, metric=metric,
                     num_partitions=partitions, num_sub_vectors=sub_vectors, rows=rows, dim=dim)


def _create_distributed(uri: str, column: str, index_type: str, metric: str,
                        kwargs: dict[str, Any], storage: Storage | None) -> None:
    """``lance_ray.create_index`` with one worker per cluster CPU (a local Ray otherwise)."""
    import ray
    from lance_ray import create_index

    if not ray.is_initialized():
        ray.init(address="auto" if _cluster() else "local", include_dashboard=False)
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    create_index(uri, column=column, index_type=index_type, name=f"{column}_idx",
                 replace=True, metric=metric, num_workers=workers,
                 storage_options=(storage or Storage()).lance_options() or None, **kwargs)


def _cluster() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
