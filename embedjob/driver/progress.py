"""Resumable runs: which input units are fully committed, stored with the output's data.

Each output commit carries, as Lance transaction properties, the units it finishes
(``embedjob.units``: per file its fingerprint and, for byte ranges, the range and the
``source_row`` keys it holds), the run key (``embedjob.run_key``: what this output is being
built from), ``embedjob.run_start`` on a fresh run's first commit and ``embedjob.complete``
plus the summary on its last one. Rows and the record of them are one atomic commit; each
commit records only what it adds, so nothing in the table grows with the number of units.
A resume walks the transaction history back from the latest version to the run's start
(one small read per version of this run) and rebuilds the record.

Each output row carries ``source_file`` and ``source_row``, so resuming deletes the rows of
unfinished units from both tables and embeds those units again: every valid id ends up
exactly once, and at most the units in flight plus one commit interval are redone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pyarrow.compute as pc
import ray

from embedjob import schema as S
from embedjob.schema import PROGRESS_KEY
from embedjob.stages.read import split_unit, unit_file
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
    """The progress of the run that last wrote the table at ``uri``, from the transaction
    history; None when there is no table or no run recorded in it."""
    if not storage.lance_exists(uri):
        return None
    dataset = storage.open_lance(uri)
    record = record_from_history(dataset)
    return record if record is not None else ProgressRecord.from_metadata(dataset.metadata)


def _newest_run_commits(dataset) -> Iterator[dict[str, str]]:
    """The transaction properties of the newest run key's commits, newest first.

    Transactions without a run key (deletes, compaction, index builds) are skipped; the walk
    ends after the run's first commit (``run_start``) or at another run's commit. One small
    read per version walked.
    """
    key = None
    for version in sorted((v["version"] for v in dataset.versions()), reverse=True):
        transaction = dataset.read_transaction(version)
        props = (transaction.transaction_properties or {}) if transaction else {}
        if S.TX_RUN_KEY not in props:
            continue
        if key is not None and props[S.TX_RUN_KEY] != key:
            return
        key = props[S.TX_RUN_KEY]
        yield props
        if S.TX_RUN_START in props:
            return


def record_from_history(dataset) -> ProgressRecord | None:
    """The newest run key decides the run; its units are gathered back to its first commit
    (``_newest_run_commits``). A finished run's record is complete: nothing to resume."""
    key, complete = None, False
    done: dict[str, str] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for props in _newest_run_commits(dataset):
        if key is None:
            key, complete = props[S.TX_RUN_KEY], S.TX_COMPLETE in props
            if complete:
                break  # a finished run: nothing to resume
        _add_units(props.get(S.TX_UNITS), done, ranges)
    if key is None:
        return None
    return ProgressRecord(run_key=key, done=done, ranges=ranges, complete=complete)


@dataclass(frozen=True)
class UnitWalk:
    """The record folded from the newest run's (or refresh's) commits back to its start."""

    key: str | None
    done: dict[str, str]  # unit -> fingerprint
    ranges: dict[str, tuple[int, int]]  # byte-range unit -> key range
    based: bool  # the walk reached the run's full record (``run_start``); False once pruned
    deltas: int  # refresh deltas (commits with ``embedjob.gone``) above that record


def walk_units(dataset) -> UnitWalk:
    """Fold the newest run key's commits, newest first: a newer commit's record of a unit
    wins, a tombstone (``embedjob.gone``) removes it, the run's first commit (``run_start``,
    also a refresh's full checkpoint) ends the walk (``_newest_run_commits``)."""
    key, based, deltas = None, False, 0
    done: dict[str, str] = {}
    ranges: dict[str, tuple[int, int]] = {}
    removed: set[str] = set()
    for props in _newest_run_commits(dataset):
        key = props[S.TX_RUN_KEY]
        units: dict[str, str] = {}
        spans: dict[str, tuple[int, int]] = {}
        _add_units(props.get(S.TX_UNITS), units, spans)
        units = {u: f for u, f in units.items() if u not in removed}
        done, ranges = units | done, {u: r for u, r in spans.items() if u in units} | ranges
        if S.TX_GONE in props:
            deltas += 1
            removed |= set(json.loads(props[S.TX_GONE])) - done.keys()
        based = S.TX_RUN_START in props
    return UnitWalk(key=key, done=done, ranges=ranges, based=based, deltas=deltas)


