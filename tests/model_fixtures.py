"""Shared fixtures and helpers of the model tests (imported by tests/test_model_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).parent / "data" / "jina-v3-tiny"
# The golden fixture's task axis: "none" (no adapter), then lora_adaptations order.
TASK_AXIS: tuple[str | None, ...] = (
    None, "retrieval.query", "retrieval.passage", "separation", "classification", "text-matching",
)
ATOL_VECTORS = 1e-5  # normalised vectors (golden README)
ATOL_STATES = 1e-4  # token states and un-normalised outputs (golden README)


def require_golden() -> Path:
    """tests/data/jina-v3-tiny; fails (never skips) when the fixture is missing.

    Test modules wrap it in their own ``golden_dir`` fixture.
    """
    for name in ("config.json", "model.safetensors", "expected.npz", "tokenizer.json",
                 "model-bf16/model.safetensors", "model-bf16/expected.npz"):
        if not (GOLDEN_DIR / name).is_file():
            pytest.fail(f"golden fixture file missing: {GOLDEN_DIR / name}")
    return GOLDEN_DIR


def expected(directory: Path) -> dict[str, np.ndarray]:
    """expected.npz of a golden directory as a dict (no pickle)."""
    with np.load(directory / "expected.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def real_ids(exp: dict[str, np.ndarray], prefix: str = "") -> list[np.ndarray]:
    """The unpadded int32 token ids of each row of ``<prefix>input_ids``."""
    ids, mask = exp[f"{prefix}input_ids"], exp[f"{prefix}attention_mask"].astype(bool)
    return [row[m].astype(np.int32) for row, m in zip(ids, mask, strict=True)]


def encode_key(task: str | None) -> str:
    """Golden key stem of encode() results: encode_none, encode_retrieval_query, ..."""
    return "encode_" + ("none" if task is None else task.replace(".", "_").replace("-", "_"))


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
