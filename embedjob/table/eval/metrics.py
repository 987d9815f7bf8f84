"""Retrieval and similarity metrics: nDCG@k, recall@k, top-1, Pearson, exact ranking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedjob.errors import ConfigError

NDCG_K = 10
RECALL_K = 100


def ndcg_at_k(ranked: Sequence[Any], relevant: set[Any], k: int = NDCG_K) -> float:
    """Binary-relevance nDCG@k: sum over hits at rank r (1-based) of 1/log2(r+1), over ideal."""
    if not relevant:
        raise ConfigError("a query without relevant documents has no nDCG; drop it")
    dcg = sum(1.0 / np.log2(rank + 2) for rank, doc in enumerate(ranked[:k]) if doc in relevant)
    ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return float(dcg / ideal)


def recall_at_k(ranked: Sequence[Any], relevant: set[Any], k: int = RECALL_K) -> float:
    """Share of the relevant documents found in the top k."""
    if not relevant:
        raise ConfigError("a query without relevant documents has no recall; drop it")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def top1(ranked: Sequence[Any], relevant: set[Any]) -> float:
    """1.0 when the best-ranked document is relevant."""
    return float(bool(ranked) and ranked[0] in relevant)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient of two equally long samples."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ConfigError(f"pearson needs two samples of equal length >= 2, got {a.size}, "
                          f"{b.size}")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def rank_documents(queries: np.ndarray, docs: np.ndarray, doc_ids: Sequence[Any],
                   k: int) -> list[list[Any]]:
    """Top-k doc ids per query by dot product (= cosine on normalized vectors), best first.

    Ties keep corpus order (stable sort), so results are deterministic.
    """
    scores = queries @ docs.T  # [queries, docs]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.asarray(doc_ids, dtype=object)
    return [list(ids[row]) for row in order]


def retrieval_metrics(ranked: list[list[Any]], qrels: Sequence[set[Any]],
                      groups: Sequence[str]) -> dict[str, Any]:
    """nDCG@10, recall@100 and top-1 over all queries, and top-1 per query group."""
    hits = [top1(r, rel) for r, rel in zip(ranked, qrels, strict=True)]
    per_group: dict[str, list[float]] = {}
    for group, hit in zip(groups, hits, strict=True):
        per_group.setdefault(group, []).append(hit)
    return {
        f"ndcg@{NDCG_K}": float(np.mean([ndcg_at_k(r, rel) for r, rel in zip(ranked, qrels,
                                                                               strict=True)])),
        f"recall@{RECALL_K}": float(np.mean([recall_at_k(r, rel) for r, rel in zip(
            ranked, qrels, strict=True)])),
        "top1": float(np.mean(hits)),
        "top1_by_group": {g: float(np.mean(v)) for g, v in sorted(per_group.items())},
    }
