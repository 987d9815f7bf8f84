"""The encoder inside other people's Ray Data pipelines.

``embed(ds, ...)`` runs this project's chain over a user's ``ray.data.Dataset``: tokenize (CPU
tasks) -> sort a window of rows by length and cut token-budget batches -> encode actors. It
returns the user's rows plus ``vector`` (full dim), ``vector_<d>`` per other dim (truncate,
then re-normalise), ``n_tokens`` and ``truncated``. **Row order**: within each window of
``window_rows`` rows, rows come back sorted by token length (keep an id column to join on);
rows with a null text come last in their window with null vectors.

``Encoder`` is a plain ``map_batches`` class for users who batch themselves::

    ds.map_batches(embedjob.ray.Encoder, fn_constructor_kwargs={"model": ..., "task": ...},
                   compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1)

It keeps each batch's row order, and returns the batch's format (dict of numpy arrays, with
``[n, d]`` vector arrays, or a pyarrow Table with fixed-size-list vector columns).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from embedjob import schema as S
from embedjob.config import DEFAULT_MODEL
from embedjob.errors import ConfigError
from embedjob.model.spec import ModelSpec, load_spec
from embedjob.stages.batching import length_order, plan_batches
from embedjob.stages.tokens import _tokenizer
from embedjob.stages.vectors import batch_runs
from embedjob.storage import Storage

TOKENS = "_embedjob_input_ids"  # internal columns, dropped before rows come back
BATCH = "_embedjob_batch"
BATCH_INDEX_BITS = 20


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What every stage needs; picklable."""

    spec: ModelSpec
    task: str | None
    dims: tuple[int, ...]
    text_column: str
    max_tokens_per_batch: int
    vector_dtype: str


def _plan(model: str, task: str | None, prompt_name: str | None, dims: Sequence[int] | int,
          text_column: str, max_tokens_per_batch: int, vector_dtype: str) -> _Plan:
    """Validate everything that can fail before any work: model files, task, dims, dtype."""
    spec = load_spec(model)
    if prompt_name is not None:
        if task is not None and task != prompt_name:
            raise ConfigError(f"task {task!r} and prompt_name {prompt_name!r} differ")
        task = prompt_name
    task = task if task is not None else spec.default_task
    spec.check_task(task)
    dims = (dims,) if isinstance(dims, int) else tuple(int(d) for d in dims)
    for d in dims:
        spec.check_dim(d)
    if vector_dtype not in S.VECTOR_DTYPES:
        raise ConfigError(f"vector_dtype {vector_dtype!r} not in {list(S.VECTOR_DTYPES)}")
    if max_tokens_per_batch < spec.max_tokens:
        raise ConfigError(f"max_tokens_per_batch {max_tokens_per_batch} is below the model's "
                          f"max_tokens {spec.max_tokens}")
    return _Plan(spec=spec, task=task, dims=tuple(d for d in dims if d != spec.hidden_size),
                 text_column=text_column, max_tokens_per_batch=max_tokens_per_batch,
                 vector_dtype=vector_dtype)


