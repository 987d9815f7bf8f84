"""Tokenize stage (CPU workers): check rows, then turn texts into int32 token ids.

The encode actors then do no string work, and the object store carries int32 ids instead
of strings. The task's instruction prefix is applied here by the model's tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from embedjob import storage
from embedjob.stages import check as validate


@functools.lru_cache(maxsize=4)
def _tokenizer(spec, options_json: str):
    """One tokenizer per worker process, reused by every task that lands there.

    The driver's spec is used as is when its files are here (same node, shared path);
    elsewhere only the small config and tokenizer files are fetched again.
    """
    from embedjob.model import load_spec

    if os.path.isdir(spec.local_dir):
        return spec.tokenizer()
    options = json.loads(options_json)
    filesystem = storage.s3fs_filesystem(options) if storage.is_s3(spec.source) else None
    return load_spec(spec.source, filesystem=filesystem).tokenizer()


def tokenize_batch(
    table: pa.Table,
    *,
    spec,
    task: str | None,
    storage_options: Mapping[str, str],
    registry,
    compare=None,
) -> pa.Table:
    """``map_batches`` body: add input_ids / n_tokens / truncated / content_hash, drop text.

    With ``compare`` (a refresh's ``ExistingRows``), rows the output already holds with
    the same content hash are marked unchanged and not tokenized; ``_changed`` flags rows
    whose id exists with another hash.
    """
    reasons = validate.check_rows(table, registry)
    texts = table.column("_text").to_pylist()
    n = table.num_rows
    hashes = [validate.content_hash(t) if r is None else None for t, r in zip(texts, reasons,
                                                                               strict=True)]
    changed = [False] * n
    if compare is not None:
        changed = compare.mark(table.column("_id").to_pylist(), hashes, reasons)
    ok = [i for i, r in enumerate(reasons) if r is None]
    ids: list[np.ndarray | None] = [None] * n
    n_tokens = np.zeros(n, np.int32)
    truncated = np.zeros(n, bool)
    if ok:
        options_json = json.dumps(dict(storage_options), sort_keys=True)
        tokenized = _tokenizer(spec, options_json).tokenize([texts[i] for i in ok], task)
        for j, i in enumerate(ok):
            ids[i] = tokenized.ids[j]
            n_tokens[i] = len(tokenized.ids[j])
            truncated[i] = bool(tokenized.truncated[j])
    out = table.drop_columns(["_text", "_reject"])
    return (
        out.append_column("_reject", pa.array(reasons, pa.string()))
        .append_column("input_ids", _ids_array(ids))
        .append_column("n_tokens", pa.array(n_tokens, pa.int32()))
        .append_column("truncated", pa.array(truncated, pa.bool_()))
        .append_column("content_hash", pa.array(hashes, pa.string()))
        .append_column("_changed", pa.array(changed, pa.bool_()))
    )


def _ids_array(ids: list[np.ndarray | None]) -> pa.Array:
    """list<int32> without a Python round trip per token."""
    lengths = np.array([0 if x is None else len(x) for x in ids], np.int64)
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [x for x in ids if x is not None]
    values = np.concatenate(present).astype(np.int32) if present else np.zeros(0, np.int32)
    mask = pa.array([x is None for x in ids], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)
