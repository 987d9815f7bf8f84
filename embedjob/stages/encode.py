"""Encode stage: actors that hold the model once, with the task's adapter merged.

Each call gets a block of bucketed rows; every contiguous run of one ``_batch`` value is
one forward. Rows not to embed (rejected) pass through with null vectors so the
write stage can set them aside. The stage checks one output per input.

A forward that runs out of memory is split in halves and retried, down to single rows; a
single text that still does not fit is rejected with its reason, never dropped (its id is
not handed to a later duplicate: ``stages.dedupe`` decided the winner before the run).

Host memory is bounded by the model plus a few blocks: after each block the actor hands the
C heap's free pages back to the OS (``release_free_heap``). Without that, an actor's private
memory climbed with every block (tiny checkpoint, 2048-row blocks of varied lengths: RssAnon
346 -> 550 MiB over 40 blocks, still climbing): torch's CPU tensors of ever-new shapes come
from glibc's heap, and the freed chunks stayed there, fragmented (mallinfo2 over 8 Brown
blocks: in use flat at ~175 MiB, free 290 -> 784 MiB). With the trim: 329 -> 363 MiB, flat
after ~20 blocks, for 20-90 ms per block. A lower ``M_MMAP_THRESHOLD`` did not help (the
fragmented chunks are small). BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.errors import BugError
from embedjob.schema import Status
from embedjob.stages import vectors as V
from embedjob.stages.crashes import CrashWatch, block_key, row_keys
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EncodeSpec:
    """What an encode actor needs; pickled to each actor.

    Attributes:
        model: The model source (local dir, ``s3://`` prefix, hub id).
        task: The task whose adapter is merged into the weights (None: no adapter).
        dims: Every stored dim, the full one first.
        vector_dtype: Stored element type (``float32`` / ``float16``).
        packed: Packed (varlen) forwards instead of padded ones.
        compile: ``torch.compile`` the encoder.
        use_gpu: Run on CUDA (else CPU with ``cpu_threads`` torch threads).
        cpu_threads: Torch threads of a CPU actor.
        storage: To read an ``s3://`` model.
        quantize: Dim -> the quantized forms stored for it (``int8``, ``binary``).
        float_dims: Dims whose float column is stored (None: every dim).
        int8_ranges: Dim -> the stamped per-dim calibration range (lo, hi), each [dim].
        chunking: ``late``: window rows, one output row per chunk (``stages.late``).
        crashes: The run's ledger of blocks and rows that killed an actor (``stages.crashes``);
            None: not watched (a crashing row would be retried for ever).
    """

    model: str
    task: str | None
    dims: tuple[int, ...]
    vector_dtype: str = "float32"
    packed: bool = False
    compile: bool = False
    use_gpu: bool = False
    cpu_threads: int = 1
    storage: Storage = field(default_factory=Storage)
    quantize: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    float_dims: tuple[int, ...] | None = None
    int8_ranges: Mapping[int, tuple[list[float], list[float]]] = field(default_factory=dict)
    chunking: str = "none"
    crashes: CrashWatch | None = None


class EncodeActor:
    """``map_batches`` callable class run with ``compute=ActorPoolStrategy(...)``.

    Args:
        spec: This stage's spec.
    """

    def __init__(self, spec: EncodeSpec) -> None:
        started = time.perf_counter()
        import torch

        from embedjob.model import load_embedder

        if not spec.use_gpu:
            torch.set_num_threads(max(1, spec.cpu_threads))
        self.embedder = load_embedder(
            spec.model, device="cuda" if spec.use_gpu else "cpu", merge_task=spec.task,
            filesystem=spec.storage.fsspec(spec.model), compile=spec.compile,
        )
        self.spec = spec
        self.dtype = np.dtype(spec.vector_dtype)
        self.out_of_memory = (torch.OutOfMemoryError, MemoryError)
        logger.info("encode actor ready in %.2f s (imports + model load)",
                    time.perf_counter() - started)

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.spec.chunking == "late":  # one row per chunk out, not per row
            from embedjob.stages import late

            return late.encode_block(self, table)
        started = time.perf_counter()
        n = table.num_rows
        vectors = np.zeros((n, self.embedder.hidden_size), np.float32)
        processed = np.zeros(n, np.int64)
        statuses = table.column(S.STATUS).to_pylist()
        reasons = table.column(S.REASON).to_pylist()
        rows = V.row_ids(table.column(S.INPUT_IDS))
        batch_of = table.column(S.BATCH).to_numpy()
        self._encode_watched(table, rows, V.batch_runs(batch_of), vectors, processed, reasons)
        late = [i for i in range(n) if batch_of[i] >= 0 and reasons[i] is not None]
        for i in late:
            statuses[i] = Status.REJECTED
        valid = np.array([s == Status.EMBED for s in statuses], bool)
        table = table.drop_columns([S.INPUT_IDS, S.BATCH, S.STATUS, S.REASON])
        table = table.append_column(S.STATUS, S.status_array(statuses))
        table = table.append_column(S.REASON, pa.array(reasons, pa.string()))
        table = table.append_column(S.PROCESSED_TOKENS, pa.array(processed, pa.int64()))
        for name, column in V.vector_columns(vectors, valid, self.spec, self.dtype).items():
            table = table.append_column(name, column)
        logger.debug("encoded %d rows (%d tokens processed) in %.2f s", n, int(processed.sum()),
                     time.perf_counter() - started)
        release_free_heap()
        return table

    # The calls into the model; tests wrap them to inject faults (tests/faults/hooks.py).

    def encode_batches(self, batches: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Every forward of a block, one wait for the device: float32 [n_i, hidden] each."""
        return self.embedder.encode_batches(batches, task=self.spec.task,
                                            packed=self.spec.packed)

    def encode_ids(self, ids: list[np.ndarray]) -> np.ndarray:
        """One forward: float32 [len(ids), hidden]."""
        return self.embedder.encode_ids(ids, task=self.spec.task, packed=self.spec.packed)

    def encode_spans(self, ids: list[np.ndarray],
                     spans: list[list[tuple[int, int]]]) -> list[np.ndarray]:
        """One padded forward, each span's mean (late chunking): float32 [spans_i, hidden]."""
        return self.embedder.encode_spans(ids, spans, task=self.spec.task)

    def _encode_watched(
        self,
        table: pa.Table,
        rows: list[np.ndarray],
        runs: list[range],
        vectors: np.ndarray,
        processed: np.ndarray,
        reasons: list[str | None],
    ) -> None:
        """``_encode_block`` with its start recorded in the crash ledger; a block that killed
        actors ``retries`` times goes row by row, and a row that did is rejected."""
        watch = self.spec.crashes
        if watch is None or not runs:
            self._encode_block(rows, runs, vectors, processed, reasons)
            return
        keys = row_keys(table)
        encoded = np.concatenate([np.arange(r.start, r.stop) for r in runs])
        block = block_key(keys, encoded)
        deaths = watch.start(block)
        if deaths < watch.retries:
            self._encode_block(rows, runs, vectors, processed, reasons)
        else:
            logger.warning("a block of %d rows killed %d encode actors; encoding it row by row",
                           len(encoded), deaths)
            for i in encoded.tolist():
                row_deaths = watch.start(keys[i])
                if row_deaths >= watch.retries:
                    reasons[i] = watch.reason(row_deaths)
                    logger.warning("row %s rejected: %s", keys[i], reasons[i])
                    continue
                self._encode_run(rows, i, i + 1, vectors, processed, reasons)
                watch.finish(keys[i])
        watch.finish(block)

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
            outs = self.encode_batches(batches)
        except self.out_of_memory as exc:
            self.embedder.free_cached_memory()
            logger.warning("out of memory in a block of %d forwards (%s); one by one", len(runs),
                           exc)
            for run in runs:
                self._encode_run(rows, run.start, run.stop, vectors, processed, reasons)
            return
        for run, ids, out in zip(runs, batches, outs, strict=True):
            vectors[run.start : run.stop] = self._checked(out, ids)
            processed[run.start : run.stop] = _processed(ids, self.spec.packed)

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
            vectors[start:stop] = self._checked(self.encode_ids(ids), ids)
        except self.out_of_memory as exc:
            self.embedder.free_cached_memory()
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
        processed[start:stop] = _processed(ids, self.spec.packed)

    def _checked(self, out: np.ndarray, ids: list[np.ndarray]) -> np.ndarray:
        if out.shape != (len(ids), self.embedder.hidden_size):
            raise BugError(
                f"encoder returned {out.shape} for {len(ids)} rows"
            )
        return out


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere):
    bounds an encode actor's memory against the fragmentation of many tensor shapes."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _processed(ids: list[np.ndarray], packed: bool) -> list[int] | int:
    """Tokens the encoder processed, spread over the rows of one forward."""
    return [len(x) for x in ids] if packed else max(map(len, ids))


def forward_cost(ids: list[np.ndarray], packed: bool) -> int:
    """Tokens one forward holds: sum of lengths (packed) or rows x longest (padded)."""
    return sum(map(len, ids)) if packed else len(ids) * max(map(len, ids))
