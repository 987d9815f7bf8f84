"""The encode stage for ``--chunking late``: window rows in, one row per chunk out.

Each run of one ``_batch`` value is one padded forward over its window rows
(``Embedder.encode_spans``); each chunk of a window (``schema.CHUNKS``) is the mean of its
pooled positions, then the vector columns are made as for any row (truncate, normalize,
quantize). Rows not embedded pass through as one row with null vectors. The padded tokens
of a window are counted once, on its first chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.errors import BugError
from embedjob.schema import Status
from embedjob.stages import vectors as V
from embedjob.stages.chunk_rows import append_flat


def encode_block(actor, table: pa.Table) -> pa.Table:
    """``EncodeActor.__call__`` for late chunking (``actor``: the EncodeActor)."""
    rows = V.row_ids(table.column(S.INPUT_IDS))
    windows = table.column(S.CHUNKS).to_pylist()  # per row: its chunks' dicts, or None
    vectors: dict[int, np.ndarray] = {}
    processed: dict[int, int] = {}
    for run in V.batch_runs(table.column(S.BATCH).to_numpy()):
        spans = [[(c[S.POOL_START], c[S.POOL_END]) for c in windows[i]] for i in run]
        outs = actor.embedder.encode_spans([rows[i] for i in run], spans, task=actor.spec.task)
        longest = max(len(rows[i]) for i in run)
        for i, out in zip(run, outs, strict=True):
            if out.shape != (len(windows[i]), actor.embedder.hidden_size):
                raise BugError(f"encode_spans returned {out.shape} for {len(windows[i])} chunks")
            vectors[i], processed[i] = out, longest
    parents, metas, stacked, spent = [], [], [], []
    for i in range(table.num_rows):
        chunks = windows[i] if i in vectors else [None]
        parents += [i] * len(chunks)
        metas += chunks
        stacked.append(vectors.get(i, np.zeros((1, actor.embedder.hidden_size), np.float32)))
        spent += [processed.get(i, 0)] + [0] * (len(chunks) - 1)
    out = table.drop_columns([S.INPUT_IDS, S.BATCH, S.CHUNKS]).take(pa.array(parents, pa.int64()))
    out = append_flat(out, metas).append_column(S.PROCESSED_TOKENS, pa.array(spent, pa.int64()))
    full = np.concatenate(stacked) if stacked else np.zeros((0, actor.embedder.hidden_size))
    valid = (out.column(S.STATUS).to_numpy() == Status.EMBED) & np.array(
        [m is not None for m in metas], bool)
    for name, column in V.vector_columns(full, valid, actor.spec, actor.dtype).items():
        out = out.append_column(name, column)
    return out
