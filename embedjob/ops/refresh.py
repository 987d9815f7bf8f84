"""Nightly incremental re-embedding whose cost follows the change, not the corpus.

``refresh(config)``:

1. **Skip unchanged units.** The listing's fingerprint of every input file is compared
   with the one the output's record holds (the Lance transaction properties of its last
   run or refresh, ``driver.progress``). Files whose every unit is recorded with the same
   fingerprint are not read at all. Changed and new files are *dirty*; files that vanished
   from the listing are *gone*.
2. **One distributed diff** (``stages.diff``, planned in ``driver.pipeline.diff``): the
   dirty units' rows and the output's rows whose lineage (``source_file``) is a dirty or gone
   file, hash-partitioned by id in one Ray Data pass, classified NEW, CHANGED, UNCHANGED,
   MOVED, REJECT or GONE with a fresh embed's duplicate-id rule.
3. **Only new and changed rows** (and the rejected ones, for the rejected table) go on to
   tokenize, encode and write; the write stage writes uncommitted fragments to the output
   itself. MOVED rows are copied with their new lineage (their stored vectors, not
   re-embedded).
4. **One commit**: a Lance ``Update`` holding the new fragments and the deletion vectors of
   every replaced or gone row, with the units read again (their new fingerprints), the
   tombstones of units no longer listed and the run summary as its transaction properties
   (a full record every ``REFRESH_CHECKPOINT_EVERY``-th refresh). A reader sees the
   table before or after.
   The rejected table is committed just before it the same way.
5. **Upkeep**: index deltas for indexes with many unindexed rows, compaction with
   ``lance_ray`` when small fragments piled up, version retention.

Nothing is written outside these commits, so a refresh killed at any point and rerun
starts over from the same table and ends in the same one.

A changed stamp (model weights, task, dims, instruction, vector dtype) cannot be mixed
with the old vectors: that refresh re-embeds everything as a **new version of the same
table** (an overwrite; older versions stay readable until cleaned up).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from lance.dataset import Transaction

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver.commit import commit_transaction
from embedjob.driver.lease import Lease
from embedjob.driver.stop import Stop, StopRequested, stop_on_signal
from embedjob.errors import ConfigError, RunStopped
from embedjob.stages import diff as D
from embedjob.stages.read import unit_file
from embedjob.storage import Storage
from embedjob.table.index import DISTRIBUTED_INDEX_ROWS

logger = logging.getLogger(__name__)

# an index gets a delta (``optimize_indices(num_indices_to_merge=0)``) once this many rows
# are outside it; below, a query scans them flat, which costs less than a new delta
DELTA_INDEX_ROWS = 100_000
ROWS_PER_PARTITION = 1_000_000  # the diff's id partitions: at least one per CPU


def stamp_mismatch(output: lance.LanceDataset, stamp: Mapping[str, str]) -> list[str]:
    """Stamp keys whose value in the output differs from this run's."""
    held = S.schema_metadata(output.schema)
    return [k for k in S.COMPATIBILITY_KEYS if held.get(k) != stamp.get(k)]


def id_column(schema: pa.Schema) -> str:
    """The output's id column: ``doc_id`` in a chunk table (one row per chunk), else ``id``."""
    return S.DOC_ID if S.is_chunk_table(schema) else S.OUT_ID


def ensure_indexes(dataset: lance.LanceDataset, storage: Storage) -> bool:
    """BTREE indexes on ``id`` (the diff looks up ids that unchanged units hold through it,
    one query per id partition) and on ``source_file`` (the diff's lineage scan reads only
    the dirty files' rows through it). Returns whether one was built now."""
    held = {tuple(i.field_names) for i in dataset.describe_indices()}
    missing = [c for c in (id_column(dataset.schema), S.SOURCE_FILE) if (c,) not in held]
    large = dataset.count_rows() >= DISTRIBUTED_INDEX_ROWS
    for column in missing:
        if large:  # a large table's first refresh: the index is built on Ray workers
            from lance_ray import create_scalar_index

            create_scalar_index(dataset.uri, column=column, index_type="BTREE",
                                num_workers=max(1, int(ray.cluster_resources()["CPU"])),
                                storage_options=storage.lance_options() or None)
        else:
            dataset.create_scalar_index(column, "BTREE")
    return bool(missing)


