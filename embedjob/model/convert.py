"""The original jinaai/jina-embeddings-v3 checkpoint -> transformers' native model + PEFT LoRA.

One key-mapping table (``KEY_TABLE``) drives everything: the expected key set (any missing or
unexpected key fails, named), the base-weight renames, the fused Wqkv split, and where each
stacked LoRA adapter lands in PEFT's layout.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from embedjob.errors import BugError, CheckpointError
from embedjob.model.source import SMALL_FILE_PATTERNS, weight_files
from embedjob.model.spec import checkpoint_layout, read_config
from embedjob.model.tasks import JINA_V3_DEFAULTS, TASK_ADAPTERS

logger = logging.getLogger(__name__)

ORIGINAL_PREFIX = "roberta."
# Original module path -> native module path(s); {i} is a layer index. Three targets split
# the fused Wqkv rows [0:H], [H:2H], [2H:3H] into q, k, v.
KEY_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embeddings.word_embeddings", ("embeddings.word_embeddings",)),
    ("embeddings.token_type_embeddings", ("embeddings.token_type_embeddings",)),
    ("emb_ln", ("embeddings.LayerNorm",)),
    ("encoder.layers.{i}.mixer.Wqkv",
     ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj")),
    ("encoder.layers.{i}.mixer.out_proj", ("layers.{i}.self_attn.o_proj",)),
    ("encoder.layers.{i}.norm1", ("layers.{i}.post_attention_layernorm",)),
    ("encoder.layers.{i}.norm2", ("layers.{i}.post_mlp_layernorm",)),
    ("encoder.layers.{i}.mlp.fc1", ("layers.{i}.mlp.fc1",)),
    ("encoder.layers.{i}.mlp.fc2", ("layers.{i}.mlp.fc2",)),
    ("pooler.dense", ("pooler.dense",)),
)
# Parameter suffix in the original file -> role. Every Linear/Embedding weight there is a torch
# parametrization: the base weight plus LoRA A/B stacked over adapters (dim 0 = adapter index).
SUFFIXES: dict[str, str] = {
    "parametrizations.weight.original": "weight",
    "parametrizations.weight.0.lora_A": "lora_A",
    "parametrizations.weight.0.lora_B": "lora_B",
    "weight": "weight",
    "bias": "bias",
}
# Native leaf modules that carry LoRA (== PEFT target_modules; "dense" is pooler.dense here).
LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2",
    "word_embeddings", "token_type_embeddings", "dense",
)
EMBEDDING_TARGETS: frozenset[str] = frozenset({"word_embeddings", "token_type_embeddings"})
PEFT_PREFIX = "base_model.model."
# Original config.json keys that the native config copies verbatim.
NATIVE_CONFIG_KEYS: tuple[str, ...] = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
    "bos_token_id", "eos_token_id", "initializer_range",
)
# jina-specific keys carried into the converted config.json so layout (2) describes itself.
JINA_META_KEYS: tuple[str, ...] = (*JINA_V3_DEFAULTS, "lora_rank", "lora_alpha")


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_FORWARD = [(_compile(src), dst) for src, dst in KEY_TABLE]
_INVERSE = [(_compile(d), src, j) for src, dsts in KEY_TABLE for j, d in enumerate(dsts)]


def native_modules(original_module: str) -> tuple[str, ...]:
    """Native module path(s) of an original module path (without ``roberta.``)."""
    for pattern, targets in _FORWARD:
        m = pattern.fullmatch(original_module)
        if m:
            return tuple(t.format(**m.groupdict()) for t in targets)
    raise KeyError(original_module)


def original_module(native_module: str) -> str:
    """Inverse of ``native_modules`` (q/k/v all map back to the fused Wqkv)."""
    for pattern, src, _ in _INVERSE:
        m = pattern.fullmatch(native_module)
        if m:
            return src.format(**m.groupdict())
    raise KeyError(native_module)


def jina_config(raw: Mapping[str, Any]) -> Any:
    """The native JinaEmbeddingsV3Config of an original config.json, built by hand.

    AutoConfig cannot read the original config (auto_map, no model_type). The jina metadata
    (tasks, instructions, dims, LoRA rank/alpha) rides along as extra attributes.
    """
    from transformers import JinaEmbeddingsV3Config

    if raw.get("position_embedding_type", "rotary") != "rotary":
        raise CheckpointError(
            f"position_embedding_type {raw['position_embedding_type']!r} not in ['rotary']"
        )
    return JinaEmbeddingsV3Config(
        **{k: raw[k] for k in NATIVE_CONFIG_KEYS if k in raw},
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(raw.get("rotary_emb_base", 20000.0))},
        architectures=["JinaEmbeddingsV3Model"],
        attn_implementation="sdpa",
        **{k: raw[k] for k in JINA_META_KEYS if k in raw},
    )


def native_keys(config: Any) -> list[str]:
    """State-dict keys of JinaEmbeddingsV3Model for ``config`` (built on meta, no memory)."""
    from transformers import JinaEmbeddingsV3Model

    with torch.device("meta"):
        return list(JinaEmbeddingsV3Model(config).state_dict())


def expected_original_keys(keys: Iterable[str]) -> set[str]:
    """Every key the original file must hold for a native model with state-dict ``keys``."""
    expected = set()
    for key in keys:
        module, param = key.rsplit(".", 1)
        src = ORIGINAL_PREFIX + original_module(module)
        if param == "weight" and module.rsplit(".", 1)[-1] in LORA_TARGETS:
            expected |= {f"{src}.parametrizations.weight.{s}" for s in ("original", "0.lora_A",
                                                                       "0.lora_B")}
        else:
            expected.add(f"{src}.{param}")
    return expected


def check_keys(present: Iterable[str], expected: set[str], where: str) -> None:
    """Raise CheckpointError naming every missing and unexpected tensor."""
    present = set(present)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the jina-embeddings-v3 layout: "
            f"missing tensors {missing}, unexpected tensors {unexpected}"
        )


def _parse(key: str) -> tuple[str, str]:
    """'roberta.<module>.<suffix>' -> (original module, role)."""
    body = key[len(ORIGINAL_PREFIX):]
    for suffix, role in SUFFIXES.items():
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], role
    raise BugError(f"key {key!r} passed check_keys but has no known suffix")


def convert_tensors(
    tensors: Mapping[str, torch.Tensor], config: Any
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Original tensors -> (native state dict, {adapter name: PEFT adapter state dict}).

    Adapter state dicts use PEFT's saved layout (``base_model.model.<module>.lora_A.weight``,
    ``...lora_embedding_A``), in ``lora_adaptations`` order, named by ``TASK_ADAPTERS``.

    Raises:
        CheckpointError: A key is missing or unexpected, or a LoRA stack has the wrong shape.
    """
    check_keys(tensors, expected_original_keys(native_keys(config)), "checkpoint")
    tasks = list(config.lora_adaptations)
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {TASK_ADAPTERS[t]: {} for t in tasks}
    for key, tensor in tensors.items():
        module, role = _parse(key)
        targets = native_modules(module)
        if role in ("weight", "bias"):
            # Fused Wqkv: rows [0:H] -> q, [H:2H] -> k, [2H:3H] -> v; others: one chunk.
            for target, part in zip(targets, tensor.chunk(len(targets), dim=0), strict=True):
                base[f"{target}.{role}"] = part.contiguous()
            continue
        _check_lora_shape(key, tensor, len(tasks), int(config.lora_rank), role, targets)
        for t, task in enumerate(tasks):
            adapters[TASK_ADAPTERS[task]].update(_lora_entries(targets, role, tensor[t]))
    return base, adapters