def embed(ds: ray.data.Dataset, *, text_column: str = "text", model: str = DEFAULT_MODEL,
          task: str | None = None, prompt_name: str | None = None,
          dims: Sequence[int] | int = (), max_tokens_per_batch: int = 16384,
          window_rows: int = 4096, num_actors: int = 1, gpus_per_actor: float = 0,
          cpus_per_actor: float = 1, vector_dtype: str = "float32") -> ray.data.Dataset:
    """Embed ``ds[text_column]``: the user's rows plus the vector columns (lazy).

    Args:
        ds: Any dataset with a string column ``text_column``.
        text_column: The column to embed (null texts get null vectors).
        model: Hub id, local directory or ``s3://`` prefix.
        task: The model's task (jina-v3: adapter + prefix; default ``retrieval.passage``).
        prompt_name: A sentence-transformers prompt by name (generic models).
        dims: Matryoshka dims stored besides the full ``vector`` (``vector_<d>``).
        max_tokens_per_batch: Padded token budget per forward (rows x longest row).
        window_rows: Rows sorted together by length (the order rows come back in).
        num_actors: Encode actors; ``gpus_per_actor`` GPUs and ``cpus_per_actor`` CPUs each.
        vector_dtype: ``float32`` or ``float16``.

    Raises:
        ConfigError, UnknownTaskError, UnsupportedDimError: before any work.
    """
    plan = _plan(model, task, prompt_name, dims, text_column, max_tokens_per_batch,
                 vector_dtype)
    tokens = ds.map_batches(_tokenize, fn_kwargs={"plan": plan}, batch_size=1024,
                            batch_format="pyarrow")
    buckets = tokens.map_batches(_bucket, fn_kwargs={"plan": plan}, batch_size=window_rows,
                                 batch_format="pyarrow")
    return buckets.map_batches(
        _EncodeActor, fn_constructor_kwargs={"plan": plan, "gpu": gpus_per_actor > 0},
        batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=gpus_per_actor, num_cpus=cpus_per_actor,
    )


def _texts(table: pa.Table, column: str) -> list[str | None]:
    if column not in table.column_names:
        raise ConfigError(f"text_column {column!r} not in the dataset's columns "
                          f"{table.column_names}")
    return table.column(column).to_pylist()


def _tokenize(table: pa.Table, *, plan: _Plan) -> pa.Table:
    texts = _texts(table, plan.text_column)
    todo = [i for i, t in enumerate(texts) if isinstance(t, str)]
    ids: list[np.ndarray | None] = [None] * len(texts)
    n_tokens, truncated = np.zeros(len(texts), np.int32), np.zeros(len(texts), bool)
    if todo:
        done = _tokenizer(plan.spec, Storage()).tokenize([texts[i] for i in todo], plan.task)
        for j, i in enumerate(todo):
            ids[i], n_tokens[i], truncated[i] = done.ids[j], len(done.ids[j]), done.truncated[j]
    return (table.append_column(TOKENS, S.token_ids_array(ids))
            .append_column(S.N_TOKENS, pa.array(n_tokens, pa.int32()))
            .append_column(S.TRUNCATED, pa.array(truncated, pa.bool_())))


def _bucket(table: pa.Table, *, plan: _Plan) -> pa.Table:
    """Rows to embed sorted by length and numbered by batch (unique across windows), then
    the null-text rows with batch -1."""
    todo = ~table.column(TOKENS).is_null().to_numpy(zero_copy_only=False)
    lengths = table.column(S.N_TOKENS).to_numpy()
    valid = np.flatnonzero(todo)
    order = valid[length_order(lengths[valid])]
    batch_of = np.full(table.num_rows, -1, np.int64)
    base = random.getrandbits(63 - BATCH_INDEX_BITS) << BATCH_INDEX_BITS
    for index, run in enumerate(plan_batches(lengths[order], plan.max_tokens_per_batch)):
        batch_of[order[run.start:run.stop]] = base | index
    final = np.concatenate([order, np.flatnonzero(~todo)])
    out = table.take(pa.array(final, pa.int64()))
    return out.append_column(BATCH, pa.array(batch_of[final], pa.int64()))


def _load(plan: _Plan, device: str | None) -> Any:
    from embedjob.model import load_embedder

    merge = plan.task if plan.spec.kind == "jina-v3" else None
    return load_embedder(plan.spec.source, device=device, merge_task=merge)


def _vectors(full: np.ndarray, valid: np.ndarray, plan: _Plan) -> dict[str, np.ndarray]:
    """Column name -> [n, d] vectors in ``plan.vector_dtype`` (invalid rows zero)."""
    from embedjob.model import matryoshka

    hidden = full.shape[1]
    full = np.where(valid[:, None], full, 0)
    out = {S.vector_column(hidden, hidden): full.astype(plan.vector_dtype)}
    for d in plan.dims:
        out[S.vector_column(d, hidden)] = matryoshka(full, d).astype(plan.vector_dtype)
    return out