def refresh(config: EmbedConfig, *, reporter=None, encoder: type | None = None):
    """Refresh ``config.output`` from ``config.input``; returns the run Summary.

    Args:
        config: The job.
        reporter: A ``driver.run.Reporter`` (the CLI's console), told how far the embed is.
        encoder: The encode stage's class (default ``EncodeActor``; tests wrap it).
    """
    from embedjob.driver import preflight, run

    storage = Storage.resolve(config.storage_options)
    if not storage.lance_exists(config.output):
        raise ConfigError(f"refresh needs an existing output; {config.output!r} does not "
                          "exist: run `embedjob embed` first")
    output = storage.open_lance(config.output)
    held = S.schema_metadata(output.schema).get(S.CHUNKING)
    if held and config.chunking == "none":  # a forgotten flag must not unchunk the table
        raise ConfigError(f"{config.output!r} is a chunk table (chunking {held}): refresh it "
                          "with the same --chunking/--chunk-* flags, or rewrite it as a plain "
                          "table with `embedjob embed --mode overwrite`")
    mismatch = stamp_mismatch(output, preflight.plan_stamp(config))
    if mismatch:
        logger.warning("stamp changed (%s): re-embedding everything as a new version of %s",
                       ", ".join(mismatch), config.output)
        return run.run(dataclasses.replace(config, mode="overwrite"), encoder=encoder,
                       reporter=reporter)
    try:
        with stop_on_signal() as stop, Lease(output=config.output, ttl_s=config.lease_ttl_s,
                                             storage=storage):
            return _refresh(config, storage, reporter or run.Reporter(), encoder, stop)
    except StopRequested as stop:  # a signal or the node watch: before the one commit
        raise RunStopped(f"stopped by {stop}: nothing committed (a refresh commits once, at "
                         "its end); rerun the same command to resume (the lease is released, "
                         "so it starts at once)", stop.exit_code) from None


@dataclass(frozen=True, kw_only=True)
class Dirty:
    """What the listing and the output's record say must be looked at."""

    units: list[str]  # every unit of a changed or new file
    files: list[str]  # changed files and vanished ones: the output rows the diff reads
    clean: dict[str, tuple[str, tuple[int, int] | None]]  # skipped unit -> (fp, range)
    gone: list[str] = dataclasses.field(default_factory=list)  # recorded units not listed
    checkpoint: bool = True  # the commit writes the full record, not a delta


def dirty_units(sources: list[str], fingerprints: Mapping[str, str], done: Mapping[str, str],
                ranges: Mapping[str, tuple[int, int]]) -> Dirty:
    """Split the listing's units into skipped (their file and every unit of it recorded
    with the listing's fingerprint) and dirty ones; recorded files not listed are gone."""
    by_file: dict[str, list[str]] = {}
    for unit in sources:
        by_file.setdefault(unit_file(unit), []).append(unit)
    dirty: list[str] = []
    clean: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for name, units in by_file.items():
        if all(done.get(u) == fingerprints[name] for u in units):
            clean |= {u: (done[u], ranges.get(u)) for u in units}
        else:
            dirty += units
    gone = {unit_file(u) for u in done} - set(by_file)
    files = sorted(gone | {unit_file(u) for u in dirty} & {unit_file(u) for u in done})
    return Dirty(units=dirty, files=files, clean=clean, gone=sorted(set(done) - set(sources)))


