"""jina-embeddings-v3 (and plain HF encoders) on transformers + PEFT, for batch embedding.

``load_spec`` / ``TextTokenizer`` need no weights (CPU tokenizer workers); ``load_embedder``
loads the model; ``convert_checkpoint`` writes the converted (-hf) layout.

Names are imported on first use (PEP 562), so ``model.errors`` and the CLI's start-up do not
pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "convert_checkpoint": "model.convert",
    "Embedder": "model.embedder",
    "load_embedder": "model.embedder",
    "matryoshka": "model.embedder",
    "ModelSpec": "model.spec",
    "TextTokenizer": "model.spec",
    "Tokenized": "model.spec",
    "load_spec": "model.spec",
    "load_tokenizer": "model.spec",
}
__all__ = [
    "Embedder",
    "ModelSpec",
    "TextTokenizer",
    "Tokenized",
    "convert_checkpoint",
    "load_embedder",
    "load_spec",
    "load_tokenizer",
    "matryoshka",
]

if TYPE_CHECKING:
    from model.convert import convert_checkpoint
    from model.embedder import Embedder, load_embedder, matryoshka
    from model.spec import ModelSpec, TextTokenizer, Tokenized, load_spec, load_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
