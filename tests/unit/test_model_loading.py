"""Sources, layouts and refusals: what loads, what fails, and what the errors say."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from embedjob.errors import (
    CheckpointError,
    ModelSourceError,
    UnknownTaskError,
    UnsupportedDimError,
)
from embedjob.model import (
    ModelSpec,
    TextTokenizer,
    convert_checkpoint,
    load_embedder,
    load_spec,
    load_tokenizer,
    matryoshka,
)
from tests.model_fixtures import (
    ATOL_VECTORS,
    TASK_AXIS,
    encode_key,
    expected,
    max_err,
    real_ids,
)

pytestmark = pytest.mark.unit


ADAPTERS = ("retrieval_query", "retrieval_passage", "separation", "classification",
            "text_matching")
HEX40 = "0123456789abcdef0123456789abcdef01234567"


def assert_reproduces_golden(source: str, exp: dict[str, np.ndarray]) -> None:
    emb = load_embedder(source)
    texts = [str(t) for t in exp["encode_texts"]]
    for k, task in enumerate(TASK_AXIS):
        assert max_err(emb.encode_ids(real_ids(exp), task=task), exp["embeddings"][k]) < 1e-5
        assert max_err(emb.encode(texts, task=task), exp[encode_key(task)]) < 1e-5


def copy_golden(golden_dir: Path, dst: Path) -> Path:
    shutil.copytree(golden_dir, dst, ignore=shutil.ignore_patterns("model-bf16", "*.npz", "*.md"))
    return dst


# --- layout (2): converted -hf --------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "bf16"])
def test_convert_checkpoint_roundtrip_equals_golden(golden_dir: Path, tmp_path: Path,
                                                    variant: str) -> None:
    src = golden_dir if variant == "fp32" else golden_dir / "model-bf16"
    dst = convert_checkpoint(src, tmp_path / "hf")
    assert sorted(p.name for p in dst.iterdir() if p.is_dir()) == sorted(ADAPTERS)
    with safe_open(str(dst / "model.safetensors"), "pt") as f:  # native keys, source dtype
        assert "layers.0.self_attn.q_proj.weight" in set(f.keys())
        assert f.get_tensor("pooler.dense.weight").dtype == (
            torch.float32 if variant == "fp32" else torch.bfloat16)
    assert_reproduces_golden(str(dst), expected(src))
    merged = load_embedder(str(dst), merge_task="classification")
    k = TASK_AXIS.index("classification")
    assert max_err(merged.encode_ids(real_ids(expected(src)), task="classification"),
                   expected(src)["embeddings"][k]) < ATOL_VECTORS


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_converted_adapters_are_plain_peft(golden_dir: Path, tmp_path: Path) -> None:
    """transformers + peft alone (no code of ours) load the converted layout."""
    from peft import PeftModel
    from transformers import JinaEmbeddingsV3Model

    dst = convert_checkpoint(golden_dir, tmp_path / "hf")
    exp = expected(golden_dir)
    base = JinaEmbeddingsV3Model.from_pretrained(str(dst))
    model = PeftModel.from_pretrained(base, str(dst / "retrieval_query"), adapter_name="q").eval()
    ids, mask = torch.from_numpy(exp["input_ids"]), torch.from_numpy(exp["attention_mask"])
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    keep = exp["attention_mask"].astype(bool)
    assert max_err(hidden[keep], exp["last_hidden_state"][1][keep]) < 1e-4


def test_missing_adapter_folder_is_named(golden_dir: Path, tmp_path: Path) -> None:
    dst = convert_checkpoint(golden_dir, tmp_path / "hf")
    shutil.rmtree(dst / "separation")
    with pytest.raises(CheckpointError, match="adapter of task 'separation' missing"):
        load_embedder(str(dst))


def test_bf16_weights_load_into_requested_dtype(golden_dir: Path) -> None:
    src = str(golden_dir / "model-bf16")
    assert next(load_embedder(src).model.parameters()).dtype == torch.float32
    emb = load_embedder(src, dtype="bfloat16")
    assert {p.dtype for n, p in emb.model.named_parameters() if "lora" not in n} == {
        torch.bfloat16}
    exp = expected(golden_dir / "model-bf16")
    assert max_err(emb.encode_ids(real_ids(exp)), exp["embeddings"][0]) < 5e-2
    with pytest.raises(ValueError, match=r"dtype 'int8' not in \['float32'"):
        load_embedder(src, dtype="int8")


# --- hub ------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache with the hub switched off (constants are read at import time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    return cache


def test_hub_id_resolves_from_offline_cache(golden_dir: Path, offline_hub: Path) -> None:
    repo = offline_hub / "models--jinaai--jina-embeddings-v3"
    copy_golden(golden_dir, repo / "snapshots" / HEX40)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HEX40)
    spec = load_spec("jinaai/jina-embeddings-v3")
    assert spec.revision == HEX40 and spec.kind == "jina-v3"
    emb = load_embedder("jinaai/jina-embeddings-v3")
    assert emb.spec.fingerprint == spec.fingerprint
    assert emb.spec.local_dir == str(repo / "snapshots" / HEX40)
    assert_reproduces_golden("jinaai/jina-embeddings-v3", expected(golden_dir))


def test_uncached_hub_id_offline_names_id_and_suggests_local_path(offline_hub: Path) -> None:
    for call in (load_embedder, load_spec):
        with pytest.raises(ModelSourceError, match="'jinaai/jina-embeddings-v3'") as info:
            call("jinaai/jina-embeddings-v3")
        assert "local directory" in str(info.value)


def test_unresolvable_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="not a local directory, an s3:// prefix or a hub"):
        load_spec(str(tmp_path / "nowhere" / "a" / "b"))


# --- s3 (through any fsspec filesystem; the job's tests use a real S3 server) ----------


class CountingFS:
    """fsspec LocalFileSystem that counts downloads."""

    def __init__(self) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.downloaded = LocalFileSystem(), []

    def find(self, path: str, detail: bool = False):
        return self.fs.find(path, detail=detail)

    def get(self, remote: str, local: str) -> None:
        self.downloaded.append(Path(remote).name)
        self.fs.get(remote, local)


def test_s3_source_downloads_small_files_for_spec_and_reuses_cache(
        golden_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDJOB_CACHE", str(tmp_path / "cache"))
    bucket = copy_golden(golden_dir, tmp_path / "bucket" / "jina")
    (bucket / "stray.bin").write_bytes(b"never downloaded")
    uri, fs = f"s3://{bucket}", CountingFS()
    spec = load_spec(uri, filesystem=fs)
    assert "model.safetensors" not in fs.downloaded and "stray.bin" not in fs.downloaded
    assert "tokenizer.json" in fs.downloaded
    assert Path(spec.local_dir).parent == tmp_path / "cache"
    emb = load_embedder(uri, filesystem=fs)
    assert fs.downloaded.count("model.safetensors") == 1 and "stray.bin" not in fs.downloaded
    assert emb.spec.fingerprint == spec.fingerprint
    n = len(fs.downloaded)
    load_embedder(uri, filesystem=fs)
    assert len(fs.downloaded) == n  # unchanged ETag/size: nothing fetched again
    exp = expected(golden_dir)
    assert max_err(emb.encode_ids(real_ids(exp)), exp["embeddings"][0]) < ATOL_VECTORS


# --- refusals: pickle, missing / unexpected / misshapen tensors ------------------------


def test_pickle_only_checkpoint_is_refused(golden_dir: Path, tmp_path: Path) -> None:
    d = copy_golden(golden_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    for call in (load_embedder, load_spec):
        with pytest.raises(CheckpointError, match=r"safetensors.*pytorch_model\.bin"):
            call(str(d))


def rewrite_weights(d: Path, edit) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_missing_tensor_is_named(golden_dir: Path, tmp_path: Path) -> None:
    d = copy_golden(golden_dir, tmp_path / "m")
    rewrite_weights(d, lambda t: t.pop("roberta.encoder.layers.1.mlp.fc1.bias"))
    with pytest.raises(CheckpointError,
                       match=r"missing tensors \['roberta\.encoder\.layers\.1\.mlp\.fc1\.bias'\]"):
        load_embedder(str(d))


def test_unexpected_tensor_is_named(golden_dir: Path, tmp_path: Path) -> None:
    d = copy_golden(golden_dir, tmp_path / "m")
    rewrite_weights(d, lambda t: t.update({"roberta.encoder.layers.2.norm1.bias": torch.zeros(64),
                                           "lm_head.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['lm_head\.bias', "
                                              r"'roberta\.encoder\.layers\.2\.norm1\.bias'\]"):
        load_embedder(str(d))


def test_misshapen_lora_stack_is_named(golden_dir: Path, tmp_path: Path) -> None:
    d = copy_golden(golden_dir, tmp_path / "m")
    key = "roberta.encoder.layers.0.mlp.fc2.parametrizations.weight.0.lora_A"
    rewrite_weights(d, lambda t: t.update({key: t[key][:4].clone()}))
    with pytest.raises(CheckpointError, match=rf"{key}: shape \[4, 4, 128\] is not \[5 adapters"):
        load_embedder(str(d))


def test_fingerprint_identifies_weights(golden_dir: Path, tmp_path: Path) -> None:
    d = copy_golden(golden_dir, tmp_path / "m")
    assert load_spec(str(d)).fingerprint == load_spec(str(golden_dir)).fingerprint
    rewrite_weights(d, lambda t: t["roberta.pooler.dense.bias"].add_(1.0))
    assert load_spec(str(d)).fingerprint != load_spec(str(golden_dir)).fingerprint


# --- tasks, dims, truncation ----------------------------------------------------------


def test_unknown_task_lists_valid_tasks(golden_dir: Path) -> None:
    emb = load_embedder(str(golden_dir))
    want = r"task 'retreival\.query' not in \['retrieval\.query', 'retrieval\.passage', "
    for call in (lambda: emb.encode(["x"], task="retreival.query"),
                 lambda: emb.encode_ids([np.array([0, 2], np.int32)], task="retreival.query"),
                 lambda: emb.tokenizer.tokenize(["x"], "retreival.query"),
                 lambda: load_embedder(str(golden_dir), merge_task="retreival.query")):
        with pytest.raises(UnknownTaskError, match=want):
            call()


def test_bad_dim_lists_matryoshka_dims(golden_dir: Path) -> None:
    emb = load_embedder(str(golden_dir))
    with pytest.raises(UnsupportedDimError,
                       match=r"dim 100 not in matryoshka dims \[8, 16, 32, 64\]"):
        emb.encode(["x"], dim=100)
    with pytest.raises(UnsupportedDimError):
        emb.spec.check_dim(12)


def test_matryoshka_is_truncate_then_normalise() -> None:
    v = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], dtype=np.float64)
    got = matryoshka(v, 2)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    with pytest.raises(UnsupportedDimError):
        matryoshka(v, 4)


def one_token_word(tok: TextTokenizer) -> str:
    """A word that costs exactly one token per repetition in the tiny tokenizer."""
    for word in (" the", " a", " and", " of"):
        lengths = [len(x) for x in tok.tokenize([word * 10, word * 11]).ids]
        if lengths == [12, 13]:
            return word
    raise AssertionError("no one-token word found")


def test_truncation_at_8194_tokens_is_reported(golden_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    spec = load_spec(str(golden_dir))
    tok = spec.tokenizer()
    assert spec.max_tokens == 8194
    word = one_token_word(tok)
    fits, over = word * 8192, word * 8193  # + <s> and </s>
    out = tok.tokenize([fits, over, "short"])
    assert [len(x) for x in out.ids] == [8194, 8194, 4]
    assert out.truncated.tolist() == [False, True, False]
    assert out.ids[1][-1] == 2 and out.ids[1][0] == 0  # </s> kept at the end
    prefixed = tok.tokenize([word * 8190], "retrieval.query")  # prefix pushes it over
    assert len(prefixed.ids[0]) == 8194 and prefixed.truncated.tolist() == [True]
    emb = load_embedder(str(golden_dir))
    with caplog.at_level(logging.WARNING, logger="embedjob.model.embedder"):
        got = emb.encode([over, "short"])
    assert "1 of 2 texts truncated to 8194 tokens: indices [0]" in caplog.text
    assert max_err(got, emb.encode_ids(out.ids[1:])) < ATOL_VECTORS


def test_ten_megabyte_text_does_not_hang(golden_dir: Path) -> None:
    tok = load_tokenizer(str(golden_dir))
    start = time.perf_counter()
    out = tok.tokenize(["Die Katze schläft auf dem warmen Fensterbrett. " * 220_000, "ok"])
    assert time.perf_counter() - start < 10
    assert [len(x) for x in out.ids] == [8194, 4] and out.truncated.tolist() == [True, False]


# --- spec -----------------------------------------------------------------------------


def test_spec_describes_model_and_pickles(golden_dir: Path) -> None:
    spec = load_spec(str(golden_dir))
    assert (spec.kind, spec.default_task, spec.hidden_size, spec.pooling) == (
        "jina-v3", "retrieval.passage", 64, "mean")
    assert spec.tasks == TASK_AXIS[1:]
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(pickle.loads(pickle.dumps(spec))) == hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kind = "generic"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"pooling 'median' not in \['cls', 'max', 'mean', "):
        dataclasses.replace(spec, pooling="median")
    with pytest.raises(ValueError, match=r"pooling 'max': jina-v3 pools by 'mean'"):
        dataclasses.replace(spec, pooling="max")
    tok = pickle.loads(pickle.dumps(spec.tokenizer()))
    assert isinstance(tok, TextTokenizer) and isinstance(tok.spec, ModelSpec)
    assert tok.tokenize(["Short."]).ids[0].dtype == np.int32
    emb = load_embedder(str(golden_dir))
    assert emb.spec == spec and emb.hidden_size == 64 and emb.matryoshka_dims == (8, 16, 32, 64)
