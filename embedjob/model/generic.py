"""Plain Hugging Face encoders (BERT / XLM-R families, sentence-transformers exports).

No adapters. What sentence-transformers runs after the transformer comes from ``modules.json``:
the Pooling module (every mode, ``include_prompt``), Dense and Normalize modules, and
``sentence_bert_config.json``'s ``max_seq_length``. Any other module is
refused when the spec is read, before any work, naming it.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from embedjob.errors import CheckpointError
from embedjob.model.tasks import PROMPT_TASKS

logger = logging.getLogger(__name__)

# RoBERTa-style models number positions from padding_idx + 1 (position 0 is pad_token_id + 1).
ROBERTA_POSITION_TYPES: frozenset[str] = frozenset({"roberta", "xlm-roberta", "camembert"})
# sentence-transformers' legacy Pooling flags, in its concatenation order.
_POOLING_FLAGS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES: tuple[str, ...] = tuple(_POOLING_FLAGS.values())
_ST = "sentence_transformers.models."
# modules.json types run here (any other is refused); 6.x also writes the ``base.modules`` path.
MODULE_TYPES: dict[str, str] = {
    **{f"{_ST}{n}": n for n in ("Transformer", "Pooling", "Dense", "Normalize")},
    **{f"sentence_transformers.base.modules.{n}": n for n in ("Transformer", "Dense", "Normalize")},
    "sentence_transformers.sentence_transformer.modules.Pooling": "Pooling",
}
DENSE_WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES: frozenset[str] = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})


@dataclass(frozen=True, kw_only=True)
class HeadStep:
    """One module after pooling, as in ``modules.json``.

    Attributes:
        kind: ``dense`` (``activation(x @ W.T + b)`` [+ residual]) or ``normalize`` (L2).
        path: The module's folder (its ``config.json`` and ``model.safetensors``).
        in_features, out_features, bias, activation, use_residual: Dense config.
    """

    kind: Literal["dense", "normalize"]
    path: str = ""
    in_features: int = 0
    out_features: int = 0
    bias: bool = True
    activation: str = "torch.nn.modules.linear.Identity"
    use_residual: bool = False


@dataclass(frozen=True, kw_only=True)
class Head:
    """What a sentence-transformers checkpoint does around its transformer.

    Attributes:
        pooling: Pooling modes joined by ``+`` (concatenated in this order), e.g. ``mean``.
        include_prompt: False: the prompt's tokens (with the leading special token) are left
            out of pooling.
        steps: Dense / Normalize modules after pooling, in order.
        max_seq_length: ``sentence_bert_config.json``'s cap on tokens per text, if any (it
            replaces the tokenizer's ``model_max_length``, as in sentence-transformers).
        dim: Width of the sentence embedding (after the last Dense).
    """

    pooling: str
    include_prompt: bool = True
    steps: tuple[HeadStep, ...] = ()
    max_seq_length: int | None = None
    dim: int


def position_offset(config: Mapping[str, Any]) -> int:
    """First position id of a sequence: pad_token_id + 1 for RoBERTa-style models, else 0."""
    if config.get("model_type") in ROBERTA_POSITION_TYPES:
        return int(config.get("pad_token_id", 1)) + 1
    return 0


def read_head(local_dir: str | Path, hidden_size: int) -> Head:
    """The modules of a sentence-transformers checkpoint (mean pooling for plain HF models).

    Raises:
        CheckpointError: A module is not one this project runs (named), or its config is not.
    """
    local = Path(local_dir)
    bert = _read_json(local / "sentence_bert_config.json")
    common = {"max_seq_length": bert.get("max_seq_length")}
    modules_path = local / "modules.json"
    if not modules_path.is_file():
        found = sorted(local.glob("*_Pooling/config.json"))
        pooling = _read_pooling(found[0], hidden_size) if found else ("mean", True)
        return Head(pooling=pooling[0], include_prompt=pooling[1], dim=hidden_size, **common)
    modules = [(MODULE_TYPES.get(m.get("type", "")), m)
               for m in json.loads(modules_path.read_text())]
    unknown = [m.get("type") for kind, m in modules if kind is None]
    if unknown:
        raise CheckpointError(
            f"{modules_path}: module {unknown[0]!r} is not supported (this job runs only "
            f"{sorted(set(MODULE_TYPES.values()))}: Transformer, then Pooling, then Dense or "
            "Normalize)"
        )
    kinds = [kind for kind, _ in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or "Transformer" in kinds[2:] or \
            "Pooling" in kinds[2:]:
        raise CheckpointError(f"{modules_path}: modules {kinds} not supported; expected "
                              "Transformer, Pooling, then any Dense / Normalize")
    if modules[0][1].get("path", ""):
        raise CheckpointError(f"{modules_path}: Transformer in subfolder "
                              f"{modules[0][1]['path']!r} not supported (only at the top level)")
    mode, include_prompt = _read_pooling(local / modules[1][1].get("path", "") / "config.json",
                                         hidden_size)
    dim = hidden_size * len(mode.split("+"))
    steps = []
    for kind, m in modules[2:]:
        step = _dense(local, m["path"], dim) if kind == "Dense" else HeadStep(kind="normalize")
        dim = step.out_features or dim
        steps.append(step)
    return Head(pooling=mode, include_prompt=include_prompt, steps=tuple(steps), dim=dim,
                **common)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_pooling(path: Path, hidden_size: int) -> tuple[str, bool]:
    """(modes joined by '+', include_prompt) from a Pooling config, old or new keys."""
    if not path.is_file():
        raise CheckpointError(f"{path}: the Pooling module's config is missing")
    config = json.loads(path.read_text())
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [m for k, m in _POOLING_FLAGS.items() if config.get(k)] or ["mean"]
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise CheckpointError(f"{path}: pooling mode {bad[0]!r} not in {list(POOLING_MODES)}")
    width = config.get("embedding_dimension", config.get("word_embedding_dimension", hidden_size))
    if int(width) != hidden_size:
        raise CheckpointError(f"{path}: pooling width {width} != the model's hidden_size "
                              f"{hidden_size}")
    return "+".join(modes), bool(config.get("include_prompt", True))


def _dense(local: Path, path: str, in_dim: int) -> HeadStep:
    config = _read_json(local / path / "config.json")
    if not config:
        raise CheckpointError(f"{local / path}: the Dense module's config.json is missing")
    step = HeadStep(
        kind="dense", path=path, in_features=int(config["in_features"]),
        out_features=int(config["out_features"]), bias=bool(config.get("bias", True)),
        activation=config.get("activation_function", "torch.nn.modules.activation.Tanh"),
        use_residual=bool(config.get("use_residual", False)),
    )
    if step.in_features != in_dim:
        raise CheckpointError(f"{local / path}: Dense in_features {step.in_features} != "
                              f"the pooled width {in_dim}")
    activation_class(step.activation)  # refused at spec time, not when the actor loads
    return step


def activation_class(name: str) -> type:
    """The torch.nn.Module class a Dense config names (only ``torch.nn`` classes are loaded).

    Raises:
        CheckpointError: ``name`` is not a ``torch.nn`` module class.
    """
    module, _, attr = name.rpartition(".")
    if module.startswith("torch.nn"):
        import torch

        cls = getattr(importlib.import_module(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            return cls
    raise CheckpointError(f"Dense activation_function {name!r} is not a torch.nn module class "
                          "(code from elsewhere is never imported)")


def read_prompts(local_dir: str | Path) -> tuple[dict[str, str], str | None]:
    """Named prompts of ``config_sentence_transformers.json`` and its ``default_prompt_name``.

    Every prompt is offered by its own name (``--prompt-name`` / ``--task``); ``query`` and
    ``passage`` are also offered as the tasks ``retrieval.query`` / ``retrieval.passage``.

    Returns:
        ({name or alias: prompt text}, default prompt name or None).

    Raises:
        CheckpointError: ``default_prompt_name`` names no prompt.
    """
    path = Path(local_dir) / "config_sentence_transformers.json"
    config = _read_json(path)
    prompts = {str(k): str(v) for k, v in (config.get("prompts") or {}).items()}
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{path}: default_prompt_name {default!r} not in {list(prompts)}")
    aliases = {task: prompts[name] for name, task in PROMPT_TASKS.items() if prompts.get(name)}
    return {**prompts, **aliases}, default


def load_generic_model(local_dir: str, *, dtype: Any) -> Any:
    """AutoModel from ``local_dir`` (no remote code, safetensors only), sdpa when supported.

    Raises:
        CheckpointError: transformers cannot build or fill the model from these files.
    """
    from transformers import AutoModel

    kwargs = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True,
              "output_loading_info": True}
    try:
        model, info = AutoModel.from_pretrained(local_dir, attn_implementation="sdpa", **kwargs)
    except ValueError as e:
        if "sdpa" not in str(e).lower():
            raise CheckpointError(f"{local_dir}: cannot load with AutoModel: {e}") from e
        logger.info("%s: no sdpa support, using eager attention", local_dir)
        model, info = AutoModel.from_pretrained(local_dir, attn_implementation="eager", **kwargs)
    # The pooler is unused by mean/cls pooling; sentence-transformers exports often lack it.
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    if missing or info["mismatched_keys"]:
        raise CheckpointError(
            f"{local_dir}: missing tensors {sorted(missing)}, "
            f"mismatched {sorted(map(str, info['mismatched_keys']))}"
        )
    return model.eval()

