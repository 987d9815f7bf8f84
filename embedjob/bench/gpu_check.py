"""``./dev gpu-check``: every GPU figure the project claims, by one command on a bare GPU machine.

Steps, in order, inside one time budget (default 420 s) that the check enforces itself:

1. ``tests``: the GPU test tier (``pytest -m gpu tests/gpu``) in a subprocess;
2. ``model_only``: the full jina-v3 shape (random weights, loaded in bf16 through
   ``load_embedder``) on the bucket stage's batches, padded and varlen-packed, on the bench
   corpus's length mix and on fixed ~512-token texts: tokens/s and MFU;
3. ``actor``: the encode stage's ``EncodeActor`` (the class the pipeline runs) called block by
   block with a feeding thread, no Ray, against ``model_only`` on the same blocks;
4. ``sentence_transformers``: its ``encode`` (batch 32 and 128, its own length sorting) on an
   XLM-R-shaped random checkpoint (the same trunk shape) beside embedjob's generic path on the
   same texts, with the ratio and the cosine between their vectors.

Each measurement runs whole windows (``window_rows`` rows sorted and cut as the bucket stage
does; each window has the corpus's length mix) over a tokenized pool, cycling, until its time
slot is spent. Slots shrink when the budget runs short, and a step that no longer fits is cut;
the JSON's ``cut`` says what was cut. The last line printed is one JSON object, also written to
``--out``. ``--smoke`` runs every step on the CPU with the tiny shape in seconds (the default
test suite runs it so the check cannot rot).

Nothing here imports Ray, Lance or s3fs: the GPU machines have none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedjob.bench.checkpoint import (
    forward_flops,
    model_dir,
    peak_tflops,
    shape_params,
    st_model_dir,
)
from embedjob.bench.config import CONFIGS, FLOPS_FORMULA, LONG_TOKENS, MEDIAN_TOKENS, P90_TOKENS
from embedjob.bench.corpus import corpus_texts, target_lengths

logger = logging.getLogger("embedjob.gpu_check")

REPO = Path(__file__).resolve().parents[2]
TASK = "retrieval.passage"
FIXED_TEXT_TOKENS = 501  # + the task prefix and <s> </s>: ~512 tokens a row (tokenized)
ST_BATCH_SIZES = (32, 128)
# A step's fixed costs beyond its measurements (checkpoint writes, loads), full shape on an
# H200-class machine: estimates to keep in reserve, refined by the first run there.
ST_SETUP_S = {"gpu": 60.0, "smoke": 3.0}
FINISH_S = 5.0


@dataclass(frozen=True, kw_only=True)
class Settings:
    """One gpu-check run (``settings`` builds it from the flags)."""

    smoke: bool
    budget_s: float
    out: Path
    device: str  # "cuda" or "cpu"
    shape: str  # CONFIGS key
    window_rows: int  # rows sorted together by length, one encode call each
    pool_windows: int  # windows tokenized per corpus (measurements cycle over them)
    long_fraction: float
    slot_s: float  # nominal seconds per measurement
    min_slot_s: float  # below this a measurement is cut
    tests_timeout_s: float
    max_tokens_per_batch: int = 16384
    seed: int = 0
    peak_tflops: float | None = None

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else "gpu"


def settings(smoke: bool, budget_s: float, out: Path, peak: float | None = None) -> Settings:
    """GPU: the full shape, 16384-row windows (the pipeline's default), 1% near 8k tokens.
    Smoke (CPU): the tiny shape, one 16-row window, no 8k rows, one window per measurement
    (seconds on 2 cores)."""
    scale = budget_s / 420.0
    if smoke:
        return Settings(smoke=True, budget_s=budget_s, out=out, device="cpu", shape="tiny",
                        window_rows=16, pool_windows=1, long_fraction=0.0, slot_s=0.05,
                        min_slot_s=0.05, tests_timeout_s=min(120.0, budget_s / 2),
                        peak_tflops=peak)
    return Settings(smoke=False, budget_s=budget_s, out=out, device="cuda", shape="full",
                    window_rows=16384, pool_windows=3, long_fraction=0.01,
                    slot_s=15.0 * scale, min_slot_s=2.0, tests_timeout_s=150.0 * scale,
                    peak_tflops=peak)


# ---------------------------------------------------------------- the budget


class Budget:
    """Seconds left of the run's budget; what was cut to stay inside it."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.started = time.monotonic()
        self.cut: list[str] = []

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.started)

    def slot(self, what: str, nominal: float, minimum: float, measurements_left: int,
             reserve_s: float) -> float:
        """This measurement's share: ``nominal``, or less when the measurements still to run
        would not fit; 0 (cut, and said so) below ``minimum``."""
        share = (self.left() - reserve_s) / max(1, measurements_left)
        slot = min(nominal, share)
        if slot < minimum:
            self.cut.append(f"{what}: not run ({self.left():.0f} s left of the budget)")
            return 0.0
        if slot < nominal:
            self.cut.append(f"{what}: {slot:.1f} s instead of {nominal:.1f} s")
        return slot


