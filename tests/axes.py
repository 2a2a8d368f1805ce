"""The axes tests run over, and which of their combinations run in the fast tier (``-m "not slow"``).

A test over two axes (code path x sampler, family x precision, ...) runs its whole product in the
full suite; the fast tier runs a diagonal of it in which every value of each axis appears once, so
that a quick run still reaches every value, and the slow tier the rest."""

import pytest

# The code paths (``code_path`` in conftest.py): the CPU kernels swapped in, and the plain MLX a
# Mac runs; the value is ``MLX_UNET_CPU_KERNELS``'s.
CODE_PATHS = {"cpu-kernels": "1", "mlx": "0"}


def each_value_once(first: list, second: list, ids: tuple[list[str], list[str]] | None = None) -> list:
    """``pytest.param(a, b)`` for every pair of ``first`` x ``second``, the pairs off the diagonal
    (pair i of the longer axis with value i modulo the shorter one's length) marked slow. ``ids``:
    the values' names on each axis, where they are not their own."""
    names = ids or ([None] * len(first), [None] * len(second))
    longest = max(len(first), len(second))
    fast = {(i % len(first), i % len(second)) for i in range(longest)}
    return [pytest.param(a, b, marks=() if (i, j) in fast else pytest.mark.slow,
                         id=None if names[0][i] is None else f"{names[0][i]}-{names[1][j]}")
            for i, a in enumerate(first) for j, b in enumerate(second)]


def these_fast(values: list, fast: set) -> list:
    """``values`` for parametrize, those not in ``fast`` marked slow (where two tests over one
    axis share it out between them, say)."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow) for value in values]
