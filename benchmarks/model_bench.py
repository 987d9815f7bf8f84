"""Encoder throughput of the jina-embeddings-v3 architecture with random weights.

Feeds real token lengths (the XLM-R tokenizer on real text), or a synthetic length mix
(``--synthetic``), through ``Embedder.encode_batches`` in length-sorted token-budget batches:
padded, packed (varlen attention) or packed through the old block-diagonal mask
(``--block-mask``), eager or ``--compile``. The model is ``embedjob.bench.model_dir(config)``
(random weights, original layout, cached) loaded by ``load_embedder`` with ``--task`` merged.
Two passes over all batches: the first includes compilation and warm-up, the second is the
timed one. Prints tokens/s, padding efficiency and, on CUDA, MFU. Not a test; numbers depend
on the machine.

FLOPs per token (forward, stated so MFU can be checked):
    2 * params_nonembedding + 4 * layers * seq * hidden
where seq is the length of the token's own sequence (useful attention work only: the
padding and the off-diagonal blocks of a packed mask are not counted).

    python benchmarks/model_bench.py --config small            # 6 x 384, CPU-sized
    python benchmarks/model_bench.py --synthetic 400 --max-tokens-per-batch 16384 --packed
    python benchmarks/model_bench.py --device cuda --config full --packed --compile
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embedjob.bench import (  # noqa: E402
    CONFIGS,
    FLOPS_FORMULA,
    forward_flops,
    model_dir,
    nonembedding_params,
    peak_tflops,
    tokenizer_dir,
)
from embedjob.model.embedder import Embedder, load_embedder  # noqa: E402

logger = logging.getLogger("model_bench")

CORPORA = (Path("/work/shared/corpora/brown/brown.parquet"), REPO / "embedjob" / "data" /
           "udhr_sample.parquet")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="small")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="XLM-R tokenizer dir (default: embedjob/data/xlm-roberta, decompressed)")
    p.add_argument("--corpus", type=Path, default=None, help="parquet with a text column")
    p.add_argument("--text-column", default="text")
    p.add_argument("--join", type=int, default=4, help="consecutive rows joined per text")
    p.add_argument("--texts", type=int, default=512, help="texts to encode")
    p.add_argument("--max-tokens", type=int, default=8194, help="truncation per text")
    p.add_argument("--synthetic", type=int, default=None, metavar="ROWS",
                   help="random token ids instead of a corpus: ROWS rows of 20-400 tokens "
                        "(uniform, seeded) plus one row of --long-tokens")
    p.add_argument("--long-tokens", type=int, default=8000, help="with --synthetic; 0: none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens-per-batch", type=int, default=8192)
    p.add_argument("--packed", action="store_true", help="pack instead of right-padding")
    p.add_argument("--block-mask", action="store_true",
                   help="with --packed: the old [1, 1, T, T] block-diagonal mask, not varlen")
    p.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True)")
    p.add_argument("--task", default="retrieval.passage", help="adapter merged into the weights")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def load_tokenizer(arg: Path | None):
    """tokenizers.Tokenizer from --tokenizer, else the shipped XLM-R (decompressed, cached)."""
    from tokenizers import Tokenizer

    directory = arg or tokenizer_dir()
    if not (directory / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer.json in {directory}; pass --tokenizer PATH")
    return Tokenizer.from_file(str(directory / "tokenizer.json")), directory


def corpus_texts(arg: Path | None, column: str, join: int, n: int) -> tuple[list[str], Path]:
    import pyarrow.parquet as pq

    path = arg or next((c for c in CORPORA if c.is_file()), None)
    if path is None:
        raise SystemExit(f"no corpus found in {[str(c) for c in CORPORA]}; pass --corpus")
    rows = [t for t in pq.read_table(path, columns=[column]).column(column).to_pylist() if t]
    texts = [" ".join(rows[i:i + join]) for i in range(0, len(rows), join)]
    return texts[:n], path


def token_ids(tok, texts: list[str], max_tokens: int) -> list[np.ndarray]:
    tok.enable_truncation(max_tokens)
    return [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts)]


def plan(lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Length-sorted batches; padded cost rows x longest, packed cost sum of lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            rows = batches[-1] + [i]
            cost = sum(lengths[j] for j in rows) if packed else len(rows) * lengths[rows[0]]
            if cost <= budget:
                batches[-1] = rows
                continue
        batches.append([i])
    return batches


def synthetic_ids(rows: int, long_tokens: int, seed: int) -> list[np.ndarray]:
    """``rows`` rows of 20-400 random token ids plus one of ``long_tokens`` (0: none)."""
    rng = np.random.default_rng(seed)
    lengths = [*rng.integers(20, 401, rows).tolist(), *([long_tokens] if long_tokens else [])]
    return [rng.integers(5, 250000, n).astype(np.int32) for n in lengths]


def run(emb: Embedder, ids: list[np.ndarray], batches: list[list[int]], *, task: str,
        packed: bool) -> tuple[float, float]:
    """Seconds of a first pass over all batches (compilation, warm-up) and of a second."""
    sync = torch.cuda.synchronize if emb.device.type == "cuda" else (lambda: None)
    rows = [[ids[i] for i in b] for b in batches]
    seconds = []
    for _ in range(2):
        sync()
        start = time.perf_counter()
        emb.encode_batches(rows, task=task, packed=packed)
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def mode(args: argparse.Namespace, emb: Embedder) -> str:
    """padded, packed-varlen or packed-block-mask."""
    if not args.packed:
        return "padded"
    return "packed-varlen" if emb.varlen else "packed-block-mask"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = CONFIGS[args.config]
    if args.synthetic is not None:
        ids = synthetic_ids(args.synthetic, args.long_tokens, args.seed)
        tok_dir = corpus = None
    else:
        tokenizer, tok_dir = load_tokenizer(args.tokenizer)
        texts, corpus = corpus_texts(args.corpus, args.text_column, args.join, args.texts)
        ids = token_ids(tokenizer, texts, args.max_tokens)
    lengths = [len(x) for x in ids]
    batches = plan(lengths, args.max_tokens_per_batch, args.packed)
    emb = load_embedder(str(model_dir(args.config)), device=args.device, dtype=dtype,
                        merge_task=args.task, compile=args.compile)
    if args.block_mask:
        emb.varlen = False
    first_s, seconds = run(emb, ids, batches, task=args.task, packed=args.packed)

    tokens = sum(lengths)
    computed = tokens if args.packed else sum(len(b) * max(lengths[i] for i in b) for b in batches)
    params = nonembedding_params(emb.model)
    flops = forward_flops(np.array(lengths), shape, params)
    peak = peak_tflops(args.peak_tflops,
                       torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    result = {
        "config": args.config, **vars(shape), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "mode": mode(args, emb),
        "compile": args.compile, "first_pass_s": round(first_s, 3),
        "texts": len(ids), "batches": len(batches), "tokens": tokens,
        "mean_tokens_per_text": round(tokens / len(ids), 1), "max_tokens_per_text": max(lengths),
        "max_tokens_per_batch": args.max_tokens_per_batch, "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "padding_efficiency": round(tokens / computed, 4),
        "params_nonembedding": params,
        "flops_per_token_formula": FLOPS_FORMULA,
        "tflops_achieved": round(flops / seconds / 1e12, 3),
        "mfu": round(flops / seconds / 1e12 / peak, 4) if peak else None,
        "peak_tflops": peak, "tokenizer": tok_dir and str(tok_dir),
        "corpus": corpus and str(corpus), "synthetic": args.synthetic,
        "threads": torch.get_num_threads(),
    }
    logger.info("%s %s%s %s on %s: %.1f tokens/s (first pass %.1f s), padding efficiency %.3f, "
                "%.2f TFLOP/s%s", args.config, result["mode"], " compiled" if args.compile else "",
                result["dtype"], result["device_name"], result["tokens_per_s"], first_s,
                result["padding_efficiency"],
                result["tflops_achieved"], f", MFU {result['mfu']:.3f}" if peak else "")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
