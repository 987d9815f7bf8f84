"""CUDA: the golden values in fp32, and bf16 close to them; skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedjob.model import load_embedder
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_encode_batches_never_waits_for_the_gpu(golden_dir: Path, dtype: str,
                                                     packed: bool) -> None:
    """Pinned inputs, non-blocking copies, vectors kept on the device: no synchronising call
    until the one copy back; the values equal encode_ids per batch."""
    emb = load_embedder(str(golden_dir), device="cuda", dtype=dtype)
    ids = real_ids(expected(golden_dir))
    batches = [ids[:3], ids[3:], [ids[0][:5], ids[1][:5]], ids[::-1]]  # third: no padding
    emb.encode_batches(batches, task="retrieval.query", packed=packed)  # warm-up: allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            pooled = emb._pool_batches(batches, "retrieval.query", packed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pooled.device.type == "cuda" and pooled.shape == (sum(map(len, batches)), 64)
    got = emb.encode_batches(batches, task="retrieval.query", packed=packed)
    for batch, vectors, row in zip(batches, got, torch.split(pooled.cpu(), [3, 2, 2, 5]),
                                   strict=True):
        want = emb.encode_ids(batch, task="retrieval.query", packed=packed)
        assert max_err(vectors, want) < 1e-6
        assert max_err(row.numpy(), want) < 1e-6


def test_cuda_bf16_packs_with_the_fused_varlen_kernel(golden_dir: Path) -> None:
    """bf16 on CUDA: torch's varlen_attn (or flash-attn); close to padded, and a changed
    middle row leaves the others unchanged."""
    from embedjob.model.attention import has_fused_varlen

    emb = load_embedder(str(golden_dir), device="cuda", dtype="bfloat16")
    assert emb.varlen and has_fused_varlen(emb.device, torch.bfloat16)
    ids = real_ids(expected(golden_dir))
    for task in TASK_AXIS:
        padded = emb.encode_ids(ids, task=task)
        packed = emb.encode_ids(ids, task=task, packed=True)
        assert np.sum(padded * packed, axis=1).min() > 0.999
    changed = [*ids[:2], ids[2][::-1].copy(), *ids[3:]]
    before = emb.encode_ids(ids, packed=True)
    after = emb.encode_ids(changed, packed=True)
    keep = [0, 1, 3, 4]
    assert max_err(before[keep], after[keep]) < 1e-3
    assert max_err(before[2], after[2]) > 1e-2


@pytest.mark.parametrize("lengths", [[5, 1, 17, 5, 5, 130, 1], [300]], ids=["mixed", "one"])
def test_cuda_fused_varlen_equals_per_sequence_sdpa(lengths: list[int]) -> None:
    from embedjob.model.attention import fused_varlen, per_sequence_sdpa

    torch.manual_seed(0)
    total, heads, head_dim = sum(lengths), 4, 64
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))  # [T, heads, head_dim]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    fused = fused_varlen(q, k, v, cu, max(lengths), 0.125).float()
    reference = per_sequence_sdpa(q.float(), k.float(), v.float(), cu.cpu(), 0.125)
    assert max_err(fused.cpu().numpy(), reference.cpu().numpy()) < 2e-2
