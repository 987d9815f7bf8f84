"""A text embedded alone equals the same text inside a padded or a packed batch (fp32, 1e-5);
packed rows attend within themselves only; ``encode_batches`` equals ``encode_ids`` per batch;
a compiled model equals the eager one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedjob.model import Embedder, load_embedder
from embedjob.model.attention import per_sequence_sdpa
from tests.model_fixtures import (
    ATOL_VECTORS,
    TASK_AXIS,
    expected,
    max_err,
    real_ids,
)

pytestmark = pytest.mark.unit

ATOL_SAME_PATH = 1e-6  # one computation reached two ways (encode_batches vs encode_ids)


@pytest.fixture(scope="module")
def emb(golden_dir: Path) -> Embedder:
    return load_embedder(str(golden_dir))


@pytest.fixture(scope="module")
def ids(emb: Embedder, golden_dir: Path) -> list[np.ndarray]:
    """Golden batch rows (9..327 tokens) plus short and empty texts: very uneven lengths."""
    extra = emb.tokenizer.tokenize(["", "Short.", "Wo finde ich die nächste Apotheke?"]).ids
    return real_ids(expected(golden_dir)) + extra


def alone(emb: Embedder, ids: list[np.ndarray], tasks: list[str | None]) -> np.ndarray:
    return np.concatenate([emb.encode_ids([x], task=t) for x, t in zip(ids, tasks, strict=True)])


@pytest.mark.parametrize("task", [None, "retrieval.query", "text-matching"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_alone_equals_batch(emb: Embedder, ids: list[np.ndarray], task: str | None,
                            packed: bool) -> None:
    want = alone(emb, ids, [task] * len(ids))
    got = emb.encode_ids(ids, task=task, packed=packed)
    assert max_err(got, want) < ATOL_VECTORS
    # order is kept: reversed input gives reversed output
    assert max_err(emb.encode_ids(ids[::-1], task=task, packed=packed), want[::-1]) < ATOL_VECTORS


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_mixed_tasks_alone_equals_batch(emb: Embedder, ids: list[np.ndarray],
                                        packed: bool) -> None:
    tasks = [TASK_AXIS[i % len(TASK_AXIS)] for i in range(len(ids))]
    got = emb.encode_ids(ids, tasks=tasks, packed=packed)
    assert max_err(got, alone(emb, ids, tasks)) < ATOL_VECTORS


def test_packed_segments_do_not_attend_to_each_other(emb: Embedder,
                                                     ids: list[np.ndarray]) -> None:
    """Changing one packed neighbour leaves the other rows' vectors unchanged."""
    first = emb.encode_ids([ids[0], ids[1]], packed=True)
    second = emb.encode_ids([ids[0], ids[3]], packed=True)
    assert max_err(first[0], second[0]) < ATOL_VECTORS
    assert max_err(first[1], second[1]) > 1e-2  # the other row really changed


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "block-mask"])
@pytest.mark.parametrize("equal_lengths", [False, True], ids=["uneven", "equal-lengths"])
def test_changing_one_packed_row_leaves_the_others(emb: Embedder, ids: list[np.ndarray],
                                                   varlen: bool, equal_lengths: bool) -> None:
    """Same offsets and positions, different tokens in the middle row: only that row moves.
    Equal lengths go through one batched SDPA call per length in the varlen path."""
    rows = [x[:9] for x in ids[:4]] if equal_lengths else ids[:4]
    changed = [*rows[:2], rows[2][::-1].copy(), rows[3]]  # same length, other tokens
    emb.varlen = varlen
    try:
        before = emb.encode_ids(rows, task="retrieval.query", packed=True)
        after = emb.encode_ids(changed, task="retrieval.query", packed=True)
    finally:
        emb.varlen = True
    keep = [0, 1, 3]
    assert max_err(before[keep], after[keep]) < ATOL_SAME_PATH
    assert max_err(before[2], after[2]) > 1e-2
    assert max_err(after, alone(emb, changed, ["retrieval.query"] * 4)) < ATOL_VECTORS


def test_jina_packs_with_varlen_attention(emb: Embedder, ids: list[np.ndarray],
                                          golden_dir: Path) -> None:
    """jina-v3 packs through the varlen path; interleaved padded forwards keep the golden
    values (the attention implementation is not switched back and forth)."""
    exp = expected(golden_dir)
    assert emb.varlen
    for k, task in enumerate(TASK_AXIS):
        padded = emb.encode_ids(real_ids(exp), task=task)
        packed = emb.encode_ids(real_ids(exp), task=task, packed=True)
        assert max_err(padded, exp["embeddings"][k]) < ATOL_VECTORS
        assert max_err(packed, exp["embeddings"][k]) < ATOL_VECTORS
    emb.varlen = False
    try:
        block_mask = emb.encode_ids(ids, task="separation", packed=True)
    finally:
        emb.varlen = True
    assert max_err(emb.encode_ids(ids, task="separation", packed=True), block_mask) < ATOL_VECTORS


