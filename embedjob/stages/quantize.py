"""int8 and binary forms of the normalized vectors: pure numpy, shared by the encode actors
(which store them) and the read side (which quantizes queries the same way).

binary: ``np.packbits(v > 0, axis=1)``, the sign bits of the dim-d vector, big-endian (the
first dim is the highest bit of byte 0): ``uint8 [n, d / 8]``.

int8, per dimension j with the stamped range ``[lo_j, hi_j]`` (float32):

    step_j = (hi_j - lo_j) / 255                      (1.0 where hi_j == lo_j)
    q_j    = clip(rint((v_j - lo_j) / step_j) - 128, -128, 127)

computed in float64, so ``lo`` maps to -128 and ``hi`` to 127 and values outside the
calibrated range saturate. The ranges are the per-dim min and max of the calibration
sample (``CALIBRATION_ROWS`` rows, see ``driver.calibrate``). Both forms are taken from the
vector as stored (after the cast to the float column's dtype), so a stored float column and
its quantized columns always agree.
"""

from __future__ import annotations

import json

import numpy as np

INT8_FORMULA = ("q = clip(rint((v - lo) / step) - 128, -128, 127), step = (hi - lo) / 255 "
                "per dim (float64; step 1 where hi == lo)")


def binary(vectors: np.ndarray) -> np.ndarray:
    """[n, d] -> uint8 [n, d / 8]: sign bits packed big-endian (``d`` a multiple of 8)."""
    return np.packbits(np.asarray(vectors) > 0, axis=-1)


def int8(vectors: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[n, d] -> int8 [n, d] with per-dim ranges ``lo``, ``hi`` [d] (module docstring)."""
    lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    step = (hi64 - lo64) / 255.0
    step = np.where(step > 0, step, 1.0)
    q = np.rint((np.asarray(vectors, np.float64) - lo64) / step) - 128.0
    return np.clip(q, -128, 127).astype(np.int8)


def ranges(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-dim calibration range of a sample [n, d]: float32 (min, max) [d] each."""
    v = np.asarray(vectors, np.float32)
    return v.min(axis=0), v.max(axis=0)


def hamming(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Differing bits between packed codes uint8 [n, b] and one packed query uint8 [b]."""
    return np.unpackbits(np.bitwise_xor(codes, query), axis=-1).sum(axis=-1, dtype=np.int64)


def int8_dot(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Dot products of int8 codes [n, d] with one int8 query [d], exact (int32)."""
    return codes.astype(np.int32) @ query.astype(np.int32)  # |sum| <= d * 2^14: no overflow


def calibration_record(ranges_by_dim: dict[int, tuple[np.ndarray, np.ndarray]], rows: int,
                       sample: str) -> str:
    """The ``embedjob.int8_calibration`` stamp: JSON with the sample, formula and ranges."""
    return json.dumps({
        "rows": rows, "sample": sample, "formula": INT8_FORMULA,
        "ranges": {str(d): {"lo": [float(x) for x in lo], "hi": [float(x) for x in hi]}
                   for d, (lo, hi) in ranges_by_dim.items()},
    })


def parse_calibration(record: str) -> dict[int, tuple[list[float], list[float]]]:
    """dim -> (lo, hi) from an ``embedjob.int8_calibration`` stamp."""
    ranges = json.loads(record)["ranges"]
    return {int(d): (r["lo"], r["hi"]) for d, r in ranges.items()}
