"""embedjob.ray: embed() over a user's dataset and the Encoder map_batches class, on real
Ray with the golden jina checkpoint: every vector equals encoding its text alone."""

from __future__ import annotations

import numpy as np
import pytest

from embedjob.errors import UnknownTaskError, UnsupportedDimError
from embedjob.model import matryoshka
from tests.model_fixtures import ATOL_VECTORS, max_err
from tests.pipeline_helpers import real_rows

pytestmark = pytest.mark.pipeline

TASK = "retrieval.passage"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    out = [{"doc": f"d{r['id']}", "text": r["text"], "lang": r["lang"]} for r in real_rows(10)]
    out.append({"doc": "long", "text": "word " * 9000, "lang": "en"})  # over 8194 tokens
    out.append({"doc": "none", "text": None, "lang": "en"})
    return out


def alone(embedder, text: str, dim: int | None = None) -> np.ndarray:
    return embedder.encode([text], task=TASK, dim=dim)[0]


def test_embed_over_a_user_dataset(ray_session, golden_dir, embedder, rows) -> None:
    import embedjob.ray

    ds = ray_session.data.from_items(rows, override_num_blocks=3)
    out = embedjob.ray.embed(ds, model=str(golden_dir), task=TASK, dims=(32,),
                             max_tokens_per_batch=9000, window_rows=6, num_actors=1)
    got = {r["doc"]: r for r in out.take_all()}
    assert sorted(got) == sorted(r["doc"] for r in rows)
    for r in rows:
        row = got[r["doc"]]
        assert row["lang"] == r["lang"] and row["text"] == r["text"]
        if r["text"] is None:
            assert row["vector"] is None and row["vector_32"] is None and row["n_tokens"] == 0
            continue
        assert max_err(np.asarray(row["vector"]), alone(embedder, r["text"])) < ATOL_VECTORS
        assert max_err(np.asarray(row["vector_32"]), alone(embedder, r["text"], 32)) \
            < ATOL_VECTORS
        ids = embedder.tokenizer.tokenize([r["text"]], TASK)
        assert row["n_tokens"] == len(ids.ids[0])
        assert row["truncated"] == (r["doc"] == "long")
    assert sorted(c for c in out.schema().names if c.startswith("_")) == []


def test_embed_refuses_bad_task_and_dim_before_work(ray_session, golden_dir) -> None:
    import embedjob.ray

    ds = ray_session.data.from_items([{"text": "x"}])
    with pytest.raises(UnknownTaskError, match="retreival"):
        embedjob.ray.embed(ds, model=str(golden_dir), task="retreival.query")
    with pytest.raises(UnsupportedDimError, match="dim 48"):
        embedjob.ray.embed(ds, model=str(golden_dir), task=TASK, dims=(48,))


@pytest.mark.parametrize("batch_format", ["default", "pyarrow"])
def test_encoder_in_map_batches(ray_session, golden_dir, embedder, rows,
                                batch_format: str) -> None:
    from embedjob.ray import Encoder

    ds = ray_session.data.from_items(rows[:10], override_num_blocks=2)
    out = ds.map_batches(
        Encoder, fn_constructor_kwargs={"model": str(golden_dir), "task": TASK, "dims": 16,
                                        "device": "cpu"},
        batch_size=4, batch_format=batch_format,
        compute=ray_session.data.ActorPoolStrategy(size=1))
    # Ray Data may hand the two blocks over in either order (preserve_order is off);
    # within a batch each output row is its input row: every vector is its own text's
    by_doc = {r["doc"]: r for r in out.take_all()}
    assert sorted(by_doc) == sorted(r["doc"] for r in rows[:10])
    got = [by_doc[r["doc"]] for r in rows[:10]]
    full = np.stack([np.asarray(r["vector"]) for r in got])
    want = np.stack([alone(embedder, r["text"]) for r in rows[:10]])
    assert max_err(full, want) < ATOL_VECTORS
    assert max_err(np.stack([np.asarray(r["vector_16"]) for r in got]),
                   matryoshka(want, 16)) < ATOL_VECTORS
