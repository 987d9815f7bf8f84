"""The three runs (pipeline, naive Ray Data recipe, model-only bound), the scaling runs and
``bench``, which runs them on one corpus."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedjob.bench.checkpoint import forward_flops, model_dir, peak_tflops, shape_params
from embedjob.bench.config import (
    CONFIGS,
    DRIVER_RSS_ROWS,
    FLOPS_FORMULA,
    SCALING_BLOCKS,
    UDHR_SAMPLE,
    BenchConfig,
)
from embedjob.bench.corpus import Corpus, make_corpus
from embedjob.bench.measure import RssSampler, result

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the three runs


def run_pipeline(cfg: BenchConfig, corpus: Corpus, model: str, output: str,
                 peak: float | None) -> dict[str, Any]:
    """(1) ``embedjob.driver.run.run`` end to end: wall time from planning to the final commit."""
    from embedjob.config import EmbedConfig
    from embedjob.driver.run import run

    gpu = cfg.device == "cuda"
    config = EmbedConfig(
        input=corpus.path, format="parquet", output=output, model=model, task=cfg.task,
        max_tokens_per_batch=cfg.max_tokens_per_batch, window_rows=cfg.window_rows,
        num_actors=cfg.num_actors, gpus_per_actor=1.0 if gpu else 0.0,
        cpus_per_actor=float(_actor_cpus(cfg) // (1 if gpu else cfg.num_actors) or 1),
        cpus_per_task=0.5, packed=cfg.packed, compile=cfg.compile,
        vector_dtype=cfg.vector_dtype,
        mode="overwrite",
    )
    with RssSampler() as rss:
        summary = run(config)
    lengths = _lance_column(output, "n_tokens")
    return result(tokens=summary.tokens, processed=summary.processed_tokens,
                  wall_s=summary.wall_s, rss=rss, flops=_flops(cfg, lengths), peak=peak,
                  rows=summary.rows_embedded, num_actors=cfg.num_actors,
                  threads_per_actor=int(config.cpus_per_actor))


class NaiveEncoder:
    """(2) The naive recipe's actor: raw texts in, tokenize + pad to the batch's longest row,
    one forward per ``map_batches`` call (``Embedder.encode_ids`` pads to the longest row)."""

    def __init__(self, *, model: str, task: str, device: str, threads: int) -> None:
        import torch

        from embedjob.model import load_embedder

        if device == "cpu":
            torch.set_num_threads(threads)
        self.embedder = load_embedder(model, device=device, merge_task=task)
        self.tokenizer = self.embedder.tokenizer
        self.task = task

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = self.tokenizer.tokenize(batch.column("text").to_pylist(), self.task).ids
        vectors = self.embedder.encode_ids(ids, task=self.task)  # [n, hidden], float32
        n_tokens = np.array([len(x) for x in ids], np.int32)
        return pa.table({
            "id": batch.column("id"),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)),
                                                        vectors.shape[1]),
            "n_tokens": pa.array(n_tokens),
            # the forward's padded cost, spread over its rows: rows x longest
            "processed_tokens": pa.array(np.full(len(ids), n_tokens.max(), np.int64)),
        })


def run_naive(cfg: BenchConfig, corpus: Corpus, model: str, output: str,
              peak: float | None) -> dict[str, Any]:
    """(2) read_parquet -> map_batches(32 rows, tokenize + pad + encode) -> write_lance."""
    import lance_ray
    import ray.data

    gpu = cfg.device == "cuda"
    started = time.perf_counter()
    with RssSampler() as rss:
        ds = ray.data.read_parquet(corpus.path).map_batches(
            NaiveEncoder,
            fn_constructor_kwargs={"model": model, "task": cfg.task, "device": cfg.device,
                                   "threads": _actor_cpus(cfg)},
            batch_size=cfg.naive_batch_rows, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_gpus=1 if gpu else 0, num_cpus=_actor_cpus(cfg),
        )
        lance_ray.write_lance(ds, output, mode="overwrite")
    wall_s = time.perf_counter() - started
    lengths = _lance_column(output, "n_tokens")
    processed = int(_lance_column(output, "processed_tokens").sum())
    return result(tokens=int(lengths.sum()), processed=processed, wall_s=wall_s, rss=rss,
                  flops=_flops(cfg, lengths), peak=peak, rows=len(lengths),
                  batch_rows=cfg.naive_batch_rows)


def run_model_only(cfg: BenchConfig, corpus: Corpus, model: str,
                   peak: float | None) -> dict[str, Any]:
    """(3) In a fresh process (its own peak RSS): same batches as the bucket stage, only the
    forwards timed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        record = pool.submit(_model_only, cfg, corpus, model).result()
    lengths = np.asarray(record.pop("lengths"))
    return result(flops=_flops(cfg, lengths), peak=peak, **record)


