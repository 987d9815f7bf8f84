"""CUDA: the golden values in fp32, and bf16 close to them; skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import load_embedder
from tests.model_fixtures import (
    ATOL_VECTORS,
    TASK_AXIS,
    encode_key,
    expected,
    max_err,
    real_ids,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]



def test_cuda_fp32_reproduces_golden(golden_dir: Path) -> None:
    emb = load_embedder(str(golden_dir), device="cuda", dtype="float32")
    exp = expected(golden_dir)
    texts = [str(t) for t in exp["encode_texts"]]
    for k, task in enumerate(TASK_AXIS):
        for packed in (False, True):
            got = emb.encode_ids(real_ids(exp), task=task, packed=packed)
            assert max_err(got, exp["embeddings"][k]) < ATOL_VECTORS
        assert max_err(emb.encode(texts, task=task), exp[encode_key(task)]) < ATOL_VECTORS


def test_cuda_defaults_to_bf16_and_stays_close(golden_dir: Path) -> None:
    emb = load_embedder(str(golden_dir / "model-bf16"), device="cuda")
    assert emb.dtype == torch.bfloat16
    exp = expected(golden_dir / "model-bf16")
    for k, task in enumerate(TASK_AXIS):
        padded = emb.encode_ids(real_ids(exp), task=task)
        packed = emb.encode_ids(real_ids(exp), task=task, packed=True)
        cosine = np.sum(padded * exp["embeddings"][k], axis=1)
        assert cosine.min() > 0.99
        assert max_err(padded, packed) < 2e-2


def test_cuda_merged_matches_unmerged(golden_dir: Path) -> None:
    exp = expected(golden_dir)
    unmerged = load_embedder(str(golden_dir), device="cuda", dtype="float32")
    merged = load_embedder(str(golden_dir), device="cuda", dtype="float32",
                           merge_task="retrieval.passage")
    want = unmerged.encode_ids(real_ids(exp), task="retrieval.passage")
    assert max_err(merged.encode_ids(real_ids(exp), task="retrieval.passage"), want) < 1e-5
