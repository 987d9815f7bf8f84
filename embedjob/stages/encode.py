"""Encode stage: actors that hold the model once, with the task's adapter merged.

Each call gets a block of bucketed rows; every contiguous run of one ``_batch`` value is
one forward. Rejected rows pass through with null vectors so the write stage can set them
aside. The stage checks one output per input.

A forward that runs out of memory is split in halves and retried, down to single rows; a
single text that still does not fit is rejected with its reason (and its id given back to
the run's id registry), never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from embedjob import storage
from embedjob.errors import BugError
from tests.faults import hooks as faults

logger = logging.getLogger(__name__)

# Fault-injection hooks (jobs/faults.py), read when an actor starts; unset in production.
DELAY_ENV = faults.ENCODE_DELAY_S  # seconds to sleep per call: kills land mid-run
OOM_ABOVE_TOKENS_ENV = faults.OOM_ABOVE_TOKENS  # bigger forwards raise torch.OutOfMemoryError


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
        compile: bool = False,
        use_gpu: bool,
        cpu_threads: int,
        storage_options: Mapping[str, str],
        registry=None,
    ) -> None:
        started = time.perf_counter()
        import torch

        from embedjob.model import load_embedder

        if not use_gpu:
            torch.set_num_threads(max(1, cpu_threads))
        filesystem = storage.s3fs_filesystem(storage_options) if storage.is_s3(model) else None
        self.embedder = load_embedder(
            model, device="cuda" if use_gpu else "cpu", merge_task=task, filesystem=filesystem,
            compile=compile,
        )
        self.task = task
        self.dims = dims
        self.dtype = np.dtype(vector_dtype)
        self.packed = packed
        self.registry = registry  # ids of rows rejected here are given back to it
        self.out_of_memory = (torch.OutOfMemoryError, MemoryError)
        self.oom_above_tokens = int(faults.value(OOM_ABOVE_TOKENS_ENV) or 0)
        self.delay_s = float(faults.value(DELAY_ENV) or 0)
        logger.info("encode actor ready in %.2f s (imports + model load)",
                    time.perf_counter() - started)

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.delay_s:
            time.sleep(self.delay_s)
        started = time.perf_counter()
        n = table.num_rows
        vectors = np.zeros((n, self.embedder.hidden_size), np.float32)
        processed = np.zeros(n, np.int64)
        reasons = table.column("_reject").to_pylist()
        rows = _row_ids(table.column("input_ids"))
        batch_of = table.column("_batch").to_numpy()
        self._encode_block(rows, batch_runs(batch_of), vectors, processed, reasons)
        late = [i for i in range(n) if batch_of[i] >= 0 and reasons[i] is not None]
        self._release(table, late)
        valid = np.array([r is None for r in reasons], bool)
        table = table.drop_columns(["input_ids", "_batch", "_reject"])
        table = table.append_column("_reject", pa.array(reasons, pa.string()))
        table = table.append_column("_processed_tokens", pa.array(processed, pa.int64()))
        for name, column in vector_columns(vectors, valid, self.dims, self.dtype).items():
            table = table.append_column(name, column)
        logger.debug("encoded %d rows (%d tokens processed) in %.2f s", n, int(processed.sum()),
                    time.perf_counter() - started)
        return table

    def _encode_block(
        self,
        rows: list[np.ndarray],
        runs: list[range],
        vectors: np.ndarray,
        processed: np.ndarray,
        reasons: list[str | None],
    ) -> None:
        """Every forward of the block with one wait for the device (the host prepares the
        next forward while the GPU runs this one); after an out-of-memory error, forward by
        forward with halving (``_encode_run``)."""
        batches = [rows[run.start : run.stop] for run in runs]
        try:
            for ids in batches:
                self._simulate_oom(ids)
            outs = self.embedder.encode_batches(batches, task=self.task, packed=self.packed)
        except self.out_of_memory as exc:
            _free_accelerator_memory(self.embedder.device)
            logger.warning("out of memory in a block of %d forwards (%s); one by one", len(runs),
                           exc)
            for run in runs:
                self._encode_run(rows, run.start, run.stop, vectors, processed, reasons)
            return
        for run, ids, out in zip(runs, batches, outs, strict=True):
            vectors[run.start : run.stop] = self._checked(out, ids)
            processed[run.start : run.stop] = _processed(ids, self.packed)

    def _encode_run(
        self,
        rows: list[np.ndarray],
        start: int,
        stop: int,
        vectors: np.ndarray,
        processed: np.ndarray,
        reasons: list[str | None],
    ) -> None:
        """Rows [start, stop) in one forward; on out-of-memory, each half on its own."""
        ids = rows[start:stop]
        try:
            vectors[start:stop] = self._forward(ids)
        except self.out_of_memory as exc:
            _free_accelerator_memory(self.embedder.device)
            if len(ids) == 1:
                reasons[start] = f"out of memory: 1 text of {len(ids[0])} tokens does not fit"
                logger.warning("%s (%s)", reasons[start], exc)
                return
            logger.warning("out of memory on %d rows of up to %d tokens; splitting in halves",
                           len(ids), max(map(len, ids)))
            middle = (start + stop) // 2
            self._encode_run(rows, start, middle, vectors, processed, reasons)
            self._encode_run(rows, middle, stop, vectors, processed, reasons)
            return
        processed[start:stop] = _processed(ids, self.packed)

    def _forward(self, ids: list[np.ndarray]) -> np.ndarray:
        """One forward: float32 [len(ids), hidden]."""
        self._simulate_oom(ids)
        return self._checked(self.embedder.encode_ids(ids, task=self.task, packed=self.packed),
                             ids)

    def _simulate_oom(self, ids: list[np.ndarray]) -> None:
        """The fault hook: forwards above ``OOM_ABOVE_TOKENS`` raise as a full GPU would."""
        if self.oom_above_tokens and _cost(ids, self.packed) > self.oom_above_tokens:
            import torch

            raise torch.OutOfMemoryError(
                f"simulated: {_cost(ids, self.packed)} tokens > {OOM_ABOVE_TOKENS_ENV}="
                f"{self.oom_above_tokens}"
            )

    def _checked(self, out: np.ndarray, ids: list[np.ndarray]) -> np.ndarray:
        if out.shape != (len(ids), self.embedder.hidden_size):
            raise BugError(
                f"encoder returned {out.shape} for {len(ids)} rows"
            )
        return out

    def _release(self, table: pa.Table, rejected: list[int]) -> None:
        """Give the ids of rows rejected here back to the registry (they were claimed by the
        tokenize stage), so that the run's one-to-one check still holds."""
        if not rejected or self.registry is None:
            return
        import ray

        from embedjob.stages.check import row_key

        ids = table.column("_id").take(rejected).to_pylist()
        sources = table.column("_source").take(rejected).to_pylist()
        starts = table.column("_row").take(rejected).to_pylist()
        claimants = [row_key(s, r) for s, r in zip(sources, starts, strict=True)]
        ray.get(self.registry.release.remote(ids, claimants))


def _processed(ids: list[np.ndarray], packed: bool) -> list[int] | int:
    """Tokens the encoder processed, spread over the rows of one forward."""
    return [len(x) for x in ids] if packed else max(map(len, ids))


def _cost(ids: list[np.ndarray], packed: bool) -> int:
    """Tokens one forward holds: sum of lengths (packed) or rows x longest (padded)."""
    return sum(map(len, ids)) if packed else len(ids) * max(map(len, ids))


def _free_accelerator_memory(device) -> None:
    """Return the failed forward's cached blocks to the GPU before the halves run."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.empty_cache()


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
    from embedjob.model import matryoshka

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
