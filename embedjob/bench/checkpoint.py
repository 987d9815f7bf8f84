"""The synthetic checkpoint: jina-v3-shaped random weights in the original on-disk layout, and
the XLM-R tokenizer the corpus and the checkpoint use."""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from embedjob.bench.config import (
    CACHE,
    CONFIGS,
    HUB_TOKENIZER,
    MAX_POSITIONS,
    PEAK_BF16_TFLOPS,
    TOKENIZER_FILES,
    TOKENIZER_SRC,
    VOCAB,
    Shape,
)
from embedjob.model.tasks import JINA_V3_DEFAULTS, TASKS

logger = logging.getLogger(__name__)

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
            f"copy ({HUB_TOKENIZER}) could not be fetched ({exc}); restore "
            "embedjob/data/xlm-roberta"
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


def st_model_dir(shape_name: str, *, seed: int = 0) -> Path:
    """A random-weight XLM-R-shaped sentence-transformers checkpoint of ``shape_name``, cached.

    The jina-v3 trunk without its LoRA and rotary parts: ``XLMRobertaModel`` (absolute
    positions, 8194 of them so 8192-token texts fit, as in jina-v3), bf16 weights, the XLM-R
    tokenizer (``model_max_length`` 8192), mean pooling. Written in the legacy
    sentence-transformers layout (``modules.json``, ``sentence_bert_config.json``,
    ``1_Pooling/config.json`` with ``pooling_mode_mean_tokens``) that both
    sentence-transformers and embedjob's generic loader read.
    """
    shape = CONFIGS[shape_name]
    key = hashlib.sha256(json.dumps(["xlmr-st", shape_name, seed]).encode()).hexdigest()[:12]
    target = CACHE / f"xlmr-st-{shape_name}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".st-model-"))
    _random_xlmr(shape, seed).save_pretrained(str(tmp), safe_serialization=True)
    tok = tokenizer_dir()
    for name in ("tokenizer.json", *TOKENIZER_FILES):
        shutil.copy2(tok / name, tmp / name)
    tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(tok_config | {"model_max_length": MAX_POSITIONS - 2}, indent=2))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
    (tmp / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": MAX_POSITIONS - 2, "do_lower_case": False}))
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": shape.hidden, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    _publish(tmp, target)
    logger.info("wrote random-weight XLM-R %s checkpoint (%s) to %s", shape_name, shape, target)
    return target


def _random_xlmr(shape: Shape, seed: int) -> Any:
    """``XLMRobertaModel`` of ``shape`` with transformers' own random init, in bf16 (built on
    the GPU when there is one: the full shape's init takes seconds there, a minute on a CPU)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.ffn,
        max_position_embeddings=MAX_POSITIONS, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        type_vocab_size=1, layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = XLMRobertaModel(config)  # with its (unused) pooler: AutoModel expects one
    return model.to(torch.bfloat16).eval()


def original_config(shape: Shape) -> dict[str, Any]:
    """The original jina-embeddings-v3 config.json with ``shape``'s sizes."""

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

