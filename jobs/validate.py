"""Row checks before tokenization, and the run-wide registry of ids already seen.

A row that fails a check is not embedded: it keeps flowing with ``_reject`` set to the
reason, and the write stage puts it in the rejected table. Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import ray

# Reasons, one place, so tests and docs name the same strings.
NULL_ID = "id is null"
NULL_TEXT = "text is null"
EMPTY_TEXT = "text is empty"
BLANK_TEXT = "text is whitespace only"
DUPLICATE_ID = "id already seen in this run"


@ray.remote(num_cpus=0)
class IdRegistry:
    """Remembers every id claimed in this run and which row claimed it.

    A retried task (same source file and row) claims its ids again and still wins them, so
    Ray's retries never turn a row into its own duplicate. Holds about 100 bytes per id
    (a Python dict entry); for runs far beyond 10^8 rows, dedupe upstream or shard.
    """

    def __init__(self) -> None:
        self._owner: dict[object, int] = {}

    def claim(self, ids: list, claimants: list[int]) -> list[bool]:
        """For each id: True when this row owns it (first claimant or the same row again)."""
        won = []
        for key, claimant in zip(ids, claimants, strict=True):
            owner = self._owner.setdefault(key, claimant)
            won.append(owner == claimant)
        return won

    def size(self) -> int:
        return len(self._owner)


def row_key(source: str, row: int) -> int:
    """A stable 64-bit key of (source file, row index)."""
    digest = hashlib.blake2b(f"{source}\x00{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def text_reason(text: str | None) -> str | None:
    """Why a text cannot be embedded, or None when it can."""
    if text is None:
        return NULL_TEXT
    if not text:
        return EMPTY_TEXT
    if not text.strip():
        return BLANK_TEXT
    return None


def check_rows(table: pa.Table, registry) -> list[str | None]:
    """Reasons per row (null id, bad text, duplicate id); earlier reasons are kept."""
    reasons = table.column("_reject").to_pylist()
    ids = table.column("_id").to_pylist()
    texts = table.column("_text").to_pylist()
    for i, (id_value, text) in enumerate(zip(ids, texts, strict=True)):
        if reasons[i] is None:
            reasons[i] = NULL_ID if id_value is None else text_reason(text)
    candidates = [i for i, r in enumerate(reasons) if r is None]
    if candidates and registry is not None:
        sources = table.column("_source").to_pylist()
        rows = table.column("_row").to_pylist()
        won = ray.get(
            registry.claim.remote(
                [ids[i] for i in candidates], [row_key(sources[i], rows[i]) for i in candidates]
            )
        )
        for i, ok in zip(candidates, won, strict=True):
            if not ok:
                reasons[i] = DUPLICATE_ID
    return reasons


def content_hash(text: str) -> str:
    """Stable hash of the corpus text as embedded (before the task prefix), 128-bit hex."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