def _model_only(cfg: BenchConfig, corpus: Corpus, model: str) -> dict[str, Any]:
    import pyarrow.dataset as pds
    import torch

    from embedjob.model import load_embedder
    from embedjob.stages.batching import (
        batch_cost,
        default_overhead_tokens,
        length_order,
        plan_batches,
    )

    if cfg.device == "cpu":
        torch.set_num_threads(cfg.encoder_threads)
    embedder = load_embedder(model, device=cfg.device, merge_task=cfg.task, compile=cfg.compile)
    texts = pds.dataset(corpus.path, format="parquet").to_table(columns=["text"])
    tokenizer = embedder.tokenizer
    tokenizer.tokenize(["warm up"], cfg.task)  # loads the tokenizer: untimed
    tokenizing = time.perf_counter()
    ids = tokenizer.tokenize(texts.column("text").to_pylist(), cfg.task).ids
    tokenizing = time.perf_counter() - tokenizing
    # per window, its batches: rows sorted by length and cut as the bucket stage does; the
    # encode actor gets one window per call
    windows: list[list[list[np.ndarray]]] = []
    overhead = default_overhead_tokens(cfg.max_tokens_per_batch, cfg.device == "cuda")
    for start in range(0, len(ids), cfg.window_rows):
        window = ids[start: start + cfg.window_rows]
        order = length_order(np.array([len(x) for x in window]))
        lengths = np.array([len(window[i]) for i in order])
        windows.append([[window[i] for i in order[run.start: run.stop]]
                        for run in plan_batches(lengths, cfg.max_tokens_per_batch,
                                                not cfg.packed, overhead_tokens=overhead)])
    batches = [b for w in windows for b in w]
    # warm-up, untimed (and the compiles of one row and of several rows)
    embedder.encode_batches([batches[0][:1], batches[-1][:2]], task=cfg.task, packed=cfg.packed)
    started = time.perf_counter()
    for window_batches in windows:  # each call waits for the device once
        embedder.encode_batches(window_batches, task=cfg.task, packed=cfg.packed)
    wall_s = time.perf_counter() - started
    lengths = np.array([len(x) for x in ids])
    processed = sum(batch_cost(np.array([len(x) for x in b]), not cfg.packed) for b in batches)
    return {"tokens": int(lengths.sum()), "processed": processed, "wall_s": wall_s,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "lengths": lengths.tolist(), "batches": len(batches),
            # the CPU stage's speed beside the encoder's: tokenize tasks one actor needs
            "tokenizer_tokens_per_s": round(float(lengths.sum()) / tokenizing, 1)}


def _flops(cfg: BenchConfig, lengths: np.ndarray) -> float | None:
    if cfg.device != "cuda":
        return None
    shape = CONFIGS[cfg.shape_name]
    return forward_flops(lengths, shape, shape_params(shape))


def _lance_column(uri: str, column: str) -> np.ndarray:
    import lance

    return lance.dataset(uri).to_table(columns=[column]).column(column).to_numpy()


def _actor_cpus(cfg: BenchConfig) -> int:
    """Encoder threads, capped so an already-running Ray has a CPU left for the CPU stages."""
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cfg.encoder_threads, total - 1))


# ---------------------------------------------------------------- the whole bench


