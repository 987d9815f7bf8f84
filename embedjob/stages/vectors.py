"""Vector columns out of an encoder's outputs, shared by the plain and the late-chunking
encode stages: runs of one ``_batch`` value, token ids per row, and the stored vector columns
of a block (truncate, normalize, quantize) as Arrow arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.errors import BugError
from embedjob.stages import quantize

if TYPE_CHECKING:
    from embedjob.stages.encode import EncodeSpec


def batch_runs(batch_of: np.ndarray) -> list[range]:
    """Contiguous runs of one non-negative ``_batch`` value."""
    runs, start = [], 0
    for i in range(1, len(batch_of) + 1):
        if i == len(batch_of) or batch_of[i] != batch_of[start]:
            if batch_of[start] >= 0:
                runs.append(range(start, i))
            start = i
    return runs


def row_ids(column: pa.ChunkedArray) -> list[np.ndarray]:
    """list<int32> -> one int32 array per row (views into the flat buffer, no copy)."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    flat = array.values.to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def vector_columns(
    full: np.ndarray, valid: np.ndarray, spec: EncodeSpec, dtype: np.dtype
) -> dict[str, pa.Array]:
    """Every stored vector column of a block: per dim, the float column (``vector`` for the
    full dim, else ``vector_<d>``: truncate, then re-normalize) and its quantized columns
    (``stages.quantize``, from the vector as stored), so only stored bytes leave the actor.

    Rows where ``valid`` is False get null vectors.
    """
    from embedjob.model import matryoshka

    hidden = full.shape[1]
    columns = {}
    for dim in dict.fromkeys((hidden, *spec.dims)):
        # [n, dim] as stored: the cast to the column's dtype first
        stored = (full if dim == hidden else matryoshka(full, dim)).astype(dtype)
        if spec.float_dims is None or dim in spec.float_dims:
            columns[S.vector_column(dim, hidden)] = fixed_size_list(stored, valid, stored.dtype)
        for form in spec.quantize.get(dim, ()):
            if form == "binary":
                codes = quantize.binary(stored)
            else:
                if dim not in spec.int8_ranges:
                    raise BugError(f"int8 column for dim {dim} without a calibration range")
                codes = quantize.int8(stored, *spec.int8_ranges[dim])
            columns[S.quantized_column(dim, form)] = fixed_size_list(codes, valid, codes.dtype)
    return columns


def fixed_size_list(vectors: np.ndarray, valid: np.ndarray, dtype: np.dtype) -> pa.Array:
    """[n, d] -> FixedSizeListArray<dtype, d>, the type Lance's vector search expects."""
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, vectors.shape[1], mask=mask)
