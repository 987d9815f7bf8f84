"""jina-embeddings-v3 (and plain HF encoders) on transformers + PEFT, for batch embedding.

``load_spec`` / ``TextTokenizer`` need no weights (CPU tokenizer workers); ``load_embedder``
loads the model; ``convert_checkpoint`` writes the converted (-hf) layout.

Names are imported on first use (PEP 562), so ``embedjob.errors`` and the CLI's start-up do not
pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "convert_checkpoint": "embedjob.model.convert",
    "Embedder": "embedjob.model.embedder",
    "load_embedder": "embedjob.model.embedder",
    "matryoshka": "embedjob.model.embedder",
    "ModelSpec": "embedjob.model.spec",
    "TextTokenizer": "embedjob.model.spec",
    "Tokenized": "embedjob.model.spec",
    "load_spec": "embedjob.model.spec",
    "load_tokenizer": "embedjob.model.spec",
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
    from embedjob.model.convert import convert_checkpoint
    from embedjob.model.embedder import Embedder, load_embedder, matryoshka
    from embedjob.model.spec import ModelSpec, TextTokenizer, Tokenized, load_spec, load_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'embedjob.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
