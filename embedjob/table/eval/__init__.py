"""``embedjob eval``: retrieval quality of every vector column of a table, on real data.

Each dataset's corpus is embedded by the real job (``driver.run.run``) into a Lance table, so
the evaluation measures the table as ``embedjob embed`` writes it; queries are embedded as
``table.search`` embeds them (the paired query task, truncated to each column's dim). Every
vector column (``vector`` and each ``vector_<d>``) is scored exactly (a flat scan, as a
search without an index), and the figures go to ``eval.json`` and ``eval.png`` (quality vs
bytes per row, one point per column, the Pareto front marked). Quantized columns
(``--quantize``, int8 and binary by default) are scored on their own and as the first stage
of a two-stage search (see ``score_table``).

Datasets (slices committed under ``embedjob/data/eval/``, from ``/work/shared/corpora``):

* ``bible-es-en``: 1,000 verse pairs (KJV / Reina-Valera 1909, verses 1000..1999); query each
  Spanish verse, its English verse is the one relevant document; nDCG@10, recall@100, top-1.
* ``udhr``: Universal Declaration, articles 1..30, English and the 12 other languages of the
  demo sample, each from its main translation (files fra, spa, ita, nld, pol, rus, cmn_hans,
  arb, hin, jpn, tur, swh); every article in language X (its paragraphs joined by newlines) is
  a query, the 30 English articles are the corpus, the English article of the same number is
  relevant; top-1 per language (chance 1/30 = 0.033), nDCG@10 / recall@100 over all queries.
* ``lee``: Lee et al. 2005, 50 documents, Pearson correlation of the cosine of each of the
  1,225 upper-triangle pairs with the human similarity score.
* ``longdoc``: long documents (``longdoc.py``): the Bible slice as 40 documents of 25 verses,
  embedded three times (``--chunking none``, ``split``, ``late``, with ``--chunk-tokens``,
  ``--chunk-overlap``, ``--chunk-boundaries``) and scored per mode on the full ``vector``
  (doc@1, doc@5, chunk@1); its plot is ``longdoc.png``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob import schema as S
from embedjob.config import CHUNK_BOUNDARIES, as_tuple, knob
from embedjob.errors import ConfigError
from embedjob.table.eval import longdoc
from embedjob.table.eval.datasets import DATASETS, EvalSet, load_dataset
from embedjob.table.eval.metrics import (
    NDCG_K,
    RECALL_K,
    pearson,
    retrieval_metrics,
)
from embedjob.table.eval.plot import headline, plot, primary_metric
from embedjob.table.search import embed_queries, open_table, quantize_query, read_stamp

logger = logging.getLogger(__name__)
NAMES: tuple[str, ...] = (*DATASETS, longdoc.NAME)  # what --dataset takes

__all__ = ["DATASETS", "EvalConfig", "EvalSet", "evaluate", "format_report", "load_dataset",
           "primary_metric"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One ``embedjob eval`` run (each field's help says what it sets)."""

    datasets: tuple[str, ...] = knob(flag="--dataset", metavar="{" + ",".join(NAMES) + "}",
                                     help="dataset to evaluate; repeatable or comma-separated")
    model: str = knob(help="local dir, s3:// prefix or hub id")
    output_dir: str = knob(help="where eval.json and eval.png go")
    work_dir: str | None = knob(None, help="keep the corpus tables here (default: a temp dir)")
    dims: tuple[int, ...] = knob((), metavar="D,D,...",
                                 help="dims to store (default: every Matryoshka dim)")
    vector_dtype: Literal["float32", "float16"] = knob("float32", help="stored vector type")
    num_actors: int = knob(1, help="encode actors of the embed job")
    quantize: tuple[str, ...] = knob(
        ("int8", "binary"), metavar="[D:]TYPE,...",
        help="quantized columns to store and score beside the floats (embed's --quantize); "
             "each is also scored as the first stage of a two-stage search")
    rescore_factor: int = knob(4, help="two-stage search: candidates per returned row")
    # 64: about four chunks per context of all-MiniLM-L6-v2 (256), the README's figures
    chunk_tokens: int = knob(64, help="longdoc: most text tokens per chunk (split, late)")
    chunk_overlap: int = knob(0, help="longdoc: text tokens a chunk shares with the one "
                                      "before it (< --chunk-tokens)")
    chunk_boundaries: Literal["tokens", "sentences"] = knob(
        "tokens", help="longdoc: chunks of --chunk-tokens tokens, or whole sentences packed "
                       "up to it")

    def __post_init__(self) -> None:
        for name in ("datasets", "dims", "quantize"):
            object.__setattr__(self, name, as_tuple(name, getattr(self, name)))
        unknown = [d for d in self.datasets if d not in NAMES]
        if unknown or not self.datasets:
            raise ConfigError(f"datasets {list(self.datasets)} must be non-empty names from "
                              f"{list(NAMES)}")
        self._check_chunking()

    def _check_chunking(self) -> None:
        """The longdoc knobs, with embed's rules (the model's context: at the embed run)."""
        tokens, overlap = self.chunk_tokens, self.chunk_overlap
        if not _is_int(tokens) or tokens < 1:
            raise ConfigError(f"--chunk-tokens {tokens!r} is not allowed; expected an "
                              "integer >= 1")
        if not _is_int(overlap) or not 0 <= overlap < tokens:
            raise ConfigError(f"--chunk-overlap {overlap!r} is not allowed; expected an "
                              f"integer >= 0 and < --chunk-tokens {tokens}")
        if self.chunk_boundaries not in CHUNK_BOUNDARIES:
            raise ConfigError(f"--chunk-boundaries {self.chunk_boundaries!r} is not allowed; "
                              f"expected {list(CHUNK_BOUNDARIES)}")


