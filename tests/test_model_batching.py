"""A text embedded alone equals the same text inside a padded or a packed batch (fp32, 1e-5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model import Embedder, load_embedder
from tests.model_fixtures import (
    ATOL_VECTORS,
    TASK_AXIS,
    expected,
    max_err,
    real_ids,
)

pytestmark = pytest.mark.unit



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
