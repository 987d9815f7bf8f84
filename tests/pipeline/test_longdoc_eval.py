"""``embedjob eval --dataset longdoc``: the long-document set scored for ``--chunking none``,
``split`` and ``late`` through the CLI and the real job, on the tiny golden checkpoint
(random weights: mechanics, not quality). One figure is recomputed independently."""

from __future__ import annotations

import json

import lance
import numpy as np
import pytest

from embedjob import cli
from embedjob.table.eval import longdoc
from tests.model_fixtures import ATOL_VECTORS, max_err

pytestmark = pytest.mark.pipeline


@pytest.mark.slow  # three embed runs: 76 s here at load ~2.5 (the bad flags: test_cli_errors)
def test_eval_longdoc_scores_none_split_late(ray_session, tmp_path, golden_dir, embedder,
                                             capsys) -> None:
    out = tmp_path / "eval"
    code = cli.main(["eval", "--dataset", "longdoc", "--model", str(golden_dir),
                     "--output-dir", str(out), "--work-dir", str(tmp_path / "work"),
                     "--chunk-tokens", "64", "-q"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())["datasets"]["longdoc"]
    modes = report["modes"]
    assert list(modes) == ["none", "split", "late"]
    assert (report["documents"], report["queries"], report["chunk_tokens"]) == (40, 1000, 64)
    for mode, m in modes.items():
        metrics = ["doc@1", "doc@5"] + ([] if mode == "none" else ["chunk@1"])
        assert all(0 <= m[k] <= 1 for k in metrics), (mode, m)
        assert m["doc@1"] <= m["doc@5"]
    assert "chunk@1" not in modes["none"] and modes["none"]["rows"] == 40
    # the same chunks in both chunk tables; late counts each document's tokens once, as none
    assert modes["split"]["rows"] == modes["late"]["rows"] > 40
    assert modes["late"]["tokens"] == modes["none"]["tokens"] < modes["split"]["tokens"]
    # doc@1 of none, recomputed: the stored vectors are encode()'s, the ranking is argmax
    data = longdoc.bible_documents(25)
    table = lance.dataset(modes["none"]["table"]).to_table()
    ids = table.column("id").to_pylist()
    stored = np.asarray(table.column("vector").to_pylist(), np.float32)
    texts = dict(zip(data.docs.column("id").to_pylist(), data.docs.column("text").to_pylist(),
                     strict=True))
    direct = embedder.encode([texts[i] for i in ids], task="retrieval.passage")
    assert max_err(stored, direct) < ATOL_VECTORS
    queries = embedder.encode(data.queries, task="retrieval.query")
    best = np.asarray(ids)[(queries @ stored.T).argmax(axis=1)]
    assert modes["none"]["doc@1"] == pytest.approx(np.mean(best == np.asarray(data.doc_of)),
                                                   abs=1e-3)  # a near-tie may flip one query
    png = (out / longdoc.PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert not (out / "eval.png").exists()  # no dataset scored per column
    printed = capsys.readouterr().out
    for mode in ("none", "split", "late"):
        assert f"| {mode} | {modes[mode]['doc@1']:.3f} |" in printed