def evaluate(config: EvalConfig, embedder: Any = None) -> dict[str, Any]:
    """Embed each dataset with the job, score every vector column, write JSON and PNG.

    Returns:
        The report written to ``<output_dir>/eval.json``.
    """
    from embedjob.model import load_embedder, load_spec

    spec = load_spec(config.model)
    embedder = embedder or load_embedder(config.model)
    work = config.work_dir or tempfile.mkdtemp(prefix="embedjob-eval-")
    report: dict[str, Any] = {"model": config.model, "weights_hash": spec.fingerprint,
                              "vector_dtype": config.vector_dtype, "datasets": {}}
    os.makedirs(config.output_dir, exist_ok=True)
    for name in config.datasets:
        if name == longdoc.NAME:
            report["datasets"][name] = _long_documents(config, embedder, work)
            continue
        data = load_dataset(name)
        uri = embed_corpus(data, config, spec, os.path.join(work, name))
        report["datasets"][name] = score_table(data, uri, embedder, config.rescore_factor)
        logger.info("eval %s: %s", name, headline(report["datasets"][name]))
    with open(os.path.join(config.output_dir, "eval.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    columns = {n: r for n, r in report["datasets"].items() if "columns" in r}
    if columns:  # the quality-per-byte plot: datasets scored per column
        plot(report | {"datasets": columns}, os.path.join(config.output_dir, "eval.png"))
    return report


def _long_documents(config: EvalConfig, embedder: Any, work: str) -> dict[str, Any]:
    """The ``longdoc`` set: three embed runs (none, split, late), scored per mode; its bar
    plot goes to ``<output_dir>/longdoc.png``."""
    result = longdoc.evaluate_long(
        config.model, os.path.join(work, longdoc.NAME), chunk_tokens=config.chunk_tokens,
        chunk_overlap=config.chunk_overlap, chunk_boundaries=config.chunk_boundaries,
        embedder=embedder, num_actors=config.num_actors, vector_dtype=config.vector_dtype)
    longdoc.plot_long(result, os.path.join(config.output_dir, longdoc.PLOT))
    result["plot"] = longdoc.PLOT
    logger.info("eval %s: %s", longdoc.NAME, ", ".join(
        f"{mode} doc@1 {m['doc@1']:.3f}" for mode, m in result["modes"].items()))
    return result


def embed_corpus(data: EvalSet, config: EvalConfig, spec: Any, work: str) -> str:
    """Run the embed job over the dataset's corpus; returns the table's URI."""
    from embedjob.config import EmbedConfig
    from embedjob.driver.run import run

    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.parquet")
    pq.write_table(data.corpus, corpus)
    output = os.path.join(work, "corpus.lance")
    task = data.table_task if data.table_task in spec.tasks else None  # generic: no adapter
    dims = config.dims or tuple(d for d in spec.matryoshka_dims if d != spec.hidden_size)
    run(EmbedConfig(input=corpus, output=output, model=config.model, task=task, dims=dims,
                    vector_dtype=config.vector_dtype, mode="overwrite",
                    num_actors=config.num_actors, quantize=config.quantize))
    return output


def score_table(data: EvalSet, uri: str, embedder: Any,
                rescore_factor: int = 4) -> dict[str, Any]:
    """Metrics of every vector column (each dim x dtype) of the table at ``uri``.

    Float columns rank by cosine. Quantized columns rank by their own similarity (binary:
    ``1 - 2 x hamming / d``; int8: the int8 dot product of the query quantized with the
    stamped ranges), and report ``recall@10_vs_float``: the share of the exact float
    search's top 10 (the float column of the same dim, else ``vector``) they return. Each
    quantized column of a retrieval set is also scored as a two-stage search
    (``<column>-><float column>``): its top ``10 x rescore_factor`` candidates rescored on
    the floats; its bytes per row are the candidate column's.
    """
    dataset = open_table(uri)
    stamp = read_stamp(dataset.schema)
    layout = S.vector_layout(dataset.schema)
    table = dataset.to_table(columns=["id", *layout])
    doc_ids = table.column("id").to_pylist()
    full = None
    if data.kind == "retrieval":
        full = embed_queries(embedder, stamp, data.queries.column("text").to_pylist(),
                             embedder.hidden_size)
    results = {}
    for name, column in sorted(layout.items(), key=lambda c: (c[1].dim, -c[1].bytes_per_row)):
        docs = _matrix(table.column(name))
        base = {"dim": column.dim, "dtype": column.dtype, "bytes_per_row": column.bytes_per_row}
        if data.kind != "retrieval":
            results[name] = base | _pairs(data, docs, doc_ids, column)
            continue
        scores = _similarity(_queries(dataset.schema, column, full), docs, column)
        results[name] = base | _retrieval(data, scores, doc_ids)
        if column.quantized:
            recall, two_stage = _against_float(data, table, layout, column, scores, full,
                                               rescore_factor)
            results[name] |= recall
            results.update(two_stage)
    return {"protocol": data.protocol, "table": uri, "task": stamp.task,
            "query_task": stamp.query_task, "columns": results}


def _queries(schema: pa.Schema, column: S.VectorColumn, full: np.ndarray) -> np.ndarray:
    """The queries as the column holds its rows: truncated floats, or quantized codes."""
    from embedjob.model import matryoshka

    queries = matryoshka(full, column.dim)  # = embed_queries(..., dim): truncate, normalize
    if not column.quantized:
        return queries
    return np.stack([quantize_query(schema, column, q) for q in queries])


def _similarity(queries: np.ndarray, docs: np.ndarray, column: S.VectorColumn) -> np.ndarray:
    """[queries, docs]: cosine (floats), ``1 - 2 x hamming / d`` (binary: the mean product
    of +-1 signs), int8 dot product (exact in float64)."""
    if column.dtype == "binary":
        signs_q = np.unpackbits(queries, axis=1).astype(np.float32) * 2 - 1
        signs_d = np.unpackbits(docs, axis=1).astype(np.float32) * 2 - 1
        return signs_q @ signs_d.T / column.dim
    if column.dtype == "int8":
        return queries.astype(np.float64) @ docs.astype(np.float64).T
    return queries.astype(np.float32) @ docs.astype(np.float32).T


def _ranked(scores: np.ndarray, doc_ids: list, k: int) -> list[list]:
    """Top-k doc ids per query, best first; ties keep corpus order."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.asarray(doc_ids, dtype=object)
    return [list(ids[row]) for row in order]


def _retrieval(data: EvalSet, scores: np.ndarray, doc_ids: list) -> dict[str, Any]:
    ranked = _ranked(scores, doc_ids, max(NDCG_K, RECALL_K))
    qrels = [set(data.qrels[q]) for q in data.queries.column("id").to_pylist()]
    return retrieval_metrics(ranked, qrels, data.queries.column("group").to_pylist())


def _against_float(data: EvalSet, table: pa.Table, layout: Mapping[str, S.VectorColumn],
                   column: S.VectorColumn, scores: np.ndarray, full: np.ndarray,
                   factor: int) -> tuple[dict[str, float], dict[str, Any]]:
    """recall@10 of the quantized ranking vs the exact float one, and the two-stage row."""
    name = S.vector_column(column.dim, full.shape[1])
    exact = layout.get(name) or layout.get(S.VECTOR)
    if exact is None:  # every float column dropped: nothing to compare with
        return {}, {}
    floats = _matrix(table.column(exact.name)).astype(np.float32)
    exact_scores = _similarity(_queries(None, exact, full), floats, exact)
    doc_ids = table.column("id").to_pylist()
    truth = _ranked(exact_scores, doc_ids, NDCG_K)
    own = f"recall@{NDCG_K}_vs_float"
    recall = {own: _overlap(_ranked(scores, doc_ids, NDCG_K), truth)}
    # two-stage: top 10 x factor by the quantized scores, rescored on the floats
    n = min(NDCG_K * factor, len(doc_ids))
    candidates = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    rescored = np.take_along_axis(exact_scores, candidates, axis=1)
    order = np.take_along_axis(candidates, np.argsort(-rescored, axis=1, kind="stable"), axis=1)
    ids = np.asarray(doc_ids, dtype=object)
    ranked = [list(ids[row[:NDCG_K]]) for row in order]
    qrels = [set(data.qrels[q]) for q in data.queries.column("id").to_pylist()]
    metrics = retrieval_metrics(ranked, qrels, data.queries.column("group").to_pylist())
    metrics.pop(f"recall@{RECALL_K}")  # only 10 rows come back
    return recall, {f"{column.name}->{exact.name}": {
        "dim": column.dim, "dtype": f"{column.dtype}->{exact.dtype}",
        "bytes_per_row": column.bytes_per_row, "rescore_bytes_per_row": exact.bytes_per_row,
        "rescore_factor": factor, **metrics, own: _overlap(ranked, truth)}}


def _overlap(ranked: list[list], truth: list[list]) -> float:
    """Mean share of each query's exact top-k that ``ranked`` returns."""
    return float(np.mean([len(set(r) & set(t)) / len(t) for r, t in zip(ranked, truth,
                                                                        strict=True)]))


def _pairs(data: EvalSet, docs: np.ndarray, doc_ids: list[str],
           column: S.VectorColumn) -> dict[str, Any]:
    """Pearson of the column's similarity of each pair (cosine; quantized: as ranked)."""
    row = {doc: i for i, doc in enumerate(doc_ids)}
    a = [row[str(x)] for x in data.pairs.column("a").to_pylist()]
    b = [row[str(x)] for x in data.pairs.column("b").to_pylist()]
    similarity = _similarity(docs, docs, column)  # [docs, docs]
    cosine = similarity[a, b]  # [pairs]
    if np.ptp(cosine) == 0:  # e.g. 8 sign bits all alike: no correlation is defined
        return {"pearson": None, "pairs": len(a)}
    return {"pearson": pearson(cosine, data.pairs.column("score").to_pylist()),
            "pairs": len(a)}


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column -> [rows, width] of its value type (float16 as float32)."""
    flat = column.combine_chunks()
    values = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, flat.type.list_size)
    return values.astype(np.float32) if values.dtype == np.float16 else values



def format_report(report: Mapping[str, Any]) -> str:
    """A markdown table: dataset, column, dim, dtype, bytes/row and the metrics
    (``a->b`` columns: two-stage search, candidates on a, rescored on b); the ``longdoc``
    set's own table (one line per chunking mode) after it."""
    lines = ["| dataset | column | dim | dtype | bytes/row | nDCG@10 | recall@100 | top-1 | "
             "Pearson | recall@10 vs float |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, result in report["datasets"].items():
        for column, m in result.get("columns", {}).items():
            cells = [_fmt(m.get(key)) for key in (f"ndcg@{NDCG_K}", f"recall@{RECALL_K}",
                                                   "top1", "pearson",
                                                   f"recall@{NDCG_K}_vs_float")]
            lines.append(f"| {name} | {column} | {m['dim']} | {m.get('dtype', '')} | "
                         f"{m['bytes_per_row']} | " + " | ".join(cells) + " |")
    tables = [lines] if len(lines) > 2 else []  # longdoc alone: no column table
    if longdoc.NAME in report["datasets"]:
        tables.append(_long_report(report["datasets"][longdoc.NAME]))
    return "\n\n".join("\n".join(t) for t in tables)


def _long_report(result: Mapping[str, Any]) -> list[str]:
    """The longdoc set's markdown table: one line per chunking mode."""
    lines = [f"| longdoc ({result['chunk_tokens']}-token chunks) | doc@1 | doc@5 | chunk@1 | "
             "rows | tokens | processed tokens |", "|---|---|---|---|---|---|---|"]
    for mode, m in result["modes"].items():
        lines.append(f"| {mode} | {m['doc@1']:.3f} | {m['doc@5']:.3f} | "
                     f"{_fmt(m.get('chunk@1')) or '-'} | {m['rows']} | {m['tokens']} | "
                     f"{m['processed_tokens']} |")
    return lines


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
