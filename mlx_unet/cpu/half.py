"""Half-precision values widened to float32 for the CPU's products, exactly and quickly."""

from functools import partial

import mlx.core as mx

HALF = (mx.float16, mx.bfloat16)


@partial(mx.compile, shapeless=True)
def _float16_bits_scaled(bits: mx.array) -> mx.array:
    """float16 bits (uint16) -> the bits of a float32 of the same value times 2**-112: sign,
    exponent and mantissa moved to float32's places (exponent bias 15, not 127) and the exponent
    of inf and NaN set to all ones."""
    # One fused integer kernel: MLX's own cast converts float16 element by element in software on
    # x86, several times slower than this (measured in README: "Half precision on the CPU").
    bits = bits.astype(mx.uint32)
    magnitude = bits & 0x7FFF
    moved = (magnitude << 13) | ((bits & 0x8000) << 16)
    return mx.where(magnitude >= 0x7C00, moved | 0x7F800000, moved)


def float32(array: mx.array) -> mx.array:
    """``array`` in float32, exactly (half-precision values are all float32 values); the same
    array if it is float32 already. Keeps a row-major array row-major."""
    if array.dtype == mx.float16:
        # Times 2**112 undoes the exponent's bias: exact for normal values, and for float16's
        # subnormals, which come out as float32 subnormals (the CPU does not flush those); inf
        # and NaN stay so.
        return _float16_bits_scaled(array.view(mx.uint16)).view(mx.float32) * 2.0 ** 112
    return array.astype(mx.float32)  # bfloat16: MLX's own cast is a shift, several G values/s
