"""Bucket stage: sort a bounded window of rows by token length and cut token-budget batches.

Adds ``_batch`` and reorders rows so that each batch is a contiguous run. ``_batch`` is
unique across windows (a 43-bit key of the window's first row, then the batch's index in
the window; -1 for rejected rows), because Ray may concatenate several windows into one
block before the encode stage. The encode stage runs each run as one forward; if Ray splits
a window across blocks, a batch is only split into smaller forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.schema import Status
from embedjob.stages.batching import length_order, plan_batches
from embedjob.stages.check import row_key

BATCH_INDEX_BITS = 20  # batches per window < 2**20 (window_rows is capped at 2**20)


@dataclass(frozen=True, kw_only=True)
class BucketSpec:
    """How batches are cut (see ``batching.plan_batches``).

    Attributes:
        max_tokens: Token budget per forward.
        padded: Padded cost (rows x longest) instead of packed cost (sum of lengths).
        overhead_tokens: What one more forward costs, in tokens.
    """

    max_tokens: int
    padded: bool = True
    overhead_tokens: int | None = None


def bucket_window(table: pa.Table, *, spec: BucketSpec) -> pa.Table:
    """``map_batches`` body over ``window_rows`` rows: rows to embed first, sorted by length
    and numbered by batch; the others (rejected) after them with batch -1."""
    todo = table.column(S.STATUS).to_numpy() == Status.EMBED
    lengths = table.column(S.N_TOKENS).to_numpy()
    valid = np.flatnonzero(todo)
    order = valid[length_order(lengths[valid])]
    batch_of = np.full(table.num_rows, -1, np.int64)
    base = _window_key(table) << BATCH_INDEX_BITS
    plan = plan_batches(lengths[order], spec.max_tokens, spec.padded,
                        overhead_tokens=spec.overhead_tokens)
    for index, run in enumerate(plan):
        batch_of[order[run.start : run.stop]] = base | index
    final = np.concatenate([order, np.flatnonzero(~todo)])
    out = table.take(pa.array(final, pa.int64()))
    return out.append_column(S.BATCH, pa.array(batch_of[final], pa.int64()))


def _window_key(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 0
    first = row_key(table.column(S.SOURCE)[0].as_py(), table.column(S.ROW)[0].as_py())
    return first & ((1 << (63 - BATCH_INDEX_BITS)) - 1)
