"""jina-embeddings-v3 (and plain HF encoders) on transformers + PEFT, for batch embedding.

``load_spec`` / ``TextTokenizer`` need no weights (CPU tokenizer workers); ``load_embedder``
loads the model; ``convert_checkpoint`` writes the converted (-hf) layout.
"""

from model.convert import convert_checkpoint
from model.embedder import Embedder, load_embedder, matryoshka
from model.spec import ModelSpec, TextTokenizer, Tokenized, load_spec, load_tokenizer

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
