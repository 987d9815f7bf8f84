"""What a model is (ModelSpec) and its tokenizer, read without loading any weights.

CPU tokenizer workers use only this module: ``load_spec`` reads config and tokenizer files
(for ``s3://`` and hub sources it downloads only those small files).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedjob.errors import (
    BugError,
    CheckpointError,
    UnknownTaskError,
    UnsupportedDimError,
    did_you_mean,
)
from embedjob.model import generic
from embedjob.model.source import ResolvedSource, resolve
from embedjob.model.tasks import JINA_DEFAULT_TASK, JINA_V3_DEFAULTS, TASK_ADAPTERS

logger = logging.getLogger(__name__)

Kind = Literal["jina-v3", "generic"]
Layout = Literal["original", "hf", "generic"]
KINDS: tuple[str, ...] = ("jina-v3", "generic")

JINA_HF_MODEL_TYPE = "jina_embeddings_v3"
# A text is cut at max_tokens * this many characters before tokenizing, so a 10 MB text
# costs a bounded tokenizer call. Real tokens average 3-5 characters (XLM-R on Brown: ~4.4);
# the cut can only matter for texts averaging over 64 characters per token.
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything about a model that tokenizing, batching and writing need; picklable.

    Attributes:
        source: The source as given (local dir, ``s3://`` prefix or hub id).
        kind: ``jina-v3`` (task adapters) or ``generic`` (plain HF encoder).
        tasks: Valid task names; for generic encoders the names of their sentence-transformers
            prompts (plus ``retrieval.query`` / ``retrieval.passage`` for ``query`` /
            ``passage``), usually none.
        default_task: The task a job uses when none is given (None: no adapter; generic
            encoders: their ``default_prompt_name``).
        instructions: Task -> instruction prefix prepended to the text before tokenizing.
        matryoshka_dims: Dims a vector may be truncated to (ascending, last = hidden_size).
        hidden_size: Full embedding width.
        max_tokens: Tokens per text including special tokens; longer texts are truncated.
        pooling: sentence-transformers Pooling modes joined by ``+`` (``mean``: over every
            non-padding token; ``cls``: the first token; ``max``, ``mean_sqrt_len_tokens``,
            ``weightedmean``, ``lasttoken``).
        head: Generic models: what sentence-transformers runs after the transformer (pooling
            options, Dense / Normalize modules); None for jina-v3 (mean pooling, normalize).
        fingerprint: Stable hash identifying the weights.
        revision: Hub commit when known.
        local_dir: Local directory holding the model files (weights may be absent).
        license: The model's licence (model card front matter ``license:`` or config.json
            ``license``), else ``unknown``.
    """

    source: str
    kind: Kind
    tasks: tuple[str, ...]
    default_task: str | None
    instructions: dict[str, str] = field(default_factory=dict)
    matryoshka_dims: tuple[int, ...]
    hidden_size: int
    max_tokens: int
    pooling: str
    fingerprint: str
    revision: str | None
    local_dir: str
    head: generic.Head | None = None
    license: str = "unknown"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} not in {list(KINDS)}")
        if not set(self.pooling.split("+")) <= set(generic.POOLING_MODES):
            raise ValueError(f"pooling {self.pooling!r} not in {list(generic.POOLING_MODES)}")
        if self.kind == "jina-v3" and (self.pooling != "mean" or self.head is not None):
            raise ValueError(f"pooling {self.pooling!r}: jina-v3 pools by 'mean' (no head)")
        if self.default_task is not None:
            self.check_task(self.default_task)
        unknown = sorted(set(self.instructions) - set(self.tasks))
        if unknown:
            raise ValueError(f"instructions for tasks {unknown} not in {list(self.tasks)}")
        if not self.matryoshka_dims or max(self.matryoshka_dims) > self.hidden_size:
            raise ValueError(
                f"matryoshka dims {list(self.matryoshka_dims)} must be non-empty and "
                f"<= hidden_size {self.hidden_size}"
            )
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens {self.max_tokens} must be >= 2")

    def __hash__(self) -> int:
        # The generated hash would fail on the instructions dict; the rest identifies a spec.
        return hash((self.source, self.fingerprint, self.kind, self.tasks, self.max_tokens,
                     tuple(sorted(self.instructions.items()))))

    def check_task(self, task: str | None) -> None:
        """Raise UnknownTaskError unless ``task`` is None (no adapter) or one of ``tasks``."""
        if task is not None and task not in self.tasks:
            if not self.tasks:
                raise UnknownTaskError(f"task {task!r} not offered: this model has no tasks "
                                       "(no adapters); leave --task out")
            raise UnknownTaskError(f"task {task!r} not in {list(self.tasks)}"
                                   f"{did_you_mean(task, self.tasks)}")

    def check_dim(self, dim: int | None) -> None:
        """Raise UnsupportedDimError unless ``dim`` is None (full) or a Matryoshka dim."""
        if dim is not None and dim not in self.matryoshka_dims:
            raise UnsupportedDimError(
                f"dim {dim} not in matryoshka dims {list(self.matryoshka_dims)}"
            )

    def prefix(self, task: str | None) -> str:
        """The instruction prefix of ``task`` ('' for None and tasks without one)."""
        self.check_task(task)
        return self.instructions.get(task, "") if task is not None else ""

    @property
    def non_commercial(self) -> bool:
        """The licence forbids commercial use (Creative Commons NC)."""
        return "-nc" in self.license.lower()

    def tokenizer(self) -> TextTokenizer:
        """A TextTokenizer for this model (loads only tokenizer files)."""
        return TextTokenizer(self)


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a list of texts.

    Attributes:
        ids: One int32 array per text: special tokens and prefix included, truncated.
        truncated: bool [n], True where the text did not fit in ``max_tokens``.
    """

    ids: list[np.ndarray]
    truncated: np.ndarray


class TextTokenizer:
    """The model's fast tokenizer plus task prefixes and truncation; no weights needed.

    Pickles as its spec, so it can be shipped to workers and rebuilt there.
    """

    def __init__(self, spec: ModelSpec) -> None:
        from transformers import AutoTokenizer

        local = Path(spec.local_dir)
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            # Rebuilt on another machine than the one that resolved the spec.
            local = Path(resolve(spec.source, weights=False).local_dir)
        self.spec = spec
        self._tok = AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)
        if not self._tok.is_fast:
            raise CheckpointError(f"{spec.source}: no fast tokenizer (tokenizer.json) found")
        self.pad_id: int = int(self._tok.pad_token_id)

    def __reduce__(self) -> tuple[Any, ...]:
        return (TextTokenizer, (self.spec,))

    def prompt_length(self, prompt: str) -> int:
        """Tokens of ``prompt`` tokenized alone, without a trailing special token (as
        sentence-transformers counts the prompt it leaves out of pooling)."""
        ids = self._tok(prompt, add_special_tokens=True)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in self._tok.all_special_ids else 0)

    def tokenize(self, texts: Sequence[str], task: str | None = None) -> Tokenized:
        """Tokenize ``texts`` for ``task`` in one batched fast-tokenizer call.

        Args:
            texts: Raw texts (no prefix).
            task: Task whose instruction prefix is prepended; None for no prefix.

        Returns:
            Int32 ids per text (``<s> prefix+text </s>``, at most ``max_tokens``) and which
            texts were truncated.
        """
        prefix = self.spec.prefix(task)
        if not texts:
            return Tokenized(ids=[], truncated=np.zeros(0, dtype=bool))
        max_chars = self.spec.max_tokens * MAX_CHARS_PER_TOKEN
        cut = np.array([len(prefix) + len(t) > max_chars for t in texts], dtype=bool)
        batch = [(prefix + t[:max_chars])[:max_chars] for t in texts]
        enc = self._tok(
            batch, add_special_tokens=True, truncation=True, max_length=self.spec.max_tokens,
            return_overflowing_tokens=True, return_attention_mask=False,
            return_token_type_ids=False,
        )
        ids: list[np.ndarray | None] = [None] * len(texts)
        truncated = cut
        # Overflow rows follow their text's first row; any overflow means truncation.
        for row, sample in zip(enc["input_ids"], enc["overflow_to_sample_mapping"], strict=True):
            if ids[sample] is None:
                ids[sample] = np.asarray(row, dtype=np.int32)
            else:
                truncated[sample] = True
        if any(x is None for x in ids):
            raise BugError("the tokenizer returned no row for some texts")
        return Tokenized(ids=ids, truncated=truncated)  # type: ignore[arg-type]

    def tokenize_documents(self, texts: Sequence[str],
                           task: str | None = None) -> list[DocumentTokens]:
        """Whole documents for chunking: untruncated, with each text token's offsets.

        Args:
            texts: Raw texts (no prefix).
            task: Task whose instruction prefix is prepended; None for no prefix.
        """
        return _document_tokens(self._tok, self.spec.prefix(task), texts) if texts else []


@dataclass(frozen=True)
class DocumentTokens:
    """A whole document's tokens, untruncated, split as ``lead + text + trail``.

    Attributes:
        lead: int32 ids before the text: the leading special token and the prefix.
        text: int32 ids of the text's own characters.
        trail: int32 ids after the text (the closing special token).
        offsets: int64 [len(text), 2] character (start, end) of each text token in the text.
    """

    lead: np.ndarray
    text: np.ndarray
    trail: np.ndarray
    offsets: np.ndarray


def split_document(ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                   special: Sequence[int], prefix_len: int) -> DocumentTokens:
    """Split ``<s> prefix+text </s>`` token ids by their offsets into the joined string: a
    text token is a non-special token ending past the prefix (one straddling the prefix's
    end, such as a word piece holding the prefix's last space, counts as text)."""
    ids = np.asarray(ids, np.int32)
    spans = np.asarray(offsets, np.int64).reshape(-1, 2)
    is_text = (np.asarray(special) == 0) & (spans[:, 1] > prefix_len)
    where = np.flatnonzero(is_text)
    first, last = (int(where[0]), int(where[-1]) + 1) if len(where) else (len(ids) - 1,) * 2
    text_offsets = np.maximum(spans[first:last] - prefix_len, 0)
    return DocumentTokens(lead=ids[:first], text=ids[first:last], trail=ids[last:],
                          offsets=text_offsets)


def _document_tokens(tok: Any, prefix: str, texts: Sequence[str]) -> list[DocumentTokens]:
    enc = tok([prefix + t for t in texts], add_special_tokens=True, truncation=False,
              return_offsets_mapping=True, return_special_tokens_mask=True,
              return_attention_mask=False, return_token_type_ids=False, verbose=False)
    return [split_document(ids, offsets, special, len(prefix)) for ids, offsets, special in
            zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"],
                strict=True)]


