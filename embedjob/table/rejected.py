"""``embedjob rejected OUTPUT``: the rows a run set aside, counted by reason, with a sample.

Reasons carry their details after a colon (``invalid JSON line: ...``, ``unreadable parquet
after row 9: ...``); rows are grouped by what comes before it, the sample keeps the whole
reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass

from embedjob import schema as S
from embedjob.errors import StorageError
from embedjob.storage import Storage

SCAN_BATCH_ROWS = 65536


@dataclass(frozen=True)
class RejectedReport:
    uri: str
    rows: int
    by_reason: dict[str, int]  # reason kind -> rows, most first
    samples: dict[str, list[dict]]  # reason kind -> up to `sample` rows (id, source, row, reason)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, default=str)


def reason_kind(reason: str | None) -> str:
    """What a reason says before its details."""
    return (reason or "(no reason)").split(":", 1)[0].strip()


def rejected_report(uri: str, storage: Storage, *, sample: int = 5) -> RejectedReport:
    """Count the rejected table's rows by reason kind, keeping ``sample`` rows of each.

    Raises:
        StorageError: There is no rejected table at ``uri``.
    """
    if not storage.lance_exists(uri):
        raise StorageError(f"no rejected-rows table at {uri!r} (a run writes it beside its "
                           "output; --rejected-output names another place)")
    counts: Counter[str] = Counter()
    samples: dict[str, list[dict]] = {}
    columns = [S.OUT_ID, S.REJECTED_SOURCE, S.REJECTED_ROW, S.REJECTED_REASON]
    dataset = storage.open_lance(uri)
    for batch in dataset.to_batches(columns=columns, batch_size=SCAN_BATCH_ROWS):
        for row in batch.to_pylist():
            kind = reason_kind(row[S.REJECTED_REASON])
            counts[kind] += 1
            kept = samples.setdefault(kind, [])
            if len(kept) < sample:
                kept.append({"id": row[S.OUT_ID], "source": row[S.REJECTED_SOURCE],
                             "row": row[S.REJECTED_ROW], "reason": row[S.REJECTED_REASON]})
    ordered = dict(counts.most_common())
    return RejectedReport(uri=uri, rows=sum(counts.values()), by_reason=ordered,
                          samples={k: samples[k] for k in ordered})


def format_rejected(report: RejectedReport, max_chars: int = 100) -> str:
    """Counts by reason, then each reason's sample rows."""
    if not report.rows:
        return f"no rejected rows in {report.uri}"
    width = max(len(f"{n:,}") for n in report.by_reason.values())
    lines = [f"{report.rows:,} rejected rows in {report.uri}"]
    lines += [f"  {n:>{width},}  {kind}" for kind, n in report.by_reason.items()]
    for kind, rows in report.samples.items():
        if rows:
            lines.append(f"{kind}:")
        for row in rows:
            reason = str(row["reason"]).replace("\n", " ")
            reason = reason if len(reason) <= max_chars else reason[: max_chars - 3] + "..."
            lines.append(f"  id {row['id']!s:<12} {row['source']} row {row['row']}: {reason}")
    return "\n".join(lines)
