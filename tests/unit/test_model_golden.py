"""The tiny jina-v3 checkpoint reproduces every array recorded from the original code.

Both weight files: fp32 (``expected.npz``) and bf16 upcast to fp32 (``model-bf16/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedjob.errors import MergedTaskError
from embedjob.model import Embedder, load_embedder, matryoshka
from embedjob.model.head import pool
from tests.model_fixtures import (
    ATOL_STATES,
    ATOL_VECTORS,
    TASK_AXIS,
    encode_key,
    expected,
    max_err,
    real_ids,
)

pytestmark = pytest.mark.unit


VARIANTS = ("fp32", "bf16")
ADAPTER_TASKS = TASK_AXIS[1:]


def variant_dir(golden_dir: Path, variant: str) -> Path:
    return golden_dir if variant == "fp32" else golden_dir / "model-bf16"


@pytest.fixture(scope="module")
def loaded(golden_dir: Path) -> dict[str, tuple[Embedder, dict[str, np.ndarray]]]:
    """Unmerged fp32-compute embedder and expected arrays per weight variant."""
    out = {}
    for variant in VARIANTS:
        directory = variant_dir(golden_dir, variant)
        out[variant] = (load_embedder(str(directory)), expected(directory))
    return out


def batch_tensors(exp: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    mask = exp["attention_mask"]
    return torch.from_numpy(exp["input_ids"]), torch.from_numpy(mask), mask.astype(bool)


def test_fixture_is_what_the_tests_assume(loaded) -> None:
    emb, exp = loaded["fp32"]
    assert tuple(None if t == "none" else str(t) for t in exp["task_axis"]) == TASK_AXIS
    assert emb.tasks == ADAPTER_TASKS
    assert emb.matryoshka_dims == (8, 16, 32, 64)
    assert emb.dtype == torch.float32
    # rotary is exercised past position 300
    assert max(len(x) for x in real_ids(exp)) > 300
    assert float(exp["lora_scaling"]) == 0.25


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", range(len(TASK_AXIS)), ids=[str(t) for t in TASK_AXIS])
def test_token_states_and_pooler(loaded, variant: str, k: int) -> None:
    emb, exp = loaded[variant]
    input_ids, attention_mask, mask = batch_tensors(exp)
    out = emb.forward(input_ids, attention_mask, tasks=[TASK_AXIS[k]] * len(input_ids),
                      output_hidden_states=True)
    if "hidden_states" in exp:  # only recorded for the fp32 weights
        states = torch.stack(out.hidden_states).numpy()  # [layers + 1, B, L, H]
        assert states.shape[0] == exp["hidden_states"].shape[1]
        assert max_err(states[:, mask], exp["hidden_states"][k][:, mask]) < ATOL_STATES
    assert max_err(out.last_hidden_state.numpy()[mask],
                   exp["last_hidden_state"][k][mask]) < ATOL_STATES
    assert max_err(out.pooler_output.numpy(), exp["pooler_output"][k]) < ATOL_STATES
    mean = pool(out.last_hidden_state, attention_mask, "mean").numpy()
    assert max_err(mean, exp["mean_pooled"][k]) < ATOL_STATES


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("k", range(len(TASK_AXIS)), ids=[str(t) for t in TASK_AXIS])
def test_embeddings_and_matryoshka_dims(loaded, variant: str, k: int) -> None:
    emb, exp = loaded[variant]
    vectors = emb.encode_ids(real_ids(exp), task=TASK_AXIS[k])
    assert vectors.dtype == np.float32
    assert max_err(vectors, exp["embeddings"][k]) < ATOL_VECTORS
    for dim in emb.matryoshka_dims:
        assert max_err(matryoshka(vectors, dim), exp[f"embeddings_dim{dim}"][k]) < ATOL_VECTORS


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_task_batch(loaded, variant: str) -> None:
    emb, exp = loaded[variant]
    tasks = [ADAPTER_TASKS[a] for a in exp["mixed_adapter_mask"]]
    assert len(set(tasks)) == len(tasks) > 1
    input_ids, attention_mask, mask = batch_tensors(exp)
    out = emb.forward(input_ids, attention_mask, tasks=tasks)
    assert max_err(out.last_hidden_state.numpy()[mask],
                   exp["mixed_last_hidden_state"][mask]) < ATOL_STATES
    assert max_err(out.pooler_output.numpy(), exp["mixed_pooler_output"]) < ATOL_STATES
    mean = pool(out.last_hidden_state, attention_mask, "mean").numpy()
    assert max_err(mean, exp["mixed_mean_pooled"]) < ATOL_STATES
    for packed in (False, True):
        vectors = emb.encode_ids(real_ids(exp), tasks=tasks, packed=packed)
        assert max_err(vectors, exp["mixed_embeddings"]) < ATOL_VECTORS


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_batch_with_base_rows(loaded, variant: str) -> None:
    """None rows ("__base__") in a mixed batch equal the no-adapter outputs."""
    emb, exp = loaded[variant]
    tasks = [None, "retrieval.query", None, "text-matching", "separation"]
    vectors = emb.encode_ids(real_ids(exp), tasks=tasks)
    want = np.stack([exp["embeddings"][TASK_AXIS.index(t), i] for i, t in enumerate(tasks)])
    assert max_err(vectors, want) < ATOL_VECTORS


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASK_AXIS, ids=[str(t) for t in TASK_AXIS])
def test_encode_matches_reference_encode(loaded, variant: str, task: str | None) -> None:
    emb, exp = loaded[variant]
    texts = [str(t) for t in exp["encode_texts"]]
    key = encode_key(task)
    tokenized = emb.tokenizer.tokenize(texts, task)
    want_ids = real_ids(exp, prefix=f"{key}_")
    assert all(np.array_equal(a, b) for a, b in zip(tokenized.ids, want_ids, strict=True))
    assert all(a.dtype == np.int32 for a in tokenized.ids)
    assert not tokenized.truncated.any()
    assert max_err(emb.encode(texts, task=task), exp[key]) < ATOL_VECTORS
    assert max_err(emb.encode(texts, task=task, dim=16), exp[f"{key}_dim16"]) < ATOL_VECTORS
    # batch_size only changes grouping, never values
    assert max_err(emb.encode(texts, task=task, batch_size=1), exp[key]) < ATOL_VECTORS


def test_prefix_is_applied_only_for_retrieval_tasks(loaded) -> None:
    emb, _ = loaded["fp32"]
    spec = emb.spec
    assert spec.prefix("retrieval.query").startswith("Represent the query")
    assert spec.prefix("retrieval.passage").startswith("Represent the document")
    assert [spec.prefix(t) for t in (None, "separation", "classification", "text-matching")] == [
        "", "", "", ""]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", ADAPTER_TASKS)
def test_merged_embedder_equals_golden(golden_dir: Path, variant: str, task: str) -> None:
    directory = variant_dir(golden_dir, variant)
    exp = expected(directory)
    k = TASK_AXIS.index(task)
    emb = load_embedder(str(directory), merge_task=task)
    input_ids, attention_mask, mask = batch_tensors(exp)
    out = emb.forward(input_ids, attention_mask, tasks=[task] * len(input_ids))
    assert max_err(out.last_hidden_state.numpy()[mask],
                   exp["last_hidden_state"][k][mask]) < ATOL_STATES
    assert max_err(emb.encode_ids(real_ids(exp), task=task), exp["embeddings"][k]) < ATOL_VECTORS
    texts = [str(t) for t in exp["encode_texts"]]
    assert max_err(emb.encode(texts, task=task), exp[encode_key(task)]) < ATOL_VECTORS
    other = next(t for t in ADAPTER_TASKS if t != task)
    for bad in (other, None):
        with pytest.raises(MergedTaskError, match=f"merged for '{task}'"):
            emb.encode_ids(real_ids(exp), task=bad)
