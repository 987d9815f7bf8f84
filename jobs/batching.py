"""Token-budget batching: a pure function of token lengths, no Ray import.

Padded cost of a batch is ``rows x longest row`` (what the encoder really computes);
packed cost is ``sum(lengths)``. Rows are sorted by length inside a bounded window (the
input is a stream), then cut greedily into contiguous runs whose cost fits the budget.
A row longer than the budget gets a batch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_batches(lengths: Sequence[int], max_tokens: int, padded: bool = True) -> list[range]:
    """Cut rows, already in the order they will run, into token-budget batches.

    Args:
        lengths: Token count of each row, in run order (sorted ascending for padded runs,
            so the longest row of a batch is its last).
        max_tokens: Budget per batch.
        padded: True for padded cost (rows x longest), False for packed cost (sum).

    Returns:
        Contiguous, non-overlapping ranges covering every row, in order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be >= 1")
    batches: list[range] = []
    start, longest, total = 0, 0, 0
    for i, n in enumerate(lengths):
        n = int(n)
        new_longest, new_total = max(longest, n), total + n
        cost = (i - start + 1) * new_longest if padded else new_total
        if i > start and cost > max_tokens:
            batches.append(range(start, i))
            start, new_longest, new_total = i, n, n
        longest, total = new_longest, new_total
    if start < len(lengths):
        batches.append(range(start, len(lengths)))
    return batches


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Stable ascending sort order of a window's token lengths."""
    return np.argsort(lengths, kind="stable")


def batch_cost(lengths: np.ndarray, padded: bool = True) -> int:
    """Tokens the encoder processes for one batch."""
    if len(lengths) == 0:
        return 0
    return int(len(lengths) * lengths.max()) if padded else int(lengths.sum())


def padding_efficiency(lengths: np.ndarray, batches: list[range], padded: bool = True) -> float:
    """Real tokens / processed tokens for a batch plan (1.0 when nothing is processed)."""
    processed = sum(batch_cost(lengths[b.start : b.stop], padded) for b in batches)
    return float(lengths.sum() / processed) if processed else 1.0
