"""``python -m tests.faults.driver embed ...``: the ``embedjob`` CLI with the fault-injecting
encode actor (``tests.faults.hooks.FaultyEncodeActor``), for tests that run the driver as a
process of its own (to SIGKILL it)."""

from __future__ import annotations

import sys

from embedjob import cli
from embedjob.driver.run import run
from tests.faults.hooks import FaultyEncodeActor


def _embed(config) -> None:
    summary = run(config, encoder=FaultyEncodeActor)
    print(summary.line())


def main(argv: list[str]) -> int:
    table = cli.commands()
    table["embed"] = cli.Command(table["embed"].help, table["embed"].options, _embed, True)
    return cli.main(argv, table=table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