@contextmanager
def _ray(cfg: BenchConfig) -> Iterator[None]:
    """Reuse a running Ray; else start a local one with room for the CPU stages.

    The encode actor reserves ``threads`` CPUs; the read/tokenize/bucket/write tasks 0.5
    each; Ray is given threads + 2 logical CPUs so they run beside the actor. They share
    the machine's physical cores with the encoder, as the pipeline's CPU stages do.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=cfg.encoder_threads + 2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the three measurements (and scaling) on one corpus; the JSON record."""
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="embedjob-bench-"))
    try:
        model = str(model_dir(cfg.shape_name, seed=cfg.seed))
        corpus = make_corpus(workdir / "corpus", rows=cfg.corpus_rows,
                             long_fraction=cfg.long_fraction, seed=cfg.seed, files=cfg.files)
        device, peak = _device(cfg)
        logger.info("corpus %s; model %s; device %s", corpus, model, device)
        calls = {
            "pipeline": (run_pipeline, str(workdir / "pipeline.lance")),
            "naive": (run_naive, str(workdir / "naive.lance")),
            "model_only": (run_model_only,),
        }
        with _ray(cfg):
            runs = {name: _timed(name, fn, cfg, corpus, model, *out, peak)
                    if name in cfg.runs else None for name, (fn, *out) in calls.items()}
            scaling = _scaling(cfg, workdir, peak) if cfg.scaling else None
    finally:
        if cfg.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        **runs,
        "speedup": _ratio(runs["pipeline"], runs["naive"]),
        "pipeline_efficiency": _ratio(runs["pipeline"], runs["model_only"]),
        "device": device,
        "model": {"config": cfg.shape_name, **asdict(CONFIGS[cfg.shape_name]),
                  "params_nonembedding": shape_params(CONFIGS[cfg.shape_name]),
                  "flops_per_token": FLOPS_FORMULA, "peak_tflops": peak},
        "corpus": asdict(corpus) | {"seed": cfg.seed, "source": str(UDHR_SAMPLE.name)},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("workdir",)},
        **({"scaling": scaling} if scaling else {}),
    }


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """tokens/s of a over tokens/s of b (None when either was not run)."""
    if not a or not b or not b["tokens_per_s"]:
        return None
    return round(a["tokens_per_s"] / b["tokens_per_s"], 3)


def _timed(name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    logger.info("bench: running %s", name)
    record = fn(*args)
    logger.info("bench: %s %s", name, json.dumps(record))
    return record


def _scaling(cfg: BenchConfig, workdir: Path, peak: float | None) -> dict[str, Any]:
    """The pipeline with 1 and with 2 encode actors on the same corpus, in windows of
    rows / ``SCALING_BLOCKS`` so that both actors get blocks; the driver's RSS at 1x vs 10x
    rows."""
    corpus = Corpus(path=str(workdir / "corpus"), rows=cfg.corpus_rows, long_rows=0,
                    target_tokens=0)
    model = str(model_dir(cfg.shape_name, seed=cfg.seed))
    window = max(1, -(-cfg.corpus_rows // SCALING_BLOCKS))

    def with_actors(n: int) -> dict[str, Any]:
        return run_pipeline(replace(cfg, num_actors=n, window_rows=window), corpus, model,
                            str(workdir / f"pipeline-{n}.lance"), peak)

    actors = {"one_actor": with_actors(1), "two_actors": with_actors(2)}
    # driver memory: the tiny model, no long tail (the question is the driver, not the encoder)
    tiny = replace(cfg, config="tiny", long_fraction=0.0, num_actors=1)
    tiny_model = str(model_dir("tiny", seed=cfg.seed))
    driver, base = {}, max(cfg.corpus_rows, DRIVER_RSS_ROWS)
    for factor in (1, 10):
        rows = base * factor
        c = make_corpus(workdir / f"corpus-{factor}x", rows=rows, long_fraction=0.0,
                        seed=cfg.seed, files=cfg.files * factor)
        r = run_pipeline(replace(tiny, rows=rows), c, tiny_model,
                         str(workdir / f"driver-{factor}x.lance"), None)
        driver[f"{factor}x"] = {"rows": rows, "tokens": r["tokens"], "wall_s": r["wall_s"],
                                "driver_peak_rss_bytes": r["driver_peak_rss_bytes"]}
    return {**actors, "window_rows": window, "driver_rss": driver}


def _device(cfg: BenchConfig) -> tuple[str, float | None]:
    import platform

    import torch

    if cfg.device == "cuda":
        name = torch.cuda.get_device_name(0)
        return f"cuda: {name}, bf16", peak_tflops(cfg.peak_tflops, name)
    cpu = platform.processor() or platform.machine()
    return (f"cpu: {os.cpu_count()} cores ({cpu}), {cfg.encoder_threads} encoder threads, "
            "float32", None)