def _check_lora_shape(key: str, tensor: torch.Tensor, n_tasks: int, rank: int, role: str,
                      targets: tuple[str, ...]) -> None:
    embedding = targets[0].rsplit(".", 1)[-1] in EMBEDDING_TARGETS
    # Linear: A [T, r, in], B [T, out, r]; Embedding: A [T, num, r], B [T, r, dim].
    rank_axis = 2 if (role == "lora_A") == embedding else 1
    if tensor.ndim != 3 or tensor.shape[0] != n_tasks or tensor.shape[rank_axis] != rank:
        raise CheckpointError(
            f"{key}: shape {list(tensor.shape)} is not [{n_tasks} adapters, ...] with rank "
            f"{rank} on axis {rank_axis}"
        )


def _lora_entries(targets: tuple[str, ...], role: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT entries of one adapter's A or B for the native ``targets`` of one module."""
    if targets[0].rsplit(".", 1)[-1] in EMBEDDING_TARGETS:
        # Original embedding delta = A @ B with A [num, r], B [r, dim]; PEFT computes
        # (B' @ A').T with A' [r, num], B' [dim, r]: so A' = A.T, B' = B.T.
        name = "lora_embedding_A" if role == "lora_A" else "lora_embedding_B"
        return {f"{PEFT_PREFIX}{targets[0]}.{name}": t.T.contiguous()}
    if role == "lora_A":  # [r, in]: shared by q, k, v of a fused Wqkv
        return {f"{PEFT_PREFIX}{x}.lora_A.weight": t.clone() for x in targets}
    parts = t.chunk(len(targets), dim=0)  # B [out, r]; fused: row blocks per q, k, v
    return {f"{PEFT_PREFIX}{x}.lora_B.weight": p.contiguous()
            for x, p in zip(targets, parts, strict=True)}


def lora_config(config: Any) -> Any:
    """The PEFT LoraConfig of every jina-v3 adapter (scaling = lora_alpha / r)."""
    from peft import LoraConfig

    return LoraConfig(r=int(config.lora_rank), lora_alpha=float(config.lora_alpha),
                      lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")


def read_original(local_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(native config, every tensor) of an original-layout directory."""
    raw = read_config(local_dir)
    if checkpoint_layout(raw) != "original":
        raise CheckpointError(f"{local_dir}: config.json is not the original jina-v3 layout "
                              "(no lora_adaptations)")
    missing = sorted({"lora_rank", "lora_alpha", "lora_adaptations"} - set(raw))
    if missing:
        raise CheckpointError(f"{local_dir}/config.json lacks {missing}")
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(local_dir)):
        if path.parent != Path(local_dir):
            continue  # adapter subfolders belong to the converted layout
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return jina_config(raw), tensors


def convert_checkpoint(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Write the converted (-hf) layout from an original jina-embeddings-v3 directory.

    ``dst_dir`` gets config.json (native config + jina metadata), model.safetensors (native
    keys, source dtype), one PEFT adapter per task in a subfolder (``retrieval_query``, ...),
    and the tokenizer files.

    Returns:
        ``dst_dir`` as a Path.

    Raises:
        CheckpointError: ``src_dir`` is not a complete original-layout checkpoint.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config, tensors = read_original(src)
    base, adapters = convert_tensors(tensors, config)
    dst.mkdir(parents=True, exist_ok=True)
    config.dtype = next(iter(base.values())).dtype
    config.save_pretrained(str(dst))
    save_file(base, str(dst / "model.safetensors"), metadata={"format": "pt"})
    peft_config = lora_config(config)
    for name, state in adapters.items():
        peft_config.save_pretrained(str(dst / name))
        save_file(state, str(dst / name / "adapter_model.safetensors"), metadata={"format": "pt"})
    for pattern in SMALL_FILE_PATTERNS:
        for path in src.glob(pattern):
            if path.name != "config.json" and "/" not in pattern:
                shutil.copy2(path, dst / path.name)
    logger.info("converted %s -> %s (%d base tensors, adapters %s)", src, dst, len(base),
                list(adapters))
    return dst