# ---------------------------------------------------------------- corpora and windows


@dataclass(frozen=True)
class Window:
    """``window_rows`` rows as the bucket stage leaves them: sorted by length, cut into
    token-budget batches (``padded`` and ``packed`` plans of the same rows)."""

    ids: list[np.ndarray]  # int32 token ids per row, ascending length
    texts: list[str]  # the same rows' raw texts (no prefix)
    padded: list[range]
    packed: list[range]

    @property
    def tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], np.int64)

    def batches(self, packed: bool) -> list[list[np.ndarray]]:
        return [self.ids[r.start:r.stop] for r in (self.packed if packed else self.padded)]


def make_windows(cfg: Settings, lengths: np.ndarray, tokenize: Callable[[list[str]], list],
                 overhead: int) -> list[Window]:
    """Texts of ``lengths`` tokens, tokenized by the model's tokenizer, cut into windows."""
    from embedjob.stages.batching import length_order

    texts = corpus_texts(lengths, cfg.seed)
    windows = []
    for start in range(0, len(texts), cfg.window_rows):
        chunk = texts[start:start + cfg.window_rows]
        ids = tokenize(chunk)
        order = length_order(np.array([len(x) for x in ids]))
        windows.append(planned([ids[i] for i in order], [chunk[i] for i in order], cfg,
                               overhead))
    return windows


def planned(ids: list[np.ndarray], texts: list[str], cfg: Settings, overhead: int) -> Window:
    """Rows sorted by length, cut as the bucket stage cuts them (``batching.plan_batches``)."""
    from embedjob.stages.batching import plan_batches

    lengths = np.array([len(x) for x in ids])
    return Window(ids=ids, texts=texts,
                  padded=plan_batches(lengths, cfg.max_tokens_per_batch, True,
                                      overhead_tokens=overhead),
                  packed=plan_batches(lengths, cfg.max_tokens_per_batch, False))


def sample(window: Window, cfg: Settings, overhead: int) -> Window:
    """A warm-up window: its 32 shortest and 2 longest rows (the kernels of both ends)."""
    keep = sorted(set(range(min(32, len(window.ids)))) | set(range(len(window.ids))[-2:]))
    return planned([window.ids[i] for i in keep], [window.texts[i] for i in keep], cfg,
                   overhead)


def corpus_lengths(cfg: Settings) -> dict[str, np.ndarray]:
    """Text-token lengths of the two corpora: the bench mix and fixed ~512-token texts."""
    rows = cfg.window_rows * cfg.pool_windows
    # one window fewer of fixed texts: a window of them already holds 3x a mix window's tokens
    fixed_rows = cfg.window_rows * max(1, cfg.pool_windows - 1)
    return {"mix": target_lengths(rows, cfg.long_fraction, cfg.seed),
            "fixed512": np.full(fixed_rows, FIXED_TEXT_TOKENS, np.int64)}


# ---------------------------------------------------------------- timing


@dataclass
class Timed:
    """Windows run by one measurement and how long they took."""

    windows: list[Window]
    wall_s: float
    peak_mem: int | None


