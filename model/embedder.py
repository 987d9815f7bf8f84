"""Embedder: token ids -> pooled, L2-normalised vectors, padded or packed, per-row tasks.

Semantics equal the original jina-embeddings-v3 ``encode()``: instruction prefix for retrieval
tasks, fp32 mean pooling over every non-padding token (special and prefix tokens included),
Matryoshka = truncate the pooled vector, then normalise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import MergedTaskError, UnsupportedDimError
from model.generic import load_generic_model, position_offset
from model.jina import BASE_ADAPTER, load_jina
from model.source import resolve
from model.spec import TASK_ADAPTERS, ModelSpec, TextTokenizer, read_config, spec_from_resolved

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def matryoshka(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Truncate ``vectors`` [..., D] to their first ``dim`` columns, then L2-normalise (float32).

    Raises:
        UnsupportedDimError: ``dim`` is not in 1..D.
    """
    v = np.asarray(vectors, dtype=np.float32)
    if not 1 <= dim <= v.shape[-1]:
        raise UnsupportedDimError(f"dim {dim} not in 1..{v.shape[-1]}")
    v = v[..., :dim]
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)  # F.normalize's eps


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None -> fp32 on CPU, bf16 on CUDA; strings from ``DTYPES``."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} not in {list(DTYPES)}")


def load_embedder(
    source: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    merge_task: str | None = None,
    filesystem: Any = None,
) -> Embedder:
    """Load a model for inference.

    Args:
        source: Local directory, ``s3://`` prefix or hub id (``jinaai/jina-embeddings-v3``).
        device: Torch device, e.g. ``cpu`` or ``cuda:0``.
        dtype: Compute dtype; None means fp32 on CPU, bf16 on CUDA.
        merge_task: Merge this task's adapter into the weights (faster; only this task).
        filesystem: fsspec filesystem for ``s3://`` (default ``s3fs.S3FileSystem()``).

    Raises:
        ModelSourceError: The source cannot be resolved.
        CheckpointError: The checkpoint is not safetensors or its tensors do not match.
        UnknownTaskError: ``merge_task`` is not one of the model's adapter tasks.
    """
    spec = spec_from_resolved(resolve(source, filesystem=filesystem, weights=True))
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = read_config(spec.local_dir)
    if spec.kind == "jina-v3":
        spec.check_task(merge_task)
        model = load_jina(spec, dtype=torch_dtype, merge_task=merge_task)
    else:
        if merge_task is not None:
            raise MergedTaskError(f"merge_task {merge_task!r}: {source} has no adapters to merge")
        model = load_generic_model(spec.local_dir, dtype=torch_dtype)
    model.to(torch_device)
    logger.info("loaded %s (%s) on %s as %s, merge_task=%s, fingerprint %s", source, spec.kind,
                torch_device, torch_dtype, merge_task, spec.fingerprint[:16])
    return Embedder(spec, model, device=torch_device, dtype=torch_dtype, merged_task=merge_task,
                    pad_id=int(config.get("pad_token_id") or 0),
                    position_offset=position_offset(config))


