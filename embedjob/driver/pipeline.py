"""The embed job as one chain of Ray Data stages:

    read units -> tokenize (CPU) -> bucket by length -> encode (actors) -> hand to writers

preceded (unless ``assume_unique_ids``) by ``scan``, the duplicate-id pre-pass over the id
column of every unit (``stages.dedupe``).

Each stage is one ``map_batches`` call whose resources are visible right here, with the one
spec preflight built for it; the driver (``driver.run``) consumes the write stage's results
and commits them.
"""

from __future__ import annotations

from dataclasses import replace

import ray
import ray.data

from embedjob import schema as S
from embedjob.driver.preflight import RunPlan
from embedjob.stages.bucket import bucket_window
from embedjob.stages.dedupe import DuplicateIndex, ScanSpec, scan_ids, source_files
from embedjob.stages.diff import PART, DiffSpec, classify, input_keys, lineage_filter, output_keys
from embedjob.stages.encode import EncodeActor
from embedjob.stages.read import read_units, unit_file
from embedjob.stages.tokens import tokenize_batch
from embedjob.stages.write import write_block

ARROW = "pyarrow"


def unit_list(items: list[dict], read_tasks: int) -> ray.data.Dataset:
    """The unit rows as at most ``read_tasks`` blocks of consecutive units, in order.

    One block is one read (or scan) task, which reads its units one after another
    (``batch_size=1``: one unit per call, its rows yielded as they come). A block per unit
    cost the driver Ray Data's per-block and per-task records for every unit, in the scan
    and the main dataset both (BENCHMARKS.md: driver growth per 10x units +25% -> +10%).
    """
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), read_tasks)))


def scan(plan: RunPlan, index: DuplicateIndex) -> ray.data.Dataset:
    """The duplicate-id pre-pass: every unit's id column (finished units too, on a resume)
    into the shards of ``index``; rows are (unit, rows scanned)."""
    position = {name: i for i, name in enumerate(source_files(plan.sources))}
    units = unit_list(
        [{"unit": u, "source_index": position[unit_file(u)], "size": plan.sizes.get(unit_file(u))}
         for u in plan.sources], plan.config.read_tasks)
    return units.map_batches(
        scan_ids, fn_kwargs={"spec": ScanSpec(read=replace(plan.read, ids_only=True),
                                              index=index)},
        batch_size=1, batch_format=ARROW, num_cpus=plan.config.cpus_per_task,
    )


def build(plan: RunPlan, *, tracker: ray.actor.ActorHandle, writers: tuple = (),
          encoder: type = EncodeActor) -> ray.data.Dataset:
    """The lazy dataset whose rows are write-stage results (fragments + counters).

    Args:
        plan: The run's plan (one spec per stage; ``plan.tokenize.duplicates`` holds the
            duplicate-id shards, after ``scan``).
        tracker: The ``ReadTracker`` (rows per unit read to its end).
        writers: The ``RowWriter`` actors the write stage hands rows to.
        encoder: The encode stage's ``map_batches`` class (tests wrap ``EncodeActor``).
    """
    return embed(plan, read(plan, plan.units, tracker), writers=writers, encoder=encoder)


def read(plan: RunPlan, units: list[str], tracker: ray.actor.ActorHandle | None
         ) -> ray.data.Dataset:
    """The read stage over ``units``: rows in the read stage's block schema."""
    cfg = plan.config
    # each unit with its file's size from the listing: a read task opens it without a HEAD
    items = unit_list([{"unit": u, "size": plan.sizes.get(unit_file(u))} for u in units],
                      cfg.read_tasks)
    return items.map_batches(
        read_units, fn_kwargs={"spec": plan.read, "tracker": tracker},
        batch_size=1, batch_format=ARROW, num_cpus=cfg.cpus_per_task,
        # its own memory reservation also keeps Ray from fusing the read into the tokenize
        # stage, which would bundle window_rows units into one read task
        memory=cfg.read_memory_bytes,
    )


def embed(plan: RunPlan, rows: ray.data.Dataset, *, writers: tuple,
          encoder: type = EncodeActor) -> ray.data.Dataset:
    """tokenize -> bucket -> encode -> write over read-stage rows (a run's, or the rows a
    refresh's diff hands on)."""
    cfg, cpu = plan.config, plan.config.cpus_per_task
    min_actors, max_actors = cfg.actor_range
    tokens = rows.map_batches(
        tokenize_batch, fn_kwargs={"spec": plan.tokenize},
        # never gather more rows than a window sorts: Ray fuses this with the bucket stage
        batch_size=min(cfg.tokenize_batch_rows, cfg.window_rows), batch_format=ARROW,
        num_cpus=cpu, compute=ray.data.TaskPoolStrategy(size=cfg.tokenize_tasks),
    )
    buckets = tokens.map_batches(
        bucket_window, fn_kwargs={"spec": plan.bucket},
        batch_size=cfg.window_rows, batch_format=ARROW, num_cpus=cpu,
    )
    vectors = buckets.map_batches(
        encoder, fn_constructor_kwargs={"spec": plan.encode},
        batch_size=None, batch_format=ARROW,
        # Ray Data restarts a dead actor and retries its calls (its defaults: max_restarts
        # and max_task_retries -1); rows are keyed, so a retry never duplicates one.
        # MIN < MAX: Ray Data adds actors while the pool is busy, removes idle ones
        compute=ray.data.ActorPoolStrategy(
            min_size=min_actors, max_size=max_actors,
            max_tasks_in_flight_per_actor=cfg.actor_prefetch),
        num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor,
        resources=cfg.actor_resource_amounts or None,  # custom resources: which nodes
    )
    return vectors.map_batches(
        write_block, fn_kwargs={"spec": plan.write, "writers": writers},
        batch_size=cfg.write_batch_rows, batch_format=ARROW, num_cpus=cpu,
    )


def diff(plan: RunPlan, spec: DiffSpec, units: list[str], files: list[str],
         tracker: ray.actor.ActorHandle) -> ray.data.Dataset:
    """A refresh's one distributed diff: the dirty ``units``' rows and the output's rows
    whose lineage is one of ``files`` (pushed down to the Lance scan), hash-partitioned by
    id, classified per partition (``stages.diff``)."""
    cpu = plan.config.cpus_per_task
    sides = []
    if units:
        sides.append(read(plan, units, tracker).map_batches(
            input_keys, fn_kwargs={"spec": spec}, batch_format=ARROW, num_cpus=cpu))
    if files:
        held = ray.data.read_lance(
            spec.output, version=spec.version, filter=lineage_filter(files),
            columns=[spec.id_column, S.CONTENT_HASH, S.SOURCE_FILE, S.SOURCE_ROW],
            scanner_options={"with_row_address": True},
            storage_options=spec.storage.lance_options() or None)
        sides.append(held.map_batches(output_keys, fn_kwargs={"spec": spec},
                                      batch_format=ARROW, num_cpus=cpu))
    both = sides[0].union(*sides[1:]) if len(sides) > 1 else sides[0]
    return both.groupby(PART, num_partitions=spec.partitions).map_groups(
        classify, fn_kwargs={"spec": spec}, batch_format=ARROW, num_cpus=cpu)
