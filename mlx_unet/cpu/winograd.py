"""Winograd's F(4x4, 3x3) for the CPU's stride-1 3x3 convolutions over many pixels and channels.

A 4x4 block of a 3x3 convolution's output depends on one 6x6 tile of its input. Winograd's
minimal filtering (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)
computes the block from 36 products of transformed values where the direct convolution takes 144
multiply-adds: with tile d, kernel g and constant matrices made from six interpolation points
(``_toom_cook``),
``Y = A^T [(G g G^T) * (B^T d B)] A``. Summed over input channels, the 36 elementwise products
become 36 matrix products, each (tiles, in) @ (in, out): 4x fewer multiply-adds than the per-tap
products of ``conv.py``.

Each transform is a linear map over a tile's positions, so each is one more matrix product, with
a Kronecker product of the small matrices: kron(B^T, B^T) (36 x 36) over the gathered tiles,
kron(G, G) (36 x 9) over the kernel's nine tap matrices, kron(A^T, A^T) (16 x 36) over the
products. BLAS runs these on every core; as elementwise MLX operations they ran on one and took
most of the time. Only gathering the tiles (6x6 windows 4 apart, 2.25x the input) and putting
the 4x4 blocks back in place are copies.

The kernel's transform (4x the kernel) is made in every call rather than kept beside the weight,
which would hold 4x the convolution weights for the run; it pays off only over enough tiles
(``MIN_TILES``), and a large one is not made at all (``MAX_KERNEL_VALUES``). With few channels
the transforms outweigh the products they save (``MIN_CHANNELS``). Tiles go through in bands of
tile rows (``_BAND_VALUES``) so that a band's tiles and products stay in the caches.

Rounding: the transforms' entries (up to 8, down to 1/24) cost accuracy, and the points are
chosen for it (``_POINTS``): a float32 result differs from the exact convolution by about 5e-6 of
the output's largest magnitude, about twice a direct float32 convolution's difference
(``tests/parity/test_conv.py`` bounds it).
"""

from fractions import Fraction
from functools import cache

import mlx.core as mx
import numpy as np

_BLOCK, _TILE = 4, 6

# Measured on SDXL's shapes (fp32, 2 cores): over 128 tiles (a 32x32 output in a guided batch of
# two) and more the products saved outweigh the kernel's transform; a 32x32 image alone (64
# tiles) or a 16x16 pair ran slower than the per-tap products.
MIN_TILES = 128
# With 128 channels the VAE as a whole gains (its decode takes 0.59x the per-tap time in
# ``benchmarks/bench_winograd.py``), though a 512x512 image of 128 channels alone comes out about
# even (0.92-1.08x between runs): with fewer channels the transforms and copies dominate.
MIN_CHANNELS = 128
# The kernel's transform is a temporary of 36 values per channel pair; above this many (128 MiB
# in float32: a 1280 x 1280 convolution's, or the 2560-channel inputs of SDXL's up blocks at a
# 128x128 latent) it would add more to the run's peak than the activations around it.
MAX_KERNEL_VALUES = 1 << 25
# A band of tile rows holds at most this many values per tile position (tiles x channels, 0.5
# MiB in float32), so that its 36 positions' tiles (18 MiB) and their products stay near the 32
# MiB cache; of 2**14 to 2**19 this ran best on SDXL's shapes.
_BAND_VALUES = 1 << 17


# The interpolation points besides infinity. Lavin and Gray's 0, 1, -1, 2, -2 gave 1.4e-5 of the
# output's largest magnitude in float32 on random SDXL-like layers; swapping 2 or -2 for its
# reciprocal (as Barabasz et al., "Error analysis and improving the accuracy of Winograd
# convolution", 2020, propose) 4.2e-6, against 2e-6 for torch's direct float32 convolution.
_POINTS = (0, 1, -1, Fraction(1, 2), -2)


