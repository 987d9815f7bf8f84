"""``embedjob convert-weights SRC DST``: a model directory with pickle weights, rewritten
with safetensors weights, once and explicitly.

The job itself never unpickles (``source.weight_files`` refuses pickle-only checkpoints). Here
each pickle weight file is read with ``torch.load(weights_only=True)``, which unpickles only
tensors and plain containers (no code runs), and written as safetensors; every other file is
copied as it is.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from embedjob.config import knob
from embedjob.errors import CheckpointError, ConfigError
from embedjob.model.generic import PICKLE_SUFFIXES

logger = logging.getLogger(__name__)

SHARD = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")


@dataclass(frozen=True, kw_only=True)
class ConvertWeightsOptions:
    """``embedjob convert-weights``: pickle weights -> safetensors, in a new directory."""

    src: str = knob(help="model directory with pickle weights (pytorch_model.bin, *.pt)",
                    positional=True)
    dst: str = knob(help="new directory: the same files, weights as safetensors",
                    positional=True)


def safetensors_name(rel: str) -> str:
    """``pytorch_model[-i-of-n].bin`` -> ``model[-i-of-n].safetensors``; ``x.pt`` ->
    ``x.safetensors`` (the same folder)."""
    path = Path(rel)
    match = SHARD.fullmatch(path.name)
    stem = f"model{match.group(1) or ''}" if match else path.stem
    return str(path.with_name(stem + ".safetensors"))


def convert_weights(src: str, dst: str) -> list[tuple[str, str]]:
    """Copy the model directory ``src`` to ``dst`` with every pickle weight file converted.

    Returns:
        (pickle file, safetensors file) pairs, relative to the directories.

    Raises:
        ConfigError: ``src`` is not a directory or ``dst`` exists.
        CheckpointError: A pickle file holds anything but tensors (refused by
            ``weights_only=True``), or ``src`` has no pickle weights.
    """
    source, target = Path(src), Path(dst)
    if not source.is_dir():
        raise ConfigError(f"convert-weights: SRC {src!r} is not a directory")
    if target.exists():
        raise ConfigError(f"convert-weights: DST {dst!r} exists; give a new directory")
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    pickles = [r for r in files if Path(r).suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise CheckpointError(f"convert-weights: no pickle weights in {src} "
                              f"(suffixes {sorted(PICKLE_SUFFIXES)})")
    tmp = target.with_name(f".{target.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    converted = []
    for rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in pickles:
            converted.append((rel, _convert_file(source / rel, tmp, rel)))
        elif rel.endswith("pytorch_model.bin.index.json"):
            new = rel.replace("pytorch_model.bin", "model.safetensors")
            _convert_index(source / rel, tmp / new)
        else:
            shutil.copy2(source / rel, tmp / rel)
    tmp.rename(target)
    for old, new in converted:
        logger.info("converted %s -> %s", old, new)
    return converted


def _convert_file(path: Path, root: Path, rel: str) -> str:
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: what weights_only refuses
        raise CheckpointError(f"convert-weights: {path} is not plain tensors "
                              f"(torch.load(weights_only=True) refused it: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"convert-weights: {path} holds no flat name -> tensor dict")
    new = safetensors_name(rel)
    # Tied or shared tensors cannot be saved as views of one buffer: one copy each.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
              str(root / new), metadata={"format": "pt"})
    return new


def _convert_index(path: Path, target: Path) -> None:
    index = json.loads(path.read_text())
    index["weight_map"] = {k: safetensors_name(v) for k, v in index.get("weight_map", {}).items()}
    target.write_text(json.dumps(index, indent=2))
