"""Row checks before tokenization (duplicate ids as the pre-pass of ``stages.dedupe``
decided them).

A row that fails a check is not embedded: it keeps flowing with status REJECTED and its
reason, and the write stage puts it in the rejected table. Nothing is dropped silently. (A
refresh's unchanged rows never reach this stage: ``stages.diff`` keeps them out.)
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.stages.dedupe import DuplicateIndex

# Reasons, one place, so tests and docs name the same strings.
NULL_ID = "id is null"
NULL_TEXT = "text is null"
EMPTY_TEXT = "text is empty"
BLANK_TEXT = "text is whitespace only"
INVISIBLE_TEXT = "text has no visible characters"
DUPLICATE_ID = "id already seen in this run"
# Unicode categories that print nothing: controls (NUL, ESC, ...), format characters
# (zero-width space/joiners, right-to-left and left-to-right marks, BOM) and separators.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def row_key(source: str, row: int) -> int:
    """A stable 64-bit key of (source file, row index)."""
    digest = hashlib.blake2b(f"{source}\x00{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def text_reason(text: str | None) -> str | None:
    """Why a text cannot be embedded, or None when it can.

    A text with at least one visible character is embedded as it is (NUL and other control
    characters included: the tokenizer's normalizer drops them). One made only of
    whitespace is "whitespace only"; one made only of controls, zero-width and direction
    marks and separators is "no visible characters".
    """
    if text is None:
        return NULL_TEXT
    if not text:
        return EMPTY_TEXT
    if not text.strip():
        return BLANK_TEXT
    if not has_visible(text):
        return INVISIBLE_TEXT
    return None


def has_visible(text: str) -> bool:
    """Whether any character prints something; stops at the first one that does."""
    return any(unicodedata.category(ch) not in INVISIBLE_CATEGORIES for ch in text)


def check_rows(table: pa.Table, duplicates: DuplicateIndex | None) -> list[str | None]:
    """Reasons per row: duplicate id, else the read stage's reason, else null id or bad text.

    A row that loses its id to an earlier row (``stages.dedupe``'s rule) is a duplicate
    whatever else is wrong with it, so every loser is counted as a duplicate exactly once.
    """
    reasons = table.column(S.REASON).to_pylist()
    ids = table.column(S.ID).to_pylist()
    texts = table.column(S.TEXT).to_pylist()
    if duplicates is not None and table.num_rows:
        lost = duplicates.losers(table.column(S.SOURCE).to_pylist(),
                                 table.column(S.ROW).to_numpy())
        for i in np.flatnonzero(lost):
            if ids[i] is not None:
                reasons[i] = DUPLICATE_ID
    for i, (id_value, text) in enumerate(zip(ids, texts, strict=True)):
        if reasons[i] is None:
            reasons[i] = NULL_ID if id_value is None else text_reason(text)
    return reasons


def content_hash(text: str) -> str:
    """Stable hash of the corpus text as embedded (before the task prefix), 128-bit hex."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
