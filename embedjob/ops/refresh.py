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
from collections.abc import Iterator, Mapping

import lance
import pyarrow as pa
import pyarrow.compute as pc

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver.lease import Lease
from embedjob.driver.progress import read_record
from embedjob.errors import ConfigError
from embedjob.stages.check import DUPLICATE_ID, OutputLookup
from embedjob.stages.dedupe import DuplicateIndex
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
    if config.chunked or S.is_chunk_table(output.schema):  # not built yet (issue #17)
        raise ConfigError(f"refresh of a chunk table ({config.output!r}) is not supported yet; "
                          "rerun `embedjob embed --chunking ... --mode overwrite`")
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
    summary, index = run.run_keeping_ids(
        _staging_config(config, staging, storage), lookup=lookup,
        keep_ids=not config.keep_deleted, reporter=reporter,
        calibration=S.schema_metadata(output.schema).get(S.INT8_CALIBRATION))
    _upsert(config.output, staging, storage)
    deleted = 0 if config.keep_deleted else _delete_gone(config, storage, index)
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


def _delete_gone(config: EmbedConfig, storage: Storage, index: DuplicateIndex | None) -> int:
    """Delete rows whose id no valid corpus row has now: ids the pre-pass did not see, and
    ids whose first corpus row this refresh rejected (its text became invalid)."""
    dataset = storage.open_lance(config.output)
    before = dataset.count_rows()
    id_type = dataset.schema.field(S.OUT_ID).type
    for ids in _gone_candidates(config, storage, dataset, index):
        for start in range(0, len(ids), DELETE_CHUNK_IDS):
            dataset.delete(pc.field(S.OUT_ID).isin(ids[start : start + DELETE_CHUNK_IDS]
                                                   .cast(id_type)))
    return before - storage.open_lance(config.output).count_rows()


def _gone_candidates(config: EmbedConfig, storage: Storage, dataset: lance.LanceDataset,
                     index: DuplicateIndex | None) -> Iterator[pa.Array]:
    """Batches of ids to delete (bounded memory: one batch at a time)."""
    for batch in dataset.to_batches(columns=[S.OUT_ID], batch_size=65536):
        ids = batch.column(S.OUT_ID)
        if index is not None:  # None: assume_unique_ids, no pre-pass to ask
            yield ids.filter(pa.array(~index.contains(ids)))
    rejected = storage.open_lance(config.rejected_uri)
    invalid = pc.field(S.REJECTED_ID).is_valid() & (pc.field(S.REJECTED_REASON) != DUPLICATE_ID)
    for batch in rejected.to_batches(columns=[S.REJECTED_ID], filter=invalid,
                                     batch_size=65536):
        yield _castable(batch.column(S.REJECTED_ID), dataset.schema.field(S.OUT_ID).type)


def _castable(ids: pa.Array, id_type: pa.DataType) -> pa.Array:
    """The rejected table's string ids that are ids of the output's type."""
    if pa.types.is_string(id_type):
        return ids
    return pa.array([v for v in ids.to_pylist() if _is_type(v, id_type)], pa.string())


def _is_type(value: str, id_type: pa.DataType) -> bool:
    try:
        pa.scalar(value).cast(id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True
