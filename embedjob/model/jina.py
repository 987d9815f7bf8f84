"""Build jina-embeddings-v3 on transformers' native JinaEmbeddingsV3Model + PEFT LoRA adapters.

Both on-disk layouts end in the same place: the base model plus one PEFT adapter per task
(unmerged, in a PeftModel so mixed-task batches can use ``adapter_names=``), or a plain model
with one task's adapter merged into its weights.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from embedjob.errors import BugError, CheckpointError
from embedjob.model.convert import (
    PEFT_PREFIX,
    check_keys,
    convert_tensors,
    lora_config,
    read_original,
)
from embedjob.model.spec import ModelSpec, checkpoint_layout, read_config
from embedjob.model.tasks import TASK_ADAPTERS

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's adapter_names entry for "no adapter" in a mixed batch


def load_jina(spec: ModelSpec, *, dtype: torch.dtype, merge_task: str | None) -> torch.nn.Module:
    """The eval-mode model for ``spec``: a PeftModel with every task adapter, or, with
    ``merge_task``, a plain model with that adapter merged in.

    Raises:
        CheckpointError: Missing, unexpected or misshapen tensors, or a missing adapter.
    """
    tasks = [merge_task] if merge_task else list(spec.tasks)
    if checkpoint_layout(read_config(spec.local_dir)) == "original":
        model, adapters, peft_config = _original_parts(spec.local_dir, dtype)
        peft_model = _attach(model, {TASK_ADAPTERS[t]: adapters[TASK_ADAPTERS[t]]
                                     for t in tasks}, peft_config)
    else:
        peft_model = _load_hf(spec, dtype, tasks)
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


def _load_hf(spec: ModelSpec, dtype: torch.dtype, tasks: list[str]) -> Any:
    """Layout (2): native weights via ``from_pretrained``, then PEFT's own loader for each
    task's adapter subfolder (``PeftModel`` + ``load_adapter``), every key checked."""
    from peft import LoraConfig, PeftModel
    from transformers import JinaEmbeddingsV3Model

    model, info = JinaEmbeddingsV3Model.from_pretrained(
        spec.local_dir, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
        output_loading_info=True,
    )
    bad = {k: sorted(map(str, info[k])) for k in ("missing_keys", "unexpected_keys",
                                                   "mismatched_keys") if info[k]}
    if bad:
        raise CheckpointError(f"{spec.local_dir}/model.safetensors: {bad}")
    names = [TASK_ADAPTERS[t] for t in tasks]
    folders = [Path(spec.local_dir) / name for name in names]
    for task, folder in zip(tasks, folders, strict=True):
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():  # safetensors only: PEFT would unpickle adapter_model.bin
            raise CheckpointError(f"adapter of task {task!r} missing: no {weights}")
    with _quiet_peft():
        peft_model = PeftModel(model.eval(), LoraConfig.from_pretrained(str(folders[0])),
                               adapter_name=names[0])
        for name, folder in zip(names, folders, strict=True):
            result = peft_model.load_adapter(str(folder), adapter_name=name)
            if result.missing_keys or result.unexpected_keys:
                raise CheckpointError(
                    f"{folder / 'adapter_model.safetensors'} does not match the jina-v3 "
                    f"adapter layout: missing tensors {sorted(result.missing_keys)}, "
                    f"unexpected tensors {sorted(result.unexpected_keys)}")
    return peft_model


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated is_gradient_checkpointing: noise, not our call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        yield


def _attach(model: Any, adapters: dict[str, dict[str, torch.Tensor]], peft_config: Any) -> Any:
    """Wrap ``model`` in a PeftModel holding ``adapters``; every LoRA tensor must match."""
    from peft import get_peft_model, set_peft_model_state_dict

    names = list(adapters)
    with _quiet_peft():
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
