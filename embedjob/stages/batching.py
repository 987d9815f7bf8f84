"""Token-budget batching: a pure function of token lengths, no Ray import.

Padded cost of a batch is ``rows x longest row`` (what the encoder really computes);
packed cost is ``sum(lengths)``. Rows are sorted by length inside a bounded window (the
input is a stream), then cut into contiguous runs whose cost fits the budget. A row longer
than the budget gets a batch of its own.

Padded cuts are chosen by dynamic programming, not greedily: among all cuts that fit the
budget, the one with the fewest processed tokens plus a fixed overhead per batch (a
forward's launch cost, so that the plan does not shatter into tiny exact-length batches).
Measured on 40,000 Brown sentences with the XLM-R tokenizer and a 16,384-token budget:
greedy cuts reach padding efficiency 0.903 (4,096-row windows) / 0.963 (16,384); these cuts
0.944 / 0.982 with 11% more batches than greedy at 16,384 rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    padded: bool = True,
    *,
    overhead_tokens: int | None = None,
) -> list[range]:
    """Cut rows, in the order they will run, into token-budget batches.

    Args:
        lengths: Token count of each row, in run order. Padded plans are optimal for rows
            sorted ascending (the bucket stage sorts); other orders are cut greedily.
        max_tokens: Budget per batch.
        padded: True for padded cost (rows x longest), False for packed cost (sum).
        overhead_tokens: Fixed cost of one more batch, in tokens; default max_tokens // 16
            (on a GPU a forward's launch overhead is a few percent of a full batch).

    Returns:
        Contiguous, non-overlapping ranges covering every row, in order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens {max_tokens} must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    if padded and len(lengths) > 1 and bool(np.all(lengths[1:] >= lengths[:-1])):
        overhead = max_tokens // 16 if overhead_tokens is None else overhead_tokens
        return _optimal_padded(lengths, max_tokens, overhead)
    return _greedy(lengths, max_tokens, padded)


def _greedy(lengths: np.ndarray, max_tokens: int, padded: bool) -> list[range]:
    """Fill each batch until the next row would break the budget."""
    batches: list[range] = []
    start, longest, total = 0, 0, 0
    for i, n in enumerate(lengths.tolist()):
        new_longest, new_total = max(longest, n), total + n
        cost = (i - start + 1) * new_longest if padded else new_total
        if i > start and cost > max_tokens:
            batches.append(range(start, i))
            start, new_longest, new_total = i, n, n
        longest, total = new_longest, new_total
    if start < len(lengths):
        batches.append(range(start, len(lengths)))
    return batches


def _optimal_padded(lengths: np.ndarray, max_tokens: int, overhead: int) -> list[range]:
    """Min over cuts of sum(rows x longest) + overhead x batches; lengths ascending.

    best[j] is the cheapest plan for rows [0, j); the last batch [i, j) costs
    (j - i) x lengths[j-1] and fits when j - i <= max_tokens // lengths[j-1].
    """
    n = len(lengths)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, np.int64)
    for j in range(1, n + 1):
        longest = int(lengths[j - 1])
        lo = max(0, j - max(1, max_tokens // max(longest, 1)))
        starts = np.arange(lo, j)
        costs = best[lo:j] + (j - starts) * longest + overhead
        k = int(np.argmin(costs))
        best[j], cut[j] = costs[k], lo + k
    batches, j = [], n
    while j > 0:
        batches.append(range(int(cut[j]), j))
        j = int(cut[j])
    return batches[::-1]


def default_overhead_tokens(max_tokens: int, gpu: bool) -> int:
    """Per-batch overhead for cutting: a CPU forward costs what its tokens cost (0); a GPU
    forward also pays kernel launches, a few percent of a full batch (max_tokens // 16)."""
    return max_tokens // 16 if gpu else 0


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
