"""The second CPU stream, and work shared out between two pipelines of it and the default one.

MLX runs each stream's operations on one thread of their own, while BLAS runs a product on every
core: where elementwise passes alternate with products, one stream leaves a core idle for the
passes. Work split into independent parts that take turns on two streams keeps both busy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx

from . import blas

_second: list[mx.Stream] = []


def second_stream() -> mx.Stream:
    """A CPU stream besides the default one, made once."""
    if not _second:
        _second.append(mx.new_stream(mx.cpu))
    return _second[0]


def evaluated_in_two_pipelines(build: Callable[[tuple[mx.Stream, mx.Stream]], mx.array],
                               inputs: Sequence[mx.array]) -> mx.array | None:
    """``build(streams)`` evaluated now, its parts on the two streams, each with half of BLAS's
    threads (so two products at once do not oversubscribe the cores); None, with nothing done,
    where that cannot be: under ``mx.compile``'s tracing, which cannot evaluate, or without
    OpenBLAS, whose threads are the ones shared out. ``inputs`` are evaluated first, on all of
    BLAS's threads."""
    threads = blas.threads()
    if threads is None:
        return None
    try:
        mx.eval(*inputs)
    except ValueError:  # "[eval] Attempting to eval an array during function transformations"
        return None
    blas.set_threads(max(1, threads // 2))
    try:
        out = build((mx.default_stream(mx.cpu), second_stream()))
        mx.eval(out)
    finally:
        blas.set_threads(threads)
    return out
