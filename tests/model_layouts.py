"""Tiny random-weight checkpoints in the on-disk layouts of the permissive XLM-R-trunk models.

Each is written the way its hub repository is laid out (``config.json`` of an
``XLMRobertaModel``, ``modules.json`` with Transformer / Pooling / Normalize, the Pooling and
``sentence_bert_config.json`` values, prompts in ``config_sentence_transformers.json``, the
licence in the model card's front matter), with the shipped XLM-R tokenizer and a 2-layer,
32-wide trunk (random weights: the figures show the mechanics, not quality).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embedjob.bench.checkpoint import tokenizer_dir


@dataclass(frozen=True)
class Layout:
    repo: str
    positions: int  # max_position_embeddings (RoBERTa: + pad offset 2)
    max_seq_length: int
    pooling: str
    license: str
    prompts: dict[str, str] = field(default_factory=dict)
    extra_files: tuple[str, ...] = ()  # pickle files the repository also ships


LAYOUTS: dict[str, Layout] = {
    "bge-m3": Layout("BAAI/bge-m3", 8194, 8192, "cls", "mit",
                     extra_files=("colbert_linear.pt", "sparse_linear.pt")),
    "e5": Layout("intfloat/multilingual-e5-large", 514, 512, "mean", "mit",
                 prompts={"query": "query: ", "passage": "passage: "}),
    "arctic": Layout("Snowflake/snowflake-arctic-embed-l-v2.0", 8194, 8192, "cls",
                     "apache-2.0", prompts={"query": "query: "}),
}


def write_layout(name: str, dst: Path, *, seed: int = 0, weights: str = "safetensors") -> Path:
    """Write the tiny ``name`` checkpoint into ``dst``.

    Args:
        weights: ``safetensors`` (model.safetensors) or ``pickle`` (only pytorch_model.bin,
            as bge-m3's main branch ships it).
    """
    from transformers import XLMRobertaConfig, XLMRobertaModel

    layout = LAYOUTS[name]
    dst.mkdir(parents=True)
    tok = tokenizer_dir()
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {**tok_config, "model_max_length": layout.max_seq_length}))
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=250002, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=layout.positions, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, architectures=["XLMRobertaModel"])
    model = XLMRobertaModel(config, add_pooling_layer=True).eval()
    if weights == "pickle":
        config.save_pretrained(dst)
        torch.save(model.state_dict(), dst / "pytorch_model.bin")
    else:
        model.save_pretrained(dst, safe_serialization=True)
    for extra in layout.extra_files:
        torch.save({"weight": torch.zeros(1)}, dst / extra)
    _write_st_files(layout, dst)
    return dst


def _write_st_files(layout: Layout, dst: Path) -> None:
    st = "sentence_transformers.models."
    (dst / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"},
    ], indent=2))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": layout.pooling == "cls",
        "pooling_mode_mean_tokens": layout.pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (dst / "2_Normalize").mkdir()
    (dst / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": layout.max_seq_length, "do_lower_case": False}))
    (dst / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"sentence_transformers": "3.0.1"},
        "prompts": layout.prompts, "default_prompt_name": None, "similarity_fn_name": "cosine",
    }, indent=2))
    (dst / "README.md").write_text(
        f"---\nlicense: {layout.license}\nlibrary_name: sentence-transformers\n---\n\n"
        f"# tiny {layout.repo} layout (random weights)\n")
