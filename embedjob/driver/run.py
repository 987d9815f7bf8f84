"""``run(config)``: plan, stream the pipeline, commit, summarize. The job's one entry point."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import ray

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver import calibrate, pipeline, progress
from embedjob.driver.commit import Committer, TableCommitter
from embedjob.driver.lease import Lease
from embedjob.driver.preflight import RunPlan, plan_run
from embedjob.driver.stop import Stop, StopRequested, stop_on_signal
from embedjob.errors import BugError, RunStopped
from embedjob.schema import Counts
from embedjob.stages.check import IdRegistry, OutputLookup
from embedjob.stages.encode import EncodeActor

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

    def line(self) -> str:
        return (
            f"embedded {self.rows_embedded}/{self.rows_read} rows "
            f"({self.rows_rejected} rejected, {self.rows_truncated} truncated, "
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


def run(config: EmbedConfig, *, lookup: OutputLookup | None = None, registry=None,
        encoder: type | None = None, calibration: str | None = None,
        reporter: Reporter | None = None) -> Summary | None:
    """Run one embed job to completion.

    Args:
        config: The job.
        lookup: A refresh's view of the output: rows it holds unchanged are skipped.
        registry: The run's ``IdRegistry`` when the caller needs it afterwards.
        encoder: The encode stage's class (default ``EncodeActor``; tests wrap it).
        calibration: An int8 calibration stamp to reuse (a refresh's staging run passes
            its table's; default: the output's when adding to it, else calibrated anew).
        reporter: Told when the run starts, how far it is, when it is through.

    Returns:
        The run's summary; None for a dry run (``config.dry_run``: the plan goes to
        ``reporter.planned`` and nothing runs).

    Raises:
        EmbedError: a configuration or storage problem, before any model loads.
    """
    started = time.monotonic()
    reporter = reporter or Reporter()
    plan = plan_run(config)
    if plan.model.non_commercial:
        logger.warning("model %s is licensed %s: its weights are for non-commercial use only "
                       "(see the model card)", plan.model.source, plan.model.license)
    if config.dry_run:
        reporter.planned(plan)
        return None
    if lookup is not None:
        plan = replace(plan, tokenize=replace(plan.tokenize, lookup=lookup))
    try:
        with stop_on_signal() as stop, Lease(output=config.output, ttl_s=config.lease_ttl_s,
                                             storage=plan.storage) as lease:
            summary = _run(plan, started, registry, encoder or EncodeActor, calibration, lease,
                           reporter, stop)
    except StopRequested as stop:  # outside the result loop: nothing new was committed
        raise RunStopped(f"stopped by {stop}: nothing new committed; {_RESUME}",
                         stop.exit_code) from None
    if config.summary_json:
        write_json(config.summary_json, asdict(summary))
    return summary


def _run(plan: RunPlan, started: float, registry, encoder: type,
         calibration: str | None, lease: Lease, reporter: Reporter, stop: Stop) -> Summary:
    """The run proper, under the output's lease."""
    config = plan.config
    _init_ray(config, reporter.forward_worker_logs)
    stop.reinstall()
    plan = calibrate.settle(plan, calibration)
    registry = registry or new_registry()
    committer = _committer(plan, started)
    committer.fence = lease.check
    seeded = _prepare_resume(plan, committer, registry) if plan.resumed else 0
    reporter.started(plan)
    if plan.units:
        results = pipeline.build(plan, registry=registry, tracker=committer.tracker,
                                 encoder=encoder)
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
    _check_one_to_one(committer, registry, seeded)
    # The last commit: the rest of the rows, the units they finish, the summary, "complete".
    summary = _summary(plan, committer, time.monotonic() - started)
    committer.commit(create=True, last_run=json.dumps(asdict(summary)))
    if committer.main.version != summary.table_version:  # another writer committed too
        logger.warning("output is at version %s, not %s: another writer committed meanwhile",
                       committer.main.version, summary.table_version)
        summary = replace(summary, table_version=committer.main.version)
    logger.info("%s", summary.line())
    return summary


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


def new_registry():
    """The run-wide registry of claimed ids (a Ray actor)."""
    return IdRegistry.remote()


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
        ledger=progress.UnitLedger(fingerprints=plan.fingerprints, done=done, ranges=ranges),
        tracker=progress.ReadTracker.remote(),
        run_key=plan.run_key,
        first=plan.resumed is None,
        main=TableCommitter(uri=cfg.output, schema=plan.schema, recreate=plan.recreate_output,
                            storage=plan.storage),
        rejected=TableCommitter(uri=cfg.rejected_uri, schema=S.REJECTED_SCHEMA,
                                recreate=plan.recreate_rejected, storage=plan.storage),
        interval_s=cfg.commit_interval_s,
        started=started,  # tokens/s in the commit lines and the summary: the same clock
    )


def _prepare_resume(plan: RunPlan, committer: Committer, registry) -> int:
    """Drop the rows of unfinished units from both tables; claim the ids already embedded.

    Returns:
        How many ids the finished units hold (claimed before any new row).
    """
    record = plan.resumed
    main = progress.unfinished_rows(plan.units, record, S.SOURCE_FILE, S.SOURCE_ROW)
    if main is not None:
        committer.main.dataset().delete(main)
        if plan.storage.lance_exists(plan.config.rejected_uri):
            committer.rejected.dataset().delete(progress.unfinished_rows(
                plan.units, record, S.REJECTED_SOURCE, S.REJECTED_ROW))
    seeded = 0
    for batch in committer.main.dataset().to_batches(columns=[S.OUT_ID], batch_size=65536):
        ids = batch.column(S.OUT_ID).to_pylist()
        ray.get(registry.claim.remote(ids, [0] * len(ids)))  # 0: no new row owns these
        seeded += len(ids)
    return seeded


def _check_one_to_one(committer: Committer, registry, seeded: int) -> None:
    """Every id the registry handed out was embedded exactly once."""
    claimed = ray.get(registry.size.remote())
    embedded = committer.counts.rows_embedded + committer.counts.rows_unchanged + seeded
    if claimed != embedded:
        raise BugError(
            f"{claimed} distinct valid ids were read but {embedded} rows were embedded")


def _summary(plan: RunPlan, committer: Committer, wall_s: float) -> Summary:
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
    )


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
