"""``embedjob bench``: this pipeline vs the naive Ray Data recipe vs the model-only bound.

One invocation, one corpus, one machine, one model, one task, one encoder thread count:

1. ``pipeline``: ``embedjob.driver.run.run`` (read -> tokenize -> bucket -> encode -> write Lance);
2. ``naive``: the recipe people write today: ``map_batches`` over fixed 32-row batches of
   raw text, tokenization and padding to the batch's longest row inside the encode actor,
   ``lance_ray.write_lance``;
3. ``model_only``: the same model's forward over the same pre-tokenized batches the
   pipeline's bucket stage cuts (same window, same token budget), in one process, no Ray,
   no I/O. Only the forwards are timed.

The corpus is real text (the shipped UDHR sample, 13 languages) cut to token lengths drawn
from a seeded long-tailed distribution: lognormal (median 60, p90 200 tokens) plus a fixed
fraction (1%) of rows with 7000-8190 tokens, tokenized with the real XLM-R tokenizer
(``embedjob/data/xlm-roberta``, decompressed to a cache dir at first use).

The model is jina-embeddings-v3-shaped with random weights, written once in the original
on-disk layout (fused Wqkv, stacked LoRA adapters of the five tasks) to a cache dir, so the
pipeline loads it exactly like the real checkpoint. CPU default: ``small`` = 6 x 384 (the
encoder dominates, as on a GPU), 100 rows (see ``DEFAULT_ROWS``); CUDA default: the full
24 x 1024 in bf16, 20,000 rows. ``tiny`` (2 x 64) is for tests.

FLOPs per token (forward), for MFU on CUDA:
    2 * params_nonembedding + 4 * layers * seq * hidden
with seq the token's own sequence length (useful attention work only: padding is not
counted). MFU = sum over rows of n * flops_per_token(n) / wall_s / peak dense bf16 FLOP/s.

The last line printed is one JSON object (see ``bench``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

REPO_DATA = Path(__file__).resolve().parent / "data"
TOKENIZER_SRC = REPO_DATA / "xlm-roberta"
UDHR_SAMPLE = REPO_DATA / "udhr_sample.parquet"
HUB_TOKENIZER = "FacebookAI/xlm-roberta-base"  # fallback when the shipped copy is missing
CACHE = Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob")) / "bench"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
VOCAB = 250002  # XLM-R vocabulary, as in jina-embeddings-v3
MAX_POSITIONS = 8194  # jina-v3 max_position_embeddings == tokenizer model_max_length
TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification",
         "text-matching")
# Lognormal body of the length distribution: median 60 tokens, p90 200 tokens
# (sigma = ln(200 / 60) / z_0.9).
MEDIAN_TOKENS, P90_TOKENS, Z90 = 60.0, 200.0, 1.2816
LONG_TOKENS = (7000, 8190)  # the long tail: rows near the 8192-token limit


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Encoder size; vocab 250002 and rotary positions as in jina-embeddings-v3."""

    layers: int
    hidden: int
    heads: int
    ffn: int


