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

from embedjob.errors import MergedTaskError, UnknownTaskError, UnsupportedDimError
from embedjob.model.attention import has_fused_varlen, install_varlen
from embedjob.model.generic import load_generic_model, position_offset
from embedjob.model.head import load_head, pool
from embedjob.model.jina import BASE_ADAPTER, load_jina
from embedjob.model.source import resolve
from embedjob.model.spec import ModelSpec, TextTokenizer, read_config, spec_from_resolved
from embedjob.model.tasks import TASK_ADAPTERS

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
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    merge_task: str | None = None,
    filesystem: Any = None,
    compile: bool = False,
) -> Embedder:
    """Load a model for inference.

    Args:
        source: Local directory, ``s3://`` prefix or hub id (``jinaai/jina-embeddings-v3``).
        device: Torch device, e.g. ``cpu`` or ``cuda:0``; None: ``cuda`` when available.
        dtype: Compute dtype; None means fp32 on CPU, bf16 on CUDA.
        merge_task: Merge this task's adapter into the weights (faster; only this task).
        filesystem: fsspec filesystem for ``s3://`` (default ``s3fs.S3FileSystem()``).
        compile: ``torch.compile(dynamic=True)`` the model: one graph for all batch shapes,
            compiled on the first forward (see ``Embedder``).

    Raises:
        ModelSourceError: The source cannot be resolved.
        CheckpointError: The checkpoint is not safetensors or its tensors do not match.
        UnknownTaskError: ``merge_task`` is not one of the model's adapter tasks.
    """
    spec = spec_from_resolved(resolve(source, filesystem=filesystem, weights=True))
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = read_config(spec.local_dir)
    head = None
    if spec.kind == "jina-v3":
        spec.check_task(merge_task)
        model = load_jina(spec, dtype=torch_dtype, merge_task=merge_task)
    else:
        if merge_task is not None and merge_task not in spec.tasks:
            raise MergedTaskError(f"merge_task {merge_task!r}: {source} has no adapters to merge")
        merge_task = None  # a generic model's tasks are prompts: nothing to merge
        model = load_generic_model(spec.local_dir, dtype=torch_dtype)
        head = load_head(spec.local_dir, spec.head) if spec.head else None
    model.to(torch_device)
    logger.info("loaded %s (%s) on %s as %s, merge_task=%s, fingerprint %s", source, spec.kind,
                torch_device, torch_dtype, merge_task, spec.fingerprint[:16])
    return Embedder(spec, model, device=torch_device, dtype=torch_dtype, merged_task=merge_task,
                    pad_id=int(config.get("pad_token_id") or 0),
                    position_offset=position_offset(config), compile=compile,
                    head=None if head is None else head.to(torch_device))


