"""Encoder throughput of the jina-embeddings-v3 architecture with random weights.

Feeds real token lengths (the XLM-R tokenizer on real text) through ``Embedder.encode_ids``
in token-budget batches, padded or packed, and prints tokens/s, padding efficiency and, on
CUDA, MFU. Not a test; numbers depend on the machine.

FLOPs per token (forward, stated so MFU can be checked):
    2 * params_nonembedding + 4 * layers * seq * hidden
where seq is the length of the token's own sequence (useful attention work only: the
padding and the off-diagonal blocks of a packed mask are not counted).

    python benchmarks/model_bench.py --config small            # 6 x 384, CPU-sized
    python benchmarks/model_bench.py --device cuda --config full --packed
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.bench import (  # noqa: E402
    CONFIGS,
    FLOPS_FORMULA,
    Shape,
    forward_flops,
    nonembedding_params,
    peak_tflops,
    tokenizer_dir,
)
from model.embedder import Embedder  # noqa: E402
from model.spec import ModelSpec  # noqa: E402

logger = logging.getLogger("model_bench")

CORPORA = (Path("/work/shared/corpora/brown/brown.parquet"), REPO / "jobs" / "data" /
           "udhr_sample.parquet")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="small")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="XLM-R tokenizer dir (default: jobs/data/xlm-roberta, decompressed)")
    p.add_argument("--corpus", type=Path, default=None, help="parquet with a text column")
    p.add_argument("--text-column", default="text")
    p.add_argument("--join", type=int, default=4, help="consecutive rows joined per text")
    p.add_argument("--texts", type=int, default=512, help="texts to encode")
    p.add_argument("--max-tokens", type=int, default=8194, help="truncation per text")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192)
    p.add_argument("--packed", action="store_true", help="pack instead of right-padding")
    p.add_argument("--warmup-batches", type=int, default=2)
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


def random_embedder(shape: Shape, device: torch.device, dtype: torch.dtype,
                    max_tokens: int) -> Embedder:
    from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model

    config = JinaEmbeddingsV3Config(
        vocab_size=250002, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.ffn,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = JinaEmbeddingsV3Model(config).to(device=device, dtype=dtype).eval()
    spec = ModelSpec(source="random", kind="jina-v3", tasks=(), default_task=None,
                     matryoshka_dims=(shape.hidden,), hidden_size=shape.hidden,
                     max_tokens=max_tokens, pooling="mean", fingerprint="random",
                     revision=None, local_dir=tempfile.gettempdir())
    return Embedder(spec, model, device=device, dtype=dtype, merged_task=None, pad_id=1,
                    position_offset=0)


def run(emb: Embedder, ids: list[np.ndarray], batches: list[list[int]], packed: bool,
        warmup: int) -> float:
    """Seconds for all batches after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if emb.device.type == "cuda" else (lambda: None)
    for rows in batches[:warmup]:
        emb.encode_ids([ids[i] for i in rows], packed=packed)
    sync()
    start = time.perf_counter()
    for rows in batches:
        emb.encode_ids([ids[i] for i in rows], packed=packed)
    sync()
    return time.perf_counter() - start


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = CONFIGS[args.config]
    tokenizer, tok_dir = load_tokenizer(args.tokenizer)
    texts, corpus = corpus_texts(args.corpus, args.text_column, args.join, args.texts)
    ids = token_ids(tokenizer, texts, args.max_tokens)
    lengths = [len(x) for x in ids]
    batches = plan(lengths, args.max_tokens_per_batch, args.packed)
    emb = random_embedder(shape, device, dtype, args.max_tokens)
    seconds = run(emb, ids, batches, args.packed, args.warmup_batches)

    tokens = sum(lengths)
    computed = tokens if args.packed else sum(len(b) * max(lengths[i] for i in b) for b in batches)
    params = nonembedding_params(emb.model)
    flops = forward_flops(np.array(lengths), shape, params)
    peak = peak_tflops(args.peak_tflops,
                       torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    result = {
        "config": args.config, **vars(shape), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "mode": "packed" if args.packed else "padded",
        "texts": len(ids), "batches": len(batches), "tokens": tokens,
        "mean_tokens_per_text": round(tokens / len(ids), 1), "max_tokens_per_text": max(lengths),
        "max_tokens_per_batch": args.max_tokens_per_batch, "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "padding_efficiency": round(tokens / computed, 4),
        "params_nonembedding": params,
        "flops_per_token_formula": FLOPS_FORMULA,
        "tflops_achieved": round(flops / seconds / 1e12, 3),
        "mfu": round(flops / seconds / 1e12 / peak, 4) if peak else None,
        "peak_tflops": peak, "tokenizer": str(tok_dir), "corpus": str(corpus),
        "threads": torch.get_num_threads(),
    }
    logger.info("%s %s %s on %s: %.1f tokens/s, padding efficiency %.3f, %.2f TFLOP/s%s",
                args.config, result["mode"], result["dtype"], result["device_name"],
                result["tokens_per_s"], result["padding_efficiency"],
                result["tflops_achieved"], f", MFU {result['mfu']:.3f}" if peak else "")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
