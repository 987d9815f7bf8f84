"""The encode stage for ``--chunking late``: window rows in, one row per chunk out.

Each run of one ``_batch`` value is one padded forward over its window rows
(``EncodeActor.encode_spans``); each chunk of a window (``schema.CHUNKS``) is the mean of its
pooled positions, then the vector columns are made as for any row (truncate, normalize,
quantize). Rows not embedded pass through as one row with null vectors. The padded tokens
of a window are counted once, on its first chunk.

Faults, as on the plain path (``stages.encode``), with the document as the unit a
rejection applies to:

- **Out of memory**: a forward that runs out of memory is split in halves and retried, down
  to one window; a window that does not fit alone rejects its document
  (``out of memory: 1 window of N tokens does not fit``).
- **A dead actor** (``stages.crashes``): a block whose forwards killed the actor
  ``retries`` times is encoded document by document (all its windows in the block, the
  document's ``source#row`` key in the ledger), and a document that killed it ``retries``
  times alone is rejected (``crashes the encoder: ...``).

A rejected document leaves one row, rejected with the reason: none of its chunks in the
block is written (no partial document), and that row carries their shares of the document
(``schema.DOC_SHARE``), so its input unit still adds up. The windows of one document have
one length (``chunks.plan_windows``), so they sort side by side into one block. When a
bucket window or block boundary falls between them (Ray may cut blocks), each block decides
on its own: a window of that length runs out of memory there too, and the ledger's document
key already holds its deaths, so the document is rejected in both (one rejected row each);
only a fault tied to one window's content (a crash that its other windows do not cause)
could leave the other block's chunks written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.errors import BugError
from embedjob.schema import Status
from embedjob.stages import vectors as V
from embedjob.stages.chunk_rows import append_flat
from embedjob.stages.crashes import block_key, row_keys

logger = logging.getLogger(__name__)


@dataclass
class _Block:
    """One call's window rows and what became of them."""

    rows: list[np.ndarray]  # token ids per window row
    windows: list[list[dict] | None]  # per row: its chunks' dicts, or None (not embedded)
    docs: list[str]  # per row: its document's key (``source#row``)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # row -> [chunks, hidden]
    processed: dict[int, int] = field(default_factory=dict)  # row -> tokens of its forward
    failed: dict[str, str] = field(default_factory=dict)  # document key -> reason

    def pending(self, run: range | list[int]) -> list[int]:
        """The rows of ``run`` whose document has not been rejected."""
        return [i for i in run if self.docs[i] not in self.failed]


def encode_block(actor, table: pa.Table) -> pa.Table:
    """``EncodeActor.__call__`` for late chunking (``actor``: the EncodeActor)."""
    block = _Block(rows=V.row_ids(table.column(S.INPUT_IDS)),
                   windows=table.column(S.CHUNKS).to_pylist(), docs=row_keys(table))
    runs = V.batch_runs(table.column(S.BATCH).to_numpy())
    _encode_watched(actor, block, table, runs)
    return _chunk_rows(actor, block, table)


def _encode_watched(actor, block: _Block, table: pa.Table, runs: list[range]) -> None:
    """The block's forwards with its start in the crash ledger; a block that killed actors
    ``retries`` times goes document by document, and a document that did is rejected."""
    watch = actor.spec.crashes
    if watch is None or not runs:
        for run in runs:
            _encode_run(actor, block, list(run))
        return
    encoded = [i for run in runs for i in run]
    # a window's key: its document's and its first chunk (a document's windows share one)
    keys = [f"{d}/{block.windows[i][0][S.CHUNK] if block.windows[i] else ''}"
            for i, d in enumerate(block.docs)]
    key = block_key(keys, np.asarray(encoded))
    deaths = watch.start(key)
    if deaths < watch.retries:
        for run in runs:
            _encode_run(actor, block, list(run))
    else:
        logger.warning("a block of %d windows killed %d encode actors; encoding it document "
                       "by document", len(encoded), deaths)
        for doc in dict.fromkeys(block.docs[i] for i in encoded):  # in block order
            doc_deaths = watch.start(doc)
            if doc_deaths >= watch.retries:
                block.failed[doc] = watch.reason(doc_deaths)
                logger.warning("document %s rejected: %s", doc, block.failed[doc])
                continue
            _encode_run(actor, block, [i for i in encoded if block.docs[i] == doc])
            watch.finish(doc)
    watch.finish(key)