class Embedder:
    """A loaded model plus the semantics of ``encode``; build it with ``load_embedder``.

    jina-v3 models on SDPA switch to ``model.attention.VARLEN_ATTENTION``: padded forwards
    are still SDPA, packed forwards attend per sequence (``varlen``; False: a block-diagonal mask,
    as for generic models).

    ``compile``: forwards with one adapter state run the transformers model (under any
    PeftModel) through ``torch.compile(dynamic=True)``: one graph for all batch shapes, plus
    one per adapter state (task, no adapter), for batch size 1 and for no padding; packed
    forwards on CPU break the graph at each attention. Mixed-task rows stay eager: PEFT
    selects their adapters with forward hooks, which dynamo does not guard on (a compiled
    graph would silently keep the adapters it was traced with).
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, *, device: torch.device,
                 dtype: torch.dtype, merged_task: str | None, pad_id: int,
                 position_offset: int, compile: bool = False,
                 head: torch.nn.Module | None = None) -> None:
        self.spec = spec
        self.model = model
        self.device = device
        self.dtype = dtype
        self.merged_task = merged_task
        self.pad_id = pad_id
        self.position_offset = position_offset
        self.varlen = spec.kind == "jina-v3" and install_varlen(_base_model(model))
        self._compiled = torch.compile(_base_model(model), dynamic=True) if compile else None
        self._tokenizer: TextTokenizer | None = None
        self.head = head  # fp32 Dense / Normalize modules after pooling (generic models)
        self._prompt_lengths: dict[str | None, int] = {}

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

    def encode(self, texts: Sequence[str], *, task: str | None = None,
               truncate_dim: int | None = None, prompt_name: str | None = None,
               batch_size: int = 32, normalize: bool = True,
               dim: int | None = None) -> np.ndarray:
        """Embed raw texts like jina's and sentence-transformers' ``encode()``.

        Args:
            texts: Raw texts; the task's instruction prefix (prompt) is added here.
            task: Task (adapter + prefix); None means no adapter (the base model), or for a
                sentence-transformers model its ``default_prompt_name`` (as its ``encode``).
            truncate_dim: Matryoshka dim; None for the full ``hidden_size``.
            prompt_name: A sentence-transformers prompt by name (the same as ``task`` for
                generic models).
            batch_size: Rows per forward (texts are length-sorted first).
            normalize: L2-normalise (after truncation); False returns the pooled vectors as
                the model's last module leaves them.
            dim: Alias of ``truncate_dim``.

        Returns:
            float32 [n, truncate_dim or hidden_size], in input order.
        """
        task = self._encode_task(task, prompt_name)
        if dim is not None and truncate_dim is not None and dim != truncate_dim:
            raise ValueError(f"dim {dim} and truncate_dim {truncate_dim} differ: give one")
        truncate_dim = truncate_dim if truncate_dim is not None else dim
        self.check_task(task)
        self.spec.check_dim(truncate_dim)
        tokenized = self.tokenizer.tokenize(list(texts), task)
        if tokenized.truncated.any():
            logger.warning("%d of %d texts truncated to %d tokens: indices %s",
                           int(tokenized.truncated.sum()), len(texts), self.spec.max_tokens,
                           np.flatnonzero(tokenized.truncated)[:20].tolist())
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(tokenized.ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.encode_ids([tokenized.ids[i] for i in rows], task=task,
                                        normalize=normalize)
        if truncate_dim is None:
            return out
        return matryoshka(out, truncate_dim) if normalize else out[:, :truncate_dim].copy()

    def _encode_task(self, task: str | None, prompt_name: str | None) -> str | None:
        """The task ``encode`` runs: ``prompt_name`` or ``task``; a generic model's default
        prompt when neither is given."""
        if prompt_name is not None:
            if self.spec.kind != "generic":
                raise UnknownTaskError(f"prompt_name {prompt_name!r}: {self.spec.source} has "
                                       f"no named prompts; its tasks are {list(self.tasks)}")
            if task is not None and task != prompt_name:
                raise ValueError(f"task {task!r} and prompt_name {prompt_name!r} differ")
            return prompt_name
        if task is None and self.spec.kind == "generic":
            return self.spec.default_task
        return task

    def encode_ids(self, ids: Sequence[np.ndarray], *, task: str | None = None,
                   tasks: Sequence[str | None] | None = None, packed: bool = False,
                   normalize: bool = True) -> np.ndarray:
        """Embed already-tokenized texts (special tokens and prefix included, truncated).

        Args:
            ids: One 1-D int array per text.
            task: One task for all rows (None: no adapter). Exclusive with ``tasks``.
            tasks: One task per row.
            packed: Concatenate all rows into one sequence (one per task) that attends within
                each row only, instead of right-padding; results equal (fp32, 1e-5).
            normalize: False: the pooled vectors before L2 normalisation.

        Returns:
            float32 [n, hidden_size], L2-normalised full-dim vectors in input order.
        """
        row_tasks = self._row_tasks(ids, task, tasks)
        if not ids:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            if not packed:
                with self._adapters(row_tasks) as extra:
                    return self._pool_padded(ids, extra, row_tasks, normalize).cpu().numpy()
            pooled = torch.empty(len(ids), self.hidden_size, dtype=torch.float32)
            for t, rows in _group_rows(row_tasks).items():
                with self._adapters([t]):
                    pooled[rows] = self._pool_packed([ids[i] for i in rows], t, normalize).cpu()
            return pooled.numpy()

    def encode_batches(self, batches: Sequence[Sequence[np.ndarray]], *, task: str | None = None,
                       packed: bool = False) -> list[np.ndarray]:
        """Embed several batches of token ids, one forward each, waiting for the device once.

        Equals ``[encode_ids(b, task=task, packed=packed) for b in batches]``. On CUDA each
        batch's inputs go from pinned host memory with ``non_blocking=True`` and its vectors
        stay on the device until the end, so the host prepares batch i+1 while the GPU runs
        batch i.

        Args:
            batches: Each a list of 1-D int token-id arrays (prefix and special tokens included).
            task: One task for every row (None: no adapter).
            packed: Packed instead of padded forwards (see ``encode_ids``).

        Returns:
            One float32 [n_i, hidden_size] L2-normalised array per batch.

        Raises:
            torch.OutOfMemoryError: A forward did not fit; nothing is returned.
        """
        for ids in batches:
            self._row_tasks(ids, task, None)
        with torch.inference_mode():
            pooled = self._pool_batches(batches, task, packed)  # [sum n_i, H] on the device
            host = pooled.cpu()  # the one wait for the device
        return [x.numpy() for x in torch.split(host, [len(ids) for ids in batches])]

    def encode_spans(self, ids: Sequence[np.ndarray], spans: Sequence[Sequence[tuple[int, int]]],
                     *, task: str | None = None) -> list[np.ndarray]:
        """Late chunking: one padded forward over the rows, then each span's mean.

        For row i and each span ``[start, end)`` of ``spans[i]`` (positions in that row,
        special tokens and prefix counted), the vector is the fp32 mean of the row's final
        token states over the span, through the model's Dense / Normalize modules if any,
        then L2-normalised. Every token of the row is in the forward (each span sees the
        whole row); which of them a span pools is the caller's choice (``stages.chunks``).

        Args:
            ids: One 1-D int token-id array per row (at most ``max_tokens`` each).
            spans: Per row, the spans to pool (non-empty, inside the row).
            task: One task for every row (None: no adapter).

        Returns:
            One float32 [len(spans[i]), hidden_size] array per row.

        Raises:
            ValueError: The model does not pool by mean, or a span is empty or outside its row.
        """
        if self.spec.pooling != "mean":
            raise ValueError(f"late chunking pools spans by mean; {self.spec.source} pools by "
                             f"{self.spec.pooling!r}")
        self._row_tasks(ids, task, None)
        for x, row in zip(ids, spans, strict=True):
            if any(not 0 <= a < b <= len(x) for a, b in row):
                raise ValueError(f"spans {list(row)} not inside a row of {len(x)} tokens")
        with torch.inference_mode(), self._adapters([task] * len(ids)) as extra:
            hidden = self._states_padded(ids, extra)  # [n, L, H] fp32
            means = [hidden[i, a:b].mean(dim=0) for i, row in enumerate(spans) for a, b in row]
            if not means:
                return [np.zeros((0, self.hidden_size), np.float32) for _ in ids]
            pooled = self._finish(torch.stack(means)).cpu()  # [spans, H]
        return [x.numpy() for x in torch.split(pooled, [len(row) for row in spans])]

    def _states_padded(self, ids: Sequence[np.ndarray], extra: dict[str, Any]) -> torch.Tensor:
        """The final token states of one right-padded forward: fp32 [n, longest, H]."""
        return self._forward_padded(ids, extra)[0].float()

    def _forward_padded(self, ids: Sequence[np.ndarray], extra: dict[str, Any]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """One right-padded forward in the current adapter state: the final token states
        [n, longest, H] (the model's dtype) and the attention mask [n, longest], on the device.
        ``extra``: model kwargs from ``_adapters``."""
        lengths = np.array([len(x) for x in ids])
        longest = int(lengths.max())
        host = np.full((2, len(ids), longest), self.pad_id, dtype=np.int64)  # ids, mask
        for i, x in enumerate(ids):
            host[0, i, : len(x)] = x
        host[1] = np.arange(longest)[None, :] < lengths[:, None]
        input_ids, mask = self._to_device(host)  # [n, L] each
        # No padding: no mask, so SDPA may use its flash kernel (transformers would otherwise
        # read mask.all() on the device to find that out).
        out = self._call_model(extra, input_ids=input_ids,
                               attention_mask=None if lengths.min() == longest else mask)
        return out.last_hidden_state, mask

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

    def _pool_batches(self, batches: Sequence[Sequence[np.ndarray]], task: str | None,
                      packed: bool) -> torch.Tensor:
        """Normalised fp32 [sum n_i, H] on the device, batches in order; nothing waits for it."""
        pooled = [torch.zeros(0, self.hidden_size, device=self.device)]
        with self._adapters([task]):
            for ids in batches:
                if not ids:
                    continue
                pooled.append(self._pool_packed(ids, task) if packed
                              else self._pool_padded(ids, {}, [task] * len(ids)))
        return torch.cat(pooled)

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

    def free_cached_memory(self) -> None:
        """Return a failed forward's cached blocks to the GPU before smaller forwards run."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        """One host -> device copy; on CUDA from pinned memory, queued behind the running
        forward (the caching host allocator keeps the pinned block until the copy is done)."""
        tensor = torch.from_numpy(host)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _pool_padded(self, ids: Sequence[np.ndarray], extra: dict[str, Any],
                     row_tasks: Sequence[str | None], normalize: bool = True) -> torch.Tensor:
        """Right-padded forward in the current adapter state; normalised fp32 [n, H], on the
        device. ``extra``: model kwargs from ``_adapters``; ``row_tasks``: each row's task
        (its prompt is left out of pooling when the model says so)."""
        states, mask = self._forward_padded(ids, extra)
        skip = self._skip(row_tasks)
        return self._finish(pool(states, mask, self.spec.pooling,
                                 None if skip is None else skip.to(mask.device)), normalize)

    def _pool_packed(self, ids: Sequence[np.ndarray], task: str | None,
                     normalize: bool = True) -> torch.Tensor:
        """All rows as one sequence with restarting positions, attending within each row only,
        in the current adapter state (one ``task`` for all rows); normalised fp32 [n, H], on
        the device."""
        lengths = np.array([len(x) for x in ids])
        cu_seq_lens = np.concatenate([[0], np.cumsum(lengths)])  # [n + 1]
        total = int(cu_seq_lens[-1])
        segment = np.repeat(np.arange(len(ids)), lengths)  # [T], row of each token
        positions = np.arange(total) - cu_seq_lens[segment] + self.position_offset
        # one copy: [T ids | T positions | T segment | n + 1 offsets]
        host = np.concatenate([*ids, positions, segment, cu_seq_lens]).astype(np.int64)
        flat = self._to_device(host)
        input_ids, position_ids, segment_d = flat[:3 * total].view(3, 1, total)  # [1, T] each
        offsets = flat[3 * total:]  # [n + 1]
        if self.varlen:
            out = self._call_model({}, input_ids=input_ids, attention_mask=None,
                                   position_ids=position_ids,
                                   **self._varlen_kwargs(cu_seq_lens, offsets))
        else:
            # [1, 1, T, T] bool, True = may attend: full T^2 work. attention_mask=None with
            # restarting position_ids alone would let rows attend to each other.
            mask = (segment_d[0, :, None] == segment_d[0, None, :])[None, None]
            out = self._call_model({}, input_ids=input_ids, attention_mask=mask,
                                   position_ids=position_ids)
        hidden = out.last_hidden_state[0].float()  # [T, H]
        skip = self._skip([task] * len(ids))
        if self.spec.pooling == "cls" and skip is None:
            pooled = hidden[offsets[:-1]]
        elif self.spec.pooling == "mean" and skip is None:
            sums = torch.zeros(len(ids), hidden.shape[1], device=hidden.device)
            sums.index_add_(0, segment_d[0], hidden)  # [n, H]
            pooled = sums / offsets.diff().float()[:, None]
        else:  # the other modes on the rows laid out right-padded: [n, longest, H]
            padded = hidden.new_zeros(len(ids), int(lengths.max()), hidden.shape[1])
            within = position_ids[0] - self.position_offset  # [T], each token's index in its row
            padded[segment_d[0], within] = hidden
            mask = (torch.arange(padded.shape[1], device=hidden.device)[None, :]
                    < offsets.diff()[:, None])  # [n, longest]
            pooled = pool(padded, mask, self.spec.pooling,
                          None if skip is None else skip.to(hidden.device))
        return self._finish(pooled, normalize)

    def _finish(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Dense / Normalize modules (if any), then L2 normalisation: fp32 [n, H]."""
        if self.head is not None:
            pooled = self.head(pooled)
        return F.normalize(pooled, p=2, dim=-1) if normalize else pooled

    def _skip(self, row_tasks: Sequence[str | None]) -> torch.Tensor | None:
        """[n] prompt tokens each row leaves out of pooling, or None (prompts are pooled)."""
        head = self.spec.head
        if head is None or head.include_prompt:
            return None
        skip = [self._prompt_length(t) for t in row_tasks]
        return torch.tensor(skip) if any(skip) else None

    def _prompt_length(self, task: str | None) -> int:
        """Tokens of ``task``'s prompt alone, leading special token included and a trailing one
        excluded: what sentence-transformers leaves out of pooling (0 without a prompt)."""
        if task not in self._prompt_lengths:
            prefix = self.spec.prefix(task)
            self._prompt_lengths[task] = self.tokenizer.prompt_length(prefix) if prefix else 0
        return self._prompt_lengths[task]

    def _call_model(self, extra: dict[str, Any], **inputs: Any) -> Any:
        """The model in the current adapter state; compiled unless ``extra`` (from
        ``_adapters``) selects adapters per row, see the class docstring."""
        if self._compiled is None or extra:
            return self.model(**inputs, **extra)
        return self._compiled(**inputs)

    def _varlen_kwargs(self, cu_seq_lens: np.ndarray, offsets: torch.Tensor) -> dict[str, Any]:
        """Model kwargs of a varlen forward. The fused kernels want int32 offsets on the device
        (``offsets``, already there); per-sequence SDPA reads them on the host (no sync)."""
        on_device = has_fused_varlen(self.device, self.dtype)
        cu = offsets.int() if on_device else torch.from_numpy(cu_seq_lens.astype(np.int32))
        longest = int(np.diff(cu_seq_lens).max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _group_rows(row_tasks: list[str | None]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for i, t in enumerate(row_tasks):
        groups.setdefault(t, []).append(i)
    return groups