def _toom_cook(points: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B^T, G, A^T) of F(4, 3) interpolating at ``points`` and infinity, exactly (in fractions).

    Row k of B^T holds the coefficients (lowest power first) of the product of (x - p) over the
    points other than p_k, its last row those of the product over all of them; G's row k is
    (1, p_k, p_k^2) over the product of (p_k - p) for those others, its last row (0, 0, 1); A^T's
    column k is (1, p_k, p_k^2, p_k^3), its last column (0, 0, 0, 1)."""
    def coefficients(roots):
        poly = [Fraction(1)]
        for root in roots:
            poly = [Fraction(0)] + poly
            for i in range(len(poly) - 1):
                poly[i] -= root * poly[i + 1]
        return poly + [Fraction(0)] * (_TILE - len(poly))

    points = [Fraction(p) for p in points]
    others = [[q for q in points if q != p] for p in points]
    input_t = [coefficients(rest) for rest in others] + [coefficients(points)]
    kernel = [[p ** j / np.prod([p - q for q in rest]) for j in range(3)] for p, rest in zip(points, others)]
    kernel.append([Fraction(0), Fraction(0), Fraction(1)])
    output_t = [[p ** i for p in points] + [Fraction(int(i == _BLOCK - 1))] for i in range(_BLOCK)]
    return tuple(np.array(m, dtype=object) for m in (input_t, kernel, output_t))


@cache
def _transforms() -> tuple[mx.array, mx.array, mx.array]:
    """kron(M, M) in float32 for M = B^T (tiles), G (kernel), A^T (products), each entry rounded
    once from its exact fraction."""
    return tuple(mx.array(np.kron(m, m).astype(np.float64).astype(np.float32)) for m in _toom_cook(_POINTS))


def applies(batch: int, out_h: int, out_w: int, in_channels: int, out_channels: int) -> bool:
    """Whether a stride-1 3x3 convolution of this size gains from Winograd's products."""
    tiles = batch * -(-out_h // _BLOCK) * -(-out_w // _BLOCK)
    return (tiles >= MIN_TILES and min(in_channels, out_channels) >= MIN_CHANNELS
            and _TILE * _TILE * in_channels * out_channels <= MAX_KERNEL_VALUES)


def convolve(x: mx.array, taps: mx.array, bias: mx.array | None, padding: int) -> mx.array:
    """The stride-1 3x3 convolution of ``x`` (batch, height, width, in), float32.

    ``taps``: the kernel as (3, 3, in, out) float32, row-major (``conv.Conv2d.taps``), so its
    nine (in, out) tap matrices are the rows of a (9, in * out) view; ``bias``: float32."""
    batch, height, width, in_channels = x.shape
    out_channels = taps.shape[-1]
    out_h, out_w = height + 2 * padding - 2, width + 2 * padding - 2
    rows, cols = -(-out_h // _BLOCK), -(-out_w // _BLOCK)
    # Padded on the bottom and right to whole tiles; the extra outputs are cut off at the end.
    padded = mx.pad(x, [(0, 0), (padding, _BLOCK * rows + 2 - height - padding),
                        (padding, _BLOCK * cols + 2 - width - padding), (0, 0)]).astype(mx.float32)
    tile_transform, kernel_transform, product_transform = _transforms()
    kernel = (kernel_transform @ taps.reshape(9, -1)).reshape(_TILE * _TILE, in_channels, out_channels)
    band = max(1, min(rows, _BAND_VALUES // (cols * max(in_channels, out_channels))))
    parts = []
    for top in range(0, rows, band):
        n = min(band, rows - top)
        window = padded[:, _BLOCK * top:_BLOCK * (top + n) + 2]
        # (36 tile positions, tiles * in): position (i, j) of every tile in the band.
        tiles = mx.stack([window[:, i:i + _BLOCK * n:_BLOCK, j:j + _BLOCK * cols:_BLOCK]
                          for i in range(_TILE) for j in range(_TILE)]).reshape(_TILE * _TILE, -1)
        values = (tile_transform @ tiles).reshape(_TILE * _TILE, -1, in_channels)
        products = (values @ kernel).reshape(_TILE * _TILE, -1)
        blocks = (product_transform @ products).reshape(_BLOCK, _BLOCK, batch, n, cols, out_channels)
        # (block row, block column, image, tile row, tile column) -> the image's rows and columns;
        # the bias is added in the same pass that copies the blocks into place.
        placed = blocks.transpose(2, 3, 0, 4, 1, 5)
        placed = mx.contiguous(placed) if bias is None else placed + bias
        parts.append(placed.reshape(batch, _BLOCK * n, _BLOCK * cols, out_channels))
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    return out if (out_h, out_w) == out.shape[1:3] else out[:, :out_h, :out_w]