CONFIGS: dict[str, Shape] = {
    "full": Shape(layers=24, hidden=1024, heads=16, ffn=4096),  # jina-embeddings-v3
    "small": Shape(layers=6, hidden=384, heads=6, ffn=1536),  # CPU-sized
    "tiny": Shape(layers=2, hidden=64, heads=4, ffn=128),  # tests
}
# Dense bf16 peak TFLOP/s per GPU (vendor datasheets, no sparsity).
PEAK_BF16_TFLOPS: dict[str, float] = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}
RUNS: tuple[str, ...] = ("pipeline", "naive", "model_only")
# Default corpus rows. CPU: the naive recipe pads 31 rows to each long row; one such
# 32 x ~8000-token forward of the 6 x 384 shape takes ~4 min and ~6 GB on the 2-core VM,
# so 100 rows (one long row) keep the default run to a few minutes. CUDA: enough rows
# that the full model's forwards outlast the job's fixed costs.
DEFAULT_ROWS: dict[str, int] = {"cpu": 100, "cuda": 20000}
SCALING_BLOCKS = 8  # blocks the scaling runs cut the corpus into (windows of rows / 8)
DRIVER_RSS_ROWS = 1000  # at least this many rows at 1x when the driver's memory is compared
FLOPS_FORMULA = "2 * params_nonembedding + 4 * layers * seq * hidden per token"


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One ``embedjob bench`` invocation.

    Attributes:
        rows: Corpus rows; None: ``DEFAULT_ROWS`` of the device.
        seed: Seed of the corpus (lengths, languages, offsets into the text).
        long_fraction: Fraction of rows drawn from ``LONG_TOKENS`` (the long tail).
        files: Parquet files the corpus is split into.
        config: Model shape, a key of ``CONFIGS``; None: ``small`` on CPU, ``full`` on CUDA.
        device: ``cpu`` or ``cuda``.
        threads: Torch threads of the encoder in all three runs (CPU); None: all cores.
        task: Task adapter merged into the weights and whose prefix is applied.
        max_tokens_per_batch: Token budget per forward (pipeline and model-only).
        window_rows: Rows sorted together by length (pipeline and model-only).
        naive_batch_rows: Rows per ``map_batches`` call of the naive recipe.
        num_actors: Encode actors of the pipeline run.
        vector_dtype: Stored vector type of the pipeline run.
        packed: Packed instead of padded forwards (pipeline and model-only).
        compile: ``torch.compile`` the encoder (pipeline and model-only; the model-only
            warm-up compiles, untimed, the pipeline's actors compile inside its wall time).
        runs: Which of ``RUNS`` to measure (all three by default); a skipped run is null.
        scaling: Also run the pipeline with 2 actors and with a 10x corpus.
        workdir: Corpus and outputs; None: a temporary dir, removed at the end.
        peak_tflops: Dense bf16 peak of the GPU; None: from ``PEAK_BF16_TFLOPS``.
    """

    rows: int | None = None
    seed: int = 0
    long_fraction: float = 0.01
    files: int = 4
    config: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int | None = None
    task: str = "retrieval.passage"
    max_tokens_per_batch: int = 16384
    window_rows: int = 1024
    naive_batch_rows: int = 32
    num_actors: int = 1
    vector_dtype: Literal["float32", "float16"] = "float32"
    packed: bool = False
    compile: bool = False
    runs: tuple[str, ...] = ("pipeline", "naive", "model_only")
    scaling: bool = False
    workdir: str | None = None
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.config is not None and self.config not in CONFIGS:
            raise ValueError(f"config {self.config!r} not in {list(CONFIGS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} not in ['cpu', 'cuda']")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} not in {list(TASKS)}")
        unknown = sorted(set(self.runs) - set(RUNS))
        if unknown or not self.runs:
            raise ValueError(f"runs {list(self.runs)} must be a non-empty subset of {list(RUNS)}")
        if not 0 <= self.long_fraction <= 1:
            raise ValueError(f"long_fraction {self.long_fraction} not in [0, 1]")
        for name in ("files", "max_tokens_per_batch", "window_rows",
                     "naive_batch_rows", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"rows {self.rows} must be >= 1")

    @property
    def shape_name(self) -> str:
        return self.config or ("full" if self.device == "cuda" else "small")

    @property
    def corpus_rows(self) -> int:
        return self.rows or DEFAULT_ROWS[self.device]

    @property
    def encoder_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


# ---------------------------------------------------------------- tokenizer and model files


def tokenizer_dir(source: Path = TOKENIZER_SRC) -> Path:
    """A directory with a plain XLM-R ``tokenizer.json`` (+ configs), made once.

    The repo ships ``tokenizer.json.xz``; it is decompressed into the cache at first use.
    Without the shipped copy the files come from the hub (``HUB_TOKENIZER``).
    """
    target = CACHE / "xlm-roberta"
    if (target / "tokenizer.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".tok-"))
    if (source / "tokenizer.json.xz").is_file():
        with lzma.open(source / "tokenizer.json.xz", "rb") as src, \
                open(tmp / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        for name in TOKENIZER_FILES:
            shutil.copy2(source / name, tmp / name)
    else:
        logger.warning("%s has no tokenizer.json.xz; fetching the XLM-R tokenizer from the "
                       "hub (%s)", source, HUB_TOKENIZER)
        _hub_tokenizer(tmp)
    _publish(tmp, target)
    return target


def _hub_tokenizer(dst: Path) -> None:
    from huggingface_hub import hf_hub_download

    try:
        for name in ("tokenizer.json", *TOKENIZER_FILES):
            shutil.copy2(hf_hub_download(HUB_TOKENIZER, name), dst / name)
    except Exception as exc:  # offline, gated, renamed: say what to do instead
        raise RuntimeError(
            f"no XLM-R tokenizer: {TOKENIZER_SRC}/tokenizer.json.xz is missing and the hub "
            f"copy ({HUB_TOKENIZER}) could not be fetched ({exc}); restore embedjob/data/xlm-roberta"
        ) from exc


def model_dir(shape_name: str, *, seed: int = 0) -> Path:
    """A random-weight jina-v3 checkpoint of ``shape_name`` in the original layout, cached.

    config.json is the original one (``lora_adaptations``, ``task_instructions``,
    ``matryoshka_dimensions``, rotary) with the sizes changed; model.safetensors holds every
    key the original file has (``roberta.`` prefix, fused Wqkv, ``emb_ln``, each LoRA target
    as ``parametrizations.weight.{original,0.lora_A,0.lora_B}`` stacked over 5 adapters).
    """
    shape = CONFIGS[shape_name]
    config = original_config(shape)
    key = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:12]
    target = CACHE / f"jina-v3-{shape_name}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".model-"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_original_tensors(shape, rank=config["lora_rank"], seed=seed),
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok = tokenizer_dir()
    for name in ("tokenizer.json", *TOKENIZER_FILES):
        shutil.copy2(tok / name, tmp / name)
    _publish(tmp, target)
    logger.info("wrote random-weight %s checkpoint (%s) to %s", shape_name, shape, target)
    return target


def original_config(shape: Shape) -> dict[str, Any]:
    """The original jina-embeddings-v3 config.json with ``shape``'s sizes."""
    from embedjob.model.spec import JINA_V3_DEFAULTS

    return {
        "architectures": ["XLMRobertaModel"], "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1, "hidden_act": "gelu", "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "intermediate_size": shape.ffn, "initializer_range": 0.02, "layer_norm_eps": 1e-5,
        "max_position_embeddings": MAX_POSITIONS, "type_vocab_size": 1, "vocab_size": VOCAB,
        "position_embedding_type": "rotary", "rotary_emb_base": 20000.0,
        "lora_adaptations": list(TASKS), "lora_rank": 4, "lora_alpha": 1,
        "task_instructions": JINA_V3_DEFAULTS["task_instructions"],
        "matryoshka_dimensions": [d for d in JINA_V3_DEFAULTS["matryoshka_dimensions"]
                                  if d <= shape.hidden] or [shape.hidden],
        "torch_dtype": "float32",
    }


def random_original_tensors(shape: Shape, *, rank: int, seed: int) -> dict[str, Any]:
    """Every tensor of an original-layout file, N(0, 0.02) weights (LoRA B 10x smaller)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, f, n_tasks = shape.hidden, shape.ffn, len(TASKS)

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * std

    tensors = {"roberta.emb_ln.weight": torch.ones(h), "roberta.emb_ln.bias": torch.zeros(h)}
    # (module, out, in); Embedding weights are [num, dim] with LoRA A [T, num, r], B [T, r, dim]
    linears = [("pooler.dense", h, h)]
    for i in range(shape.layers):
        p = f"encoder.layers.{i}."
        linears += [(p + "mixer.Wqkv", 3 * h, h), (p + "mixer.out_proj", h, h),
                    (p + "mlp.fc1", f, h), (p + "mlp.fc2", h, f)]
        for norm in ("norm1", "norm2"):
            tensors[f"roberta.{p}{norm}.weight"] = torch.ones(h)
            tensors[f"roberta.{p}{norm}.bias"] = torch.zeros(h)
    for name, rows in (("embeddings.word_embeddings", VOCAB),
                       ("embeddings.token_type_embeddings", 1)):
        w = f"roberta.{name}.parametrizations.weight."
        tensors[w + "original"] = normal(rows, h)
        tensors[w + "0.lora_A"] = normal(n_tasks, rows, rank)
        tensors[w + "0.lora_B"] = normal(n_tasks, rank, h, std=0.002)
    for name, out, inp in linears:
        w = f"roberta.{name}.parametrizations.weight."
        tensors[w + "original"] = normal(out, inp)
        tensors[w + "0.lora_A"] = normal(n_tasks, rank, inp)
        tensors[w + "0.lora_B"] = normal(n_tasks, out, rank, std=0.002)
        tensors[f"roberta.{name}.bias"] = torch.zeros(out)
    return tensors


def nonembedding_params(model: Any) -> int:
    """Parameters outside the embedding tables (what a token's matmuls touch)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def shape_params(shape: Shape) -> int:
    """``nonembedding_params`` of the native model of ``shape``, built on the meta device."""
    import torch
    from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

    config = JinaEmbeddingsV3Config(
        vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.ffn,
    )
    with torch.device("meta"):
        return nonembedding_params(JinaEmbeddingsV3Model(config))


def forward_flops(lengths: np.ndarray, shape: Shape, params: int) -> float:
    """Useful forward FLOPs of rows with ``lengths`` tokens (``FLOPS_FORMULA``)."""
    n = np.asarray(lengths, dtype=np.float64)
    return float(np.sum(n * (2 * params + 4 * shape.layers * n * shape.hidden)))


def peak_tflops(override: float | None, device_name: str) -> float | None:
    """Dense bf16 peak of the named GPU; None when unknown (and no override)."""
    if override is not None:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp dir into place; a concurrent writer that won is fine."""
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise


# ---------------------------------------------------------------- corpus


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A generated corpus: parquet files with ``id`` (int64) and ``text``."""

    path: str
    rows: int
    long_rows: int
    target_tokens: int  # sum of the drawn lengths (text tokens, before prefix/specials)


def target_lengths(rows: int, long_fraction: float, seed: int) -> np.ndarray:
    """Seeded token lengths: lognormal body plus exactly round(rows x long_fraction) long rows
    (at least one when the fraction is > 0), in a shuffled order."""
    rng = np.random.default_rng(seed)
    sigma = np.log(P90_TOKENS / MEDIAN_TOKENS) / Z90
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_TOKENS), sigma, rows), 4, LONG_TOKENS[0] - 1)
    n_long = min(rows, max(1 if long_fraction > 0 else 0, round(rows * long_fraction)))
    lengths[:n_long] = rng.integers(LONG_TOKENS[0], LONG_TOKENS[1] + 1, n_long)
    return rng.permutation(lengths.astype(np.int64))


