"""Two or more ways of one computation timed in turns in one process, so that a host whose speed
drifts (this VM's does, by tens of percent within an hour) moves every way alike."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import mlx.core as mx


def count(text: str) -> int:
    """argparse's type for --rounds and --repeats: a whole number from 1 (no turns would time
    nothing, and the median of nothing fails)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of 1 or more")
    return int(text)


def in_turns(ways: dict[str, Callable[[], None]], call: Callable[[], mx.array], rounds: int, repeats: int) -> dict:
    """Each round, for each way: ``ways[name]()`` sets it up, then an untimed ``call()`` (its output
    kept) and ``repeats`` timed ones. Returns per way the median seconds ("medians"), the last
    untimed output ("outputs"), and MLX's peak memory in GiB over its last turn, both as is
    ("peaks") and above what was held when the turn began ("added")."""
    seconds = {name: [] for name in ways}
    outputs, peaks, added = {}, {}, {}
    for _ in range(rounds):
        for name, set_up in ways.items():
            set_up()
            held = mx.get_active_memory()
            mx.reset_peak_memory()
            outputs[name] = call()
            mx.eval(outputs[name])
            for _ in range(repeats):
                start = time.perf_counter()
                mx.eval(call())
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = mx.get_peak_memory() / 2**30
            added[name] = (mx.get_peak_memory() - held) / 2**30
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    return {"medians": medians, "outputs": outputs, "peaks": peaks, "added": added}