def run_for(slot_s: float, windows: list[Window], step: Callable[[Window], None],
            device: str) -> Timed:
    """``step`` over ``windows`` (cycling) until ``slot_s`` is spent; at least one window."""
    _reset_peak(device)
    done: list[Window] = []
    started = time.perf_counter()
    while not done or time.perf_counter() - started < slot_s:
        window = windows[len(done) % len(windows)]
        step(window)
        done.append(window)
    wall_s = time.perf_counter() - started
    return Timed(done, wall_s, _peak(device))


def figures(timed: Timed, cfg: Settings, params: int | None, peak: float | None,
            packed: bool | None) -> dict[str, Any]:
    """tokens/s, MFU (useful FLOPs: padding not counted), padding efficiency, sizes."""
    lengths = np.concatenate([w.lengths() for w in timed.windows])
    tokens = int(lengths.sum())
    out: dict[str, Any] = {
        "windows": len(timed.windows), "rows": int(len(lengths)), "tokens": tokens,
        "wall_s": round(timed.wall_s, 6), "tokens_per_s": round(tokens / timed.wall_s, 1),
    }
    if packed is not None:
        batches = [b for w in timed.windows for b in w.batches(packed)]
        processed = sum(sum(map(len, b)) if packed else len(b) * max(map(len, b))
                        for b in batches)
        out |= {"batches": len(batches), "padding_efficiency": round(tokens / processed, 4)}
    if params is not None:
        flops = forward_flops(lengths, CONFIGS[cfg.shape], params)
        out["tflops_per_s"] = round(flops / timed.wall_s / 1e12, 3)
        out["mfu"] = round(flops / timed.wall_s / (peak * 1e12), 4) if peak else None
    out["peak_gpu_mem_bytes"] = timed.peak_mem
    return out


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())


# ---------------------------------------------------------------- step 1: the GPU test tier


def run_tests(timeout_s: float) -> dict[str, Any]:
    """``python -m pytest -m gpu tests/gpu`` with this interpreter; counts from its summary."""
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed here (./dev gpu-wheels ships it)"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/gpu"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return {"rc": None, "timed_out_after_s": round(timeout_s, 1),
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    output = done.stdout + done.stderr
    if done.returncode not in (0, 5):  # 5: nothing collected
        sys.stderr.write(output[-6000:])
    counts = {k: int(n) for n, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", output.splitlines()[-1]
        if output.strip() else "")}
    return {"rc": done.returncode, **counts, "wall_s": round(time.perf_counter() - started, 1),
            "summary": output.strip().splitlines()[-1] if output.strip() else ""}


# ---------------------------------------------------------------- steps 2 and 3


def load_actor(cfg: Settings) -> tuple[Any, float]:
    """The encode stage's actor on the random full-shape checkpoint (written once, cached):
    its embedder is model-only's too, so the model loads once. Returns (actor, load_s)."""
    from embedjob.stages.encode import EncodeActor, EncodeSpec

    started = time.perf_counter()
    path = str(model_dir(cfg.shape, seed=cfg.seed))
    written = time.perf_counter() - started
    hidden = CONFIGS[cfg.shape].hidden
    actor = EncodeActor(EncodeSpec(model=path, task=TASK, dims=(hidden,),
                                   use_gpu=cfg.device == "cuda",
                                   cpu_threads=os.cpu_count() or 1))
    logger.info("model: checkpoint ready in %.1f s, actor loaded in %.1f s (%s)", written,
                time.perf_counter() - started - written, actor.embedder.dtype)
    return actor, time.perf_counter() - started