def make_corpus(directory: str | Path, *, rows: int, long_fraction: float, seed: int,
                files: int) -> Corpus:
    """Write a deterministic long-tailed corpus of real UDHR text as ``files`` parquet files.

    Each row is a run of consecutive text of one language (its paragraphs concatenated and
    repeated, so a row may exceed the language's whole text) cut at token boundaries of the
    XLM-R tokenizer to the drawn length.
    """
    import pyarrow.parquet as pq

    streams = _language_streams()
    rng = np.random.default_rng(seed + 1)
    lengths = target_lengths(rows, long_fraction, seed)
    texts = []
    for n in lengths.tolist():
        text, offsets = streams[int(rng.integers(len(streams)))]
        start = int(rng.integers(0, len(offsets) - n))
        texts.append(text[offsets[start][0]: offsets[start + n - 1][1]])
    out = _mkdir(Path(directory))
    for f, part in enumerate(np.array_split(np.arange(rows), files)):
        if len(part):
            table = pa.table({"id": pa.array(part, pa.int64()),
                              "text": pa.array([texts[i] for i in part], pa.string())})
            pq.write_table(table, out / f"part-{f:03d}.parquet")
    n_long = int((lengths >= LONG_TOKENS[0]).sum())
    return Corpus(path=str(out), rows=rows, long_rows=n_long, target_tokens=int(lengths.sum()))


