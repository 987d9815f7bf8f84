"""What the benchmark measures: peak RSS of the driver and of Ray's workers, and each run's
record of the JSON line."""

from __future__ import annotations

import threading
from typing import Any

# ---------------------------------------------------------------- measuring


class RssSampler:
    """Peak resident memory of this process and of Ray's worker processes, sampled.

    Ray workers are this machine's processes whose name starts with ``ray::`` (tasks and
    actors); their peak is the largest single worker's RSS.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.driver = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        import psutil

        self.driver = max(self.driver, psutil.Process().memory_info().rss)
        for proc in psutil.process_iter(["name", "memory_info"]):
            info = proc.info
            if (info["name"] or "").startswith("ray::") and info["memory_info"]:
                self.worker = max(self.worker, info["memory_info"].rss)


def result(*, tokens: int, processed: int, wall_s: float, rss: RssSampler | int,
           flops: float | None, peak: float | None, **extra: Any) -> dict[str, Any]:
    """The per-run record of the JSON line."""
    out: dict[str, Any] = {
        "tokens": tokens, "processed_tokens": processed, "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        "padding_efficiency": round(tokens / processed, 4) if processed else 1.0,
    }
    if isinstance(rss, RssSampler):
        out |= {"peak_rss_bytes": max(rss.driver, rss.worker),
                "driver_peak_rss_bytes": rss.driver, "worker_peak_rss_bytes": rss.worker}
    else:
        out["peak_rss_bytes"] = rss
    if flops is not None and peak:
        out["mfu"] = round(flops / wall_s / (peak * 1e12), 4)
    return out | extra

