"""Tokenize stage (CPU workers): check rows, then turn texts into int32 token ids.

The encode actors then do no string work, and the object store carries int32 ids instead
of strings. The task's instruction prefix is applied here by the model's tokenizer.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.model.spec import ModelSpec, TextTokenizer
from embedjob.schema import Status
from embedjob.stages import check
from embedjob.stages.chunks import ChunkSpec
from embedjob.stages.dedupe import DuplicateIndex
from embedjob.storage import Storage


@dataclass(frozen=True, kw_only=True)
class TokenizeSpec:
    """What the tokenize stage needs; pickled to every task.

    Attributes:
        model: The model's spec (tokenizer files, prefixes, max_tokens).
        task: The task whose instruction prefix is prepended (None: no prefix).
        storage: To fetch the tokenizer files again on a node without the driver's copy.
        duplicates: The run's duplicate-id shards (None: ids are not checked, as with
            ``assume_unique_ids``).
        chunking: Cut documents into chunk rows (``stages.chunk_rows``); None: one row each.
    """

    model: ModelSpec
    task: str | None
    storage: Storage = field(default_factory=Storage)
    duplicates: DuplicateIndex | None = None
    chunking: ChunkSpec | None = None


@functools.lru_cache(maxsize=4)
def _tokenizer(model: ModelSpec, storage: Storage) -> TextTokenizer:
    """One tokenizer per worker process, reused by every task that lands there.

    The driver's spec is used as is when its files are here (same node, shared path);
    elsewhere only the small config and tokenizer files are fetched again.
    """
    from embedjob.model import load_spec

    if os.path.isdir(model.local_dir):
        return model.tokenizer()
    return load_spec(model.source, filesystem=storage.fsspec(model.source)).tokenizer()


def tokenize_batch(table: pa.Table, *, spec: TokenizeSpec) -> pa.Table:
    """``map_batches`` body: status, reason, input_ids, n_tokens, truncated, content_hash and
the text is dropped.

    Args:
        table: Rows of the read stage.
        spec: This stage's spec.
    """
    reasons = check.check_rows(table, spec.duplicates)
    statuses = [Status.EMBED if r is None else Status.REJECTED for r in reasons]
    texts = table.column(S.TEXT).to_pylist()
    n = table.num_rows
    hashes = [check.content_hash(t) if s == Status.EMBED else None
              for t, s in zip(texts, statuses, strict=True)]
    todo = [i for i, s in enumerate(statuses) if s == Status.EMBED]
    if spec.chunking is not None:
        return _chunked(table, statuses, reasons, hashes, texts, todo, spec)
    ids: list[np.ndarray | None] = [None] * n
    n_tokens = np.zeros(n, np.int32)
    truncated = np.zeros(n, bool)
    if todo:
        tokenized = _tokenizer(spec.model, spec.storage).tokenize([texts[i] for i in todo],
                                                                  spec.task)
        for j, i in enumerate(todo):
            ids[i] = tokenized.ids[j]
            n_tokens[i] = len(tokenized.ids[j])
            truncated[i] = bool(tokenized.truncated[j])
    return (
        table.drop_columns([S.TEXT, S.REASON])
        .append_column(S.STATUS, S.status_array(statuses))
        .append_column(S.REASON, pa.array(reasons, pa.string()))
        .append_column(S.INPUT_IDS, S.token_ids_array(ids))
        .append_column(S.N_TOKENS, pa.array(n_tokens, pa.int32()))
        .append_column(S.TRUNCATED, pa.array(truncated, pa.bool_()))
        .append_column(S.CONTENT_HASH, pa.array(hashes, pa.string()))
    )


def _chunked(table: pa.Table, statuses: list, reasons: list, hashes: list,
             texts: list, todo: list[int], spec: TokenizeSpec) -> pa.Table:
    """The chunk rows of a batch (``stages.chunk_rows``)."""
    from embedjob.stages.chunk_rows import chunk_table

    base = (table.drop_columns([S.TEXT, S.REASON])
            .append_column(S.STATUS, S.status_array(statuses))
            .append_column(S.REASON, pa.array(reasons, pa.string()))
            .append_column(S.CONTENT_HASH, pa.array(hashes, pa.string())))
    tokenizer = _tokenizer(spec.model, spec.storage)
    docs = tokenizer.tokenize_documents([texts[i] for i in todo], spec.task)
    return chunk_table(base, dict(zip(todo, docs, strict=True)), texts, spec.chunking)
