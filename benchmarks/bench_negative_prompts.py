"""Negative prompts in one window: a bucket's shared phase when its requests carry K distinct negative prompts.

Side by side on one in-process edge worker, the same requests run
- as the worker runs them: one loop for the whole bucket, groups planned apart by negative prompt, each trajectory
  with its own unconditional embedding (sage_core.sampler.uncond_rows);
- one loop per negative prompt (every negative prompt its own bucket, as the server did before).
Both make the same groups and the same latents; the figures are UNet calls, UNet rows per call and seconds.

    python -m benchmarks.bench_negative_prompts --model default --requests 16 --negatives 4 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.results import exit_on, output_file, positive_int, write_json

NEGATIVE_TEXTS = ("blurry, low quality", "text, watermark", "dark, underexposed", "cartoon, drawing",
                  "extra limbs, deformed", "grainy, noisy", "oversaturated", "cropped, out of frame")


class CountingUNet:
    """Wraps the UNet a worker's shared phase calls: counts its calls and the rows (batch entries) it was given."""

    def __init__(self, unet: Any) -> None:
        self.unet, self.dtype = unet, unet.dtype
        self.calls = self.rows = 0

    def __call__(self, sample: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.rows += int(sample.shape[0])
        return self.unet(sample, *args, **kwargs)


@contextmanager
def counting_unet(worker: Any) -> Iterator[CountingUNet]:
    """The worker's shared-phase UNet wrapped in a CountingUNet while the block runs."""
    unet = worker.unet
    worker.unet = counting = CountingUNet(unet)
    try:
        yield counting
    finally:
        worker.unet = unet


def workload(requests: int, negatives: int, mean_group: float) -> list[tuple[str, str]]:
    """(prompt, negative prompt) per request: request i takes negative prompt i mod `negatives`, and within one
    negative prompt each prompt text comes `mean_group` times in a row, so groups of about that size can form."""
    return [(f"scene number {int(i // negatives // mean_group)} with a red object", NEGATIVE_TEXTS[i % negatives])
            for i in range(requests)]


def jobs(worker: Any, asks: list[tuple[str, str]], steps: int, guidance: float, share: float) -> tuple[Any, list]:
    """The bucket as the worker runs it, and the same requests as one bucket per negative prompt."""
    from edge_server.worker import BucketJob, BucketSettings, MemberSpec

    info = worker.info()
    settings = BucketSettings(steps, guidance, "ddim", info.default_height, info.default_width)
    members = [MemberSpec(p, 1000 + i, share, "fp16", negative_prompt=n) for i, (p, n) in enumerate(asks)]
    split: dict[str, list] = {}
    for m in members:
        split.setdefault(m.negative_prompt, []).append(m)
    return BucketJob(settings, tuple(members)), [BucketJob(settings, tuple(ms)) for ms in split.values()]


def run_jobs(worker: Any, bucket_jobs: list) -> tuple[float, int, int, int]:
    """Seconds, UNet calls, UNet rows and groups of running these buckets' shared phases one after another."""
    import torch

    with counting_unet(worker) as counting:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        groups = sum(len(worker._shared_bucket(job, threading.Event())) for job in bucket_jobs)
        seconds = time.perf_counter() - start  # _shared_bucket ends with the latents on the host: no sync needed
    return seconds, counting.calls, counting.rows, groups


def measure(worker: Any, args: argparse.Namespace) -> dict:
    """Both ways, alternating, `repeats` times each (after one untimed run of each)."""
    asks = workload(args.requests, args.negatives, args.mean_group)
    together, apart = jobs(worker, asks, args.steps, args.guidance, args.share)
    runs: dict[str, list[tuple[float, int, int, int]]] = {"one loop": [], "loop per negative prompt": []}
    for r in range(args.repeats + 1):
        for name, bucket_jobs in (("one loop", [together]), ("loop per negative prompt", apart)):
            result = run_jobs(worker, bucket_jobs)
            if r:
                runs[name].append(result)
    out = {}
    for name, results in runs.items():
        _, calls, rows, groups = results[0]
        out[name] = {"seconds_median": round(statistics.median(s for s, *_ in results), 4),
                     "seconds": [round(s, 4) for s, *_ in results], "unet_calls": calls,
                     "rows_per_call": round(rows / calls, 2) if calls else 0.0, "groups": groups}
    one, per = out["one loop"]["seconds_median"], out["loop per negative prompt"]["seconds_median"]
    out["speedup"] = round(per / one, 3) if one else None
    return out


def make_worker(args: argparse.Namespace) -> Any:
    """An edge worker (in-process) holding the model, eager UNet."""
    from edge_server.config import build_config
    from edge_server.worker import EdgeWorker

    return EdgeWorker(build_config(None, {"model": args.model, "dtype": args.dtype, "ray_num_cpus": 2}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="default (the shipped model), tiny, sd15-random, or a "
                        "pipeline folder or .safetensors file")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--requests", type=positive_int, default=16, help="requests in the bucket")
    parser.add_argument("--negatives", type=positive_int, default=4, help=f"distinct negative prompts (at most "
                        f"{len(NEGATIVE_TEXTS)})")
    parser.add_argument("--mean-group", type=float, default=2.0, help="mean group size within a negative prompt")
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--share", type=float, default=0.4, help="each request's sharing ratio")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each way")
    parser.add_argument("--json", type=output_file, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.negatives > len(NEGATIVE_TEXTS):
        parser.error(f"--negatives must be at most {len(NEGATIVE_TEXTS)}, got {args.negatives}")
    if not 0.0 <= args.share <= 1.0 or not args.mean_group >= 1.0 or not args.guidance > 1.0:
        parser.error("--share must be in [0, 1], --mean-group >= 1 and --guidance > 1 (negative prompts need "
                     "classifier-free guidance)")
    return args


def main(argv: list[str] | None = None) -> int:
    from edge_server.config import ConfigError
    from sage_core.models import ModelError

    args = parse_args(argv)
    with exit_on(ConfigError, ModelError):
        worker = make_worker(args)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
              "device": str(worker.pipe.unet.device), **measure(worker, args)}
    for name in ("one loop", "loop per negative prompt"):
        r = result[name]
        print(f"{name:>25}: {r['seconds_median']:.3f} s median of {args.repeats}, {r['unet_calls']} UNet calls, "
              f"{r['rows_per_call']:.1f} rows per call, {r['groups']} groups")
    print(f"one loop is {result['speedup']:.2f}x as fast ({args.requests} requests, {args.negatives} negative "
          f"prompts, {args.steps} steps, share {args.share:g}, {result['device']})")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
