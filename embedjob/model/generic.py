"""Plain Hugging Face encoders (BERT / XLM-R families, sentence-transformers exports).

No adapters. Pooling comes from the sentence-transformers pooling config when present.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedjob.errors import CheckpointError
from embedjob.model.tasks import PROMPT_TASKS

logger = logging.getLogger(__name__)

# RoBERTa-style models number positions from padding_idx + 1 (position 0 is pad_token_id + 1).
ROBERTA_POSITION_TYPES: frozenset[str] = frozenset({"roberta", "xlm-roberta", "camembert"})
_POOLING_FLAGS: dict[str, str] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
}


def position_offset(config: Mapping[str, Any]) -> int:
    """First position id of a sequence: pad_token_id + 1 for RoBERTa-style models, else 0."""
    if config.get("model_type") in ROBERTA_POSITION_TYPES:
        return int(config.get("pad_token_id", 1)) + 1
    return 0


def read_pooling(local_dir: str | Path) -> str:
    """``mean`` or ``cls`` from the sentence-transformers Pooling module; default ``mean``.

    Raises:
        CheckpointError: The pooling config asks for a mode other than mean or cls.
    """
    path = _pooling_config_path(Path(local_dir))
    if path is None:
        return "mean"
    flags = json.loads(path.read_text())
    on = [k for k, v in flags.items() if k.startswith("pooling_mode") and v]
    if len(on) != 1 or on[0] not in _POOLING_FLAGS:
        raise CheckpointError(
            f"{path}: pooling modes {on} not supported; exactly one of {list(_POOLING_FLAGS)}"
        )
    return _POOLING_FLAGS[on[0]]


def _pooling_config_path(local_dir: Path) -> Path | None:
    modules = local_dir / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith(".Pooling"):
                path = local_dir / module.get("path", "") / "config.json"
                return path if path.is_file() else None
        return None
    found = sorted(local_dir.glob("*_Pooling/config.json"))
    return found[0] if found else None


def read_prompts(local_dir: str | Path) -> dict[str, str]:
    """Task -> prefix from sentence-transformers ``prompts`` (query/passage only); usually {}."""
    path = Path(local_dir) / "config_sentence_transformers.json"
    prompts = json.loads(path.read_text()).get("prompts", {}) if path.is_file() else {}
    return {task: prompts[name] for name, task in PROMPT_TASKS.items() if prompts.get(name)}


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
