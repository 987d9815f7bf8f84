"""The refresh diff's decisions (``stages.diff.classify``) and the unit split
(``ops.refresh.dirty_units``), on hand-made rows: no Ray, a real Lance table for the
ids that unchanged units hold."""

from __future__ import annotations

import lance
import pyarrow as pa

from embedjob import schema as S
from embedjob.ops.refresh import dirty_units
from embedjob.stages import check
from embedjob.stages import diff as D

READ = pa.schema([pa.field(S.SOURCE, pa.string()), pa.field(S.ROW, pa.int64()),
                  pa.field(S.UNIT, pa.string()), pa.field(S.ID, pa.int64()),
                  pa.field(S.TEXT, pa.string()), pa.field(S.REASON, pa.string())])


def _output(tmp_path, rows):
    """An output table holding (id, text, source_file, source_row) rows."""
    uri = str(tmp_path / "o.lance")
    lance.write_dataset(pa.table({
        S.OUT_ID: pa.array([r[0] for r in rows], pa.int64()),
        S.CONTENT_HASH: [check.content_hash(r[1]) for r in rows],
        S.SOURCE_FILE: [r[2] for r in rows],
        S.SOURCE_ROW: pa.array([r[3] for r in rows], pa.int64())}), uri)
    return uri


def _spec(uri, keep_deleted=False):
    return D.DiffSpec(output=uri, version=1, read_schema=READ,
                      positions={"a": 0, "b": 1, "c": 2}, partitions=1,
                      keep_deleted=keep_deleted)


def _corpus(spec, rows):
    """Read-stage rows (source, row, id, text) through ``input_keys``."""
    table = pa.table({S.SOURCE: [r[0] for r in rows],
                      S.ROW: pa.array([r[1] for r in rows], pa.int64()),
                      S.UNIT: [r[0] for r in rows],
                      S.ID: pa.array([r[2] for r in rows], pa.int64()),
                      S.TEXT: [r[3] for r in rows], S.REASON: [None] * len(rows)},
                     schema=READ)
    return D.input_keys(table, spec=spec)


def _decisions(result):
    return sorted((r[S.ID], D.Kind(r[D.KIND]).name, r[S.SOURCE], r[S.ROW], r[S.REASON])
                  for r in result.to_pylist())


def test_classify_every_kind_and_the_duplicate_rule_against_an_unchanged_unit(tmp_path):
    # output: file a (dirty: rewritten), file b (unchanged, not read), file z (gone)
    uri = _output(tmp_path, [(1, "one", "a", 0), (2, "two", "a", 1), (3, "three", "a", 2),
                             (4, "four", "a", 3), (5, "five", "b", 0), (6, "six", "b", 1),
                             (7, "seven", "z", 0)])
    spec = _spec(uri)
    lineage = lance.dataset(uri).to_table(filter=D.lineage_filter(["a", "z"]),
                                          with_row_address=True)
    corpus = _corpus(spec, [
        ("a", 0, 1, "one"),          # unchanged
        ("a", 1, 2, "two, amended"),  # changed
        ("a", 2, 4, "four"),          # id 4 moved from row 3 to row 2, same text
        ("a", 3, 8, "eight"),         # new
        ("a", 4, 8, "eight again"),   # duplicate of the row before
        ("a", 5, 6, "six"),           # file a comes first: wins id 6 from unchanged file b
        ("c", 0, 5, "five?"),         # file c comes after b: b's row keeps id 5
        ("a", 6, 9, "   "),           # invalid text: rejected
    ])                               # id 3 is gone from a, id 7 with file z
    both = pa.concat_tables([corpus, D.output_keys(lineage, spec=spec)])
    got = _decisions(D.classify(both, spec=spec))
    assert got == [
        (1, "UNCHANGED", "a", 0, None),
        (2, "CHANGED", "a", 1, None),
        (3, "GONE", "a", 2, None),
        (4, "MOVED", "a", 2, None),
        (5, "REJECT", "c", 0, check.DUPLICATE_ID),
        (6, "MOVED", "a", 5, None),                 # same text: b's vector, a's lineage
        (6, "REJECT", "b", 1, check.DUPLICATE_ID),  # b's row is deleted and rejected
        (7, "GONE", "z", 0, None),
        (8, "NEW", "a", 3, None),
        (8, "REJECT", "a", 4, check.DUPLICATE_ID),
        (9, "REJECT", "a", 6, None),
    ]
    addresses = {r[S.ID]: r[D.ADDR] for r in D.classify(both, spec=spec).to_pylist()
                 if r[D.KIND] == D.Kind.MOVED}
    assert addresses == {4: 3, 6: 5}  # the old rows' addresses (one fragment: offsets)