def _encode_run(actor, block: _Block, run: list[int]) -> None:
    """Window rows ``run`` in one padded forward; on out-of-memory, each half on its own,
    down to one window, whose document is then rejected."""
    run = block.pending(run)
    if not run:
        return
    try:
        outs = actor.encode_spans([block.rows[i] for i in run],
                                  [[(c[S.POOL_START], c[S.POOL_END]) for c in block.windows[i]]
                                   for i in run])
    except actor.out_of_memory as exc:
        actor.embedder.free_cached_memory()
        if len(run) == 1:
            reason = f"out of memory: 1 window of {len(block.rows[run[0]])} tokens does not fit"
            block.failed[block.docs[run[0]]] = reason
            logger.warning("document %s rejected: %s (%s)", block.docs[run[0]], reason, exc)
            return
        logger.warning("out of memory on %d windows of up to %d tokens; splitting in halves",
                       len(run), max(len(block.rows[i]) for i in run))
        _encode_run(actor, block, run[: len(run) // 2])
        _encode_run(actor, block, run[len(run) // 2 :])
        return
    longest = max(len(block.rows[i]) for i in run)
    for i, out in zip(run, outs, strict=True):
        if out.shape != (len(block.windows[i]), actor.embedder.hidden_size):
            raise BugError(f"encode_spans returned {out.shape} for {len(block.windows[i])} "
                           "chunks")
        block.vectors[i], block.processed[i] = out, longest


def _chunk_rows(actor, block: _Block, table: pa.Table) -> pa.Table:
    """One row per chunk of the encoded windows; one row per row not embedded; one rejected
    row per rejected document, holding the shares of its windows in this block."""
    hidden = actor.embedder.hidden_size
    parents, metas, stacked, spent = [], [], [], []
    statuses = table.column(S.STATUS).to_pylist()
    reasons = table.column(S.REASON).to_pylist()
    rejected = _rejected_shares(block)
    for i in range(table.num_rows):
        doc = block.docs[i]
        if doc in block.failed:
            if rejected[doc][0] != i:  # the document's first row stands for it
                continue
            statuses[i], reasons[i] = Status.REJECTED, block.failed[doc]
            chunks = [{f.name: None for f in S.CHUNK_STRUCT}
                      | {S.DOC_SHARE: rejected[doc][1], S.COUNTED_TOKENS: 0}]
        else:
            chunks = block.windows[i] if i in block.vectors else [None]
        parents += [i] * len(chunks)
        metas += chunks
        stacked.append(block.vectors.get(i, np.zeros((1, hidden), np.float32)))
        spent += [block.processed.get(i, 0)] + [0] * (len(chunks) - 1)
    out = table.drop_columns([S.INPUT_IDS, S.BATCH, S.CHUNKS, S.STATUS, S.REASON])
    out = out.append_column(S.STATUS, S.status_array(statuses))
    out = out.append_column(S.REASON, pa.array(reasons, pa.string()))
    out = out.take(pa.array(parents, pa.int64()))
    out = append_flat(out, metas).append_column(S.PROCESSED_TOKENS, pa.array(spent, pa.int64()))
    full = np.concatenate(stacked) if stacked else np.zeros((0, hidden), np.float32)
    valid = (out.column(S.STATUS).to_numpy() == Status.EMBED) & np.array(
        [m is not None and m[S.CHUNK] is not None for m in metas], bool)
    for name, column in V.vector_columns(full, valid, actor.spec, actor.dtype).items():
        out = out.append_column(name, column)
    return out


def _rejected_shares(block: _Block) -> dict[str, tuple[int, int]]:
    """Rejected document -> (its first row in the block, its windows' shares summed)."""
    found: dict[str, tuple[int, int]] = {}
    for i, doc in enumerate(block.docs):
        if doc in block.failed:
            first, total = found.get(doc, (i, 0))
            found[doc] = (first, total + sum(c[S.DOC_SHARE] for c in block.windows[i] or []))
    return found
