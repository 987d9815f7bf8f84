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

import functools
import hashlib
import json
import operator
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow.compute as pc
import ray

from embedjob.schema import PROGRESS_KEY
from embedjob.stages.read import unit_file
from embedjob.storage import Storage


@ray.remote(num_cpus=0)
class ReadTracker:
    """Row count (and key range) of every unit whose read finished, until the driver takes
    them (idempotent under task retries); holds only the units read since the last take."""

    def __init__(self) -> None:
        self._read: dict[str, tuple[int, tuple[int, int] | None]] = {}

    def unit_read(self, unit: str, rows: int, key_range: tuple[int, int] | None) -> None:
        self._read[unit] = (rows, key_range)

    def take(self) -> dict[str, tuple[int, tuple[int, int] | None]]:
        read, self._read = self._read, {}
        return read


@dataclass(frozen=True, kw_only=True)
class ProgressRecord:
    """What an earlier attempt finished; empty for a new output."""

    run_key: str = ""
    done: Mapping[str, str] = field(default_factory=dict)  # unit -> its file's fingerprint
    # byte-range units: the [lo, hi) of ``source_row`` their rows occupy
    ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    complete: bool = False

    def to_json(self) -> str:
        return json.dumps({"run_key": self.run_key, "done": dict(self.done),
                           "ranges": {u: list(r) for u, r in self.ranges.items()},
                           "complete": self.complete}, sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ProgressRecord | None:
        raw = metadata.get(PROGRESS_KEY)
        if raw is None:
            return None
        data = json.loads(raw)
        return cls(run_key=data["run_key"], done=data["done"],
                   ranges={u: tuple(r) for u, r in data.get("ranges", {}).items()},
                   complete=data["complete"])


def unfinished_rows(todo: list[str], record: ProgressRecord, file_column: str,
                    row_column: str) -> pc.Expression | None:
    """The rows a resume deletes: those of every file with units still to do, except the
    rows of that file's done byte ranges (``record.ranges``); None when nothing is to do."""
    done_ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for unit, key_range in record.ranges.items():
        done_ranges[unit_file(unit)].append(key_range)
    files = sorted({unit_file(u) for u in todo})
    whole = [f for f in files if not done_ranges.get(f)]
    terms = [pc.field(file_column).isin(whole)] if whole else []
    row = pc.field(row_column)
    for name in files:
        kept = [(row >= lo) & (row < hi) for lo, hi in _merged(done_ranges.get(name, []))]
        if kept:
            terms.append((pc.field(file_column) == name) & ~functools.reduce(operator.or_, kept))
    return functools.reduce(operator.or_, terms) if terms else None


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-empty ranges, adjacent and overlapping ones merged (a file's done units are
    mostly consecutive, so the filter stays short)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


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
    """Driver-side counts: rows per unit written (pending) and committed.

    Only units in flight are held: a unit leaves ``committed``/``read`` once it is done.
    """

    fingerprints: Mapping[str, str]  # file -> fingerprint
    done: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    pending: Counter = field(default_factory=Counter)
    committed: Counter = field(default_factory=Counter)
    read: dict[str, tuple[int, tuple[int, int] | None]] = field(default_factory=dict)

    def add(self, units: list[str], rows: list[int]) -> None:
        self.pending.update(dict(zip(units, rows, strict=True)))

    def on_commit(self, read: Mapping[str, tuple[int, tuple[int, int] | None]]) -> list[str]:
        """Pending rows are now committed; units whose every row is committed are done.

        Args:
            read: Units whose read finished since the last call (``ReadTracker.take``).

        Returns:
            The units this commit finished.
        """
        self.committed.update(self.pending)
        self.pending.clear()
        self.read.update({u: v for u, v in read.items() if u not in self.done})  # retried reads
        finished = [u for u, (total, _) in self.read.items() if self.committed[u] == total]
        for unit in finished:
            total, key_range = self.read.pop(unit)
            self.committed.pop(unit, None)
            self.done[unit] = self.fingerprints[unit_file(unit)]
            if key_range is not None:
                self.ranges[unit] = key_range
        return finished
