"""The long-document retrieval eval: ``none`` vs ``split`` vs ``late`` chunking.

Built from the shipped Bible slice (``bible_es_en.parquet``: KJV verses 1000..1999 with
their Reina-Valera 1909 translation): every ``verses_per_doc`` consecutive English verses
form one document (verses joined by a space; 25 verses: 40 documents of about 1,000
all-MiniLM tokens each, four times that model's 256-token context). Each Spanish verse is
a query; its relevant item is the document holding the English verse, and for chunk tables
the chunk whose characters hold most of that verse.

Scores (exact cosine over the table's full ``vector``, no index):

- ``doc@1`` / ``doc@5``: the relevant document is first / in the first 5; a chunk table
  ranks a document by its best chunk (``search --collapse``);
- ``chunk@1``: chunk tables only: the first chunk holds the aligned verse (the chunk that
  overlaps the verse's characters the most).

``none`` embeds each document once, cut at the model's context (what a plain job does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob import schema as S
from embedjob.table.eval.datasets import _read

MODES: tuple[str, ...] = ("none", "split", "late")
NAME = "longdoc"  # its name as an ``embedjob eval --dataset``
PLOT = "longdoc.png"  # its plot, in ``--output-dir``
PROTOCOL = ("KJV verses 1000..1999 as 40 documents of 25 verses; each Reina-Valera verse "
            "queries them (doc@1, doc@5: a chunk table ranks a document by its best chunk; "
            "chunk@1: the best chunk holds the aligned verse) for --chunking none, split, late")


@dataclass(frozen=True)
class LongDocSet:
    """Documents, queries and where each query's verse sits."""

    docs: pa.Table  # id (string), text
    queries: list[str]  # Spanish verses
    doc_of: list[str]  # query -> relevant document id
    span_of: list[tuple[int, int]]  # query -> the verse's characters in its document


def bible_documents(verses_per_doc: int = 25) -> LongDocSet:
    """The Bible slice as long documents (see the module docstring)."""
    rows = _read("bible_es_en.parquet").to_pylist()
    ids, texts, queries, doc_of, span_of = [], [], [], [], []
    for start in range(0, len(rows), verses_per_doc):
        doc_id, parts, at = f"doc-{start // verses_per_doc:03d}", [], 0
        for r in rows[start:start + verses_per_doc]:
            queries.append(r["es"])
            doc_of.append(doc_id)
            span_of.append((at, at + len(r["en"])))
            parts.append(r["en"])
            at += len(r["en"]) + 1
        ids.append(doc_id)
        texts.append(" ".join(parts))
    return LongDocSet(pa.table({"id": ids, "text": texts}), queries, doc_of, span_of)


def embed_modes(data: LongDocSet, model: str, work: str, *, task: str | None,
                chunk_tokens: int, chunk_overlap: int = 0, chunk_boundaries: str = "tokens",
                modes: tuple[str, ...] = MODES, **embed: Any) -> dict[str, tuple[str, Any]]:
    """One embed run per mode into ``work/<mode>.lance``; mode -> (uri, summary).

    ``embed``: further ``EmbedConfig`` fields (``num_actors``, ``vector_dtype``)."""
    from embedjob.config import EmbedConfig
    from embedjob.driver.run import run

    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "docs.parquet")
    pq.write_table(data.docs, corpus)
    out = {}
    for mode in modes:
        uri = os.path.join(work, f"{mode}.lance")
        summary = run(EmbedConfig(input=corpus, output=uri, model=model, task=task,
                                  mode="overwrite", chunking=mode, chunk_tokens=chunk_tokens,
                                  chunk_overlap=chunk_overlap,
                                  chunk_boundaries=chunk_boundaries, **embed))
        out[mode] = (uri, summary)
    return out


