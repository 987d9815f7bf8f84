"""embedjob: distributed batch embedding of text corpora into Lance tables.

The Python API::

    import embedjob
    summary = embedjob.run(embedjob.EmbedConfig(input="s3://corpus/", output="s3://out.lance"))
    embedjob.refresh(config)                   # nightly: only new and changed rows
    embedder = embedjob.load_embedder(source)  # the encoder alone

Names are imported on first use (PEP 562), so ``import embedjob`` and the CLI's start-up do
not pay for importing Ray, torch or Lance.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EmbedConfig": "embedjob.config",
    "run": "embedjob.driver.run",
    "refresh": "embedjob.ops.refresh",
    "load_embedder": "embedjob.model",
    "Summary": "embedjob.driver.run",
}
__all__ = ["EmbedConfig", "Summary", "load_embedder", "refresh", "run"]

if TYPE_CHECKING:
    from embedjob.config import EmbedConfig
    from embedjob.driver.run import Summary, run
    from embedjob.model import load_embedder
    from embedjob.ops.refresh import refresh


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'embedjob' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
