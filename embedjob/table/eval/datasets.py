"""The evaluation datasets: slices of real corpora committed under ``embedjob/data/eval/``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from embedjob.errors import ConfigError

DATA = Path(__file__).resolve().parents[2] / "data" / "eval"
Kind = Literal["retrieval", "pairs"]


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