def score(data: LongDocSet, uri: str, queries: np.ndarray) -> dict[str, float]:
    """doc@1, doc@5 and (chunk tables) chunk@1 of one table; ``queries``: [q, H] normalized."""
    import lance

    table = lance.dataset(uri).to_table()
    chunked = S.is_chunk_table(table.schema)
    docs = table.column(S.DOC_ID if chunked else S.OUT_ID).to_pylist()
    vectors = np.asarray(table.column(S.VECTOR).to_pylist(), np.float32)  # [rows, H]
    scores = queries @ vectors.T  # [q, rows]
    names = sorted(set(docs))
    column = np.array([names.index(d) for d in docs])
    per_doc = np.full((len(queries), len(names)), -np.inf, np.float32)
    np.maximum.at(per_doc, (slice(None), column), scores)  # a document: its best chunk
    truth = np.array([names.index(d) for d in data.doc_of])
    ranks = (per_doc > per_doc[np.arange(len(truth)), truth][:, None]).sum(axis=1)
    result = {"doc@1": float(np.mean(ranks == 0)), "doc@5": float(np.mean(ranks < 5)),
              "rows": len(docs)}
    if chunked:
        result["chunk@1"] = _chunk_hits(data, table, scores)
    return result


def _chunk_hits(data: LongDocSet, table: pa.Table, scores: np.ndarray) -> float:
    """Share of queries whose best chunk is the one holding most of the aligned verse."""
    docs = table.column(S.DOC_ID).to_pylist()
    starts = table.column(S.CHAR_START).to_numpy()
    ends = table.column(S.CHAR_END).to_numpy()
    best = scores.argmax(axis=1)
    hits = 0
    for q, (doc, (a, b)) in enumerate(zip(data.doc_of, data.span_of, strict=True)):
        overlap = np.minimum(ends, b) - np.maximum(starts, a)
        overlap = np.where(np.array(docs, dtype=object) == doc, overlap, -1)
        hits += int(overlap[best[q]] == overlap.max() and overlap.max() > 0)
    return hits / len(data.doc_of)


def evaluate_long(model: str, work: str, *, chunk_tokens: int, chunk_overlap: int = 0,
                  chunk_boundaries: str = "tokens", verses_per_doc: int = 25,
                  embedder: Any = None, **embed: Any) -> dict[str, Any]:
    """Embed the long-document set in every mode and score it (figures per mode).

    ``embed``: further ``EmbedConfig`` fields of the three runs (``num_actors``,
    ``vector_dtype``)."""
    from embedjob.model import load_embedder
    from embedjob.table.search import embed_queries, read_stamp

    data = bible_documents(verses_per_doc)
    embedder = embedder or load_embedder(model, device="cpu")
    task = "retrieval.passage" if "retrieval.passage" in embedder.spec.tasks else None
    runs = embed_modes(data, model, work, task=task, chunk_tokens=chunk_tokens,
                       chunk_overlap=chunk_overlap, chunk_boundaries=chunk_boundaries, **embed)
    report: dict[str, Any] = {"model": model, "protocol": PROTOCOL,
                              "documents": data.docs.num_rows, "queries": len(data.queries),
                              "chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap,
                              "chunk_boundaries": chunk_boundaries, "modes": {}}
    import lance

    # every mode's stamp pairs the same query task: the queries are embedded once
    stamp = read_stamp(lance.dataset(runs[MODES[0]][0]).schema)
    q = embed_queries(embedder, stamp, data.queries, embedder.hidden_size)
    for mode, (uri, summary) in runs.items():
        report["modes"][mode] = score(data, uri, q) | {
            "table": uri, "tokens": summary.tokens,
            "processed_tokens": summary.processed_tokens,
            "truncated_docs": summary.rows_truncated}
    return report


def plot_long(report: dict[str, Any], path: str) -> None:
    """A bar per mode and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["doc@1", "doc@5", "chunk@1"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, mode in enumerate(report["modes"]):
        values = [report["modes"][mode].get(m, 0.0) for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * 0.27, values, width=0.27, label=mode)
    ax.set_xticks(np.arange(len(metrics)) + 0.27, metrics)
    ax.set_ylim(0, 1)
    name = report.get("model_name") or "/".join(Path(report["model"]).parts[-2:])
    ax.set_title(f"long documents: {name}, "
                 f"{report['chunk_tokens']}-token chunks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
