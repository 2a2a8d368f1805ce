"""A half-precision UNet on the CPU kernels: its weights widened as each layer runs, or held in
float32 for the run (``cpu.widen``, ``pipelines.run.RunSettings.widen_weights``), in one process.

    python benchmarks/bench_widen.py --model DIR                 # DIR: a pipeline mlx-unet convert wrote
    python benchmarks/bench_widen.py --model DIR --latent 32 64 --steps 12 18 --rounds 3
    python benchmarks/bench_widen.py --model DIR --steps 12 --release --no-forwards
    python benchmarks/bench_widen.py --quick                     # the demo pipeline: checks the benchmark runs

The pipeline is loaded in float16. Both ways run in turns in this one process (this host's speed
moves by 5-10% from one process to the next, more than the difference measured):
- forwards: the UNet's guided forward (a batch of two) at each --latent size, the prompt's
  cross-attention keys and values made once, as a run makes them; the median of 2 forwards per
  round each way, the ratio, and what holding the weights saves a forward. Then the one-time
  costs: widening the weights (their memory touched first, as a run does) and narrowing them back.
- runs: whole pipeline calls of each --steps count from the same prompt embeddings (the image's
  latents out, no decode), ``widen_weights=False`` against the default (None: widened where that
  pays and fits); the UNet kept across calls (narrowed back after a widened run) or, with
  --release, freed after each and loaded again before the next (not timed). Seconds per call,
  the ratio, the median step, and MLX's peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

import mlx_unet  # noqa: E402  (before mlx: the fast BLAS on Linux)
import mlx.core as mx  # noqa: E402

from mlx_unet.cpu import widen  # noqa: E402
from mlx_unet.cpu.heap import reused_heap  # noqa: E402
from mlx_unet.demo import demo_pipeline  # noqa: E402
from mlx_unet.pipelines.diffusion import DiffusionPipeline  # noqa: E402
from mlx_unet.pipelines.sampler import Sampler  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon, 35mm"
WAYS = ("widened per call", "held in float32")


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def forwards(pipe: DiffusionPipeline, latent: int, rounds: int) -> dict[str, float]:
    """Median seconds of a guided forward each way, and the one-time costs (seconds)."""
    unet, e = pipe.unet, pipe.encode_prompt(PROMPT)
    # The run's own conditioning (the guided batch, SDXL's added embedding), as a Sampler makes it.
    conditioning = Sampler(unet, None).prepare_conditioning(
        e.context, e.pooled, negative_prompt_embeds=e.negative_context, negative_pooled_prompt_embeds=e.negative_pooled,
        size=(latent * 8, latent * 8)).for_unet(unet)
    batch = conditioning.context.shape[0]
    sample = mx.random.normal((batch, latent, latent, unet.config.in_channels), key=mx.random.key(0))
    timestep = mx.array([500.0] * batch)
    text_kv = unet.cross_attention_kv(conditioning.context)
    mx.eval(text_kv)

    def forward():
        mx.eval(unet(sample, timestep, None, cross_attention_kv=text_kv, added_embedding=conditioning.added_embedding))

    seconds = {way: [] for way in WAYS}
    costs = {"widen": [], "narrow back": []}
    with reused_heap():  # as a pipeline call runs
        forward()  # kernels built, buffers made
        for _ in range(rounds):
            seconds["widened per call"] += [_seconds(forward), _seconds(forward)]
            block = widen.widened(unet)
            costs["widen"].append(_seconds(block.__enter__))
            forward()  # the first forward on the new buffers: not timed
            seconds["held in float32"] += [_seconds(forward), _seconds(forward)]
            costs["narrow back"].append(_seconds(lambda: block.__exit__(None, None, None)))
    return {**{way: statistics.median(s) for way, s in seconds.items()},
            **{name: statistics.median(s) for name, s in costs.items()}}


def runs(pipe: DiffusionPipeline, size: int, steps: int, rounds: int, release: bool) -> dict[str, dict]:
    """Per way ("never" / "by default"): median seconds per call, median step, peak MLX GiB, and
    whether its runs widened the UNet."""
    embeddings = pipe.encode_prompt(PROMPT)
    ways = {"never": False, "by default": None}
    found = {way: {"call": [], "step": [], "peak": 0.0, "widened": False} for way in ways}
    for _ in range(rounds):
        for way, widen_weights in ways.items():
            pipe.unet  # loaded before the timing (again after a release)
            mx.reset_peak_memory()
            stamps = []

            def step_done(stage, step):
                stamps.append(time.perf_counter())
                if step.index == 0:  # half weights left in the UNet: not widened
                    found[way]["widened"] |= not widen.half_parameters(pipe.unet)

            start = time.perf_counter()
            pipe(None, prompt_embeds=embeddings, steps=steps, height=size, width=size, seed=1, output="latent",
                 widen_weights=widen_weights, release_unet=release, callback=step_done)
            found[way]["call"].append(time.perf_counter() - start)
            found[way]["step"].append(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
            found[way]["peak"] = max(found[way]["peak"], mx.get_peak_memory() / 2**30)
    return {way: {**f, "call": statistics.median(f["call"]), "step": statistics.median(f["step"])}
            for way, f in found.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a pipeline folder mlx-unet convert wrote (loaded in float16)")
    p.add_argument("--latent", type=int, nargs="+", default=[32, 64], help="forwards' latent sizes (default: 32 64)")
    p.add_argument("--steps", type=int, nargs="+", default=[12],
                   help="runs' step counts (default: 12); the image is 8x the first latent size")
    p.add_argument("--rounds", type=int, default=2, help="turns of each way (default: 2)")
    p.add_argument("--release", action="store_true", help="runs free the UNet after them (a one-shot command's)")
    p.add_argument("--no-forwards", action="store_true", help="time only the runs")
    p.add_argument("--quick", action="store_true", help="the demo pipeline, small sizes: a smoke run")
    args = p.parse_args(argv)
    if args.model is None and not args.quick:
        p.error("give --model DIR, or --quick")
    if args.quick:
        args.latent, args.steps, args.rounds = [8], [2], 1
    with demo_pipeline() if args.quick else nullcontext(args.model.expanduser()) as folder:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=mx.float16)
        print(f"{folder.name}: float16 UNet, {widen.widening_bytes(pipe.unet) / 2**30:.2f} GiB more in float32; "
              f"MLX {mx.__version__} ({mx.default_device()})")
        if not args.no_forwards:
            print(f"{'latent':>6} {'per call s':>10} {'held s':>8} {'ratio':>6} {'saved s':>8} {'widen s':>8} "
                  f"{'narrow s':>8}")
            for latent in args.latent:
                r = forwards(pipe, latent, args.rounds)
                per_call, held = r["widened per call"], r["held in float32"]
                print(f"{latent:>6} {per_call:10.3f} {held:8.3f} {held / per_call:6.3f} {per_call - held:8.3f} "
                      f"{r['widen']:8.2f} {r['narrow back']:8.2f}", flush=True)
        size = args.latent[0] * 8
        print(f"runs at {size} px, {'UNet freed after each' if args.release else 'UNet kept'}:")
        print(f"{'steps':>5} {'never s':>8} {'default s':>9} {'ratio':>6} {'step never':>10} {'step default':>12} "
              f"{'widened':>7} {'peak never GiB':>14} {'peak default GiB':>16}")
        for steps in args.steps:
            r = runs(pipe, size, steps, args.rounds, args.release)
            never, default = r["never"], r["by default"]
            print(f"{steps:>5} {never['call']:8.2f} {default['call']:9.2f} {default['call'] / never['call']:6.3f} "
                  f"{never['step']:10.3f} {default['step']:12.3f} {'yes' if default['widened'] else 'no':>7} "
                  f"{never['peak']:14.2f} {default['peak']:16.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
