"""Bucket stage: sort a bounded window of rows by token length and cut token-budget batches.

Adds ``_batch`` and reorders rows so that each batch is a contiguous run. ``_batch`` is
unique across windows (a 43-bit key of the window's first row, then the batch's index in
the window; -1 for rejected rows), because Ray may concatenate several windows into one
block before the encode stage. The encode stage runs each run as one forward; if Ray splits
a window across blocks, a batch is only split into smaller forwards.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedjob.stages.batching import length_order, plan_batches
from embedjob.stages.check import row_key

BATCH_INDEX_BITS = 20  # batches per window < 2**20 (window_rows is capped at 2**20)


def bucket_window(
    table: pa.Table, *, max_tokens: int, padded: bool, overhead_tokens: int | None = None
) -> pa.Table:
    """``map_batches`` body over ``window_rows`` rows."""
    rejected = table.column("_reject").is_valid().to_numpy(zero_copy_only=False)
    lengths = table.column("n_tokens").to_numpy()
    valid = np.flatnonzero(~rejected)
    order = valid[length_order(lengths[valid])]
    batch_of = np.full(table.num_rows, -1, np.int64)
    base = _window_key(table) << BATCH_INDEX_BITS
    plan = plan_batches(lengths[order], max_tokens, padded, overhead_tokens=overhead_tokens)
    for index, run in enumerate(plan):
        batch_of[order[run.start : run.stop]] = base | index
    final = np.concatenate([order, np.flatnonzero(rejected)])
    out = table.take(pa.array(final, pa.int64()))
    return out.append_column("_batch", pa.array(batch_of[final], pa.int64()))


def _window_key(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 0
    first = row_key(table.column("_source")[0].as_py(), table.column("_row")[0].as_py())
    return first & ((1 << (63 - BATCH_INDEX_BITS)) - 1)