def measure_model_only(cfg: Settings, budget: Budget, embedder: Any, windows: list[Window],
                       name: str, packed: bool, left: int, reserve: float,
                       params: int, peak: float | None) -> dict[str, Any] | None:
    """``Embedder.encode_batches`` per window: every forward, one wait for the device."""
    slot = budget.slot(f"model_only.{name}", cfg.slot_s, cfg.min_slot_s, left, reserve)
    if not slot:
        return None
    first = windows[0].batches(packed)
    embedder.encode_batches([first[0][:1], first[-1][:2]], task=TASK, packed=packed)  # warm-up

    def step(window: Window) -> None:
        embedder.encode_batches(window.batches(packed), task=TASK, packed=packed)

    record = figures(run_for(slot, windows, step, cfg.device), cfg, params, peak, packed)
    logger.info("model_only.%s: %s", name, json.dumps(record))
    return record


def block_table(window: Window, packed: bool, base: int) -> Any:
    """The encode stage's input block for ``window``: the bucket stage's columns (ids, status,
    reason, token ids, batch numbers), rows already in batch order."""
    import pyarrow as pa

    from embedjob import schema as S
    from embedjob.schema import Status

    n = len(window.ids)
    batch_of = np.empty(n, np.int64)
    for index, run in enumerate(window.packed if packed else window.padded):
        batch_of[run.start:run.stop] = base + index
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum([len(x) for x in window.ids], out=offsets[1:])
    input_ids = pa.ListArray.from_arrays(pa.array(offsets),
                                         pa.array(np.concatenate(window.ids), pa.int32()))
    return pa.table({
        S.ID: pa.array(np.arange(base, base + n), pa.int64()),
        S.STATUS: S.status_array([Status.EMBED] * n),
        S.REASON: pa.array([None] * n, pa.string()),
        S.INPUT_IDS: input_ids,
        S.BATCH: pa.array(batch_of, pa.int64()),
    })


def measure_actor(cfg: Settings, budget: Budget, actor: Any, windows: list[Window],
                  packed: bool, left: int, reserve: float, params: int,
                  peak: float | None, overhead: int) -> dict[str, Any] | None:
    """``EncodeActor.__call__`` per block, blocks built ahead by a feeding thread (two queued,
    the pipeline's default ``--actor-prefetch``), as Ray Data would hand them over."""
    from embedjob import schema as S

    name = "packed" if packed else "padded"
    slot = budget.slot(f"actor.{name}", cfg.slot_s, cfg.min_slot_s, left, reserve)
    if not slot:
        return None
    # The pipeline builds one actor per spec; here one actor serves both modes (its spec is
    # read at each call), so the full model loads once.
    actor.spec = dataclasses.replace(actor.spec, packed=packed)
    warm = sample(windows[0], cfg, overhead)
    got = actor(block_table(warm, packed, 0))  # warm-up, and a one-to-one check
    if got.num_rows != len(warm.ids) or got.column(S.VECTOR).null_count:
        raise RuntimeError(f"actor returned {got.num_rows} rows for {len(warm.ids)}")
    # the stored vectors (rows in the block's order) against model-only's on the same batches
    stored = got.column(S.VECTOR).combine_chunks().flatten().to_numpy().reshape(
        got.num_rows, -1)  # [rows, hidden] float32
    bound = np.concatenate(actor.embedder.encode_batches(warm.batches(packed), task=TASK,
                                                         packed=packed))
    max_diff = float(np.abs(stored - bound).max())
    with _feeder(windows, packed) as blocks:

        def step(window: Window) -> None:
            table = blocks.get()
            if actor(table).num_rows != len(window.ids):
                raise RuntimeError("actor output rows != input rows")

        record = figures(run_for(slot, windows, step, cfg.device), cfg, params, peak, packed)
    record["max_abs_diff_vs_model_only"] = round(max_diff, 7)
    logger.info("actor.%s: %s", name, json.dumps(record))
    return record


@dataclass
class _Blocks:
    queue: queue.Queue
    stop: threading.Event

    def get(self) -> Any:
        item = self.queue.get(timeout=600)
        if isinstance(item, BaseException):
            raise item
        return item


