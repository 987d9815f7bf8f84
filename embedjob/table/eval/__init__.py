"""``embedjob eval``: retrieval quality of every vector column of a table, on real data.

Each dataset's corpus is embedded by the real job (``driver.run.run``) into a Lance table, so
the evaluation measures the table as ``embedjob embed`` writes it; queries are embedded as
``table.search`` embeds them (the paired query task, truncated to each column's dim). Every
vector column (``vector`` and each ``vector_<d>``) is scored exactly (a flat scan, as a
search without an index), and the figures go to ``eval.json`` and ``eval.png`` (quality vs
dim, bytes per row on a second axis).

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

from embedjob.config import as_tuple, knob
from embedjob.errors import ConfigError
from embedjob.table.eval.datasets import DATASETS, EvalSet, load_dataset
from embedjob.table.eval.metrics import (
    NDCG_K,
    RECALL_K,
    pearson,
    rank_documents,
    retrieval_metrics,
)
from embedjob.table.eval.plot import headline, plot, primary_metric
from embedjob.table.search import embed_queries, open_table, read_stamp, vector_columns

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "EvalConfig", "EvalSet", "evaluate", "format_report", "load_dataset",
           "primary_metric"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One ``embedjob eval`` run (each field's help says what it sets)."""

    datasets: tuple[str, ...] = knob(flag="--dataset", metavar="{" + ",".join(DATASETS) + "}",
                                     help="dataset to evaluate; repeatable or comma-separated")
    model: str = knob(help="local dir, s3:// prefix or hub id")
    output_dir: str = knob(help="where eval.json and eval.png go")
    work_dir: str | None = knob(None, help="keep the corpus tables here (default: a temp dir)")
    dims: tuple[int, ...] = knob((), metavar="D,D,...",
                                 help="dims to store (default: every Matryoshka dim)")
    vector_dtype: Literal["float32", "float16"] = knob("float32", help="stored vector type")
    num_actors: int = knob(1, help="encode actors of the embed job")

    def __post_init__(self) -> None:
        for name in ("datasets", "dims"):
            object.__setattr__(self, name, as_tuple(name, getattr(self, name)))
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ConfigError(f"datasets {list(self.datasets)} must be non-empty names from "
                              f"{list(DATASETS)}")


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
    for name in config.datasets:
        data = load_dataset(name)
        uri = embed_corpus(data, config, spec, os.path.join(work, name))
        report["datasets"][name] = score_table(data, uri, embedder)
        logger.info("eval %s: %s", name, headline(report["datasets"][name]))
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "eval.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    plot(report, os.path.join(config.output_dir, "eval.png"))
    return report


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
                    num_actors=config.num_actors))
    return output


def score_table(data: EvalSet, uri: str, embedder: Any) -> dict[str, Any]:
    """Metrics of every vector column of the table at ``uri`` for dataset ``data``."""
    dataset = open_table(uri)
    stamp = read_stamp(dataset.schema)
    columns = vector_columns(dataset.schema)
    table = dataset.to_table(columns=["id", *columns])
    doc_ids = table.column("id").to_pylist()
    width = 2 if stamp.vector_dtype == "float16" else 4
    full = None
    if data.kind == "retrieval":
        full = embed_queries(embedder, stamp, data.queries.column("text").to_pylist(),
                             embedder.hidden_size)
    results = {}
    for column, dim in sorted(columns.items(), key=lambda item: item[1]):
        docs = _matrix(table.column(column))
        metrics = (_retrieval(data, docs, doc_ids, full, dim) if data.kind == "retrieval"
                   else _pairs(data, docs, doc_ids))
        results[column] = {"dim": dim, "bytes_per_row": dim * width, **metrics}
    return {"protocol": data.protocol, "table": uri, "task": stamp.task,
            "query_task": stamp.query_task, "columns": results}


def _retrieval(data: EvalSet, docs: np.ndarray, doc_ids: list[str], full: np.ndarray,
               dim: int) -> dict[str, Any]:
    from embedjob.model import matryoshka

    queries = matryoshka(full, dim)  # = embed_queries(..., dim): truncate, then normalize
    ranked = rank_documents(queries, docs, doc_ids, k=max(NDCG_K, RECALL_K))
    qrels = [set(data.qrels[q]) for q in data.queries.column("id").to_pylist()]
    return retrieval_metrics(ranked, qrels, data.queries.column("group").to_pylist())


def _pairs(data: EvalSet, docs: np.ndarray, doc_ids: list[str]) -> dict[str, Any]:
    row = {doc: i for i, doc in enumerate(doc_ids)}
    a = [row[str(x)] for x in data.pairs.column("a").to_pylist()]
    b = [row[str(x)] for x in data.pairs.column("b").to_pylist()]
    cosine = np.einsum("ij,ij->i", docs[a], docs[b])  # [pairs]
    return {"pearson": pearson(cosine, data.pairs.column("score").to_pylist()),
            "pairs": len(a)}


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column -> float32 [rows, dim]."""
    flat = column.combine_chunks()
    dim = flat.type.list_size
    return flat.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)



def format_report(report: Mapping[str, Any]) -> str:
    """A markdown table: dataset, column, dim, bytes/row and the metrics."""
    lines = ["| dataset | column | dim | bytes/row | nDCG@10 | recall@100 | top-1 | Pearson |",
             "|---|---|---|---|---|---|---|---|"]
    for name, result in report["datasets"].items():
        for column, m in result["columns"].items():
            cells = [_fmt(m.get(key)) for key in (f"ndcg@{NDCG_K}", f"recall@{RECALL_K}",
                                                   "top1", "pearson")]
            lines.append(f"| {name} | {column} | {m['dim']} | {m['bytes_per_row']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