def _refresh(config: EmbedConfig, storage: Storage, reporter, encoder: type | None,
             stop: Stop):
    """Under the output's lease: plan, diff, embed, one commit, upkeep."""
    from embedjob.driver import calibrate, preflight, progress, run

    started = time.monotonic()
    plan = preflight.plan_run(dataclasses.replace(config, mode="append"))
    run.start_ray(config, reporter, stop)
    output = storage.open_lance(config.output)
    plan = calibrate.settle(plan, S.schema_metadata(output.schema).get(S.INT8_CALIBRATION))
    if ensure_indexes(output, storage):
        output = storage.open_lance(config.output)
    walk = progress.walk_units(output)
    # a pruned history (no full record left) is read whole: the diff keeps it correct
    done, ranges = (walk.done, walk.ranges) if walk.based else ({}, {})
    dirty = dataclasses.replace(
        dirty_units(plan.sources, plan.fingerprints, done, ranges),
        checkpoint=not walk.based or walk.deltas + 1 >= S.REFRESH_CHECKPOINT_EVERY)
    logger.info("refresh: %d of %d units unchanged (not read), %d to diff; %d files' output "
                "rows to compare", len(dirty.clean), len(plan.sources), len(dirty.units),
                len(dirty.files))
    reporter.started(plan)
    spec = _diff_spec(plan, output, storage)
    with stop.waiting():  # nothing is committed until ``_commit``: a stop may break in here
        work = _diff_and_embed(plan, spec, dirty, encoder)
    reporter.finished()
    summary = _commit(plan, spec, dirty, work, started)
    _upkeep(config, storage, output.count_rows() > 0)
    if config.summary_json:
        run.write_json(config.summary_json, dataclasses.asdict(summary))
    logger.info("%s", summary.line())
    return summary


