"""Encode stage: actors that hold the model once, with the task's adapter merged.

Each call gets a block of bucketed rows; every contiguous run of one ``_batch`` value is
one forward. Rejected rows pass through with null vectors so the write stage can set them
aside. The stage checks one output per input.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from jobs import storage
from jobs.errors import PipelineInvariantError

logger = logging.getLogger(__name__)

# Fault-injection hook for the crash/resume tests: seconds to sleep per encode call, so a
# test can kill the driver or an actor mid-run. Unset in production.
DELAY_ENV = "EMBEDJOB_TEST_ENCODE_DELAY_S"


class EncodeActor:
    """``map_batches`` callable class run with ``compute=ActorPoolStrategy(...)``."""

    def __init__(
        self,
        *,
        model: str,
        task: str | None,
        dims: tuple[int, ...],
        vector_dtype: str,
        packed: bool,
        use_gpu: bool,
        cpu_threads: int,
        storage_options: Mapping[str, str],
    ) -> None:
        import torch

        from model import load_embedder

        if not use_gpu:
            torch.set_num_threads(max(1, cpu_threads))
        filesystem = storage.s3fs_filesystem(storage_options) if storage.is_s3(model) else None
        self.embedder = load_embedder(
            model, device="cuda" if use_gpu else "cpu", merge_task=task, filesystem=filesystem
        )
        self.task = task
        self.dims = dims
        self.dtype = np.dtype(vector_dtype)
        self.packed = packed

    def __call__(self, table: pa.Table) -> pa.Table:
        if os.environ.get(DELAY_ENV):
            time.sleep(float(os.environ[DELAY_ENV]))
        n = table.num_rows
        hidden = self.embedder.hidden_size
        vectors = np.zeros((n, hidden), np.float32)
        processed = np.zeros(n, np.int64)
        rows = _row_ids(table.column("input_ids"))
        for run in batch_runs(table.column("_batch").to_numpy()):
            ids = [rows[i] for i in run]
            out = self.embedder.encode_ids(ids, task=self.task, packed=self.packed)
            if out.shape != (len(ids), hidden):
                raise PipelineInvariantError(
                    f"encoder returned {out.shape} for {len(ids)} rows; this is a bug"
                )
            vectors[run.start : run.stop] = out
            # tokens the encoder processed, spread over the rows of the forward
            processed[run.start : run.stop] = max(map(len, ids)) if not self.packed else [
                len(x) for x in ids
            ]
        valid = table.column("_batch").to_numpy() >= 0
        table = table.drop_columns(["input_ids", "_batch"])
        table = table.append_column("_processed_tokens", pa.array(processed, pa.int64()))
        for name, column in vector_columns(vectors, valid, self.dims, self.dtype).items():
            table = table.append_column(name, column)
        return table


def batch_runs(batch_of: np.ndarray) -> list[range]:
    """Contiguous runs of one non-negative ``_batch`` value."""
    runs, start = [], 0
    for i in range(1, len(batch_of) + 1):
        if i == len(batch_of) or batch_of[i] != batch_of[start]:
            if batch_of[start] >= 0:
                runs.append(range(start, i))
            start = i
    return runs


def _row_ids(column: pa.ChunkedArray) -> list[np.ndarray]:
    """list<int32> -> one int32 array per row (views into the flat buffer, no copy)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    flat = array.values.to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def vector_columns(
    full: np.ndarray, valid: np.ndarray, dims: tuple[int, ...], dtype: np.dtype
) -> dict[str, pa.Array]:
    """``vector`` (full dim) and ``vector_<d>`` (truncate, then re-normalize) per dim.

    Rows where ``valid`` is False get null vectors.
    """
    from model import matryoshka

    columns = {"vector": _fixed_size_list(full, valid, dtype)}
    for dim in dims:
        if dim != full.shape[1]:
            columns[f"vector_{dim}"] = _fixed_size_list(matryoshka(full, dim), valid, dtype)
    return columns


def _fixed_size_list(vectors: np.ndarray, valid: np.ndarray, dtype: np.dtype) -> pa.Array:
    """[n, d] -> FixedSizeListArray<dtype, d>, the type Lance's vector search expects."""
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, vectors.shape[1], mask=mask)
