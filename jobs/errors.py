"""Domain errors of the job, and the one list of transient errors that are retried.

Per-job problems (bad config, unreachable storage) raise one of these before any work;
the CLI translates them once into a message and a non-zero exit. Per-row problems never
raise: the row is set aside in the rejected table with its reason.
"""

from model.errors import EmbedError


class ConfigError(EmbedError, ValueError):
    """The job's configuration is invalid; the message names the value and what is allowed."""


class StorageError(EmbedError):
    """Object storage or a local path cannot be reached, read or written."""


class InputError(EmbedError):
    """The input location holds nothing the job can read."""


class OutputExistsError(ConfigError):
    """The output exists and the mode does not allow touching it."""


class PipelineInvariantError(EmbedError, AssertionError):
    """An internal invariant broke (a row lost or duplicated between stages): this is a bug."""


# Errors worth a retry with backoff, each transient for the reason given.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # the endpoint dropped or refused a connection: servers restart, LBs rotate
    TimeoutError,  # a slow or overloaded endpoint; the same request usually succeeds later
)