def _diff_spec(plan, output: lance.LanceDataset, storage: Storage) -> D.DiffSpec:
    from embedjob.stages.dedupe import source_files

    cpus = int(ray.cluster_resources().get("CPU", 1))
    partitions = max(cpus, output.count_rows() // ROWS_PER_PARTITION)
    return D.DiffSpec(output=plan.config.output, version=output.version,
                      read_schema=plan.read.schema(),
                      positions={f: i for i, f in enumerate(source_files(plan.sources))},
                      partitions=partitions, keep_deleted=plan.config.keep_deleted,
                      storage=storage, id_column=id_column(output.schema))


@dataclass
class Work:
    """What the diff and the embed produced, before the commit."""

    kinds: dict[int, int] = field(default_factory=dict)  # Kind -> rows
    rows_read: int = 0
    counts: S.Counts = field(default_factory=S.Counts)
    main: list = field(default_factory=list)  # new fragments (embedded and moved rows)
    rejected: list = field(default_factory=list)
    deleted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # row addrs
    held_losers: list[tuple[str, int]] = field(default_factory=list)  # (source, row)
    read: dict = field(default_factory=dict)  # unit -> (rows, key range) of the dirty units


def _diff_and_embed(plan, spec: D.DiffSpec, dirty: Dirty, encoder: type | None) -> Work:
    """The diff (materialized: it holds only dirty units' rows), then the embed of the rows
    it hands on, the copies of moved rows, and the addresses of the rows to delete."""
    from embedjob.driver import pipeline, progress
    from embedjob.stages.encode import EncodeActor
    from embedjob.stages.write import WriterPool, load_fragments

    work = Work()
    if not dirty.units and not dirty.files:
        return work
    tracker = progress.ReadTracker.remote()
    diffed = pipeline.diff(plan, spec, dirty.units, dirty.files, tracker).materialize()
    work.read = ray.get(tracker.take.remote())
    names = [D.KIND, D.ADDR, D.HELD, D.SIDE, S.SOURCE, S.ROW]
    blocks = [b.select(names) for b in ray.get(diffed.select_columns(names).to_arrow_refs())]
    if not blocks or not sum(b.num_rows for b in blocks):
        return work
    table = pa.concat_tables(blocks)
    _tally(work, table)
    rows = diffed.map_batches(D.to_tokenize, fn_kwargs={"spec": spec}, batch_format="pyarrow")
    pool = WriterPool.create(plan.write, plan.config.writer_count)
    for result in pipeline.embed(plan, rows, writers=pool.actors,
                                 encoder=encoder or EncodeActor).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        work.counts.add(result)
    for result in pool.flush():  # the writers' fragments (their counters came above)
        for pickled in result.column("main_fragments").to_pylist():
            work.main += load_fragments(pickled)
        for pickled in result.column("rejected_fragments").to_pylist():
            work.rejected += load_fragments(pickled)
    if work.kinds.get(D.Kind.MOVED):
        moved = diffed.filter(expr=f"{D.KIND} == {int(D.Kind.MOVED)}").map_batches(  # (chunks too)
            D.copy_moved, fn_kwargs={"spec": spec, "schema": plan.schema},
            batch_size=plan.config.write_batch_rows, batch_format="pyarrow")
        for batch in moved.iter_batches(batch_size=None, batch_format="pyarrow"):
            work.main += load_fragments(batch.column("fragment").to_pylist())
    return work


def _tally(work: Work, table: pa.Table) -> None:
    """Counts per kind, the rows read, the addresses to delete, the held losers."""
    kinds = table.column(D.KIND).to_numpy(zero_copy_only=False)
    work.kinds = {int(k): int(n) for k, n in zip(*np.unique(kinds, return_counts=True),
                                                 strict=True)}
    work.rows_read = int(pc.sum(pc.and_(pc.equal(table.column(D.SIDE), D.INPUT),
                                        pc.invert(table.column(D.HELD)))).as_py() or 0)
    addrs = table.column(D.ADDR)
    replaced = pc.and_(addrs.is_valid(), pc.invert(pc.equal(table.column(D.KIND),
                                                            int(D.Kind.UNCHANGED))))
    work.deleted = np.unique(addrs.filter(replaced).to_numpy(zero_copy_only=False)
                             .astype(np.uint64))
    losers = table.filter(pc.and_(table.column(D.HELD), pc.equal(table.column(D.KIND),
                                                                 int(D.Kind.REJECT))))
    work.held_losers = list(zip(losers.column(S.SOURCE).to_pylist(),
                                losers.column(S.ROW).to_pylist(), strict=True))


def _deletions(spec: D.DiffSpec, addrs: np.ndarray, cpus: float) -> tuple[list[int], list]:
    """Deletion vectors of every output fragment holding a row at ``addrs``, one Ray task
    per fragment: (ids of fragments left empty, updated fragment metadata)."""
    if addrs.size == 0:
        return [], []
    fragments = addrs >> np.uint64(32)
    task = ray.remote(num_cpus=cpus)(D.delete_rows)
    ids = [int(f) for f in np.unique(fragments)]
    refs = [task.remote(f, addrs[fragments == f], spec=spec) for f in ids]
    removed, updated = [], []
    for fragment_id, blob in zip(ids, ray.get(refs), strict=True):
        metadata = pickle.loads(blob)
        if metadata is None:
            removed.append(fragment_id)
        else:
            updated.append(metadata)
    return removed, updated


def _commit(plan, spec: D.DiffSpec, dirty: Dirty, work: Work, started: float):
    """The rejected table's commit, then the output's one commit (rows, deletions, the
    record of the units it read again, tombstones, the summary as its transaction
    properties; every ``REFRESH_CHECKPOINT_EVERY``-th refresh records every unit)."""
    from embedjob.driver import progress

    cfg, storage = plan.config, plan.storage
    # new files too: a rerun after a crash between the two commits replaces their rows
    replaced = sorted(set(dirty.files) | {unit_file(u) for u in dirty.units})
    _commit_rejected(cfg.rejected_uri, storage, replaced, work)
    removed, updated = _deletions(spec, work.deleted, cfg.cpus_per_task)
    summary = _summary(plan, spec, work, time.monotonic() - started)
    # a delta records only the units read again plus tombstones; a checkpoint records all
    finished = dict(dirty.clean) if dirty.checkpoint else {}
    for unit in dirty.units:
        rows_and_range = work.read.get(unit, (0, None))
        finished[unit] = (plan.fingerprints[unit_file(unit)], rows_and_range[1])
    properties = progress.commit_properties(plan.run_key, finished, first=dirty.checkpoint,
                                            last_run=json.dumps(dataclasses.asdict(summary)),
                                            gone=None if dirty.checkpoint else dirty.gone)
    operation = lance.LanceOperation.Update(removed_fragment_ids=removed,
                                            updated_fragments=updated,
                                            new_fragments=work.main)
    commit_output(cfg.output, storage, Transaction(read_version=spec.version,
                                                   operation=operation,
                                                   transaction_properties=properties))
    return summary


def commit_output(uri: str, storage: Storage, transaction: Transaction) -> None:
    """The refresh's one commit of the output (a seam the kill-point tests wait at)."""
    commit_transaction(uri, transaction, storage)


def _commit_rejected(uri: str, storage: Storage, files: list[str], work: Work) -> None:
    """Replace the rejected rows of ``files`` (every file read, and the vanished ones) and
    of unchanged rows that lost their id now with this refresh's, in one commit. Rerun
    after a crash before the output's commit, it replaces them again: the same end state."""
    terms = [pc.field(S.REJECTED_SOURCE).isin(files)] if files else []
    terms += [(pc.field(S.REJECTED_SOURCE) == s) & (pc.field(S.REJECTED_ROW) == r)
              for s, r in work.held_losers]
    if not terms and not work.rejected:
        return
    dataset = storage.open_lance(uri)
    removed, updated = [], []
    if terms:
        predicate = terms[0]
        for term in terms[1:]:
            predicate = predicate | term
        removed, updated = _delete_where(dataset, predicate)
    operation = lance.LanceOperation.Update(removed_fragment_ids=removed,
                                            updated_fragments=updated,
                                            new_fragments=work.rejected)
    commit_transaction(uri, Transaction(read_version=dataset.version, operation=operation),
                       storage)


def _delete_where(dataset: lance.LanceDataset, predicate: pc.Expression
                  ) -> tuple[list[int], list]:
    """Deletion vectors of the fragments with rows matching ``predicate`` (the rejected
    table is small: it is scanned)."""
    hits = dataset.to_table(columns=[], filter=predicate, with_row_address=True)
    addrs = hits.column("_rowaddr").to_numpy()
    removed, updated = [], []
    for fragment_id in np.unique(addrs >> np.uint64(32)):
        mine = addrs[(addrs >> np.uint64(32)) == fragment_id]
        listed = ",".join(str(int(a)) for a in mine)
        metadata = dataset.get_fragment(int(fragment_id)).delete(f"_rowaddr IN ({listed})")
        if metadata is None:
            removed.append(int(fragment_id))
        else:
            updated.append(metadata)
    return removed, updated


def _summary(plan, spec: D.DiffSpec, work: Work, wall_s: float):
    from embedjob.driver.run import Summary

    counts, kinds = work.counts, work.kinds
    before = plan.storage.open_lance(spec.output, version=spec.version).count_rows()
    # a chunk table's rows are chunks (rows_embedded counts documents): unchanged = chunk rows
    written = counts.chunks_embedded if plan.config.chunked else counts.rows_embedded
    after = before - int(work.deleted.size) + written + kinds.get(D.Kind.MOVED, 0)
    values = counts.counters() | {"rows_unchanged": after - written,
                                  "rows_changed": kinds.get(D.Kind.CHANGED, 0)}
    return Summary(
        **values, output=spec.output, rejected_output=plan.config.rejected_uri,
        table_version=spec.version + 1, rows_read=work.rows_read,
        rows_new=kinds.get(D.Kind.NEW, 0), rows_deleted=kinds.get(D.Kind.GONE, 0),
        resumed_units_done=0,
        padding_efficiency=counts.tokens / counts.processed_tokens if counts.processed_tokens
        else 1.0,
        tokens_per_s=counts.tokens / wall_s if wall_s > 0 else 0.0,
        wall_s=round(wall_s, 3), commits=1, task=plan.task, dims=list(plan.dims))


def _upkeep(config: EmbedConfig, storage: Storage, has_rows: bool) -> None:
    """Index deltas, compaction when small fragments piled up, version retention."""
    from embedjob.ops import compact

    dataset = storage.open_lance(config.output)
    stale = [i.name for i in dataset.describe_indices()
             if dataset.stats.index_stats(i.name).get("num_unindexed_rows", 0)
             >= DELTA_INDEX_ROWS]
    if stale and has_rows:  # a delta per index: nothing already indexed is rewritten
        dataset.optimize.optimize_indices(num_indices_to_merge=0, index_names=stale)
    if compact.piled_up(storage.open_lance(config.output)):  # (under the lease already)
        compact.compact_unlocked(config.output, storage, config.retain_days or 7.0,
                                 compact.TARGET_ROWS_PER_FRAGMENT)
    elif config.retain_days is not None:
        storage.open_lance(config.output).cleanup_old_versions(
            older_than=dt.timedelta(days=config.retain_days))
