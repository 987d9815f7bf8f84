"""Build jina-embeddings-v3 on transformers' native JinaEmbeddingsV3Model + PEFT LoRA adapters.

Both on-disk layouts end in the same place: the base model plus one PEFT adapter per task
(unmerged, in a PeftModel so mixed-task batches can use ``adapter_names=``), or a plain model
with one task's adapter merged into its weights.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from embedjob.errors import BugError, CheckpointError
from embedjob.model.convert import (
    PEFT_PREFIX,
    check_keys,
    convert_tensors,
    lora_config,
    read_original,
)
from embedjob.model.spec import TASK_ADAPTERS, ModelSpec, checkpoint_layout, read_config

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's adapter_names entry for "no adapter" in a mixed batch


def load_jina(spec: ModelSpec, *, dtype: torch.dtype, merge_task: str | None) -> torch.nn.Module:
    """The eval-mode model for ``spec``: a PeftModel with every task adapter, or, with
    ``merge_task``, a plain model with that adapter merged in.

    Raises:
        CheckpointError: Missing, unexpected or misshapen tensors, or a missing adapter.
    """
    layout = checkpoint_layout(read_config(spec.local_dir))
    if layout == "original":
        model, adapters, peft_config = _original_parts(spec.local_dir, dtype)
    else:
        model, adapters, peft_config = _hf_parts(spec, dtype)
    wanted = [TASK_ADAPTERS[merge_task]] if merge_task else [TASK_ADAPTERS[t] for t in spec.tasks]
    peft_model = _attach(model, {n: adapters[n] for n in wanted}, peft_config)
    if merge_task:
        return peft_model.merge_and_unload().eval()
    return peft_model.eval()


def _original_parts(local_dir: str, dtype: torch.dtype) -> tuple[Any, dict, Any]:
    """Layout (1): convert the original file in memory, then fill the native model strictly."""
    from transformers import JinaEmbeddingsV3Model
    from transformers.initialization import no_init_weights

    config, tensors = read_original(local_dir)
    base, adapters = convert_tensors(tensors, config)
    with no_init_weights():  # every tensor is overwritten below; skip the random init
        model = JinaEmbeddingsV3Model(config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in base.items()}, strict=True)
    except RuntimeError as e:  # shape mismatches against config.json
        raise CheckpointError(f"{local_dir}: {e}") from e
    return model.to(dtype).eval(), adapters, lora_config(config)


def _hf_parts(spec: ModelSpec, dtype: torch.dtype) -> tuple[Any, dict, Any]:
    """Layout (2): native weights via from_pretrained, one PEFT adapter per task subfolder."""
    from peft import LoraConfig
    from transformers import JinaEmbeddingsV3Model

    model, info = JinaEmbeddingsV3Model.from_pretrained(
        spec.local_dir, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
        output_loading_info=True,
    )
    bad = {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys",
                                                   "mismatched_keys") if info[k]}
    if bad:
        raise CheckpointError(f"{spec.local_dir}/model.safetensors: {bad}")
    adapters, configs = {}, []
    for task in spec.tasks:
        folder = Path(spec.local_dir) / TASK_ADAPTERS[task]
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"adapter of task {task!r} missing: no {weights}")
        adapters[TASK_ADAPTERS[task]] = load_file(str(weights))
        configs.append(LoraConfig.from_pretrained(str(folder)))
    return model.eval(), adapters, configs[0] if configs else None


def _attach(model: Any, adapters: dict[str, dict[str, torch.Tensor]], peft_config: Any) -> Any:
    """Wrap ``model`` in a PeftModel holding ``adapters``; every LoRA tensor must match."""
    from peft import get_peft_model, set_peft_model_state_dict

    names = list(adapters)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing: noise, not our call.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        peft_model = get_peft_model(model, peft_config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, peft_config)
    for name, state in adapters.items():
        expected = {_saved_key(k, name) for k in peft_model.state_dict()
                    if name in k.split(".") and "lora_" in k}
        check_keys(state, expected, f"adapter {name!r}")
        set_peft_model_state_dict(peft_model, state, adapter_name=name)
    return peft_model


def _saved_key(key: str, name: str) -> str:
    """PeftModel state-dict key -> the key PEFT saves (adapter name dropped)."""
    key = key.replace(f".{name}.", ".").removesuffix(f".{name}")
    if not key.startswith(PEFT_PREFIX):
        raise BugError(f"PEFT key {key!r} lacks {PEFT_PREFIX!r}")
    return key