def _arrow(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    values = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, vectors.shape[1], mask=mask)


class _EncodeActor:
    """The encode stage of ``embed``: one forward per ``_batch`` run of a block."""

    def __init__(self, plan: _Plan, gpu: bool) -> None:
        self.plan = plan
        self.embedder = _load(plan, "cuda" if gpu else "cpu")

    def __call__(self, table: pa.Table) -> pa.Table:
        runs = batch_runs(table.column(BATCH).to_numpy())
        column = table.column(TOKENS).to_pylist()
        ids = [None if x is None else np.asarray(x, np.int32) for x in column]
        full = np.zeros((table.num_rows, self.embedder.hidden_size), np.float32)
        if runs:
            vectors = self.embedder.encode_batches([[ids[i] for i in r] for r in runs],
                                                   task=self.plan.task)
            for run, v in zip(runs, vectors, strict=True):
                full[run.start:run.stop] = v
        valid = np.array([x is not None for x in ids], bool)
        out = table.drop_columns([TOKENS, BATCH])
        for name, v in _vectors(full, valid, self.plan).items():
            out = out.append_column(name, _arrow(v, valid))
        return out


class Encoder:
    """``map_batches`` class: embeds each batch's ``text_column`` in the batch's own order.

    Args:
        model: Hub id, local directory or ``s3://`` prefix.
        task: The model's task (jina-v3 default ``retrieval.passage``).
        prompt_name: A sentence-transformers prompt by name (generic models).
        dims: Matryoshka dims stored besides the full ``vector``.
        text_column: The column to embed.
        device: Torch device; None: CUDA when available.
        max_tokens_per_batch: Padded token budget per forward inside a batch.
        vector_dtype: ``float32`` or ``float16``.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, task: str | None = None,
                 prompt_name: str | None = None, dims: Sequence[int] | int = (),
                 text_column: str = "text", device: str | None = None,
                 max_tokens_per_batch: int = 16384, vector_dtype: str = "float32") -> None:
        self.plan = _plan(model, task, prompt_name, dims, text_column, max_tokens_per_batch,
                          vector_dtype)
        self.embedder = _load(self.plan, device)

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> Any:
        is_arrow = isinstance(batch, pa.Table)
        texts = (_texts(batch, self.plan.text_column) if is_arrow
                 else list(batch[self.plan.text_column]))
        todo = [i for i, t in enumerate(texts) if isinstance(t, str)]
        tokenized = self.embedder.tokenizer.tokenize([texts[i] for i in todo], self.plan.task)
        full = np.zeros((len(texts), self.embedder.hidden_size), np.float32)
        n_tokens, truncated = np.zeros(len(texts), np.int32), np.zeros(len(texts), bool)
        order = length_order(np.array([len(x) for x in tokenized.ids], np.int64))
        lengths = [len(tokenized.ids[j]) for j in order]
        runs = plan_batches(lengths, self.plan.max_tokens_per_batch)
        vectors = self.embedder.encode_batches(
            [[tokenized.ids[order[k]] for k in r] for r in runs], task=self.plan.task)
        for run, v in zip(runs, vectors, strict=True):
            rows = [todo[order[k]] for k in run]
            full[rows] = v
        for j, i in enumerate(todo):
            n_tokens[i], truncated[i] = len(tokenized.ids[j]), tokenized.truncated[j]
        valid = np.zeros(len(texts), bool)
        valid[todo] = True
        columns = {**_vectors(full, valid, self.plan), S.N_TOKENS: n_tokens,
                   S.TRUNCATED: truncated}
        if not is_arrow:
            return {**batch, **columns}
        for name, values in columns.items():
            array = _arrow(values, valid) if values.ndim == 2 else pa.array(values)
            batch = batch.append_column(name, array)
        return batch
