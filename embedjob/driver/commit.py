"""Driver-side commits of the fragments that the write stage produced.

The output and the rejected table are committed together, every ``commit_interval_s`` and
at the end. The first commit of a table that this run (re)creates is an Overwrite with the
stamped schema; later ones are Appends on top of the version this run last committed.
After each commit the progress record (``embedjob.driver.progress``) is updated, so a rerun after a
crash resumes from the last commit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import lance
import pyarrow as pa
import ray

from embedjob.driver.progress import ProgressRecord, UnitLedger
from embedjob.errors import retry_transient
from embedjob.schema import LAST_RUN_KEY, PROGRESS_KEY, Counts
from embedjob.stages.write import load_fragments
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class TableCommitter:
    """Collects fragments for one Lance table and commits them."""

    uri: str
    schema: pa.Schema
    recreate: bool  # True: the first commit replaces whatever is there
    storage: Storage
    pending: list = field(default_factory=list)
    version: int | None = None
    commits: int = 0

    def add(self, pickled: list[bytes]) -> None:
        self.pending.extend(load_fragments(pickled))

    def commit(self, *, force: bool = False) -> None:
        """Commit pending fragments (``force`` also commits an empty Overwrite once)."""
        first = self.version is None
        if not self.pending and not (force and first and self.recreate):
            return
        if first and self.recreate:
            operation = lance.LanceOperation.Overwrite(self.schema, self.pending)
            read_version = None
        else:
            operation = lance.LanceOperation.Append(self.pending)
            read_version = self.version if self.version is not None else self._latest()
        dataset = lance.LanceDataset.commit(
            self.uri,
            operation,
            read_version=read_version,
            storage_options=self.storage.lance_options(),
        )
        self.version = dataset.version
        self.commits += 1
        self.pending = []

    def _latest(self) -> int:
        return self.dataset().version

    def dataset(self) -> lance.LanceDataset:
        return retry_transient(lambda: self.storage.open_lance(self.uri),
                               what=f"opening {self.uri}")

    def update_metadata(self, values: dict[str, str]) -> None:
        """Table-level key/values (a metadata-only commit)."""
        if self.version is None and self.recreate:
            return  # nothing committed yet: the table does not exist
        dataset = self.dataset()
        # a repeated metadata update writes the same values: safe to retry
        retry_transient(lambda: dataset.update_metadata(values),
                        what=f"updating the metadata of {self.uri}")
        self.version = dataset.version


@dataclass
class Committer:
    """Both tables, the interval, and the running counts."""

    main: TableCommitter
    rejected: TableCommitter
    interval_s: float
    ledger: UnitLedger
    tracker: ray.actor.ActorHandle
    run_key: str
    counts: Counts = field(default_factory=Counts)
    started: float = field(default_factory=time.monotonic)
    last_commit: float = field(default_factory=time.monotonic)

    def add(self, result: pa.Table) -> None:
        for pickled in result.column("main_fragments").to_pylist():
            self.main.add(pickled)
        for pickled in result.column("rejected_fragments").to_pylist():
            self.rejected.add(pickled)
        self.counts.add(result)
        for units, rows in zip(result.column("units").to_pylist(),
                               result.column("unit_rows").to_pylist(), strict=True):
            self.ledger.add(units, rows)
        if time.monotonic() - self.last_commit >= self.interval_s:
            self.commit()

    def commit(
        self, *, create: bool = False, final: bool = False, last_run: str | None = None
    ) -> None:
        """Commit what is pending, then the progress record.

        Args:
            create: Also create tables this run (re)creates when nothing is pending.
            final: Mark the run complete in the progress record.
            last_run: The run summary (JSON) to store beside the progress record.
        """
        # Rejected rows first: a reader of the output never sees rows whose rejected
        # siblings are not yet visible.
        self.rejected.commit(force=create)
        self.main.commit(force=create)
        self.ledger.on_commit(ray.get(self.tracker.take.remote()))
        record = ProgressRecord(run_key=self.run_key, done=self.ledger.done,
                                ranges=self.ledger.ranges, complete=final)
        metadata = {PROGRESS_KEY: record.to_json()}
        if last_run is not None:
            metadata[LAST_RUN_KEY] = last_run
        self.main.update_metadata(metadata)
        self.last_commit = time.monotonic()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        if final:  # a metadata-only version: the run's record, no rows
            logger.info("recorded the run's summary: output version %s", self.main.version)
            return
        logger.info(
            "data commit %d: %d rows embedded, %d rejected so far, %.0f tokens/s, output "
            "version %s", self.main.commits, self.counts.rows_embedded,
            self.counts.rows_rejected, self.counts.tokens / elapsed, self.main.version,
        )
