"""``run(config)``: plan, stream the pipeline, commit, summarize. The job's one entry point."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import ray

from embedjob import storage
from embedjob.config import EmbedConfig
from embedjob.driver import pipeline, progress
from embedjob.driver.commit import Committer, TableCommitter
from embedjob.driver.lease import Lease
from embedjob.driver.preflight import RunPlan, plan_run
from embedjob.errors import BugError
from embedjob.stages import check as validate

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """What one run did; logged as one line and written as JSON."""

    output: str
    rejected_output: str
    table_version: int | None
    rows_read: int
    rows_embedded: int
    rows_rejected: int
    rows_unchanged: int
    rows_new: int
    rows_changed: int
    rows_deleted: int
    rows_truncated: int
    resumed_units_done: int
    tokens: int
    processed_tokens: int
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
            f"{self.tokens_per_s:.0f} tokens/s, {self.wall_s:.1f} s, {self.commits} commits "
            f"-> {self.output} (version {self.table_version})"
        )


def run(config: EmbedConfig, *, compare_with=None, registry=None) -> Summary:
    """Run one embed job to completion.

    Args:
        config: The job.
        compare_with: A refresh's ``ExistingRows``: rows it holds unchanged are skipped.
        registry: The run's ``IdRegistry`` when the caller needs it afterwards.

    Raises:
        EmbedError: a configuration or storage problem, before any model loads.
    """
    started = time.monotonic()
    plan = plan_run(config)
    with Lease(output=config.output, ttl_s=config.lease_ttl_s,
               storage_options=plan.storage_options):
        summary = _run(plan, started, compare_with, registry)
    if config.summary_json:
        write_json(config.summary_json, asdict(summary))
    return summary


def _run(plan: RunPlan, started: float, compare_with, registry) -> Summary:
    """The run proper, under the output's lease."""
    config = plan.config
    _init_ray(config)
    registry = registry or new_registry()
    committer = _committer(plan)
    seeded = _prepare_resume(plan, committer, registry) if plan.resumed else 0
    if plan.units:
        results = pipeline.build(plan, registry, committer.tracker, compare_with)
        for result in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(result)
    _check_one_to_one(committer, registry, seeded)
    committer.commit(create=True)
    # The final commit writes only metadata (progress + this summary): one more version.
    summary = _summary(plan, committer, time.monotonic() - started)
    committer.commit(final=True, last_run=json.dumps(asdict(summary)))
    if committer.main.version != summary.table_version:  # another writer committed too
        logger.warning("output is at version %s, not %s: another writer committed meanwhile",
                       committer.main.version, summary.table_version)
        summary = replace(summary, table_version=committer.main.version)
    logger.info("%s", summary.line())
    return summary


def new_registry():
    """The run-wide registry of claimed ids (a Ray actor)."""
    return validate.IdRegistry.remote()


def _init_ray(config: EmbedConfig) -> None:
    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kwargs = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, log_to_driver=True, **kwargs)


def _committer(plan: RunPlan) -> Committer:
    cfg = plan.config
    done = dict(plan.resumed.done) if plan.resumed else {}
    return Committer(
        ledger=progress.UnitLedger(fingerprints=plan.fingerprints, done=done),
        tracker=progress.ReadTracker.remote(),
        run_key=plan.run_key,
        main=TableCommitter(uri=cfg.output, schema=plan.schema, recreate=plan.recreate_output,
                            storage_options=plan.storage_options),
        rejected=TableCommitter(uri=cfg.rejected_uri, schema=plan.rejected_schema,
                                recreate=plan.recreate_rejected,
                                storage_options=plan.storage_options),
        interval_s=cfg.commit_interval_s,
    )


def _prepare_resume(plan: RunPlan, committer: Committer, registry) -> int:
    """Drop the rows of unfinished units from both tables; claim the ids already embedded.

    Returns:
        How many ids the finished units hold (claimed before any new row).
    """
    if plan.units:
        listed = ", ".join("'" + u.replace("'", "''") + "'" for u in plan.units)
        committer.main.dataset().delete(f"source_file IN ({listed})")
        if storage.lance_exists(plan.config.rejected_uri, plan.storage_options):
            committer.rejected.dataset().delete(f"source IN ({listed})")
    seeded = 0
    for batch in committer.main.dataset().to_batches(columns=["id"], batch_size=65536):
        ids = batch.column("id").to_pylist()
        ray.get(registry.claim.remote(ids, [0] * len(ids)))  # 0: no new row owns these
        seeded += len(ids)
    return seeded


def _check_one_to_one(committer: Committer, registry, seeded: int) -> None:
    """Every id the registry handed out was embedded exactly once."""
    claimed = ray.get(registry.size.remote())
    embedded = committer.counts.rows_embedded + committer.counts.rows_unchanged + seeded
    if claimed != embedded:
        raise BugError(
            f"{claimed} distinct valid ids were read but {embedded} rows were embedded; "
            "this is a bug"
        )


def _summary(plan: RunPlan, committer: Committer, wall_s: float) -> Summary:
    counts = committer.counts
    return Summary(
        output=plan.config.output,
        rejected_output=plan.config.rejected_uri,
        table_version=(committer.main.version or 0) + 1,
        rows_read=counts.rows_embedded + counts.rows_rejected + counts.rows_unchanged,
        rows_embedded=counts.rows_embedded,
        rows_rejected=counts.rows_rejected,
        rows_unchanged=counts.rows_unchanged,
        rows_new=counts.rows_embedded - counts.rows_changed,
        rows_changed=counts.rows_changed,
        rows_deleted=0,
        rows_truncated=counts.rows_truncated,
        resumed_units_done=len(plan.resumed.done) if plan.resumed else 0,
        tokens=counts.tokens,
        processed_tokens=counts.processed_tokens,
        padding_efficiency=counts.tokens / counts.processed_tokens if counts.processed_tokens
        else 1.0,
        tokens_per_s=counts.tokens / wall_s if wall_s > 0 else 0.0,
        wall_s=round(wall_s, 3),
        commits=committer.main.commits,
        task=plan.task,
        dims=list(plan.dims),
    )


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
