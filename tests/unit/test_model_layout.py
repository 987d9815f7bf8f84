"""The jina-v3 key table against transformers' own conversion mapping, and the converted
(-hf) layout's adapters loaded by PEFT's loader with every key checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from embedjob.errors import CheckpointError
from embedjob.model import convert_checkpoint, load_embedder
from embedjob.model.convert import (
    KEY_TABLE,
    ORIGINAL_PREFIX,
    native_keys,
    native_modules,
    original_module,
    read_original,
)

pytestmark = pytest.mark.unit


def _transformers_rename(module: str) -> tuple[str, ...]:
    """An original module path through transformers' ``jina_embeddings_v3`` conversion rules
    (what ``from_pretrained`` applies to the original file): renames, then the Wqkv split."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    targets = (module,)
    for rule in get_checkpoint_conversion_mapping("jina_embeddings_v3"):
        out = []
        for name in targets:
            (source,) = rule.source_patterns
            if re.search(source, name) is None:
                out.append(name)
            elif type(rule).__name__ == "WeightRenaming":
                out.append(re.sub(source, rule.target_patterns[0], name))
            else:  # WeightConverter: one source chunked into the targets, in order
                out += [re.sub(source, target, name) for target in rule.target_patterns]
        targets = tuple(out)
    return targets


def _module(key: str) -> str:
    if ".parametrizations." in key:
        return key.split(".parametrizations.")[0]
    return key.rsplit(".", 1)[0]


def test_key_table_agrees_with_transformers_conversion_mapping(golden_dir: Path) -> None:
    config, tensors = read_original(golden_dir)
    # module path of each original key: before ".parametrizations." or the last ".<param>"
    modules = {_module(k[len(ORIGINAL_PREFIX):]) for k in tensors}
    assert len(modules) > 10
    for module in sorted(modules):
        assert native_modules(module) == _transformers_rename(module), module
    # and every native base weight maps back to a row of the table
    natives = {k.rsplit(".", 1)[0] for k in native_keys(config)}
    assert {original_module(m) for m in natives} == modules
    assert {src.split(".{i}.")[-1] for src, _ in KEY_TABLE} >= {"mixer.Wqkv", "norm1", "norm2"}


def test_hf_layout_adapters_load_through_peft_and_match_the_original(golden_dir: Path,
                                                                      tmp_path: Path) -> None:
    hf = convert_checkpoint(golden_dir, tmp_path / "hf")
    texts = ["The right to life.", "Everyone has the right to education, free of charge."]
    original = load_embedder(str(golden_dir))
    converted = load_embedder(str(hf))
    for task in ("retrieval.query", "text-matching", None):
        a = original.encode(texts, task=task)
        b = converted.encode(texts, task=task)
        assert abs(a - b).max() < 1e-6, task


def test_hf_adapter_with_an_unexpected_or_missing_tensor_is_named(golden_dir: Path,
                                                                  tmp_path: Path) -> None:
    hf = convert_checkpoint(golden_dir, tmp_path / "hf")
    weights = hf / "classification" / "adapter_model.safetensors"
    state = load_file(str(weights))
    extra = dict(state)
    extra["base_model.model.layers.0.mlp.fc1.lora_C.weight"] = next(iter(state.values())).clone()
    save_file(extra, str(weights))
    with pytest.raises(CheckpointError, match=r"classification/adapter_model\.safetensors.*"
                                              r"unexpected tensors \[.*lora_C"):
        load_embedder(str(hf))
    dropped = {k: v for k, v in state.items() if ".fc2." not in k}
    save_file(dropped, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensors \[.*fc2\.lora_"):
        load_embedder(str(hf))
