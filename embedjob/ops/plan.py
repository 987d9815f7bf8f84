"""``embedjob plan``: size a job before paying for it, from a sample of the input.

Reads the first rows of a few input files (never the whole corpus), tokenizes them exactly
as the job would (task prefix, truncation), and extrapolates: rows, token-length
percentiles, total tokens, output bytes per vector column, and GPU-hours at a throughput
(default: the ``pipeline.tokens_per_s`` of the last ``embedjob bench`` on this machine).

It also times the tokenizer on that sample, and from it sizes the CPU stage: the tokenize
tasks that keep ``num_actors`` encode actors fed at that throughput (``--tokenize-tasks``).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedjob.config import EmbedConfig
from embedjob.stages import read
from embedjob.storage import Listed, Storage

LAST_BENCH = Path(os.environ.get("EMBEDJOB_CACHE", Path.home() / ".cache" / "embedjob")) / (
    "last_bench.json")
SAMPLE_FILES = 8
FOOTER_SAMPLE = 64  # Parquet footers read to estimate rows (all of them below this many files)
FOOTER_THREADS = 16  # footers read at once (each is one or two ranged GETs)
PERCENTILES = (50, 90, 99, 100)

# Reference throughput when none was measured: jina-embeddings-v3's shape (303.4M
# non-embedding parameters, 636 MFLOP per token at 300-token rows) at 35-50% MFU of each
# card's dense bf16 peak -- BENCHMARKS.md "Projection: 1B rows x 300 tokens on H100" (a
# projection, not a measurement; a smaller model is faster: pass --tokens-per-s or run
# `embedjob bench --device cuda`). Prices: on-demand $/GPU-hour ranges, assumptions that
# --gpu-price overrides, not quotes.
FLOP_PER_TOKEN = 636e6
MFU_RANGE = (0.35, 0.50)
GPUS: dict[str, tuple[float, tuple[float, float]]] = {  # name: (peak TFLOP/s, $/h range)
    "h100": (989.0, (2.0, 4.0)),
    "h200": (989.0, (3.0, 5.0)),
    "a100": (312.0, (1.2, 2.5)),
    "l4": (121.0, (0.5, 0.9)),
}
REFERENCE_SOURCE = ("reference: jina-v3 shape at 35-50% MFU of the card's bf16 peak "
                    "(BENCHMARKS.md projection, not a measurement)")


@dataclass(frozen=True, kw_only=True)
class CostEstimate:
    """Wall-clock and cost of the job on ``gpus`` cards of one type, as ranges."""

    gpu: str
    gpus: int
    tokens_per_s_per_gpu: tuple[float, float]
    source: str  # where the throughput comes from
    hours: tuple[float, float]  # wall-clock
    price_per_gpu_hour: tuple[float, float]
    cost: tuple[float, float]

    def line(self) -> str:
        lo, hi = self.hours
        return (f"on {self.gpus} x {self.gpu.upper()}: ~{_duration(lo)} to {_duration(hi)} "
                f"wall-clock, ${self.cost[0]:,.0f} to ${self.cost[1]:,.0f} at "
                f"${self.price_per_gpu_hour[0]:g}-{self.price_per_gpu_hour[1]:g} per GPU-hour "
                f"({self.tokens_per_s_per_gpu[0]:,.0f}-{self.tokens_per_s_per_gpu[1]:,.0f} "
                f"tokens/s per GPU; {self.source})")


def estimate_cost(tokens: int, gpu: str, gpus: int, *, measured: float | None = None,
                  measured_source: str = "", price: tuple[float, float] | None = None
                  ) -> CostEstimate:
    """Wall-clock and cost ranges for ``tokens`` on ``gpus`` cards of type ``gpu``.

    Args:
        tokens: Tokens to embed.
        gpu: A key of ``GPUS``.
        gpus: Cards (one encode actor each).
        measured: A measured tokens/s per GPU (a point, not a range); else the reference.
        measured_source: Where ``measured`` comes from.
        price: $/GPU-hour (low, high); default the table's range for ``gpu``.
    """
    peak, default_price = GPUS[gpu]
    if measured:
        speed, source = (measured, measured), measured_source
    else:
        speed = tuple(peak * 1e12 * m / FLOP_PER_TOKEN for m in MFU_RANGE)
        source = REFERENCE_SOURCE
    price = price or default_price
    hours = (tokens / (speed[1] * gpus) / 3600, tokens / (speed[0] * gpus) / 3600)
    return CostEstimate(gpu=gpu, gpus=gpus, tokens_per_s_per_gpu=speed, source=source,
                        hours=hours, price_per_gpu_hour=price,
                        cost=(hours[0] * gpus * price[0], hours[1] * gpus * price[1]))


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:,.1f} h"


@dataclass(frozen=True, kw_only=True)
class SizingReport:
    files: int
    sampled_rows: int
    estimated_rows: int
    rows_exact: bool  # every file's rows counted (Parquet footers, Lance); else estimated
    token_percentiles: dict[str, int]
    mean_tokens: float
    estimated_tokens: int
    bytes_per_column: dict[str, int]  # "column (dtype)" -> rows x bytes per row
    bytes_per_row: dict[str, int]  # the same keys -> bytes one row of the column takes
    tokens_per_s: float | None
    tokens_per_s_source: str
    gpu_hours: float | None
    tokenizer_tokens_per_s: float  # one tokenize task, measured on the sample
    num_actors: int
    tokenize_tasks: int | None  # tasks that feed num_actors at tokens_per_s; None: unknown
    model_license: str = "unknown"
    max_tokens: int = 0  # the model's limit per text
    truncated_rows: int = 0  # estimated rows over max_tokens (cut when embedded)
    truncated_sampled: int = 0  # of the sample
    cost: CostEstimate | None = None

    def lines(self) -> list[str]:
        # "~": an estimate (extrapolated from the sample); no "~": counted
        approx = "" if self.rows_exact else "~"
        out = [f"input: {self.files} files, {approx}{self.estimated_rows:,} rows "
               f"(sampled {self.sampled_rows:,}; ~ marks estimates)",
               "tokens per row: " + ", ".join(f"p{k} {v}" for k, v in
                                               self.token_percentiles.items())
               + f", mean {self.mean_tokens:.1f} (of the sample)",
               f"estimated tokens: ~{self.estimated_tokens:,}"]
        out += [f"output {name}: {approx}{_human(size)} ({self.bytes_per_row[name]} B/row)"
                for name, size in self.bytes_per_column.items()]
        if self.gpu_hours is not None:
            out.append(f"at {self.tokens_per_s:,.0f} tokens/s ({self.tokens_per_s_source}): "
                       f"~{self.gpu_hours:,.2f} GPU-hours")
        else:
            out.append("no throughput known: pass --tokens-per-s or run `embedjob bench`")
        out.append(f"tokenizer: {self.tokenizer_tokens_per_s:,.0f} tokens/s per task "
                   f"(measured on the sample)")
        out.append(f"model licence: {self.model_license}"
                   + (" (non-commercial use only)" if "-nc" in self.model_license.lower()
                      else ""))
        if self.tokenize_tasks is not None:
            out.append(f"to feed {self.num_actors} encode actor(s): {self.tokenize_tasks} "
                       f"tokenize task(s) (--tokenize-tasks {self.tokenize_tasks})")
        if self.cost is not None:
            out.append(self.cost.line())
        if self.truncated_sampled:
            out.append(f"warning: ~{self.truncated_rows:,} rows ({self.truncated_sampled:,} of "
                       f"the {self.sampled_rows:,} sampled) are over the model's "
                       f"{self.max_tokens:,}-token limit: they will be cut there "
                       "(output column truncated = true)")
        return out

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self))


def size_job(config: EmbedConfig, *, sample_rows: int = 20000,
             tokens_per_s: float | None = None, gpu: str | None = None, gpus: int = 1,
             price: tuple[float, float] | None = None) -> SizingReport:
    """Sample the input and extrapolate the job's size (and, for ``gpu``, its wall-clock
    and cost on ``gpus`` of those cards at ``price`` $/GPU-hour)."""
    from embedjob.driver.preflight import model_plan, read_spec_for

    storage = Storage.resolve(config.storage_options)
    fmt = config.input_format
    inputs = read.list_inputs(config.input, fmt, storage)
    if not inputs:
        from embedjob.errors import InputError

        raise InputError(f"--input {config.input!r} matched no {fmt} files")
    spec, task, dims = model_plan(config, storage)
    layout = _vector_layout(config, dims)
    read_spec, _ = read_spec_for(config, fmt, inputs, storage)
    units = [i.uri for i in inputs]
    texts, sampled_units = _sample_texts(units[:SAMPLE_FILES], read_spec, sample_rows)
    tokenizer = spec.tokenizer()
    started = time.perf_counter()
    tokenized = tokenizer.tokenize(texts, task)
    lengths = np.array([len(x) for x in tokenized.ids] or [0])
    over = int(np.asarray(tokenized.truncated).sum()) if len(texts) else 0
    tokenizer_speed = float(lengths.sum()) / max(time.perf_counter() - started, 1e-9)
    rows, exact = _estimate_rows(inputs, sampled_units, len(texts), read_spec)
    speed, source = _throughput(tokens_per_s)
    total_tokens = int(lengths.mean() * rows)
    return SizingReport(
        files=len(units), sampled_rows=len(texts), estimated_rows=rows, rows_exact=exact,
        token_percentiles={str(p): int(np.percentile(lengths, p)) for p in PERCENTILES},
        mean_tokens=float(lengths.mean()), estimated_tokens=total_tokens,
        bytes_per_column={f"{c.name} ({c.dtype})": rows * c.bytes_per_row for c in layout},
        bytes_per_row={f"{c.name} ({c.dtype})": c.bytes_per_row for c in layout},
        tokens_per_s=speed, tokens_per_s_source=source,
        gpu_hours=total_tokens / speed / 3600 if speed else None,
        tokenizer_tokens_per_s=tokenizer_speed, num_actors=config.max_actors,
        tokenize_tasks=tokenize_tasks(config.max_actors, speed, tokenizer_speed),
        model_license=spec.license, max_tokens=spec.max_tokens,
        truncated_sampled=over, truncated_rows=round(over / max(len(texts), 1) * rows),
        cost=None if gpu is None else estimate_cost(
            total_tokens, gpu, gpus, measured=tokens_per_s,
            measured_source="--tokens-per-s", price=price),
    )


def _vector_layout(config: EmbedConfig, dims: tuple[int, ...]) -> list:
    """The vector columns a run of ``config`` writes (floats and ``--quantize`` forms)."""
    import pyarrow as pa

    from embedjob import schema as S
    from embedjob.driver.preflight import quantize_plan

    quantize, float_dims = quantize_plan(config, dims)
    schema = S.output_schema(pa.string(), dims[0], dims, config.vector_dtype, [], {},
                             quantize, float_dims)
    return list(S.vector_layout(schema).values())


def tokenize_tasks(num_actors: int, encoder_tokens_per_s: float | None,
                   tokenizer_tokens_per_s: float, headroom: float = 1.5) -> int | None:
    """Tokenize tasks that keep ``num_actors`` encoders fed, with ``headroom`` for the
    tokenizer's slower moments (long texts, cold caches); None when the encoder's speed is
    unknown."""
    if not encoder_tokens_per_s or tokenizer_tokens_per_s <= 0:
        return None
    need = num_actors * encoder_tokens_per_s * headroom / tokenizer_tokens_per_s
    return max(1, math.ceil(need))


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"


def _sample_texts(units: list[str], spec: read.ReadSpec, limit: int) -> tuple[list[str], int]:
    """Up to ``limit`` valid texts from the first units, spread over them."""
    texts: list[str] = []
    per_unit = max(1, limit // len(units))
    used = 0
    for unit in units:
        used += 1
        taken = 0
        for table in read.iter_rows(unit, spec):
            for text in table.column("_text").to_pylist():
                if text and text.strip() and taken < per_unit:
                    texts.append(text)
                    taken += 1
            if taken >= per_unit:
                break
    return texts, used


def _estimate_rows(inputs: list[Listed], sampled_units: int, sampled: int,
                   spec: read.ReadSpec) -> tuple[int, bool]:
    """Rows per byte of a sample times the listed bytes; exact when every file was counted.

    Parquet: the footers of up to ``FOOTER_SAMPLE`` files spread over the listing, read in a
    thread pool (one footer per file would be 100k requests on a 100k-file corpus). Other
    formats: the texts sampled per byte of the files they came from. Lance: fragments count
    their own rows in the manifest.
    """
    if spec.format == "lance":
        return spec.storage.open_lance(inputs[0].uri.rpartition("#")[0]).count_rows(), True
    total = sum(i.size for i in inputs)
    if spec.format == "parquet":
        step = max(1, len(inputs) // FOOTER_SAMPLE)
        sample = inputs[::step][:FOOTER_SAMPLE]
        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            counts = list(pool.map(lambda i: read.parquet_rows(i.uri, spec, i.size or None),
                                   sample))
        if len(sample) == len(inputs):
            return sum(counts), True
        return int(sum(counts) / (sum(i.size for i in sample) or 1) * total), False
    sampled_bytes = sum(i.size for i in inputs[:sampled_units]) or 1
    return int(sampled / sampled_bytes * total), False


def _throughput(override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if LAST_BENCH.is_file():
        last = json.loads(LAST_BENCH.read_text())
        speed = (last.get("pipeline") or {}).get("tokens_per_s")
        if speed:
            return float(speed), f"last bench on {last.get('device', '?')}"
    return None, "unknown"


def record_bench(result: dict) -> None:
    """Keep the last bench result for ``embedjob plan``."""
    LAST_BENCH.parent.mkdir(parents=True, exist_ok=True)
    LAST_BENCH.write_text(json.dumps(result))


