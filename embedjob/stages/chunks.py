"""Chunk planning for long documents: a pure function of a text's tokens, no Ray import.

A document's tokens are ``lead + text + trail``: ``lead`` is the leading special token and
the task's instruction prefix, ``text`` the tokens of the document's own characters (each
with its character offsets), ``trail`` the closing special token. Chunks are spans of the
text tokens:

- ``tokens`` boundaries: every ``chunk_tokens`` tokens, each chunk starting ``chunk_tokens -
  overlap`` tokens after the one before; the last one ends at the text's end.
- ``sentences`` boundaries: whole sentences packed up to ``chunk_tokens`` tokens; the next
  chunk starts at the earliest sentence that keeps at most ``overlap`` tokens shared. A
  sentence ends after ``.``, ``!``, ``?`` or ``…`` followed by whitespace (so ``3.14`` and
  ``e.g.x`` do not end one; the whitespace starts the next sentence), right after
  ``。！？｡`` and their full-width kin with no whitespace needed (Chinese and Japanese write
  none), and before every line break. A sentence
  longer than ``chunk_tokens`` (a script without such marks) is cut on token boundaries.

Character spans map back to the exact text: a chunk covers ``text[char_start:char_end]``,
from its first token's start (0 for the first chunk) to the next chunk-free token's start
(the text's end for the last chunk), so chunks without overlap tile the text exactly.

``late`` pools each chunk from one forward over the document. A document longer than a
forward (``window`` tokens, lead and trail included) runs as overlapping macro-windows of
``window`` tokens (each ``lead + text[ws:we] + trail``); consecutive windows share at least
``chunk_tokens`` and at least half a window of text tokens, so every chunk lies wholly in
one. Each chunk is pooled from the window where it sits farthest from an edge: the largest
distance (in tokens) from its span to the nearer window edge that is not the document's own
start or end (ties: the earlier window). The first chunk's pool includes ``lead`` and the
last chunk's ``trail``, so a document that is one chunk gets the vector of ``none``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Sentence ends: Latin-style marks + closing quotes/brackets before whitespace; CJK marks
# need no whitespace after them; a line break always starts a new one. The whitespace after
# an end belongs to the next sentence, as the next word's token holds it in SentencePiece
# vocabularies (XLM-R's "▁Next").
_LATIN_END = r"[.!?…]+[\"'”’»)\]]*(?=\s)"
_CJK_END = r"[。！？｡︒﹒﹖﹗]+[\"'”’」』）】]*"
SENTENCE_END = re.compile(f"{_LATIN_END}|{_CJK_END}|(?=\n)")


@dataclass(frozen=True)
class Span:
    """One chunk: text tokens ``[token_start, token_end)``, characters ``[char_start,
    char_end)``."""

    token_start: int
    token_end: int
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Pooled:
    """Where a late chunk is pooled: window ``window``, positions ``[start, end)`` of that
    window's row (lead and trail counted)."""

    window: int
    start: int
    end: int


def sentence_ends(text: str) -> list[int]:
    """Character offsets where a sentence ends (the next one starts), ascending, without 0
    and ``len(text)``."""
    return sorted({m.end() for m in SENTENCE_END.finditer(text)} - {0, len(text)})


