"""Speed of the shipped default model on this machine's CPU: 8 images, 30 DDIM steps, CFG 7.5.

    .venv/bin/python -m benchmarks.bench_default_model [--threads 2] [--repeats 5] [--model PATH]

Prints the best and the median wall time of `repeats` runs (after one warm-up). The goal (<= 10 s) is judged on
the best run: on a CPU shared with other work the median measures the neighbours as much as the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.results import exit_on, positive_int

GOAL_SECONDS = 10.0
PROMPTS = (
    "a red circle",
    "a large blue square in the center",
    "two yellow stars",
    "a green triangle at the top",
    "a purple heart on a white background",
    "an orange cross on the left",
    "a white star to the left of a red circle",
    "three blue hearts",
)


def bench(model: str | None, threads: int, repeats: int, steps: int = 30, guidance: float = 7.5) -> dict:
    """Time pipe(8 prompts) end to end (text encoding, denoising loop, VAE decode)."""
    from sage_core.models import ModelError, load_pipeline

    torch.set_num_threads(threads)
    with exit_on(ModelError):  # a missing or broken model folder: one line
        pipe = load_pipeline(model, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    run = lambda seed: pipe(  # noqa: E731
        list(PROMPTS),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    with torch.inference_mode():
        times = timed_runs(run, repeats)
    return summarize(times, steps, guidance, threads)


def timed_runs(run: Callable[[int], object], repeats: int) -> list[float]:
    """Seconds of `repeats` calls run(1..repeats) after the warm-up run(0), each reported on stderr as it ends
    (a run of 8 images takes seconds to tens of seconds: the whole bench is minutes)."""
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        run(r)
        seconds = time.perf_counter() - t0
        label = "warm-up" if r == 0 else f"run {r}/{repeats}"
        print(f"{label}: {seconds:.2f} s", file=sys.stderr, flush=True)
        if r:
            times.append(seconds)
    return times


def summarize(times: list[float], steps: int, guidance: float, threads: int) -> dict:
    """The figures of a run, times rounded to 10 ms; the goal is judged on the best time as recorded, so the
    verdict agrees with the number printed beside it."""
    best = round(min(times), 2)
    return {
        "images": len(PROMPTS),
        "steps": steps,
        "guidance": guidance,
        "threads": threads,
        "seconds_best": best,
        "seconds_median": round(statistics.median(times), 2),
        "seconds_all": [round(t, 2) for t in times],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "goal_seconds": GOAL_SECONDS,
        "meets_goal": best <= GOAL_SECONDS,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs after the warm-up")
    args = parser.parse_args(argv)
    res = bench(args.model, args.threads, args.repeats)
    print(json.dumps(res))
    print(
        f"default model: {res['images']} images, {res['steps']} steps, CFG {res['guidance']} on "
        f"{res['threads']} CPU threads: best {res['seconds_best']:.2f} s, median {res['seconds_median']:.2f} s "
        f"(load {res['load_average_1min']}; goal <= {GOAL_SECONDS:.0f} s: {'met' if res['meets_goal'] else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