@pytest.mark.parametrize("lengths", [[5, 1, 17, 5, 5, 32, 1], [64], [3, 3, 3, 3]],
                         ids=["mixed", "one", "all-equal"])
def test_per_sequence_sdpa_equals_block_diagonal_mask(lengths: list[int]) -> None:
    torch.manual_seed(0)
    total, heads, head_dim = sum(lengths), 4, 16
    q, k, v = (torch.randn(total, heads, head_dim) for _ in range(3))  # [T, heads, head_dim]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = segment[:, None] == segment[None, :]  # [T, T]
    dense = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)),
                                           attn_mask=mask, scale=0.3).transpose(0, 1)
    assert max_err(per_sequence_sdpa(q, k, v, cu, 0.3).numpy(), dense.numpy()) < 1e-5


@pytest.mark.parametrize("task", [None, "retrieval.passage"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_encode_batches_equals_encode_ids(emb: Embedder, ids: list[np.ndarray],
                                          task: str | None, packed: bool) -> None:
    batches = [ids[:3], [], ids[3:4], ids[4:][::-1], [ids[1][:7], ids[2][:7]]]  # last: no padding
    got = emb.encode_batches(batches, task=task, packed=packed)
    assert len(got) == len(batches)
    assert got[1].shape == (0, emb.hidden_size)
    for batch, vectors in zip(batches, got, strict=True):
        assert vectors.dtype == np.float32
        if batch:
            want = emb.encode_ids(batch, task=task, packed=packed)
            assert max_err(vectors, want) < ATOL_SAME_PATH
    assert emb.encode_batches([], task=task) == []


def test_encode_batches_checks_every_batch_first(emb: Embedder, ids: list[np.ndarray]) -> None:
    too_long = np.zeros(emb.spec.max_tokens + 1, dtype=np.int32)
    with pytest.raises(ValueError, match="text has 8195 tokens"):
        emb.encode_batches([ids[:2], [too_long]])
    with pytest.raises(ValueError, match="retreival.query"):
        emb.encode_batches([ids[:2]], task="retreival.query")


def test_encode_batches_raises_out_of_memory(emb: Embedder, ids: list[np.ndarray],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller splits batches on torch.OutOfMemoryError, so it must come through as is."""
    calls = []

    def second_forward_oom(**kwargs):
        calls.append(kwargs["input_ids"].shape)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return model(**kwargs)

    model = emb.model
    monkeypatch.setattr(emb, "model", second_forward_oom)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        emb.encode_batches([ids[:2], ids[2:4], ids[4:]], task="separation")
    assert len(calls) == 2


@pytest.mark.slow
def test_compiled_equals_eager_without_recompiling(emb: Embedder, ids: list[np.ndarray],
                                                   golden_dir: Path) -> None:
    """compile=True: same vectors; a second padded shape and a second packed batch reuse
    the graphs of the first (dynamic shapes); adapter switches and mixed tasks stay right.
    ~1 min on a 2-core CPU (cold compile cache)."""
    from torch._dynamo.utils import counters

    compiled = load_embedder(str(golden_dir), compile=True)
    for packed in (False, True):
        first, second = ids[:4], ids[4:] + ids[:1]
        got = compiled.encode_batches([first], task="retrieval.query", packed=packed)[0]
        graphs = counters["stats"]["unique_graphs"]
        assert max_err(got, emb.encode_ids(first, task="retrieval.query", packed=packed)) < (
            ATOL_VECTORS)
        got = compiled.encode_ids(second, task="retrieval.query", packed=packed)
        assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a new shape"
        assert max_err(got, emb.encode_ids(second, task="retrieval.query", packed=packed)) < (
            ATOL_VECTORS)
    # switching adapters recompiles or reuses the graph of that adapter state, never another's
    for task in (None, "separation", "retrieval.query", None):
        assert max_err(compiled.encode_ids(ids, task=task), emb.encode_ids(ids, task=task)) < (
            ATOL_VECTORS)
    # mixed tasks select adapters with PEFT forward hooks: must not reuse a compiled graph
    tasks = [TASK_AXIS[i % len(TASK_AXIS)] for i in range(len(ids))]
    assert max_err(compiled.encode_ids(ids, tasks=tasks), alone(emb, ids, tasks)) < ATOL_VECTORS


def test_outputs_are_unit_norm_float32(emb: Embedder, ids: list[np.ndarray]) -> None:
    for packed in (False, True):
        got = emb.encode_ids(ids, task="separation", packed=packed)
        assert got.dtype == np.float32 and got.shape == (len(ids), emb.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert emb.encode_ids([], task=None).shape == (0, emb.hidden_size)


def test_encode_ids_argument_errors(emb: Embedder, ids: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="not both"):
        emb.encode_ids(ids, task="separation", tasks=["separation"] * len(ids))
    with pytest.raises(ValueError, match="2 tasks for 3 rows"):
        emb.encode_ids(ids[:3], tasks=[None, None])
    too_long = np.zeros(emb.spec.max_tokens + 1, dtype=np.int32)
    with pytest.raises(ValueError, match="text has 8195 tokens, max_tokens is 8194"):
        emb.encode_ids([too_long])
