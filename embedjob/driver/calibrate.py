"""The int8 columns' calibration: per-dim ranges from a fixed sample of the run, stamped.

A fresh run embeds its first ``CALIBRATION_ROWS`` valid rows (in input-unit order, the first
valid texts of the first units: the same rows on every rerun of the same input) in one Ray
task with an encode actor's resources, takes each int8 dim's per-dim min and max of the
vectors as stored, and stamps them (``schema.INT8_CALIBRATION``) before any row is
encoded. The encode actors quantize with the stamped ranges only.

Never re-calibrated silently: a resumed or appending run reads the ranges from the output's
stamp, a refresh encodes with the table's ranges, and search and eval quantize
queries with the table's. Only a stamp change (a refresh that re-embeds everything as a new
version) calibrates again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import ray

from embedjob import schema as S
from embedjob.driver.preflight import RunPlan
from embedjob.errors import ConfigError
from embedjob.stages import quantize, read
from embedjob.stages.encode import EncodeSpec

logger = logging.getLogger(__name__)

# 2048 rows: the min/max per dim of 2048 normalized vectors is stable to a few percent of the
# range (all-MiniLM-L6-v2 on the UDHR sample: 759 vs 2048 rows move lo/hi by < 0.02), and
# embedding them costs the actor's first seconds, once per fresh run.
CALIBRATION_ROWS = 2048
SAMPLE = f"the first {CALIBRATION_ROWS} valid rows of the input, in input-unit order"


def int8_dims(plan: RunPlan) -> list[int]:
    return [d for d, forms in plan.quantize.items() if "int8" in forms]


def settle(plan: RunPlan, given: str | None = None) -> RunPlan:
    """``plan`` with its int8 ranges in the stamp and the encode spec.

    Args:
        plan: The run's plan.
        given: A calibration stamp to reuse (a refresh passes its table's).

    Raises:
        ConfigError: The reused stamp lacks a range for one of the run's int8 dims.
    """
    dims = int8_dims(plan)
    if not dims:
        return plan
    record = given or _held(plan)
    if record is None:
        record = calibrate(plan, dims)
    ranges = quantize.parse_calibration(record)
    missing = [d for d in dims if d not in ranges]
    if missing:
        raise ConfigError(f"int8 dims {missing} have no stamped calibration range "
                          f"(stamped: {sorted(ranges)}); pass --mode overwrite to start over")
    schema = plan.schema.with_metadata(S.schema_metadata(plan.schema)
                                       | {S.INT8_CALIBRATION: record})
    return replace(plan, schema=schema,
                   encode=replace(plan.encode, int8_ranges={d: ranges[d] for d in dims}),
                   write=replace(plan.write, schema=schema))


def _held(plan: RunPlan) -> str | None:
    """The output's stamped calibration when this run adds to it (resume, append)."""
    if plan.recreate_output and plan.resumed is None:
        return None
    held = S.schema_metadata(plan.storage.open_lance(plan.config.output).schema)
    return held.get(S.INT8_CALIBRATION)


def calibrate(plan: RunPlan, dims: list[int]) -> str:
    """Embed the sample in one Ray task (an encode actor's resources); the stamp JSON."""
    started = time.perf_counter()
    texts = sample_texts(plan)
    if not texts:
        raise ConfigError("int8 calibration found no valid text in the input")
    cfg = plan.config
    task = ray.remote(num_gpus=cfg.gpus_per_actor, num_cpus=cfg.cpus_per_actor)(encode_sample)
    full = ray.get(task.remote(plan.encode, texts))
    ranges = {d: quantize.ranges(stored_vectors(full, d, plan.encode.vector_dtype))
              for d in dims}
    logger.info("int8 calibration on %d rows in %.1f s", len(texts),
                time.perf_counter() - started)
    return quantize.calibration_record(ranges, len(texts), SAMPLE)


def sample_texts(plan: RunPlan, limit: int = CALIBRATION_ROWS) -> list[str]:
    """The first ``limit`` valid texts of the run's units, in order."""
    texts: list[str] = []
    for unit in plan.units:
        for table in read.iter_rows(unit, plan.read):
            reasons = table.column(S.REASON).to_pylist()
            for text, reason in zip(table.column(S.TEXT).to_pylist(), reasons, strict=True):
                if reason is None and isinstance(text, str) and text.strip():
                    texts.append(text)
                    if len(texts) == limit:
                        return texts
    return texts


def stored_vectors(full: np.ndarray, dim: int, vector_dtype: str) -> np.ndarray:
    """The dim-``dim`` vectors as the float column stores them (truncated, re-normalized,
    cast): what the int8 columns are quantized from."""
    from embedjob.model import matryoshka

    vectors = full if dim == full.shape[1] else matryoshka(full, dim)
    return vectors.astype(vector_dtype)


def encode_sample(spec: EncodeSpec, texts: list[str]) -> np.ndarray:
    """On a worker: load the model as an encode actor does, embed ``texts`` (full dim)."""
    import torch

    from embedjob.model import load_embedder

    if not spec.use_gpu:
        torch.set_num_threads(max(1, spec.cpu_threads))
    embedder = load_embedder(spec.model, device="cuda" if spec.use_gpu else "cpu",
                             merge_task=spec.task, filesystem=spec.storage.fsspec(spec.model))
    return embedder.encode(texts, task=spec.task)
