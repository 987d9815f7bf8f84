"""Driver-side commits of the fragments that the writers produced.

The output and the rejected table are committed together, every ``commit_interval_s`` and
at the end; each commit first flushes the writers (``stages.write.WriterPool``), so it holds
every row handed to them until then. The first commit of a table that this run (re)creates
is an Overwrite with the stamped schema; later ones are Appends on top of the version this
run last committed.
The units a commit finishes travel in that same output commit, as Lance transaction
properties (``embedjob.driver.progress``): rows and the record of them are one atomic step,
and each commit records only what it adds. The last commit also carries the run summary;
there is no metadata-only commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lance
import pyarrow as pa
import ray
from lance.dataset import Transaction

from embedjob.driver import progress
from embedjob.driver.progress import UnitLedger
from embedjob.errors import Backoff, retry_transient
from embedjob.schema import Counts
from embedjob.stages.write import WriterPool, load_fragments
from embedjob.storage import Storage

logger = logging.getLogger(__name__)


LANDED_LOOKBACK_VERSIONS = 20  # versions searched for a commit that landed despite its error


def commit_transaction(uri: str, transaction: Transaction, storage: Storage
                       ) -> lance.LanceDataset:
    """Commit ``transaction`` exactly once, retrying transient errors.

    A transient error can come after the store applied the manifest write (a connection reset
    on Lance's conditional PUT of the manifest, which object_store does not repeat). Repeating
    the commit then would land the same fragments twice (Lance rebases it as the next
    version), so before each retry the latest versions are searched for this transaction's
    uuid: found, the commit landed and that version is returned.

    Raises:
        TransientGiveUpError: transient errors for longer than the retry budget.
        Exception: any other error, at once (a commit conflict with another writer included).
    """
    backoff = Backoff(f"commit to {uri}")
    while True:
        try:
            return lance.LanceDataset.commit(uri, transaction,
                                             storage_options=storage.lance_options())
        except Exception as exc:  # noqa: BLE001 - judged by backoff.wait, which re-raises
            backoff.wait(exc)
        landed = retry_transient(lambda: _landed(uri, transaction, storage),
                                 what=f"reading the versions of {uri}")
        if landed is not None:
            logger.info("commit to %s landed as version %d despite the error", uri,
                        landed.version)
            return landed


def _landed(uri: str, transaction: Transaction, storage: Storage) -> lance.LanceDataset | None:
    """The version among the latest ones that ``transaction`` made, if it landed."""
    if not storage.lance_exists(uri):
        return None
    latest = storage.open_lance(uri)
    oldest = max(transaction.read_version + 1, latest.version - LANDED_LOOKBACK_VERSIONS, 1)
    for version in range(latest.version, oldest - 1, -1):
        made = latest.read_transaction(version)
        if made is not None and made.uuid == transaction.uuid:
            return latest.checkout_version(version)
    return None


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

    def commit(self, *, force: bool = False, properties: dict[str, str] | None = None) -> None:
        """Commit pending fragments.

        Args:
            force: Also commit an empty Overwrite once (a table this run creates).
            properties: Transaction properties; a commit with properties is made even when
                no fragment is pending (an empty Append carrying them).
        """
        first = self.version is None
        if not self.pending and not properties and not (force and first and self.recreate):
            return
        if first and self.recreate:
            operation = lance.LanceOperation.Overwrite(self.schema, self.pending)
            read_version = 0
        else:
            operation = lance.LanceOperation.Append(self.pending)
            read_version = self.version if self.version is not None else self._latest()
        transaction = Transaction(read_version=read_version, operation=operation,
                                  transaction_properties=dict(properties or {}))
        dataset = commit_transaction(self.uri, transaction, self.storage)
        self.version = dataset.version
        self.commits += 1
        self.pending = []

    def next_version(self) -> int:
        """The version the next commit will make (unless another writer commits first)."""
        if self.version is not None:
            return self.version + 1
        return (self._latest() if self.storage.lance_exists(self.uri) else 0) + 1

    def _latest(self) -> int:
        return self.dataset().version

    def dataset(self) -> lance.LanceDataset:
        return retry_transient(lambda: self.storage.open_lance(self.uri),
                               what=f"opening {self.uri}")


@dataclass
class Committer:
    """Both tables, the interval, and the running counts."""

    main: TableCommitter
    rejected: TableCommitter
    interval_s: float
    ledger: UnitLedger
    tracker: ray.actor.ActorHandle
    run_key: str
    first: bool = True  # the next output commit is this run's first (not a resume's)
    fence: Callable[[], None] | None = None  # Lease.check: raises when the lease is lost
    writers: WriterPool | None = None  # flushed into every commit
    counts: Counts = field(default_factory=Counts)
    started: float = field(default_factory=time.monotonic)
    last_commit: float = field(default_factory=time.monotonic)

    def add(self, result: pa.Table) -> None:
        """Take write-stage results (counters); commit when the interval has passed."""
        self._collect(result)
        if time.monotonic() - self.last_commit >= self.interval_s:
            self.commit()

    def _collect(self, result: pa.Table) -> None:
        """Fragments, counters and rows per unit of ``RESULT_SCHEMA`` rows."""
        for pickled in result.column("main_fragments").to_pylist():
            self.main.add(pickled)
        for pickled in result.column("rejected_fragments").to_pylist():
            self.rejected.add(pickled)
        self.counts.add(result)
        for units, rows in zip(result.column("units").to_pylist(),
                               result.column("unit_rows").to_pylist(), strict=True):
            self.ledger.add(units, rows)

    def commit(self, *, create: bool = False, last_run: str | None = None) -> None:
        """Commit what is pending with the record of the units it finishes.

        Args:
            create: Also create tables this run (re)creates when nothing is pending.
            last_run: The run summary (JSON): this is the run's last commit, which marks
                it complete.
        """
        if self.fence is not None:  # nothing of this commit is written past a lost lease
            self.fence()
        if self.writers is not None:  # all they hold goes into this commit
            for result in self.writers.flush():
                self._collect(result)
        # Rejected rows first: a reader of the output never sees rows whose rejected
        # siblings are not yet visible.
        self.rejected.commit(force=create)
        finished = self.ledger.finishing(ray.get(self.tracker.take.remote()))
        properties = progress.commit_properties(
            self.run_key, finished, first=self.first, last_run=last_run)
        worth = bool(finished) or last_run is not None or (self.first and self.main.pending)
        self.main.commit(force=create, properties=properties if worth else None)
        self.ledger.finished(finished)
        self.first = self.first and self.main.version is None
        self.last_commit = time.monotonic()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        logger.info(
            "data commit %d: %d rows embedded, %d rejected so far, %.0f tokens/s, output "
            "version %s", self.main.commits, self.counts.rows_embedded,
            self.counts.rows_rejected, self.counts.tokens / elapsed, self.main.version,
        )