def committed_units(dataset) -> tuple[str | None, dict[str, str], dict[str, tuple[int, int]]]:
    """What the newest run (or refresh) recorded, complete or not: (its run key,
    unit -> fingerprint, unit -> key range); see ``walk_units``."""
    walk = walk_units(dataset)
    return walk.key, walk.done, walk.ranges


def commit_properties(key: str, finished: Mapping[str, tuple[str, tuple[int, int] | None]],
                      *, first: bool, last_run: str | None,
                      gone: list[str] | None = None) -> dict[str, str]:
    """The transaction properties of one output commit (only what it adds).

    Args:
        key: The run key.
        finished: unit -> (its file's fingerprint, its key range or None).
        first: The run's first commit, or a refresh's full checkpoint (ends the walk).
        last_run: The run summary (JSON) on the run's last commit, else None.
        gone: A refresh delta's tombstones: recorded units no longer listed (None: no delta).
    """
    files: dict[str, dict] = {}
    for unit, (fingerprint, key_range) in sorted(finished.items()):
        path, start, end = split_unit(unit)
        entry = files.setdefault(path, {"fp": fingerprint, "units": []})
        entry["units"].append(None if end is None else [start, end, *key_range])
    props = {S.TX_RUN_KEY: key, S.TX_UNITS: json.dumps(files, separators=(",", ":"))}
    if first:
        props[S.TX_RUN_START] = "1"
    elif gone is not None:
        props[S.TX_GONE] = json.dumps(sorted(gone), separators=(",", ":"))
    if last_run is not None:
        props |= {S.TX_COMPLETE: "1", S.LAST_RUN_KEY: last_run}
    return props


def _add_units(raw: str | None, done: dict[str, str],
               ranges: dict[str, tuple[int, int]]) -> None:
    for path, entry in json.loads(raw or "{}").items():
        for item in entry["units"]:
            if item is None:
                done[path] = entry["fp"]
            else:
                start, end, lo, hi = item
                unit = f"{path}#bytes={start}-{end}"
                done[unit], ranges[unit] = entry["fp"], (lo, hi)


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
    row_weight: int = 1  # what one input row counts for (a chunk table: schema.DOC_WEIGHT)

    def add(self, units: list[str], rows: list[int]) -> None:
        self.pending.update(dict(zip(units, rows, strict=True)))

    def finishing(self, read: Mapping[str, tuple[int, tuple[int, int] | None]]
                  ) -> dict[str, tuple[str, tuple[int, int] | None]]:
        """The units that the commit about to be made finishes: every row of theirs is
        committed or pending in it. Call ``finished`` once that commit succeeded.

        Args:
            read: Units whose read finished since the last call (``ReadTracker.take``).

        Returns:
            unit -> (its file's fingerprint, its key range or None).
        """
        self.read.update({u: v for u, v in read.items() if u not in self.done})  # retried reads
        return {u: (self.fingerprints[unit_file(u)], key_range)
                for u, (total, key_range) in self.read.items()
                if self.committed[u] + self.pending[u] == total * self.row_weight}

    def finished(self, units: Mapping[str, tuple[str, tuple[int, int] | None]]) -> None:
        """The commit succeeded: pending rows are committed, ``units`` are done."""
        self.committed.update(self.pending)
        self.pending.clear()
        for unit, (fingerprint, key_range) in units.items():
            self.read.pop(unit, None)
            self.committed.pop(unit, None)
            self.done[unit] = fingerprint
            if key_range is not None:
                self.ranges[unit] = key_range
