"""``run(config)``: plan, stream the pipeline, commit, summarize. The job's one entry point."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver import calibrate, nodes, pipeline, progress
from embedjob.driver.commit import Committer, TableCommitter
from embedjob.driver.lease import Lease
from embedjob.driver.preflight import RunPlan, plan_run
from embedjob.driver.stop import Stop, StopRequested, stop_on_signal
from embedjob.errors import BugError, RunStopped, retries_made
from embedjob.schema import Counts
from embedjob.stages.crashes import CrashWatch
from embedjob.stages.dedupe import DuplicateIndex, source_files
from embedjob.stages.encode import EncodeActor
from embedjob.stages.read import unit_file
from embedjob.stages.write import WriterPool

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Summary(Counts):
    """What one run did (the counters of ``schema.Counts`` and more); logged as one line and
    written as JSON."""

    output: str
    rejected_output: str
    table_version: int | None
    rows_read: int
    rows_new: int
    rows_deleted: int
    resumed_units_done: int
    padding_efficiency: float
    tokens_per_s: float
    wall_s: float
    commits: int
    task: str | None
    dims: list[int]
    encoder_deaths: int = 0  # encode actor processes that died with a block in flight
    # retries of the driver's own backoff loops (lease, opening the output to commit); the
    # storage clients retry each request themselves, unseen (README "Transient errors")
    transient_retries: int = 0

    def line(self) -> str:
        return (
            f"embedded {self.rows_embedded}/{self.rows_read} rows "
            f"({self.rows_rejected} rejected, {self.rows_duplicate} of them duplicate ids, "
            f"{self.rows_truncated} truncated, "
            f"{self.rows_unchanged} unchanged, {self.rows_deleted} deleted), "
            f"{self.tokens} tokens, padding efficiency {self.padding_efficiency:.3f}, "
            f"{self.tokens_per_s:.0f} tokens/s, {self.wall_s:.1f} s, {self.commits} data "
            f"commits -> {self.output} (version {self.table_version})"
        )


class Reporter:
    """What a caller sees of a run as it goes (the CLI's console); this base shows nothing."""

    forward_worker_logs = True  # Ray's log_to_driver, when this run starts Ray

    def planned(self, plan: RunPlan) -> None:
        """A dry run's plan: preflight passed, nothing will run."""

    def started(self, plan: RunPlan) -> None:
        """Preflight passed; nothing is read yet."""

    def progress(self, counts: Counts) -> None:
        """The running counts, after each block of results."""

    def finished(self) -> None:
        """Every row is through (the final commit follows)."""


def run(config: EmbedConfig, *, encoder: type | None = None, calibration: str | None = None,
        reporter: Reporter | None = None) -> Summary | None:
    """Run one embed job to completion.

    Args:
        config: The job.
        encoder: The encode stage's class (default ``EncodeActor``; tests wrap it).
        calibration: An int8 calibration stamp to reuse (default: the output's when adding
            to it, else calibrated anew).
        reporter: Told when the run starts, how far it is, when it is through.

    Returns:
        The run's summary; None for a dry run (``config.dry_run``: the plan goes to
        ``reporter.planned`` and nothing runs).

    Raises:
        EmbedError: a configuration or storage problem, before any model loads.
    """
    return run_with_index(config, encoder=encoder, calibration=calibration,
                          reporter=reporter)[0]


def run_with_index(config: EmbedConfig, *, encoder: type | None = None,
                   calibration: str | None = None, reporter: Reporter | None = None
                   ) -> tuple[Summary | None, DuplicateIndex | None]:
    """``run``, also returning the duplicate-id shards (the scale benchmark reads their
    bytes; None with ``--assume-unique-ids``)."""
    started = time.monotonic()
    reporter = reporter or Reporter()
    plan = plan_run(config)
    if plan.model.non_commercial:
        logger.warning("model %s is licensed %s: its weights are for non-commercial use only "
                       "(see the model card)", plan.model.source, plan.model.license)
    if config.dry_run:
        reporter.planned(plan)
        return None, None
    retries = retries_made()
    try:
        with stop_on_signal() as stop, Lease(output=config.output, ttl_s=config.lease_ttl_s,
                                             storage=plan.storage) as lease:
            summary, index = _run(plan, started, encoder or EncodeActor, calibration,
                                  lease, reporter, stop, retries)
    except StopRequested as stop:  # outside the result loop: nothing new was committed
        raise RunStopped(f"stopped by {stop}: nothing new committed; {_RESUME}",
                         stop.exit_code) from None
    # the lease's release included (the summary committed in the table counts until then)
    summary = replace(summary, transient_retries=retries_made() - retries)
    if config.summary_json:
        write_json(config.summary_json, asdict(summary))
    return summary, index


def _run(plan: RunPlan, started: float, encoder: type,
         calibration: str | None, lease: Lease, reporter: Reporter, stop: Stop,
         retries_at_start: int) -> tuple[Summary, DuplicateIndex | None]:
    """The run proper, under the output's lease (``retries_at_start``: ``retries_made()``
    before the lease was taken)."""
    config = plan.config
    start_ray(config, reporter, stop)
    plan = calibrate.settle(plan, calibration)
    committer = _committer(plan, started)
    committer.fence = lease.check
    if plan.resumed:
        _prepare_resume(plan, committer)
    index = None if config.assume_unique_ids else _find_duplicates(plan)
    plan = replace(plan, tokenize=replace(plan.tokenize, duplicates=index))
    crashes = CrashWatch.create(config.encoder_crash_retries)
    plan = replace(plan, encode=replace(plan.encode, crashes=crashes))
    reporter.started(plan)
    if plan.units:
        results = pipeline.build(plan, tracker=committer.tracker,
                                 writers=committer.writers.actors, encoder=encoder)
        batches = iter(results.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            while True:
                with stop.waiting():  # a stop signal breaks off only this wait
                    result = next(batches, None)
                if result is None:
                    break
                committer.add(result)
                reporter.progress(committer.counts)
        except StopRequested as requested:
            _stop(committer, requested)
    reporter.finished()
    _check_duplicates(plan, committer, index)
    # The last commit: the rest of the rows, the units they finish, the summary, "complete".
    summary = replace(_summary(plan, committer, time.monotonic() - started, crashes.deaths()),
                      transient_retries=retries_made() - retries_at_start)
    committer.commit(create=True, last_run=json.dumps(asdict(summary)))
    if committer.main.version != summary.table_version:  # another writer committed too
        logger.warning("output is at version %s, not %s: another writer committed meanwhile",
                       committer.main.version, summary.table_version)
        summary = replace(summary, table_version=committer.main.version)
    logger.info("%s", summary.line())
    return summary, index


_RESUME = ("rerun the same command to resume (it reads only the input units not committed; "
           "the lease is released, so it starts at once)")


def _stop(committer: Committer, stop: StopRequested) -> None:
    """Commit what the writers had handed over, then end the run as stopped.

    Raises:
        RunStopped: always (the lease is released on the way out).
    """
    committer.commit()
    counts = committer.counts
    raise RunStopped(
        f"stopped by {stop}: {counts.rows_embedded} rows embedded and {counts.rows_rejected} "
        f"rejected are committed (output version {committer.main.version}); {_RESUME}",
        stop.exit_code) from None


def _find_duplicates(plan: RunPlan) -> DuplicateIndex:
    """The pre-pass: scan every unit's ids into the shards and decide each id's winner."""
    started = time.monotonic()
    shards = plan.config.id_shards or max(1, int(ray.cluster_resources().get("CPU", 1)) // 8)
    files = source_files(plan.sources)
    index = DuplicateIndex.create(files, shards)
    for _ in pipeline.scan(plan, index).iter_batches(batch_size=None):
        pass  # the rows scanned per unit are not needed: the shards hold the ids
    rows, distinct = index.resolve(files)
    logger.info("duplicate-id pre-pass: %d rows with an id, %d distinct, %d shards, %.1f s",
                rows, distinct, shards, time.monotonic() - started)
    return index


def start_ray(config: EmbedConfig, reporter: Reporter, stop: Stop) -> None:
    """Join (or start) the Ray cluster for a run or a refresh, then put the graceful stop's
    handlers back (``ray.init`` installs its own SIGTERM handler) and start the node watch
    (no node for an encode actor for ``--node-wait-s``: stop)."""
    _init_ray(config, reporter.forward_worker_logs)
    stop.reinstall()
    nodes.NodeWatch.start(config, stop)


def _init_ray(config: EmbedConfig, log_to_driver: bool = True) -> None:
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kwargs = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, log_to_driver=log_to_driver, **kwargs)


def _committer(plan: RunPlan, started: float) -> Committer:
    cfg = plan.config
    done = dict(plan.resumed.done) if plan.resumed else {}
    ranges = dict(plan.resumed.ranges) if plan.resumed else {}
    return Committer(
        ledger=progress.UnitLedger(fingerprints=plan.fingerprints, done=done, ranges=ranges,
                                   row_weight=S.DOC_WEIGHT if cfg.chunked else 1),
        tracker=progress.ReadTracker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote(),  # outlives a lost node
        writers=WriterPool.create(plan.write, cfg.writer_count),
        run_key=plan.run_key,
        first=plan.resumed is None,
        main=TableCommitter(uri=cfg.output, schema=plan.schema, recreate=plan.recreate_output,
                            storage=plan.storage),
        rejected=TableCommitter(uri=cfg.rejected_uri, schema=S.REJECTED_SCHEMA,
                                recreate=plan.recreate_rejected, storage=plan.storage),
        interval_s=cfg.commit_interval_s,
        started=started,  # tokens/s in the commit lines and the summary: the same clock
    )


def _prepare_resume(plan: RunPlan, committer: Committer) -> None:
    """Drop the rows of unfinished units from both tables (they are embedded again)."""
    record = plan.resumed
    main = progress.unfinished_rows(plan.units, record, S.SOURCE_FILE, S.SOURCE_ROW)
    if main is not None:
        committer.main.dataset().delete(main)
        if plan.storage.lance_exists(plan.config.rejected_uri):
            committer.rejected.dataset().delete(progress.unfinished_rows(
                plan.units, record, S.REJECTED_SOURCE, S.REJECTED_ROW))


def _check_duplicates(plan: RunPlan, committer: Committer, index: DuplicateIndex | None) -> None:
    """Every row the pre-pass called a duplicate was rejected as one, and no other row: the
    losers of the files this run read, less those of their units finished before a resume."""
    if index is None:
        return
    position = {name: i for i, name in enumerate(source_files(plan.sources))}
    todo = {unit_file(u) for u in plan.units}
    done = plan.resumed.ranges if plan.resumed else {}
    skipped = [(position[unit_file(u)], lo, hi) for u, (lo, hi) in done.items()
               if unit_file(u) in todo]
    expected = index.count_losers([position[f] for f in todo], skipped)
    if committer.counts.rows_duplicate != expected:
        raise BugError(f"the pre-pass found {expected} duplicate rows in this run's units but "
                       f"{committer.counts.rows_duplicate} were rejected as duplicates")


def _summary(plan: RunPlan, committer: Committer, wall_s: float, encoder_deaths: int
             ) -> Summary:
    counts = committer.counts
    return Summary(
        **counts.counters(),
        output=plan.config.output,
        rejected_output=plan.config.rejected_uri,
        table_version=committer.main.next_version(),
        rows_read=counts.rows_embedded + counts.rows_rejected + counts.rows_unchanged,
        rows_new=counts.rows_embedded - counts.rows_changed,
        rows_deleted=0,
        resumed_units_done=len(plan.resumed.done) if plan.resumed else 0,
        padding_efficiency=counts.tokens / counts.processed_tokens if counts.processed_tokens
        else 1.0,
        tokens_per_s=counts.tokens / wall_s if wall_s > 0 else 0.0,
        wall_s=round(wall_s, 3),
        commits=committer.main.commits + 1,  # made before the last commit, counting it
        task=plan.task,
        dims=list(plan.dims),
        encoder_deaths=encoder_deaths,
    )


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
