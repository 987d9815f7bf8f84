"""``python -m tests.pipeline.refresh_driver POINT MARKER refresh ...``: the ``embedjob``
CLI, whose refresh stops for good at a kill point, after touching ``MARKER``, so a test can
SIGKILL the driver there:

- ``diff``: inside the diff's classify tasks (the output is read, nothing is written);
- ``commit``: just before the output's one commit (the rejected table is committed, the
  new fragments and deletion files are written, the output's commit is not made).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from embedjob import cli
from embedjob.driver import pipeline
from embedjob.ops import refresh as refresh_module
from embedjob.stages import diff

HANG_S = 600.0


def _hang(marker: str) -> None:
    Path(marker).touch()
    time.sleep(HANG_S)


def main(argv: list[str]) -> int:
    point, marker, rest = argv[0], argv[1], argv[2:]
    if point == "diff":
        def classify(group, *, spec):  # runs in a Ray worker (pickled by value)
            _hang(marker)
            return diff.classify(group, spec=spec)

        pipeline.classify = classify
    elif point == "commit":
        def commit_output(uri, storage, transaction):
            _hang(marker)

        refresh_module.commit_output = commit_output
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
