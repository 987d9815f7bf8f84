"""The synthetic corpus: real UDHR text cut to a seeded long-tailed length mix."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedjob.bench.checkpoint import _mkdir, tokenizer_dir
from embedjob.bench.config import LONG_TOKENS, MEDIAN_TOKENS, P90_TOKENS, UDHR_SAMPLE, Z90

# ---------------------------------------------------------------- corpus


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """A generated corpus: parquet files with ``id`` (int64) and ``text``."""

    path: str
    rows: int
    long_rows: int
    target_tokens: int  # sum of the drawn lengths (text tokens, before prefix/specials)


def target_lengths(rows: int, long_fraction: float, seed: int) -> np.ndarray:
    """Seeded token lengths: lognormal body plus exactly round(rows x long_fraction) long rows
    (at least one when the fraction is > 0), in a shuffled order."""
    rng = np.random.default_rng(seed)
    sigma = np.log(P90_TOKENS / MEDIAN_TOKENS) / Z90
    lengths = np.clip(rng.lognormal(np.log(MEDIAN_TOKENS), sigma, rows), 4, LONG_TOKENS[0] - 1)
    n_long = min(rows, max(1 if long_fraction > 0 else 0, round(rows * long_fraction)))
    lengths[:n_long] = rng.integers(LONG_TOKENS[0], LONG_TOKENS[1] + 1, n_long)
    return rng.permutation(lengths.astype(np.int64))


def make_corpus(directory: str | Path, *, rows: int, long_fraction: float, seed: int,
                files: int) -> Corpus:
    """Write a deterministic long-tailed corpus of real UDHR text as ``files`` parquet files.

    Each row is a run of consecutive text of one language (its paragraphs concatenated and
    repeated, so a row may exceed the language's whole text) cut at token boundaries of the
    XLM-R tokenizer to the drawn length.
    """
    import pyarrow.parquet as pq

    lengths = target_lengths(rows, long_fraction, seed)
    texts = corpus_texts(lengths, seed)
    out = _mkdir(Path(directory))
    for f, part in enumerate(np.array_split(np.arange(rows), files)):
        if len(part):
            table = pa.table({"id": pa.array(part, pa.int64()),
                              "text": pa.array([texts[i] for i in part], pa.string())})
            pq.write_table(table, out / f"part-{f:03d}.parquet")
    n_long = int((lengths >= LONG_TOKENS[0]).sum())
    return Corpus(path=str(out), rows=rows, long_rows=n_long, target_tokens=int(lengths.sum()))


def corpus_texts(lengths: np.ndarray, seed: int) -> list[str]:
    """One text per length: a run of consecutive UDHR text of one language (its paragraphs
    concatenated and repeated) cut at XLM-R token boundaries to that many tokens."""
    streams = _language_streams()
    rng = np.random.default_rng(seed + 1)
    texts = []
    for n in np.asarray(lengths).tolist():
        text, offsets = streams[int(rng.integers(len(streams)))]
        start = int(rng.integers(0, len(offsets) - n))
        texts.append(text[offsets[start][0]: offsets[start + n - 1][1]])
    return texts


@functools.cache
def _language_streams() -> list[tuple[str, list[tuple[int, int]]]]:
    """Per language of the UDHR sample: (text repeated to > 8192 tokens, token char offsets)."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    table = pq.read_table(UDHR_SAMPLE, columns=["lang", "text"]).to_pydict()
    by_lang: dict[str, list[str]] = {}
    for lang, text in zip(table["lang"], table["text"], strict=True):
        by_lang.setdefault(lang, []).append(text)
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    tok.no_truncation()
    streams = []
    for lang in sorted(by_lang):
        once = " ".join(by_lang[lang])
        n_once = len(tok.encode(once, add_special_tokens=False).ids)
        text = " ".join([once] * (LONG_TOKENS[1] // max(n_once, 1) + 2))
        streams.append((text, tok.encode(text, add_special_tokens=False).offsets))
    return streams

