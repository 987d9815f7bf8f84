"""Chunk rows, built in the tokenize stage for ``--chunking late|split`` (CPU workers).

``split``: one row per chunk whose ``input_ids`` are ``lead + chunk tokens + trail`` (the
chunk embedded alone, as a plain chunking pipeline would; the chunk's own tokens, not a
re-tokenized substring, so its span is exact). ``late``: one row per macro-window that pools
at least one chunk (``lead + text[ws:we] + trail``; a document within the window is one row
of its full length, bucketed by it), with its chunks in ``schema.CHUNKS``; the encode stage
pools them and writes one row per chunk. Rows not embedded (rejected, unchanged) stay one
row each. Every row carries its share of its document (``schema.DOC_SHARE``, summing to
``schema.DOC_WEIGHT``), so a unit counts as committed only when every chunk of its documents
is, and the tokens the summary counts (``schema.COUNTED_TOKENS``): a chunk's own for split,
the document's once (on its first chunk) for late.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.model.spec import DocumentTokens
from embedjob.stages import chunks as C


def _split_rows(doc: DocumentTokens, spans: list[C.Span]) -> tuple[list, list[dict]]:
    ids = [np.concatenate([doc.lead, doc.text[s.token_start:s.token_end], doc.trail])
           for s in spans]
    shares = C.shares(len(spans), S.DOC_WEIGHT)
    meta = [_meta(i, s, len(x), len(x), share) for i, (s, x, share)
            in enumerate(zip(spans, ids, shares, strict=True))]
    return ids, meta


def _late_rows(doc: DocumentTokens, spans: list[C.Span], window: int, size: int
               ) -> tuple[list, list[list[dict]]]:
    n, lead, trail = len(doc.text), len(doc.lead), len(doc.trail)
    windows = C.plan_windows(n, window - lead - trail, size)
    pools = C.late_pools(spans, windows, n, lead, trail)
    shares = C.shares(len(spans), S.DOC_WEIGHT)
    per_window: dict[int, list[dict]] = {}
    for i, (span, pool, share) in enumerate(zip(spans, pools, shares, strict=True)):
        counted = lead + n + trail if i == 0 else 0  # the document's tokens, counted once
        per_window.setdefault(pool.window, []).append(
            _meta(i, span, pool.end - pool.start, counted, share, pool))
    ids = [np.concatenate([doc.lead, doc.text[windows[w][0]:windows[w][1]], doc.trail])
           for w in sorted(per_window)]
    return ids, [per_window[w] for w in sorted(per_window)]


def _meta(i: int, span: C.Span, n_tokens: int, counted: int, share: int,
          pool: C.Pooled | None = None) -> dict:
    return {S.CHUNK: i, S.CHAR_START: span.char_start, S.CHAR_END: span.char_end,
            S.TOKEN_START: span.token_start, S.TOKEN_END: span.token_end,
            S.N_TOKENS: n_tokens, S.POOL_START: pool.start if pool else 0,
            S.POOL_END: pool.end if pool else 0, S.COUNTED_TOKENS: counted,
            S.DOC_SHARE: share}


def chunk_table(base: pa.Table, docs: dict[int, DocumentTokens], texts: list,
                spec: C.ChunkSpec) -> pa.Table:
    """Expand ``base`` (the tokenize stage's rows, without token columns) into chunk rows.

    Args:
        base: One row per input row (status, reason, content hash, lineage...).
        docs: Row index -> its tokens, for the rows to embed.
        texts: Every row's text (read for sentence boundaries and lengths).
        spec: How to chunk.
    """
    parents, ids, metas, too_many = [], [], [], {}
    for row in range(base.num_rows):
        spans = None
        if row in docs:
            doc, text = docs[row], texts[row]
            spans = C.plan_spans(doc.offsets, len(text), spec.tokens, spec.overlap,
                                 spec.boundaries, text)
            if len(spans) > S.DOC_WEIGHT:  # its shares would not add up: set it aside
                too_many[row] = (f"document has {len(spans)} chunks, more than "
                                 f"{S.DOC_WEIGHT}; raise --chunk-tokens")
                spans = None
        if spans is None:
            parents.append(row)
            ids.append(None)
            metas.append(None)
            continue
        if spec.mode == "split":
            row_ids, row_meta = _split_rows(doc, spans)
        else:
            row_ids, row_meta = _late_rows(doc, spans, spec.window, spec.tokens)
        parents += [row] * len(row_ids)
        ids += row_ids
        metas += row_meta
    out = _rejected(base, too_many).take(pa.array(parents, pa.int64()))
    return _with_chunk_columns(out, ids, metas, spec.mode)


def _rejected(base: pa.Table, reasons: dict[int, str]) -> pa.Table:
    """``base`` with the rows of ``reasons`` rejected for them."""
    if not reasons:
        return base
    status = base.column(S.STATUS).to_pylist()
    reason = base.column(S.REASON).to_pylist()
    for row, text in reasons.items():
        status[row], reason[row] = int(S.Status.REJECTED), text
    base = base.set_column(base.column_names.index(S.STATUS), S.STATUS, S.status_array(status))
    return base.set_column(base.column_names.index(S.REASON), S.REASON,
                           pa.array(reason, pa.string()))


def _with_chunk_columns(out: pa.Table, ids: list, metas: list, mode: str) -> pa.Table:
    n_tokens = [0 if x is None else len(x) for x in ids]
    out = (out.append_column(S.INPUT_IDS, S.token_ids_array(ids))
           .append_column(S.N_TOKENS, pa.array(n_tokens, pa.int32()))
           .append_column(S.TRUNCATED, pa.array([False] * len(ids), pa.bool_())))
    if mode == "late":
        return out.append_column(S.CHUNKS, pa.array(metas, pa.list_(S.CHUNK_STRUCT)))
    return append_flat(out, metas)


def append_flat(out: pa.Table, metas: list) -> pa.Table:
    """The chunk's columns, flat (null chunk columns for rows not embedded, which keep the
    whole document's share)."""
    for f in S.CHUNK_STRUCT:
        if f.name in (S.POOL_START, S.POOL_END):
            continue
        if f.name == S.DOC_SHARE:
            values = [S.DOC_WEIGHT if m is None else m[f.name] for m in metas]
        elif f.name == S.COUNTED_TOKENS:
            values = [0 if m is None else m[f.name] for m in metas]
        else:
            values = [None if m is None else m[f.name] for m in metas]
        if f.name == S.N_TOKENS:
            index = out.column_names.index(S.N_TOKENS)
            out = out.set_column(index, S.N_TOKENS,
                                 pa.array([0 if v is None else v for v in values], f.type))
        else:
            out = out.append_column(f.name, pa.array(values, f.type))
    return out
