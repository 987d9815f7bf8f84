"""Late chunking on the golden jina-v3 tiny checkpoint: every chunk vector equals one forward
over the document, the mean of the span's token states, truncate, normalize (1e-5), both from
the recorded reference token states and from a plain model forward; split chunks equal
``encode_ids`` of each chunk alone; a one-chunk document equals ``--chunking none``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedjob.model import matryoshka
from embedjob.stages import chunks as C
from tests.model_fixtures import ATOL_VECTORS, TASK_AXIS, expected, max_err, real_ids

pytestmark = pytest.mark.unit


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pools(n_text: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Row positions of each chunk of a ``<s> text </s>`` row (lead 1, trail 1)."""
    offsets = np.stack([np.arange(n_text), np.arange(n_text) + 1], axis=1)
    spans = C.plan_spans(offsets, n_text, size, overlap)
    pools = C.late_pools(spans, [(0, n_text)], n_text, lead=1, trail=1)
    return [(p.start, p.end) for p in pools]


@pytest.mark.parametrize("task", [None, "retrieval.passage"])
def test_late_chunks_equal_the_recorded_token_states_pooled(golden_dir, embedder, task) -> None:
    exp = expected(golden_dir)
    t = TASK_AXIS.index(task)
    rows = real_ids(exp)
    for i, ids in enumerate(rows):
        pools = _pools(len(ids) - 2, 16, 4)
        assert len(pools) > 1 or len(ids) < 20
        got = embedder.encode_spans([ids], [pools], task=task)[0]
        states = exp["last_hidden_state"][t, i].astype(np.float64)  # [L, H] recorded
        for d in (64, 16):
            want = _l2(np.stack([states[a:b].mean(0)[:d] for a, b in pools]))
            assert max_err(matryoshka(got, d), want) < ATOL_VECTORS, (i, d)


def test_late_chunks_equal_a_plain_forward_in_a_batch(embedder) -> None:
    """Several rows of other lengths in one padded forward; the reference is the model's
    own forward of each row alone, pooled in numpy."""
    texts = ["A short one.", "Late chunking pools each chunk from one forward over the whole "
             "document, so every chunk sees its context. " * 3, "Ein deutscher Satz, kurz."]
    tok = embedder.tokenizer
    ids = tok.tokenize(texts, "retrieval.passage").ids
    lead = len(tok.tokenize_documents(["x"], "retrieval.passage")[0].lead)
    spans = []
    for x in ids:
        offsets = np.stack([np.arange(len(x) - lead - 1)] * 2, axis=1)
        plan = C.plan_spans(offsets, 0, 7, 2)
        n = len(x) - lead - 1
        spans.append([(p.start, p.end) for p in
                      C.late_pools(plan, [(0, n)], n, lead=lead, trail=1)])
    got = embedder.encode_spans(ids, spans, task="retrieval.passage")
    for x, row, vectors in zip(ids, spans, got, strict=True):
        out = embedder.forward(torch.from_numpy(x[None].astype(np.int64)),
                               torch.ones(1, len(x), dtype=torch.int64),
                               tasks=["retrieval.passage"])
        states = out.last_hidden_state[0].double().numpy()
        want = _l2(np.stack([states[a:b].mean(0) for a, b in row]))
        assert max_err(vectors, want) < ATOL_VECTORS
        assert max_err(matryoshka(vectors, 32), _l2(want[:, :32])) < ATOL_VECTORS


def test_a_one_chunk_document_gets_the_vector_of_chunking_none(embedder) -> None:
    ids = embedder.tokenizer.tokenize(["Everyone has the right to life."], "retrieval.query").ids
    late = embedder.encode_spans(ids, [[(0, len(ids[0]))]], task="retrieval.query")[0]
    assert max_err(late, embedder.encode_ids(ids, task="retrieval.query")) < ATOL_VECTORS


def test_bad_spans_are_refused(embedder) -> None:
    ids = embedder.tokenizer.tokenize(["abc def"]).ids
    with pytest.raises(ValueError, match="not inside a row"):
        embedder.encode_spans(ids, [[(2, 2)]])
    with pytest.raises(ValueError, match="not inside a row"):
        embedder.encode_spans(ids, [[(0, len(ids[0]) + 1)]])
