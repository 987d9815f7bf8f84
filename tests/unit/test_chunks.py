"""The chunk planner (stages/chunks.py): spans cover the document with the asked overlap and
no gaps, character spans map back to the exact text, sentences (CJK too), macro-windows."""

from __future__ import annotations

import numpy as np
import pytest

from embedjob.stages import chunks as C

pytestmark = pytest.mark.unit

TEXT = ("The first sentence is here. A second one follows! Does a third ask? "
        "第一句话在这里。第二句话！第三句话？\n"
        "A last line without a full stop")


@pytest.fixture(scope="module")
def tokenizer(golden_dir):
    from embedjob.model import load_spec

    return load_spec(str(golden_dir)).tokenizer()


def _covered(spans: list[tuple[int, int]], n: int, overlap: int) -> None:
    """The spans start at 0, end at n, leave no gap and move forward."""
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (a, b), (c, _) in zip(spans, spans[1:], strict=False):
        assert a < c <= b, "no gap, progress"


@pytest.mark.parametrize(("n", "size", "overlap"), [(10, 4, 0), (10, 4, 1), (10, 4, 3),
                                                    (4, 4, 2), (1, 256, 0), (257, 256, 16)])
def test_token_spans_cover_with_the_asked_overlap(n, size, overlap) -> None:
    spans = C.token_spans(n, size, overlap)
    _covered(spans, n, overlap)
    assert all(b - a <= size for a, b in spans)
    assert all(b - c == overlap for (_, b), (c, _) in zip(spans, spans[1:], strict=False))
    # the steps are exactly size - overlap, so the count is ceil((n - overlap) / step)
    step = size - overlap
    assert len(spans) == max(1, -(-(n - overlap) // step))


def test_token_spans_refuse_overlap_at_chunk_size() -> None:
    with pytest.raises(ValueError, match=r"overlap 4 not in \[0, 4\)"):
        C.token_spans(10, 4, 4)


def test_sentence_ends_latin_cjk_and_lines() -> None:
    ends = C.sentence_ends(TEXT)
    pieces = [TEXT[a:b] for a, b in zip([0, *ends], [*ends, len(TEXT)], strict=True)]
    assert pieces == ["The first sentence is here.", " A second one follows!",
                      " Does a third ask?", " 第一句话在这里。", "第二句话！", "第三句话？",
                      "\nA last line without a full stop"]
    assert C.sentence_ends("pi is 3.14 e.g.x and so on") == []


@pytest.mark.parametrize("boundaries", ["tokens", "sentences"])
@pytest.mark.parametrize(("size", "overlap"), [(8, 0), (8, 3), (20, 0), (20, 7), (3, 1)])
def test_char_spans_map_back_to_the_exact_text(tokenizer, boundaries, size, overlap) -> None:
    doc = tokenizer.tokenize_documents([TEXT])[0]
    spans = C.plan_spans(doc.offsets, len(TEXT), size, overlap, boundaries, TEXT)
    n = len(doc.text)
    _covered([(s.token_start, s.token_end) for s in spans], n, overlap)
    assert all(s.token_end - s.token_start <= size for s in spans)
    for s in spans:  # every token of the span lies inside the chunk's characters
        inside = doc.offsets[s.token_start:s.token_end]
        assert s.char_start <= inside[:, 0].min() and inside[:, 1].max() <= s.char_end
    if overlap == 0:  # without overlap the chunks tile the text
        assert "".join(TEXT[s.char_start:s.char_end] for s in spans) == TEXT
        assert [s.char_end for s in spans[:-1]] == [s.char_start for s in spans[1:]]
    else:
        shared = [a.token_end - b.token_start for a, b in zip(spans, spans[1:], strict=False)]
        assert all(0 <= x <= overlap for x in shared)
        if boundaries == "tokens":
            assert all(x == overlap for x in shared)


def test_sentence_chunks_start_at_sentence_starts(tokenizer) -> None:
    doc = tokenizer.tokenize_documents([TEXT])[0]
    spans = C.plan_spans(doc.offsets, len(TEXT), 20, 0, "sentences", TEXT)
    ends = set(C.sentence_ends(TEXT))
    assert len(spans) > 2 and all(s.char_start in ends for s in spans[1:])
    # a CJK text with no marks at all falls back to token boundaries
    cjk = "这是一个没有标点的很长的句子" * 4
    doc = tokenizer.tokenize_documents([cjk])[0]
    spans = C.plan_spans(doc.offsets, len(cjk), 10, 0, "sentences", cjk)
    assert [s.token_end - s.token_start for s in spans[:-1]] == [10] * (len(spans) - 1)
    assert "".join(cjk[s.char_start:s.char_end] for s in spans) == cjk


def test_macro_windows_hold_every_chunk_and_pick_the_farthest_from_an_edge() -> None:
    n, capacity, size = 100, 40, 10
    windows = C.plan_windows(n, capacity, size)
    assert windows == [(0, 40), (20, 60), (40, 80), (60, 100)]  # stride min(30, 20)
    offsets = np.stack([np.arange(n), np.arange(n) + 1], axis=1)
    spans = C.plan_spans(offsets, n, size, 0, "tokens")
    picked = [C.pick_window(s, windows, n) for s in spans]
    # chunk [20, 30): in windows 0 (15 from its right edge... 10) and 1 (0 from its left edge)
    # -> window 0; chunk [30, 40): window 0 ends at it (0), window 1 leaves 10 / 20 -> 1
    assert picked == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    for s, w in zip(spans, picked, strict=True):  # brute force: no window does better
        ws, we = windows[w]
        score = min(s.token_start - ws if ws else 1e9, we - s.token_end if we < n else 1e9)
        for vs, ve in windows:
            if vs <= s.token_start and s.token_end <= ve:
                assert min(s.token_start - vs if vs else 1e9,
                           ve - s.token_end if ve < n else 1e9) <= score
    pools = C.late_pools(spans, windows, n, lead=3, trail=1)
    assert (pools[0].start, pools[0].end) == (0, 3 + 10)  # the lead is the first chunk's
    assert pools[-1] == C.Pooled(3, 3 + 30, 3 + 40 + 1)  # the trail is the last chunk's
    assert pools[4] == C.Pooled(1, 3 + 20, 3 + 30)  # chunk [40, 50) in window [20, 60)


def test_a_short_document_is_one_window_and_windows_need_room_for_a_chunk() -> None:
    assert C.plan_windows(30, 40, 10) == [(0, 30)]
    with pytest.raises(ValueError, match="cannot hold a chunk"):
        C.plan_windows(100, 8, 10)


def test_a_unit_is_finished_only_when_every_chunk_of_its_documents_is_written() -> None:
    """Chunk rows carry shares of their document (DOC_WEIGHT each); the ledger counts a
    unit's rows read times DOC_WEIGHT, so a document half written keeps its unit open."""
    import pyarrow as pa

    from embedjob import schema as S
    from embedjob.driver.progress import UnitLedger
    from embedjob.stages.write import _unit_rows

    assert C.shares(3, S.DOC_WEIGHT) == [349525, 349525, 349526]
    assert sum(C.shares(7, 100)) == 100 and min(C.shares(100, 100)) == 1
    with pytest.raises(ValueError):
        C.shares(101, 100)
    doc_a, doc_b = C.shares(3, S.DOC_WEIGHT), C.shares(2, S.DOC_WEIGHT)
    first = pa.table({S.UNIT: ["u"] * 3, S.DOC_SHARE: [doc_a[0], doc_a[1], doc_b[0]]})
    rest = pa.table({S.UNIT: ["u", "u"], S.DOC_SHARE: [doc_a[2], doc_b[1]]})
    ledger = UnitLedger(fingerprints={"u": "fp"}, row_weight=S.DOC_WEIGHT)
    ledger.add(*_unit_rows(first))
    assert ledger.finishing({"u": (2, None)}) == {}  # two documents read, 3 of 5 chunks in
    ledger.add(*_unit_rows(rest))
    assert ledger.finishing({}) == {"u": ("fp", None)}


def test_a_document_of_too_many_chunks_is_rejected_with_its_reason(monkeypatch) -> None:
    import pyarrow as pa

    from embedjob import schema as S
    from embedjob.model.spec import DocumentTokens
    from embedjob.stages.chunk_rows import chunk_table

    monkeypatch.setattr(S, "DOC_WEIGHT", 4)
    base = pa.table({S.STATUS: S.status_array([S.Status.EMBED] * 2),
                     S.REASON: pa.array([None, None], pa.string())})
    docs = {i: DocumentTokens(np.array([0], np.int32), np.arange(n, dtype=np.int32),
                              np.array([2], np.int32),
                              np.stack([np.arange(n), np.arange(n) + 1], axis=1))
            for i, n in ((0, 8), (1, 10))}
    spec = C.ChunkSpec(mode="split", tokens=2, overlap=0, boundaries="tokens", window=64)
    out = chunk_table(base, docs, ["x" * 8, "y" * 10], spec)
    assert out.column(S.CHUNK).to_pylist() == [0, 1, 2, 3, None]  # 4 chunks fit, 5 do not
    assert out.column(S.DOC_SHARE).to_pylist() == [1, 1, 1, 1, 4]
    assert out.column(S.STATUS).to_pylist()[-1] == S.Status.REJECTED
    assert out.column(S.REASON).to_pylist()[-1] == ("document has 5 chunks, more than 4; "
                                                    "raise --chunk-tokens")
