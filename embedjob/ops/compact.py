"""Table upkeep: compact small fragments (lance_ray, distributed) and drop old versions.

Every commit of a run or a refresh adds fragments; a nightly refresh adds small ones.
``compact`` rewrites them into fragments of ``target_rows_per_fragment`` rows with
``lance_ray.compact_files`` (Ray workers), then removes versions older than the retention
window (readers pinned to an older version keep working until then) and the files of failed
commits that no version references (``delete_unverified``: safe because compaction holds the
output's lease, so no run is writing fragments meanwhile).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import lance

from embedjob.errors import StorageError
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

TARGET_ROWS_PER_FRAGMENT = 1024 * 1024  # Lance's default file size target
# A refresh compacts when this many fragments hold, on average, under a quarter of the target.
PILE_UP_FRAGMENTS = 32


@dataclass(frozen=True)
class CompactReport:
    fragments_before: int
    fragments_after: int
    versions_removed: int
    bytes_removed: int

    def line(self) -> str:
        return (f"fragments {self.fragments_before} -> {self.fragments_after}, "
                f"{self.versions_removed} old versions removed "
                f"({self.bytes_removed / 2**20:,.1f} MiB)")


def compact(
    output: str,
    storage: Storage,
    *,
    retain_days: float = 7.0,
    target_rows_per_fragment: int = TARGET_ROWS_PER_FRAGMENT,
) -> CompactReport:
    """Compact ``output``, clean up versions older than ``retain_days`` and orphaned files."""
    from embedjob.driver.lease import Lease

    if not storage.lance_exists(output):
        raise StorageError(f"no Lance table at {output!r}")
    with Lease(output=output, ttl_s=120.0, storage=storage):
        return compact_unlocked(output, storage, retain_days, target_rows_per_fragment)


def compact_unlocked(output: str, storage: Storage, retain_days: float,
                     target_rows_per_fragment: int) -> CompactReport:
    """``compact`` for a caller that already holds the output's lease (a refresh)."""
    from lance.optimize import CompactionOptions
    from lance_ray import compact_files

    from embedjob.table.info import last_run_json

    held = storage.open_lance(output)
    before, summary = len(held.get_fragments()), last_run_json(held)
    compact_files(output, storage_options=storage.lance_options(),
                  compaction_options=CompactionOptions(
                      target_rows_per_fragment=target_rows_per_fragment),
                  num_workers=_workers())
    if summary is not None:  # the run summary's commit may be cleaned up next: carry it
        carry_last_run(output, storage, summary)
    dataset = storage.open_lance(output)
    stats = dataset.cleanup_old_versions(older_than=dt.timedelta(days=retain_days),
                                         delete_unverified=True)
    report = CompactReport(before, len(dataset.get_fragments()), stats.old_versions,
                           stats.bytes_removed)
    logger.info("compacted %s: %s", output, report.line())
    return report


def _workers() -> int:
    """One compaction worker per CPU of the cluster (Ray's view; 2 without a cluster)."""
    import ray

    if not ray.is_initialized():
        return 2
    return max(1, int(ray.cluster_resources().get("CPU", 2)))


def carry_last_run(output: str, storage: Storage, summary: str) -> None:
    """One empty commit carrying the run summary (``embedjob.last_run``) forward."""
    from lance.dataset import Transaction

    from embedjob import schema as S
    from embedjob.driver.commit import commit_transaction

    dataset = storage.open_lance(output)
    transaction = Transaction(read_version=dataset.version,
                              operation=lance.LanceOperation.Append([]),
                              transaction_properties={S.LAST_RUN_KEY: summary})
    commit_transaction(output, transaction, storage)


def piled_up(dataset: lance.LanceDataset, target: int = TARGET_ROWS_PER_FRAGMENT) -> bool:
    """Whether small fragments have piled up enough to be worth a compaction."""
    fragments = dataset.get_fragments()
    if len(fragments) < PILE_UP_FRAGMENTS:
        return False
    return dataset.count_rows() / len(fragments) < target / 4
