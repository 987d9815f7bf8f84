"""Resumable runs: which input units are fully committed, stored with the output.

The progress record lives in the output table's metadata (``embedjob.progress``, JSON):
the run key (what this output is being built from), each finished unit with the
fingerprint it had when read, and whether the run completed. It is written right after
every data commit; a crash between the two only means a finished unit is redone.

Each output row carries ``source_file`` and ``source_row``, so resuming deletes the rows of
unfinished units from both tables and embeds those units again: every valid id ends up
exactly once, and at most one commit interval of work is redone.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import ray

from embedjob.schema import PROGRESS_KEY
from embedjob.storage import Storage


@ray.remote(num_cpus=0)
class ReadTracker:
    """Row count of every unit whose read finished (idempotent under task retries)."""

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}

    def unit_read(self, unit: str, rows: int) -> None:
        self._rows[unit] = rows

    def totals(self) -> dict[str, int]:
        return dict(self._rows)


@dataclass(frozen=True, kw_only=True)
class ProgressRecord:
    """What an earlier attempt finished; empty for a new output."""

    run_key: str = ""
    done: Mapping[str, str] = field(default_factory=dict)  # unit -> fingerprint
    complete: bool = False

    def to_json(self) -> str:
        return json.dumps({"run_key": self.run_key, "done": dict(self.done),
                           "complete": self.complete}, sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ProgressRecord | None:
        raw = metadata.get(PROGRESS_KEY)
        if raw is None:
            return None
        data = json.loads(raw)
        return cls(run_key=data["run_key"], done=data["done"], complete=data["complete"])


def read_record(uri: str, storage: Storage) -> ProgressRecord | None:
    """The progress record of the table at ``uri``; None when there is no table or record."""
    if not storage.lance_exists(uri):
        return None
    return ProgressRecord.from_metadata(storage.open_lance(uri).metadata)


def run_key(parts: Mapping[str, object]) -> str:
    """Stable hash of the settings that decide what an output holds."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class UnitLedger:
    """Driver-side counts: rows per unit written (pending) and committed."""

    fingerprints: Mapping[str, str]
    done: dict[str, str] = field(default_factory=dict)
    pending: Counter = field(default_factory=Counter)
    committed: Counter = field(default_factory=Counter)

    def add(self, units: list[str], rows: list[int]) -> None:
        self.pending.update(dict(zip(units, rows, strict=True)))

    def on_commit(self, totals: Mapping[str, int]) -> None:
        """Pending rows are now committed; units whose every row is committed are done."""
        self.committed.update(self.pending)
        self.pending.clear()
        for unit, total in totals.items():
            if unit not in self.done and self.committed[unit] == total:
                self.done[unit] = self.fingerprints[unit]
