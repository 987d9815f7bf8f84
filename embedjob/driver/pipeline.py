"""The embed job as one chain of Ray Data stages:

    read units -> tokenize (CPU) -> bucket by length -> encode (actors) -> write fragments

Each stage is one ``map_batches`` call whose resources are visible right here; the driver
(``embedjob.driver.run``) consumes the write stage's results and commits them.
"""

from __future__ import annotations

import ray
import ray.data

from embedjob.driver.preflight import RunPlan
from embedjob.stages.bucket import bucket_window
from embedjob.stages.encode import EncodeActor
from embedjob.stages.read import read_units
from embedjob.stages.tokens import tokenize_batch
from embedjob.stages.write import write_block

ARROW = "pyarrow"


def build(
    plan: RunPlan,
    registry: ray.actor.ActorHandle,
    tracker: ray.actor.ActorHandle,
    compare_with=None,
) -> ray.data.Dataset:
    """The lazy dataset whose rows are write-stage results (fragments + counts)."""
    cfg, opts = plan.config, plan.storage_options
    cpu = cfg.cpus_per_task
    items = [{"unit": u} for u in plan.units]
    units = ray.data.from_items(items, override_num_blocks=len(items))
    rows = units.map_batches(
        read_units, fn_kwargs={"spec": plan.read_spec, "tracker": tracker},
        batch_size=1, batch_format=ARROW, num_cpus=cpu,
        # its own memory reservation also keeps Ray from fusing the read into the tokenize
        # stage, which would bundle window_rows units into one read task
        memory=cfg.read_memory_bytes,
    )
    tokens = rows.map_batches(
        tokenize_batch,
        fn_kwargs={"spec": plan.spec, "task": plan.task, "storage_options": opts,
                   "registry": registry, "compare": compare_with},
        # never gather more rows than a window sorts: Ray fuses this with the bucket stage
        batch_size=min(cfg.tokenize_batch_rows, cfg.window_rows), batch_format=ARROW,
        num_cpus=cpu, compute=ray.data.TaskPoolStrategy(size=cfg.tokenize_tasks),
    )
    buckets = tokens.map_batches(
        bucket_window,
        fn_kwargs={"max_tokens": cfg.max_tokens_per_batch, "padded": not cfg.packed,
                   "overhead_tokens": cfg.overhead_tokens},
        batch_size=cfg.window_rows, batch_format=ARROW, num_cpus=cpu,
    )
    vectors = buckets.map_batches(
        EncodeActor,
        fn_constructor_kwargs={
            "model": cfg.model, "task": plan.task, "dims": plan.dims,
            "vector_dtype": cfg.vector_dtype, "packed": cfg.packed, "compile": cfg.compile,
            "use_gpu": cfg.gpus_per_actor > 0, "cpu_threads": int(cfg.cpus_per_actor),
            "storage_options": opts, "registry": registry,
        },
        batch_size=None, batch_format=ARROW,
        # Ray Data restarts a dead actor and retries its calls (its defaults: max_restarts
        # and max_task_retries -1); rows are keyed, so a retry never duplicates one
        compute=ray.data.ActorPoolStrategy(
            size=cfg.num_actors, max_tasks_in_flight_per_actor=cfg.actor_prefetch),
        num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor,
    )
    return vectors.map_batches(
        write_block,
        fn_kwargs={"output": cfg.output, "rejected_output": cfg.rejected_uri,
                   "schema": plan.schema, "storage_options": opts,
                   "replace_schema": plan.replace_schema},
        batch_size=cfg.write_batch_rows, batch_format=ARROW, num_cpus=cpu,
    )
