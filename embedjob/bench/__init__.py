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

from embedjob.bench.checkpoint import (
    forward_flops,
    model_dir,
    nonembedding_params,
    original_config,
    peak_tflops,
    random_original_tensors,
    shape_params,
    tokenizer_dir,
)
from embedjob.bench.config import (
    CONFIGS,
    FLOPS_FORMULA,
    LONG_TOKENS,
    RUNS,
    VOCAB,
    BenchConfig,
    Shape,
)
from embedjob.bench.corpus import Corpus, make_corpus, target_lengths
from embedjob.bench.measure import RssSampler, result
from embedjob.bench.runs import bench

__all__ = [
    "CONFIGS", "FLOPS_FORMULA", "LONG_TOKENS", "RUNS", "VOCAB", "BenchConfig", "Corpus",
    "RssSampler", "Shape", "bench", "forward_flops", "make_corpus", "model_dir",
    "nonembedding_params", "original_config", "peak_tflops", "random_original_tensors",
    "result", "shape_params", "target_lengths", "tokenizer_dir",
]
