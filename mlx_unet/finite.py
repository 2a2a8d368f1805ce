"""NaN and inf checks over weights as they are converted and loaded: by their bits, in parts."""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np

# A float's bits without the sign: inf and NaN are the largest (an exponent of all ones), so one
# maximum tells whether an array holds any. numpy's isfinite on float16 took 2.5x as long; MLX's
# took 4 ns a float32 value and 7 ns a float16 one on the CPU (it widens half precision in
# software), the maximum of the bits 0.2 ns.
_NONFINITE_BITS = {mx.float16: (mx.uint16, 0x7FFF, 0x7C00), mx.bfloat16: (mx.uint16, 0x7FFF, 0x7F80),
                   mx.float32: (mx.uint32, 0x7FFFFFFF, 0x7F800000)}
_HALF_NONFINITE = {"F16": _NONFINITE_BITS[mx.float16][2], "BF16": _NONFINITE_BITS[mx.bfloat16][2]}
# Checked in parts of this many values through one small buffer: a temporary the size of each
# tensor is fresh memory, which cost more than the check (5 s of SDXL's 2.6 G float16 weights).
_CHECK_VALUES = 1 << 18


def all_finite(array: mx.array) -> mx.array:
    """Whether ``array`` holds no NaN or inf, as a lazy boolean scalar (true for integers)."""
    if array.size == 0 or not mx.issubdtype(array.dtype, mx.floating):
        return mx.array(True)
    if array.dtype not in _NONFINITE_BITS:
        return mx.all(mx.isfinite(array))
    bits, magnitude, limit = _NONFINITE_BITS[array.dtype]
    return mx.max(array.view(bits) & magnitude) < limit


def stored_finite(values: np.ndarray, stored_dtype: str) -> bool:
    """Whether ``values``, read from a safetensors tensor of dtype ``stored_dtype`` (bfloat16 as
    its bits), hold no NaN or inf."""
    flat = values.reshape(-1)
    if stored_dtype in _HALF_NONFINITE:
        limit = _HALF_NONFINITE[stored_dtype]
        return all(int(np.bitwise_and(part, 0x7FFF, out=out).max()) < limit
                   for part, out in _in_parts(flat.view(np.uint16), np.uint16))
    if values.dtype.kind == "f":
        return all(np.isfinite(part, out=out).all() for part, out in _in_parts(flat, bool))
    return True


def _in_parts(flat: np.ndarray, out_dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``flat`` in parts of ``_CHECK_VALUES`` values, each with an output of its size in
    ``out_dtype``: views of one buffer, reused from part to part."""
    scratch = np.empty(min(flat.size, _CHECK_VALUES), out_dtype)
    for start in range(0, flat.size, _CHECK_VALUES):
        part = flat[start:start + _CHECK_VALUES]
        yield part, scratch[:part.size]
