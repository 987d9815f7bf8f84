"""The benchmark's settings and the constants its parts share (no heavy imports)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from embedjob.config import as_tuple, knob
from embedjob.errors import ConfigError
from embedjob.model.tasks import TASKS

logger = logging.getLogger(__name__)

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
TOKENIZER_SRC = REPO_DATA / "xlm-roberta"
UDHR_SAMPLE = REPO_DATA / "udhr_sample.parquet"
HUB_TOKENIZER = "FacebookAI/xlm-roberta-base"  # fallback when the shipped copy is missing
CACHE = Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob")) / "bench"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
VOCAB = 250002  # XLM-R vocabulary, as in jina-embeddings-v3
MAX_POSITIONS = 8194  # jina-v3 max_position_embeddings == tokenizer model_max_length
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
# Dense bf16 peak TFLOP/s per GPU (vendor datasheets, no sparsity); the first name contained
# in the device's name wins, so the PCIe H100 comes before the SXM one.
PEAK_BF16_TFLOPS: dict[str, float] = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                                      "A100": 312.0, "L4": 121.0}
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
    """One ``embedjob bench`` invocation (each field's help says what it sets)."""

    rows: int | None = knob(None, help="corpus rows (default: 100 on cpu, 20000 on cuda)")
    seed: int = knob(0, help="corpus seed (lengths, languages, offsets into the text)")
    long_fraction: float = knob(0.01, help="fraction of rows of 7000-8190 tokens")
    files: int = knob(4, help="parquet files of the corpus")
    config: str | None = knob(None, flag="--model-config", metavar="{full,small,tiny}",
                              help="random-weight jina-v3 shape (default: small on cpu, "
                                   "full on cuda)")
    device: Literal["cpu", "cuda"] = knob("cpu", help="where the encoder runs")
    threads: int | None = knob(None, help="encoder torch threads in all runs (default: all "
                                          "cores)")
    task: str = knob("retrieval.passage", help="task adapter merged into the weights")
    max_tokens_per_batch: int = knob(16384, help="token budget per forward (pipeline, "
                                                 "model-only)")
    window_rows: int = knob(1024, help="rows sorted together by length (pipeline, model-only)")
    naive_batch_rows: int = knob(32, help="rows per map_batches call of the naive recipe")
    num_actors: int = knob(1, help="encode actors of the pipeline run")
    vector_dtype: Literal["float32", "float16"] = knob("float32",
                                                       help="stored vector type (pipeline)")
    packed: bool = knob(False, help="packed instead of padded forwards (pipeline, model-only)")
    compile: bool = knob(False, help="torch.compile the encoder (pipeline, model-only)")
    runs: tuple[str, ...] = knob(RUNS, metavar="R,R,...",
                                 help="which of pipeline,naive,model_only to measure")
    scaling: bool = knob(False, help="also: 2 encode actors, and driver RSS at 1x vs 10x rows")
    workdir: str | None = knob(None, help="keep the corpus and outputs here (default: a temp "
                                          "dir, removed)")
    peak_tflops: float | None = knob(None, help="GPU dense bf16 peak (default: from the device "
                                                "name)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", as_tuple("runs", self.runs))
        if self.config is not None and self.config not in CONFIGS:
            raise ConfigError(f"config {self.config!r} not in {list(CONFIGS)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} not in ['cpu', 'cuda']")
        if self.task not in TASKS:
            raise ConfigError(f"task {self.task!r} not in {list(TASKS)}")
        unknown = sorted(set(self.runs) - set(RUNS))
        if unknown or not self.runs:
            raise ConfigError(f"runs {list(self.runs)} must be a non-empty subset of {list(RUNS)}")
        if not 0 <= self.long_fraction <= 1:
            raise ConfigError(f"long_fraction {self.long_fraction} not in [0, 1]")
        for name in ("files", "max_tokens_per_batch", "window_rows",
                     "naive_batch_rows", "num_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= 1")
        if self.rows is not None and self.rows < 1:
            raise ConfigError(f"rows {self.rows} must be >= 1")

    @property
    def shape_name(self) -> str:
        return self.config or ("full" if self.device == "cuda" else "small")

    @property
    def corpus_rows(self) -> int:
        return self.rows or DEFAULT_ROWS[self.device]

    @property
    def encoder_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

