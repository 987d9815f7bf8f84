"""Domain errors of the model package.

Raised deep, translated once at the edge (the CLI prints the message and exits non-zero).
Every message names the bad value and what is allowed.
"""


class EmbedError(Exception):
    """Base of every error this project raises on purpose."""


class ModelError(EmbedError):
    """A model could not be loaded or asked to do something it does not offer."""


class ModelSourceError(ModelError):
    """A model source (local dir, s3:// prefix, hub id) cannot be resolved or read."""


class CheckpointError(ModelError):
    """A checkpoint's files or tensors do not match what the loader expects."""


class UnknownTaskError(ModelError, ValueError):
    """A task name that the model has no adapter for."""


class UnsupportedDimError(ModelError, ValueError):
    """A Matryoshka dimension that the model does not offer."""


class MergedTaskError(ModelError, ValueError):
    """A task asked of an embedder whose weights have another task's adapter merged in."""
