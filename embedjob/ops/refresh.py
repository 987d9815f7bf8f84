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
import json
import logging
from collections.abc import Mapping

import lance
import pyarrow as pa
import pyarrow.compute as pc
import ray

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver.lease import Lease
from embedjob.driver.progress import read_record
from embedjob.errors import ConfigError
from embedjob.stages.check import OutputLookup
from embedjob.storage import Storage

logger = logging.getLogger(__name__)

DELETE_CHUNK_IDS = 1000


def stamp_mismatch(output: lance.LanceDataset, stamp: Mapping[str, str]) -> list[str]:
    """Stamp keys whose value in the output differs from this run's."""
    held = S.schema_metadata(output.schema)
    return [k for k in S.COMPATIBILITY_KEYS if held.get(k) != stamp.get(k)]


def ensure_id_index(dataset: lance.LanceDataset) -> None:
    """A BTREE index on ``id`` makes the per-batch lookups cheap; new rows are indexed
    again by ``optimize_indices`` after the upsert."""
    if not any(list(i.field_names) == [S.OUT_ID] for i in dataset.describe_indices()):
        dataset.create_scalar_index(S.OUT_ID, "BTREE")


def refresh(config: EmbedConfig, *, reporter=None):
    """Refresh ``config.output`` from ``config.input``; returns the run Summary.

    Args:
        config: The job.
        reporter: A ``driver.run.Reporter`` (the CLI's console), told how far the embed is.
    """
    from embedjob.driver import preflight, run

    storage = Storage.resolve(config.storage_options)
    if not storage.lance_exists(config.output):
        raise ConfigError(f"refresh needs an existing output; {config.output!r} does not "
                          "exist: run `embedjob embed` first")
    output = storage.open_lance(config.output)
    mismatch = stamp_mismatch(output, preflight.plan_stamp(config))
    if mismatch:
        logger.warning("stamp changed (%s): re-embedding everything as a new version of %s",
                       ", ".join(mismatch), config.output)
        return run.run(dataclasses.replace(config, mode="overwrite"), reporter=reporter)
    with Lease(output=config.output, ttl_s=config.lease_ttl_s, storage=storage):
        return _refresh(config, storage, reporter)


def _refresh(config: EmbedConfig, storage: Storage, reporter=None):
    """Under the output's lease: staging embed, upsert, delete gone ids."""
    from embedjob.driver import run

    ensure_id_index(storage.open_lance(config.output))
    output = storage.open_lance(config.output)
    lookup = OutputLookup(uri=config.output, version=output.version, storage=storage)
    staging = S.sibling_uri(config.output, "staging")
    registry = run.new_registry()
    summary = run.run(_staging_config(config, staging, storage), lookup=lookup,
                      registry=registry, reporter=reporter,
                      calibration=S.schema_metadata(output.schema).get(S.INT8_CALIBRATION))
    _upsert(config.output, staging, storage)
    deleted = 0 if config.keep_deleted else _delete_gone(config.output, storage, registry)
    storage.open_lance(config.output).optimize.optimize_indices()
    storage.remove_tree(staging)
    _upkeep(config, storage)
    final = storage.open_lance(config.output)
    # the summary is one more (empty) version: the upsert and deletes are Lance's own
    # commits, which take no transaction properties
    summary = dataclasses.replace(summary, output=config.output, rows_deleted=deleted,
                                  table_version=final.version + 1)
    from embedjob.ops import compact

    compact.carry_last_run(config.output, storage, json.dumps(dataclasses.asdict(summary)))
    if config.summary_json:
        run.write_json(config.summary_json, dataclasses.asdict(summary))
    logger.info("%s", summary.line())
    return summary


def _upkeep(config: EmbedConfig, storage: Storage) -> None:
    """Compact when small fragments piled up; apply the version retention when set."""
    from embedjob.ops import compact

    dataset = storage.open_lance(config.output)
    if compact.piled_up(dataset):  # (the refresh holds the output's lease already)
        compact.compact_unlocked(config.output, storage, config.retain_days or 7.0,
                                 compact.TARGET_ROWS_PER_FRAGMENT)
    elif config.retain_days is not None:
        dataset.cleanup_old_versions(older_than=dt.timedelta(days=config.retain_days))


def _staging_config(config: EmbedConfig, staging: str, storage: Storage) -> EmbedConfig:
    """The embed run for new/changed rows: resumes an interrupted staging table, else
    starts it over. The rejected table of a refresh lists every invalid corpus row."""
    record = read_record(staging, storage)
    mode = "create" if record is not None and not record.complete else "overwrite"
    return dataclasses.replace(config, output=staging, mode=mode,
                               rejected_output=config.rejected_uri, summary_json=None)


def _upsert(output: str, staging: str, storage: Storage) -> None:
    """Merge-insert the staging rows into the output on ``id``; one atomic commit."""
    rows = storage.open_lance(staging)
    if rows.count_rows() == 0:
        return
    target = storage.open_lance(output)
    schema = target.schema
    reader = pa.RecordBatchReader.from_batches(
        schema, (batch.cast(schema) for batch in rows.to_batches(columns=schema.names)))
    (target.merge_insert(S.OUT_ID).when_matched_update_all().when_not_matched_insert_all()
     .execute(reader))


def _delete_gone(output: str, storage: Storage, registry) -> int:
    """Delete rows whose id no valid corpus row claimed in this refresh."""
    dataset = storage.open_lance(output)
    gone: list = []
    for batch in dataset.to_batches(columns=[S.OUT_ID], batch_size=65536):
        ids = batch.column(S.OUT_ID).to_pylist()
        gone += [i for i, seen in zip(ids, ray.get(registry.contains.remote(ids)), strict=True)
                 if not seen]
    for start in range(0, len(gone), DELETE_CHUNK_IDS):
        dataset.delete(pc.field(S.OUT_ID).isin(gone[start : start + DELETE_CHUNK_IDS]))
    return len(gone)