def load_spec(source: str, *, filesystem: Any = None) -> ModelSpec:
    """Read a model's spec from config and tokenizer files only (no weights downloaded).

    Args:
        source: Local directory, ``s3://`` prefix or hub id.
        filesystem: fsspec filesystem for ``s3://`` (default ``s3fs.S3FileSystem()``).

    Raises:
        ModelSourceError: The source cannot be resolved.
        CheckpointError: The files do not describe a supported model.
    """
    return spec_from_resolved(resolve(source, filesystem=filesystem, weights=False))


def load_tokenizer(source: str, *, filesystem: Any = None) -> TextTokenizer:
    """``load_spec(source).tokenizer()``."""
    return load_spec(source, filesystem=filesystem).tokenizer()


def read_config(local_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory as a dict."""
    path = Path(local_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {local_dir}")
    return json.loads(path.read_text())


def checkpoint_layout(config: Mapping[str, Any]) -> Layout:
    """``original`` (jinaai/jina-embeddings-v3), ``hf`` (converted -hf) or ``generic``."""
    if config.get("model_type") == JINA_HF_MODEL_TYPE:
        return "hf"
    if "lora_adaptations" in config:
        return "original"
    return "generic"


def spec_from_resolved(resolved: ResolvedSource) -> ModelSpec:
    """Build the ModelSpec of a resolved source from its config and tokenizer files."""
    config = read_config(resolved.local_dir)
    common = {
        "source": resolved.source, "fingerprint": resolved.fingerprint,
        "revision": resolved.revision, "local_dir": resolved.local_dir,
        "hidden_size": int(config["hidden_size"]),
        "max_tokens": max_tokens(resolved.local_dir, config),
        "license": read_license(resolved.local_dir, config),
    }
    if checkpoint_layout(config) == "generic":
        prompts, default_prompt = generic.read_prompts(resolved.local_dir)
        head = generic.read_head(resolved.local_dir, common["hidden_size"])
        common.update(hidden_size=head.dim,
                      max_tokens=max_tokens(resolved.local_dir, config, head.max_seq_length))
        # a checkpoint's own Matryoshka declaration (jina-style config key), if any
        declared = {int(d) for d in config.get("matryoshka_dimensions") or () if d <= head.dim}
        return ModelSpec(
            kind="generic", tasks=tuple(prompts), default_task=default_prompt,
            instructions=prompts, matryoshka_dims=tuple(sorted(declared | {head.dim})),
            pooling=head.pooling, head=head, **common,
        )
    meta = {k: config.get(k, v) for k, v in JINA_V3_DEFAULTS.items()}
    tasks = tuple(meta["lora_adaptations"])
    unknown = sorted(set(tasks) - set(TASK_ADAPTERS))
    if unknown:
        raise CheckpointError(f"lora_adaptations {unknown} not in {list(TASK_ADAPTERS)}")
    dims = [d for d in meta["matryoshka_dimensions"] if d <= common["hidden_size"]]
    return ModelSpec(
        kind="jina-v3", tasks=tasks,
        default_task=JINA_DEFAULT_TASK if JINA_DEFAULT_TASK in tasks else None,
        instructions={t: meta["task_instructions"].get(t, "") for t in tasks},
        matryoshka_dims=tuple(sorted(set(dims) | {common["hidden_size"]})),
        pooling="mean", **common,
    )


def read_license(local_dir: str | Path, config: Mapping[str, Any]) -> str:
    """``license:`` of the model card's front matter (README.md), else config.json's
    ``license``, else ``unknown``."""
    path = Path(local_dir) / "README.md"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    if lines and lines[0].strip() == "---":
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, _, value = line.partition(":")
            if key.strip() == "license" and value.strip():
                return value.strip().strip("'\"")
    return str(config.get("license") or "unknown")


def max_tokens(local_dir: str | Path, config: Mapping[str, Any],
               max_seq_length: int | None = None) -> int:
    """``max_seq_length`` (sentence-transformers), else the tokenizer's ``model_max_length``,
    capped by the positions the model can embed."""
    path = Path(local_dir) / "tokenizer_config.json"
    tok_config = json.loads(path.read_text()) if path.is_file() else {}
    limit = int(min(max_seq_length or tok_config.get("model_max_length") or 1 << 30, 1 << 30))
    positions = config.get("max_position_embeddings")
    if positions:
        limit = min(limit, int(positions) - generic.position_offset(config))
    return limit
