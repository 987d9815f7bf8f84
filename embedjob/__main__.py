"""``python -m embedjob``: the same CLI as the ``embedjob`` command."""

import sys

from embedjob.cli import main

sys.exit(main())