def test_classify_keep_deleted_keeps_gone_rows(tmp_path):
    uri = _output(tmp_path, [(1, "one", "a", 0), (2, "two", "a", 1)])
    spec = _spec(uri, keep_deleted=True)
    lineage = lance.dataset(uri).to_table(filter=D.lineage_filter(["a"]),
                                          with_row_address=True)
    both = pa.concat_tables([_corpus(spec, [("a", 0, 1, "one")]),
                             D.output_keys(lineage, spec=spec)])
    assert _decisions(D.classify(both, spec=spec)) == [(1, "UNCHANGED", "a", 0, None)]


def test_dirty_units_skips_files_recorded_with_the_listed_fingerprint():
    sources = ["a", "b#bytes=0-10", "b#bytes=10-20", "c", "d"]
    fingerprints = {"a": "1:1", "b": "2:2", "c": "3:9", "d": "4:4"}
    done = {"a": "1:1", "b#bytes=0-10": "2:2", "b#bytes=10-20": "2:2", "c": "3:3",
            "z": "5:5"}
    ranges = {"b#bytes=0-10": (0, 4), "b#bytes=10-20": (4, 9)}
    split = dirty_units(sources, fingerprints, done, ranges)
    assert split.units == ["c", "d"]           # c changed, d is new
    assert split.files == ["c", "z"]           # d has no output rows; z vanished
    assert split.clean == {"a": ("1:1", None), "b#bytes=0-10": ("2:2", (0, 4)),
                           "b#bytes=10-20": ("2:2", (4, 9))}


def test_classify_a_chunk_table_decides_per_document(tmp_path):
    """Several rows per doc_id (one per chunk): every chunk row of a changed, gone or
    duplicate-losing document is deleted, a moved one's are all copied with the new lineage,
    an unchanged one's untouched; counts per document for the document kinds."""
    uri = str(tmp_path / "c.lance")
    chunks = [(1, "one", "a", 0), (1, "one", "a", 0), (2, "two", "a", 1), (2, "two", "a", 1),
              (2, "two", "a", 1), (3, "three", "a", 2), (3, "three", "a", 2),
              (4, "four", "a", 3), (4, "four", "a", 3), (5, "five", "b", 0),
              (5, "five", "b", 0)]
    lance.write_dataset(pa.table({
        S.DOC_ID: pa.array([r[0] for r in chunks], pa.int64()),
        S.CHUNK: pa.array([0, 1, 0, 1, 2, 0, 1, 0, 1, 0, 1], pa.int32()),
        S.CONTENT_HASH: [check.content_hash(r[1]) for r in chunks],
        S.SOURCE_FILE: [r[2] for r in chunks],
        S.SOURCE_ROW: pa.array([r[3] for r in chunks], pa.int64())}), uri)
    spec = D.DiffSpec(output=uri, version=1, read_schema=READ, positions={"a": 0, "b": 1},
                      partitions=1, id_column=S.DOC_ID)
    lineage = lance.dataset(uri).to_table(filter=D.lineage_filter(["a"]),
                                          with_row_address=True)
    corpus = _corpus(spec, [("a", 0, 1, "one"), ("a", 1, 2, "two, amended"),
                            ("a", 2, 4, "four"),       # moved from row 3; doc 3 is gone
                            ("a", 3, 5, "five")])      # wins id 5 from unchanged file b
    both = pa.concat_tables([corpus, D.output_keys(lineage, spec=spec)])
    result = D.classify(both, spec=spec)
    addrs = {a: (d, c) for a, d, c in zip(
        lineage.column("_rowaddr").to_pylist(), lineage.column(S.DOC_ID).to_pylist(),
        lineage.column(S.CHUNK).to_pylist(), strict=True)}
    held_b = lance.dataset(uri).to_table(filter="source_file = 'b'", with_row_address=True)
    addrs |= {a: (5, c) for a, c in zip(held_b.column("_rowaddr").to_pylist(),
                                       held_b.column(S.CHUNK).to_pylist(), strict=True)}
    per_kind: dict = {}
    for r in result.to_pylist():
        chunk = addrs[r[D.ADDR]][1] if r[D.ADDR] is not None else None
        per_kind.setdefault(D.Kind(r[D.KIND]).name, []).append(
            (r[S.ID], chunk, r[S.SOURCE], r[S.ROW]))
    assert {k: sorted(v) for k, v in per_kind.items()} == {
        "UNCHANGED": [(1, 0, "a", 0)],
        "CHANGED": [(2, 0, "a", 1)],
        "GONE": [(3, 0, "a", 2)],
        "MOVED": [(4, 0, "a", 2), (4, 1, "a", 2), (5, 0, "a", 3), (5, 1, "a", 3)],
        "REJECT": [(5, 0, "b", 0)],           # b's document loses its id: deleted, rejected
        "CHUNK": [(2, 1, "a", 1), (2, 2, "a", 1), (3, 1, "a", 2)],  # (5's chunk 1: moved)
    }
    side = result.filter(pa.compute.equal(result.column(D.KIND), int(D.Kind.MOVED)))
    assert sorted(side.column(D.SIDE).to_pylist()) == [D.INPUT, D.INPUT, D.OUTPUT, D.OUTPUT]