class Embedder:
    """A loaded model plus the semantics of ``encode``; build it with ``load_embedder``."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, *, device: torch.device,
                 dtype: torch.dtype, merged_task: str | None, pad_id: int,
                 position_offset: int) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        self.dtype = dtype
        self.merged_task = merged_task
        self.pad_id = pad_id
        self.position_offset = position_offset
        self._tokenizer: TextTokenizer | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        return self.spec.matryoshka_dims

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = self.spec.tokenizer()
        return self._tokenizer

    def check_task(self, task: str | None) -> None:
        """Raise unless ``task`` is valid for the model and for how it was loaded."""
        self.spec.check_task(task)
        if self.merged_task is not None and task != self.merged_task:
            raise MergedTaskError(
                f"task {task!r} not available: this embedder was loaded merged for "
                f"{self.merged_task!r} (adapter merged into the weights); load it without "
                "merge_task to encode other tasks"
            )

    def encode(self, texts: Sequence[str], *, task: str | None = None, dim: int | None = None,
               batch_size: int = 32) -> np.ndarray:
        """Embed raw texts like the original ``encode()``.

        Args:
            texts: Raw texts; the task's instruction prefix is added here.
            task: Task (adapter + prefix); None means no adapter (the base model).
            dim: Matryoshka dim; None for the full ``hidden_size``.
            batch_size: Rows per forward (texts are length-sorted first).

        Returns:
            float32 [n, dim or hidden_size], L2-normalised, in input order.
        """
        self.check_task(task)
        self.spec.check_dim(dim)
        tokenized = self.tokenizer.tokenize(list(texts), task)
        if tokenized.truncated.any():
            logger.warning("%d of %d texts truncated to %d tokens: indices %s",
                           int(tokenized.truncated.sum()), len(texts), self.spec.max_tokens,
                           np.flatnonzero(tokenized.truncated)[:20].tolist())
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(tokenized.ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.encode_ids([tokenized.ids[i] for i in rows], task=task)
        return out if dim is None else matryoshka(out, dim)

    def encode_ids(self, ids: Sequence[np.ndarray], *, task: str | None = None,
                   tasks: Sequence[str | None] | None = None, packed: bool = False) -> np.ndarray:
        """Embed already-tokenized texts (special tokens and prefix included, truncated).

        Args:
            ids: One 1-D int array per text.
            task: One task for all rows (None: no adapter). Exclusive with ``tasks``.
            tasks: One task per row.
            packed: Concatenate all rows into one sequence with a block-diagonal attention
                mask instead of right-padding; results equal (fp32, 1e-5).

        Returns:
            float32 [n, hidden_size], L2-normalised full-dim vectors in input order.
        """
        row_tasks = self._row_tasks(ids, task, tasks)
        if not ids:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            if packed:
                pooled = torch.empty(len(ids), self.hidden_size, dtype=torch.float32)
                for t, rows in _group_rows(row_tasks).items():
                    pooled[rows] = self._pool_packed([ids[i] for i in rows], t).cpu()
            else:
                pooled = self._pool_padded(ids, row_tasks).cpu()
            return F.normalize(pooled, p=2, dim=-1).numpy()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                tasks: Sequence[str | None], **model_kwargs: Any) -> Any:
        """One model forward with an adapter per row (None: no adapter); HF model output.

        Args:
            input_ids: [B, L] token ids.
            attention_mask: [B, L] 1 for tokens, 0 for padding; or a 4D [B, 1, L, L] mask.
            tasks: One task per row (or one for all rows).
            **model_kwargs: Passed to the model (``position_ids``, ``output_hidden_states``).
        """
        with torch.inference_mode(), self._adapters(list(tasks)) as extra:
            return self.model(input_ids=input_ids.to(self.device),
                              attention_mask=attention_mask.to(self.device),
                              **extra, **model_kwargs)

    def _row_tasks(self, ids: Sequence[np.ndarray], task: str | None,
                   tasks: Sequence[str | None] | None) -> list[str | None]:
        if tasks is not None and task is not None:
            raise ValueError("pass task (one for all rows) or tasks (one per row), not both")
        row_tasks = [task] * len(ids) if tasks is None else list(tasks)
        if len(row_tasks) != len(ids):
            raise ValueError(f"{len(row_tasks)} tasks for {len(ids)} rows")
        for t in set(row_tasks):
            self.check_task(t)
        for x in ids:
            if x.ndim != 1:
                raise ValueError(f"token ids must be 1-D arrays, got shape {list(x.shape)}")
            if not 1 <= len(x) <= self.spec.max_tokens:
                raise ValueError(f"text has {len(x)} tokens, max_tokens is {self.spec.max_tokens}")
        return row_tasks

    @contextlib.contextmanager
    def _adapters(self, row_tasks: list[str | None]) -> Iterator[dict[str, Any]]:
        """Select adapters for one forward; yields extra model kwargs."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):  # merged or generic: weights are the task
            yield {}
            return
        distinct = set(row_tasks)
        if len(distinct) > 1:
            yield {"adapter_names": [BASE_ADAPTER if t is None else TASK_ADAPTERS[t]
                                     for t in row_tasks]}
        elif None in distinct:
            with self.model.disable_adapter():
                yield {}
        else:
            self.model.set_adapter(TASK_ADAPTERS[row_tasks[0]])
            yield {}

    def _pool_padded(self, ids: Sequence[np.ndarray], row_tasks: list[str | None]) -> torch.Tensor:
        """Right-padded forward; returns fp32 [n, H]."""
        lengths = torch.tensor([len(x) for x in ids])
        input_ids = torch.full((len(ids), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]  # [n, L]
        hidden = self.forward(input_ids, mask.long(), tasks=row_tasks).last_hidden_state
        return pool(hidden, mask.to(self.device), self.spec.pooling)

    def _pool_packed(self, ids: Sequence[np.ndarray], task: str | None) -> torch.Tensor:
        """All rows as one sequence: restarting positions, block-diagonal mask; fp32 [n, H]."""
        lengths = torch.tensor([len(x) for x in ids])
        input_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64))[None]  # [1, T]
        segment = torch.repeat_interleave(torch.arange(len(ids)), lengths)  # [T]
        starts = torch.cumsum(lengths, 0) - lengths  # [n]
        positions = torch.arange(input_ids.shape[1]) - starts[segment] + self.position_offset
        # [1, 1, T, T] bool, True = may attend. attention_mask=None with restarting
        # position_ids would let sequences attend to each other.
        mask = (segment[:, None] == segment[None, :])[None, None]
        out = self.forward(input_ids, mask, tasks=[task],
                           position_ids=positions[None].to(self.device))
        hidden = out.last_hidden_state[0].float()  # [T, H]
        if self.spec.pooling == "cls":
            return hidden[starts.to(self.device)]
        sums = torch.zeros(len(ids), hidden.shape[1], device=hidden.device)
        sums.index_add_(0, segment.to(hidden.device), hidden)  # [n, H]
        return sums / lengths.to(hidden.device, torch.float32)[:, None]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool [B, L, H] token states over a [B, L] mask in fp32 -> [B, H]."""
    if pooling == "cls":
        return hidden[:, 0].float()
    m = mask.to(torch.float32)[..., None]  # [B, L, 1]
    summed = (hidden.float() * m).sum(dim=1)  # [B, H]
    return summed / m.sum(dim=1).clamp(min=1e-9)


def _group_rows(row_tasks: list[str | None]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for i, t in enumerate(row_tasks):
        groups.setdefault(t, []).append(i)
    return groups
