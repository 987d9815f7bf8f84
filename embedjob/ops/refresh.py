"""Nightly incremental re-embedding: embed only new and changed rows, drop gone ones.

``refresh(config)`` compares each input row's ``content_hash`` with what the output holds
(looked up per tokenize batch through a BTREE index on ``id``, so memory stays bounded by
the batch, never by the table), embeds new and changed rows into a staging table with the
ordinary (resumable) embed run, upserts them into the output with one Lance merge-insert,
then deletes the rows whose ids are gone from the corpus (unless ``keep_deleted``).

A changed stamp (model weights, task, dims, instruction, vector dtype) cannot be mixed
with the old vectors: that refresh re-embeds everything as a **new version of the same
table** (an overwrite; older versions stay readable until cleaned up).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import lance
import pyarrow as pa
import pyarrow.compute as pc
import ray

from embedjob import storage
from embedjob.config import EmbedConfig
from embedjob.driver.lease import Lease
from embedjob.driver.progress import LAST_RUN_KEY, read_record
from embedjob.errors import ConfigError

logger = logging.getLogger(__name__)

UNCHANGED = "unchanged since the last run"  # a skip marker, never written as a rejection
# Stamp keys that must match for old and new vectors to live in one table.
STAMP_KEYS = ("embedjob.weights_hash", "embedjob.task", "embedjob.instruction",
              "embedjob.dims", "embedjob.vector_dtype")
DELETE_CHUNK_IDS = 1000


@dataclass(frozen=True, kw_only=True)
class ExistingRows:
    """The output table as it was when the refresh started (a pinned version)."""

    uri: str
    version: int
    storage_options: Mapping[str, str]

    def hashes(self, ids: list) -> dict:
        """id -> content_hash of the rows among ``ids`` that the table holds."""
        wanted = [i for i in ids if i is not None]
        if not wanted:
            return {}
        dataset = _dataset(self.uri, self.version, json.dumps(dict(self.storage_options)))
        found = dataset.to_table(columns=["id", "content_hash"],
                                 filter=pc.field("id").isin(wanted))
        return dict(zip(found.column("id").to_pylist(), found.column("content_hash").to_pylist(),
                        strict=True))

    def mark(self, ids: list, hashes: list, reasons: list) -> list[bool]:
        """Set UNCHANGED on rows whose hash the table already holds; flag changed rows."""
        known = self.hashes([ids[i] for i, r in enumerate(reasons) if r is None])
        changed = [False] * len(ids)
        for i, reason in enumerate(reasons):
            if reason is None and ids[i] in known:
                if known[ids[i]] == hashes[i]:
                    reasons[i] = UNCHANGED
                else:
                    changed[i] = True
        return changed


@functools.lru_cache(maxsize=4)
def _dataset(uri: str, version: int, options_json: str) -> lance.LanceDataset:
    return storage.open_lance(uri, json.loads(options_json), version=version)


def stamp_mismatch(output: lance.LanceDataset, stamp: Mapping[str, str]) -> list[str]:
    """Stamp keys whose value in the output differs from this run's."""
    held = {k.decode(): v.decode() for k, v in (output.schema.metadata or {}).items()}
    return [k for k in STAMP_KEYS if held.get(k) != stamp.get(k)]


def ensure_id_index(dataset: lance.LanceDataset) -> None:
    """A BTREE index on ``id`` makes the per-batch lookups cheap; new rows are indexed
    again by ``optimize_indices`` after the upsert."""
    if not any(index["fields"] == ["id"] for index in dataset.list_indices()):
        dataset.create_scalar_index("id", "BTREE")


def staging_uri(output: str) -> str:
    base = output.rstrip("/")
    return (base[: -len(".lance")] if base.endswith(".lance") else base) + ".staging.lance"