class _feeder:  # noqa: N801 (a context manager used like a function)
    """A thread that builds the blocks of ``windows`` (cycling) into a 2-deep queue."""

    def __init__(self, windows: list[Window], packed: bool) -> None:
        self.blocks = _Blocks(queue.Queue(maxsize=2), threading.Event())
        self.thread = threading.Thread(target=self._feed, args=(windows, packed), daemon=True)

    def _feed(self, windows: list[Window], packed: bool) -> None:
        i = 0
        try:
            while not self.blocks.stop.is_set():
                table = block_table(windows[i % len(windows)], packed, (i + 1) << 20)
                while not self.blocks.stop.is_set():
                    try:
                        self.blocks.queue.put(table, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                i += 1
        except BaseException as exc:  # handed to the consumer, which raises it
            self.blocks.queue.put(exc)

    def __enter__(self) -> _Blocks:
        self.thread.start()
        while self.blocks.queue.qsize() < 2 and self.thread.is_alive():
            time.sleep(0.01)  # the pipeline's prefetch is full when the actor starts
        return self.blocks

    def __exit__(self, *exc: object) -> None:
        self.blocks.stop.set()
        self.thread.join(timeout=10)


# ---------------------------------------------------------------- step 4: sentence-transformers


def measure_st(cfg: Settings, budget: Budget, lengths: np.ndarray,
               peak: float | None) -> dict[str, Any]:
    """sentence-transformers ``encode`` vs embedjob's generic path on an XLM-R-shaped random
    checkpoint, same texts (one window per call, each sorted by length by the encoder)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return {"skipped": "sentence_transformers is not installed here"}
    import torch
    from sentence_transformers import SentenceTransformer

    from embedjob.model import load_embedder
    from embedjob.stages.batching import default_overhead_tokens

    started = time.perf_counter()
    path = str(st_model_dir(cfg.shape, seed=cfg.seed))
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    st = SentenceTransformer(path, device=cfg.device, model_kwargs={"dtype": dtype},
                             local_files_only=True)
    ours = load_embedder(path, device=cfg.device)
    overhead = default_overhead_tokens(cfg.max_tokens_per_batch, cfg.device == "cuda")
    windows = make_windows(cfg, lengths, lambda t: ours.tokenizer.tokenize(t).ids, overhead)
    record: dict[str, Any] = {"setup_s": round(time.perf_counter() - started, 1),
                              "checkpoint": "XLMRobertaModel " + _shape_text(cfg.shape)}
    params = shape_params(CONFIGS[cfg.shape])  # the same trunk shape as jina-v3's
    warm = sample(windows[0], cfg, overhead)  # warm-up both, and compare their vectors
    st_vectors = st.encode(warm.texts, batch_size=ST_BATCH_SIZES[0], normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    our_vectors = np.concatenate(ours.encode_batches(warm.batches(False)))
    record["min_cosine_vs_embedjob"] = round(float(np.min(np.sum(
        st_vectors.astype(np.float32) * our_vectors, axis=1))), 5)
    runs: list[tuple[str, Callable[[Window], None]]] = [
        (f"batch_{bs}", _st_step(st, bs)) for bs in ST_BATCH_SIZES]
    runs.append(("embedjob_generic_padded",
                 lambda w: ours.encode_batches(w.batches(False))))
    for i, (name, step) in enumerate(runs):
        slot = budget.slot(f"sentence_transformers.{name}", cfg.slot_s, cfg.min_slot_s,
                           len(runs) - i, FINISH_S)
        if slot:
            record[name] = figures(run_for(slot, windows, step, cfg.device), cfg, params,
                                   peak, None)
            logger.info("sentence_transformers.%s: %s", name, json.dumps(record[name]))
    ours_tps = (record.get("embedjob_generic_padded") or {}).get("tokens_per_s")
    for bs in ST_BATCH_SIZES:
        theirs = (record.get(f"batch_{bs}") or {}).get("tokens_per_s")
        record[f"ratio_embedjob_vs_batch_{bs}"] = (round(ours_tps / theirs, 3)
                                                   if ours_tps and theirs else None)
    return record


def _st_step(st: Any, batch_size: int) -> Callable[[Window], None]:
    def step(window: Window) -> None:
        st.encode(window.texts, batch_size=batch_size, normalize_embeddings=True,
                  convert_to_numpy=True, show_progress_bar=False)
    return step


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the whole check


def environment(cfg: Settings) -> dict[str, Any]:
    """Card, driver, versions, the peak the MFU figures use."""
    import torch

    from embedjob.model.attention import has_fused_varlen

    card = torch.cuda.get_device_name(0) if cfg.device == "cuda" else None
    peak = peak_tflops(cfg.peak_tflops, card) if card else None
    versions = {name: _version(name) for name in (
        "torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "pyarrow",
        "sentence_transformers", "pytest")}
    fused = bool(card) and has_fused_varlen(torch.device("cuda"), torch.bfloat16)
    return {
        "card": card, "driver": _driver() if card else None,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "peak_bf16_tflops": peak,
        "peak_source": ("--peak-tflops" if cfg.peak_tflops else "name table" if peak
                        else "unknown card: pass --peak-tflops" if card else None),
        "fused_varlen": fused, **versions,
    }


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(__import__(module).__version__)
    except Exception as exc:  # a broken install: say so rather than fail the check
        return f"unimportable: {type(exc).__name__}: {exc}"


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _shape_text(shape: str) -> str:
    s = CONFIGS[shape]
    return f"{s.layers} x {s.hidden}, {s.heads} heads, ffn {s.ffn}"


def check(cfg: Settings) -> dict[str, Any]:
    """Every step inside the budget; the JSON record (errors are recorded, not raised)."""
    budget = Budget(cfg.budget_s)
    env = environment(cfg)
    peak = env["peak_bf16_tflops"]
    record: dict[str, Any] = {
        "check": "gpu-check", "smoke": cfg.smoke,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **{k: env[k] for k in ("card", "driver", "torch")}, "environment": env,
        "budget_s": cfg.budget_s, "errors": {},
    }
    measurements = 4 + 2 + len(ST_BATCH_SIZES) + 1
    reserve = ST_SETUP_S[cfg.mode] + FINISH_S
    with _step(record, "tests"):
        timeout = min(cfg.tests_timeout_s, budget.left() - reserve
                      - measurements * cfg.min_slot_s * 2)
        record["tests"] = (run_tests(timeout) if timeout > 10 else
                           {"skipped": f"budget: {budget.left():.0f} s left"})
        if "timed_out_after_s" in record["tests"]:
            budget.cut.append(f"tests: stopped after {timeout:.0f} s")
    with _step(record, "model_only"):
        _model_steps(cfg, budget, record, peak, reserve)
    _free(cfg.device)  # the jina model is gone with _model_steps' frame
    with _step(record, "sentence_transformers"):
        record["sentence_transformers"] = measure_st(cfg, budget, corpus_lengths(cfg)["mix"],
                                                     peak)
    _free(cfg.device)
    peaks = [got.get("peak_gpu_mem_bytes") for _, got in _iter_figures(record)]
    record["peak_gpu_mem_bytes"] = max((p for p in peaks if p is not None), default=None)
    record["cut"] = budget.cut
    record["wall_s"] = round(time.monotonic() - budget.started, 1)
    return record


def _model_steps(cfg: Settings, budget: Budget, record: dict[str, Any], peak: float | None,
                 reserve: float) -> None:
    """Steps 2 and 3 on one loaded model."""
    from embedjob.stages.batching import default_overhead_tokens

    actor, load_s = load_actor(cfg)
    embedder = actor.embedder
    shape = CONFIGS[cfg.shape]
    params = shape_params(shape)
    record["model"] = {
        "shape": cfg.shape, "layers": shape.layers, "hidden": shape.hidden,
        "heads": shape.heads, "ffn": shape.ffn, "params_nonembedding": params,
        "flops_per_token": FLOPS_FORMULA, "dtype": str(embedder.dtype).removeprefix("torch."),
        "load_s": round(load_s, 1), "varlen": embedder.varlen,
    }
    overhead = default_overhead_tokens(cfg.max_tokens_per_batch, cfg.device == "cuda")
    started = time.perf_counter()
    corpora = {name: make_windows(cfg, lengths,
                                  lambda t: embedder.tokenizer.tokenize(t, TASK).ids, overhead)
               for name, lengths in corpus_lengths(cfg).items()}
    record["corpus"] = {
        "window_rows": cfg.window_rows, "pool_windows": cfg.pool_windows,
        "max_tokens_per_batch": cfg.max_tokens_per_batch, "overhead_tokens": overhead,
        "mix": {"median_tokens": MEDIAN_TOKENS, "p90_tokens": P90_TOKENS,
                "long_fraction": cfg.long_fraction, "long_tokens": list(LONG_TOKENS)},
        "fixed512": {"text_tokens": FIXED_TEXT_TOKENS},
        "tokenize_s": round(time.perf_counter() - started, 1),
    }
    runs = [(c, p) for c in corpora for p in (False, True)]
    record["model_only"], record["actor"] = {}, {}
    later = 2 + len(ST_BATCH_SIZES) + 1
    for i, (corpus, packed) in enumerate(runs):
        name = f"{corpus}_{'packed' if packed else 'padded'}"
        record["model_only"][name] = measure_model_only(
            cfg, budget, embedder, corpora[corpus], name, packed, len(runs) - i + later,
            reserve, params, peak)
    for i, packed in enumerate((False, True)):
        name = "mix_packed" if packed else "mix_padded"
        got = measure_actor(cfg, budget, actor, corpora["mix"], packed,
                            2 - i + len(ST_BATCH_SIZES) + 1, reserve, params, peak, overhead)
        bound = record["model_only"].get(name)
        if got and bound:
            got["vs_model_only"] = round(got["tokens_per_s"] / bound["tokens_per_s"], 3)
        record["actor"][name] = got


class _step:  # noqa: N801 (a context manager used like a function)
    """Record a step's exception under ``errors`` and go on with the next step."""

    def __init__(self, record: dict[str, Any], name: str) -> None:
        self.record, self.name = record, name

    def __enter__(self) -> None:
        logger.info("gpu-check: %s", self.name)

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        logger.exception("gpu-check: %s failed", self.name)
        self.record["errors"][self.name] = f"{type(exc).__name__}: {exc}"[:2000]
        return True


# ---------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> Settings:
    """Flags -> Settings; a bad value exits with a one-line message naming the flag."""
    parser = argparse.ArgumentParser(
        prog="./dev gpu-check", allow_abbrev=False,
        description="Every GPU figure of the project, measured in one budgeted run.")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shape, seconds (what the default test suite runs)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds the whole check may take (default 420; at least 60 "
                             "on a GPU)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"),
                        help="where the JSON record is written (default ./gpu-check.json)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak (default: from its name)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or (not args.smoke and args.budget_s < 60):
        parser.error(f"--budget-s {args.budget_s:g}: must be >= 60 (> 0 with --smoke)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops {args.peak_tflops:g}: must be > 0")
    return settings(args.smoke, args.budget_s, args.out, args.peak_tflops)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machines have no network
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch

    if not cfg.smoke and not torch.cuda.is_available():
        sys.stderr.write("gpu-check: no CUDA device here; run it with --smoke on a CPU\n")
        return 2
    record = check(cfg)
    for name, got in _iter_figures(record):
        sys.stderr.write(f"{name:<45} {got['tokens_per_s']:>12,.0f} tokens/s  "
                         f"mfu {got.get('mfu')}  {got.get('vs_model_only') or ''}\n")
    line = json.dumps(record, sort_keys=False)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(line + "\n")
    print(line, flush=True)
    return 1 if record["errors"] else 0


def _iter_figures(record: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, figures) of every measurement in a record (for summaries and tests)."""
    for step in ("model_only", "actor"):
        for name, got in (record.get(step) or {}).items():
            if got:
                yield f"{step}.{name}", got
    for name, got in (record.get("sentence_transformers") or {}).items():
        if isinstance(got, dict) and "tokens_per_s" in got:
            yield f"sentence_transformers.{name}", got


if __name__ == "__main__":
    sys.exit(main())