def _language_streams() -> list[tuple[str, list[tuple[int, int]]]]:
    """Per language of the UDHR sample: (text repeated to > 8192 tokens, token char offsets)."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    table = pq.read_table(UDHR_SAMPLE, columns=["lang", "text"]).to_pydict()
    by_lang: dict[str, list[str]] = {}
    for lang, text in zip(table["lang"], table["text"], strict=True):
        by_lang.setdefault(lang, []).append(text)
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    tok.no_truncation()
    streams = []
    for lang in sorted(by_lang):
        once = " ".join(by_lang[lang])
        n_once = len(tok.encode(once, add_special_tokens=False).ids)
        text = " ".join([once] * (LONG_TOKENS[1] // max(n_once, 1) + 2))
        streams.append((text, tok.encode(text, add_special_tokens=False).offsets))
    return streams


# ---------------------------------------------------------------- measuring


class RssSampler:
    """Peak resident memory of this process and of Ray's worker processes, sampled.

    Ray workers are this machine's processes whose name starts with ``ray::`` (tasks and
    actors); their peak is the largest single worker's RSS.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.driver = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        import psutil

        self.driver = max(self.driver, psutil.Process().memory_info().rss)
        for proc in psutil.process_iter(["name", "memory_info"]):
            info = proc.info
            if (info["name"] or "").startswith("ray::") and info["memory_info"]:
                self.worker = max(self.worker, info["memory_info"].rss)


def result(*, tokens: int, processed: int, wall_s: float, rss: RssSampler | int,
           flops: float | None, peak: float | None, **extra: Any) -> dict[str, Any]:
    """The per-run record of the JSON line."""
    out: dict[str, Any] = {
        "tokens": tokens, "processed_tokens": processed, "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "padding_efficiency": round(tokens / processed, 4) if processed else 1.0,
    }
    if isinstance(rss, RssSampler):
        out |= {"peak_rss_bytes": max(rss.driver, rss.worker),
                "driver_peak_rss_bytes": rss.driver, "worker_peak_rss_bytes": rss.worker}
    else:
        out["peak_rss_bytes"] = rss
    if flops is not None and peak:
        out["mfu"] = round(flops / wall_s / (peak * 1e12), 4)
    return out | extra


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