def refresh(config: EmbedConfig, *, keep_deleted: bool = False):
    """Refresh ``config.output`` from ``config.input``; returns the run Summary."""
    from embedjob.driver import preflight, run

    options = storage.resolve_storage_options(config.storage_options)
    if not storage.lance_exists(config.output, options):
        raise ConfigError(f"refresh needs an existing output; {config.output!r} does not "
                          "exist: run `embedjob embed` first")
    output = storage.open_lance(config.output, options)
    stamp = preflight.plan_stamp(config)
    mismatch = stamp_mismatch(output, stamp)
    if mismatch:
        logger.warning("stamp changed (%s): re-embedding everything as a new version of %s",
                       ", ".join(mismatch), config.output)
        return run.run(dataclasses.replace(config, mode="overwrite"))
    with Lease(output=config.output, ttl_s=config.lease_ttl_s, storage_options=options):
        return _refresh(config, options, keep_deleted)


def _refresh(config: EmbedConfig, options: dict, keep_deleted: bool):
    """Under the output's lease: staging embed, upsert, delete gone ids."""
    from embedjob.driver import run

    output = storage.open_lance(config.output, options)
    ensure_id_index(output)
    output = storage.open_lance(config.output, options)
    existing = ExistingRows(uri=config.output, version=output.version, storage_options=options)
    staging = staging_uri(config.output)
    registry = run.new_registry()
    summary = run.run(_staging_config(config, staging, options), compare_with=existing,
                      registry=registry)
    _upsert(config.output, staging, options)
    deleted = 0 if keep_deleted else _delete_gone(config.output, options, registry)
    final = storage.open_lance(config.output, options)
    final.optimize.optimize_indices()
    storage.remove_tree(staging, options)
    _upkeep(config, options)
    final = storage.open_lance(config.output, options)
    # the last-run record is one more (metadata-only) version
    summary = dataclasses.replace(summary, output=config.output, rows_deleted=deleted,
                                  table_version=final.version + 1)
    final.update_metadata({LAST_RUN_KEY: json.dumps(dataclasses.asdict(summary))})
    if config.summary_json:
        run.write_json(config.summary_json, dataclasses.asdict(summary))
    logger.info("%s", summary.line())
    return summary


def _upkeep(config: EmbedConfig, options: dict) -> None:
    """Compact when small fragments piled up; apply the version retention when set."""
    from embedjob.ops import compact as maintain

    dataset = storage.open_lance(config.output, options)
    if maintain.piled_up(dataset):  # (the refresh holds the output's lease already)
        maintain.compact_unlocked(config.output, options, config.retain_days or 7.0,
                                  maintain.TARGET_ROWS_PER_FRAGMENT)
    elif config.retain_days is not None:
        dataset.cleanup_old_versions(older_than=dt.timedelta(days=config.retain_days))


def _staging_config(config: EmbedConfig, staging: str, options: dict) -> EmbedConfig:
    """The embed run for new/changed rows: resumes an interrupted staging table, else
    starts it over. The rejected table of a refresh lists every invalid corpus row."""
    record = read_record(staging, options)
    mode = "create" if record is not None and not record.complete else "overwrite"
    return dataclasses.replace(config, output=staging, mode=mode,
                               rejected_output=config.rejected_uri, summary_json=None)


def _upsert(output: str, staging: str, options: dict) -> None:
    """Merge-insert the staging rows into the output on ``id``; one atomic commit."""
    rows = storage.open_lance(staging, options)
    if rows.count_rows() == 0:
        return
    target = storage.open_lance(output, options)
    schema = target.schema
    reader = pa.RecordBatchReader.from_batches(
        schema, (batch.cast(schema) for batch in rows.to_batches(columns=schema.names)))
    (target.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
     .execute(reader))


def _delete_gone(output: str, options: dict, registry) -> int:
    """Delete rows whose id no valid corpus row claimed in this refresh."""
    dataset = storage.open_lance(output, options)
    gone: list = []
    for batch in dataset.to_batches(columns=["id"], batch_size=65536):
        ids = batch.column("id").to_pylist()
        gone += [i for i, seen in zip(ids, ray.get(registry.contains.remote(ids)), strict=True)
                 if not seen]
    for start in range(0, len(gone), DELETE_CHUNK_IDS):
        chunk = gone[start : start + DELETE_CHUNK_IDS]
        dataset.delete(pc.field("id").isin(chunk))
    return len(gone)