def token_spans(n: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Spans of ``chunk_tokens`` tokens, ``chunk_tokens - overlap`` apart, covering ``[0, n)``.

    A text of no tokens is one empty span (its chunk pools only lead and trail).
    """
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap {overlap} not in [0, {chunk_tokens})")
    spans, start = [], 0
    while True:
        end = min(start + chunk_tokens, n)
        spans.append((start, end))
        if end >= n:
            return spans
        start = end - overlap


def sentence_spans(starts: np.ndarray, ends: list[int], n: int, chunk_tokens: int,
                   overlap: int) -> list[tuple[int, int]]:
    """Whole sentences packed up to ``chunk_tokens`` tokens (see the module docstring).

    Args:
        starts: [n] each text token's first character (non-decreasing).
        ends: Sentence ends as character offsets (``sentence_ends``).
        n: Text tokens.
        chunk_tokens: Most tokens per chunk.
        overlap: Most tokens a chunk shares with the one before.
    """
    cuts = sorted({int(np.searchsorted(starts, e, "left")) for e in ends} - {0, n})
    units = []  # sentences as token spans, each at most chunk_tokens long
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        units += [(a + s, a + e) for s, e in token_spans(b - a, chunk_tokens, 0)]
    spans, i = [], 0
    while i < len(units):
        k = i + 1
        while k < len(units) and units[k][1] - units[i][0] <= chunk_tokens:
            k += 1
        spans.append((units[i][0], units[k - 1][1]))
        if k == len(units):
            return spans
        end = units[k - 1][1]
        i = next((j for j in range(i + 1, k) if end - units[j][0] <= overlap), k)
    return spans


def plan_spans(offsets: np.ndarray, text_len: int, chunk_tokens: int, overlap: int,
               boundaries: str = "tokens", text: str = "") -> list[Span]:
    """Chunks of one document.

    Args:
        offsets: [n, 2] character (start, end) of each text token.
        text_len: ``len(text)``.
        chunk_tokens: Most text tokens per chunk.
        overlap: Text tokens a chunk shares with the one before (< chunk_tokens).
        boundaries: ``tokens`` or ``sentences``.
        text: The text (read for ``sentences``).

    Returns:
        The chunks in order; together they cover every token and every character.
    """
    n = len(offsets)
    starts = np.maximum.accumulate(offsets[:, 0]) if n else np.zeros(0, np.int64)
    if boundaries == "sentences":
        spans = sentence_spans(starts, sentence_ends(text), n, chunk_tokens, overlap)
    elif boundaries == "tokens":
        spans = token_spans(n, chunk_tokens, overlap)
    else:
        raise ValueError(f"boundaries {boundaries!r} not in ['tokens', 'sentences']")

    def char(t: int) -> int:
        return 0 if t == 0 else text_len if t >= n else int(starts[t])

    return [Span(a, b, char(a), char(b) if b < n else text_len) for a, b in spans]


def plan_windows(n: int, capacity: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Macro-windows ``[ws, we)`` of at most ``capacity`` text tokens covering ``[0, n)``.

    Consecutive windows share at least ``chunk_tokens`` and half a window of tokens (so a
    chunk fits wholly in one); the last window ends at ``n``.
    """
    if capacity < chunk_tokens:
        raise ValueError(f"a window of {capacity} text tokens cannot hold a chunk of "
                         f"{chunk_tokens}")
    if n <= capacity:
        return [(0, n)]
    stride = max(1, min(capacity - chunk_tokens, capacity // 2))
    windows, start = [], 0
    while start + capacity < n:
        windows.append((start, start + capacity))
        start += stride
    windows.append((n - capacity, n))
    return windows


def pick_window(span: Span, windows: list[tuple[int, int]], n: int) -> int:
    """The window holding ``span`` where it sits farthest from an inner edge (ties: first)."""
    best, best_score = -1, -1.0
    for w, (ws, we) in enumerate(windows):
        a, b = span.token_start, span.token_end
        if ws > a or b > we:
            continue
        left = a - ws if ws > 0 else float("inf")
        right = we - b if we < n else float("inf")
        if min(left, right) > best_score:
            best, best_score = w, min(left, right)
    if best < 0:
        raise ValueError(f"no window holds tokens [{span.token_start}, {span.token_end})")
    return best


def late_pools(spans: list[Span], windows: list[tuple[int, int]], n: int, lead: int,
               trail: int) -> list[Pooled]:
    """Each chunk's window and pooled positions in that window's row (``lead + text[ws:we] +
    trail``): the first chunk also pools ``lead``, the last also ``trail``."""
    pools = []
    for i, span in enumerate(spans):
        w = pick_window(span, windows, n)
        ws, we = windows[w]
        start = 0 if i == 0 else lead + span.token_start - ws
        end = lead + span.token_end - ws
        if i == len(spans) - 1:
            end = lead + (we - ws) + trail
        pools.append(Pooled(w, start, end))
    return pools


@dataclass(frozen=True, kw_only=True)
class ChunkSpec:
    """How the tokenize stage cuts documents into chunks; pickled to every task.

    Attributes:
        mode: ``late`` (window rows, chunks pooled by the encode stage) or ``split`` (one
            row per chunk, embedded alone).
        tokens: Most text tokens per chunk.
        overlap: Text tokens a chunk shares with the one before.
        boundaries: ``tokens`` or ``sentences``.
        window: Late: most tokens per forward (lead and trail included).
    """

    mode: str
    tokens: int
    overlap: int
    boundaries: str
    window: int


def shares(n: int, weight: int) -> list[int]:
    """``n`` positive integer shares of ``weight`` that sum to it exactly (n <= weight)."""
    if not 1 <= n <= weight:
        raise ValueError(f"{n} chunks do not fit {weight} shares")
    return [weight * (i + 1) // n - weight * i // n for i in range(n)]
