"""The counting S3 proxy lives in ``embedjob.bench.s3_counter`` (the scale benchmark uses it)."""

from embedjob.bench.s3_counter import CountingProxy

__all__ = ["CountingProxy"]
