"""Serving benchmark: independent sampling vs the edge server's shared phase, side by side in one run.

On an H100 (SD v1.5 architectures with random weights: speed does not depend on weight values):

    python -m benchmarks.bench_serving --model sd15-random --batches 8,16,32,64 --steps 30 --share 0.4 \\
        --json $OUT/bench_serving.json

CPU fallback (kept working by tests/test_bench_serving.py):

    python -m benchmarks.bench_serving --model tiny --batches 2,4 --steps 4 --windows 1

It prints, for each batch size: (1) ms per UNet sample of a bare UNet forward; (a) a stock diffusers
StableDiffusionPipeline on the batch (independent sampling, CFG); (b) the shared phase as the edge worker runs it
(sage_core plan + run_shared_plan, one batched UNet call per step for all groups); (c) the whole edge path per
window (embedding, grouping, shared phase, codec, up to the bytes ready to send) and its overhead over (b)'s UNet
time. GPU-seconds per image on the server and the fraction of the compute floor (about 0.84 TFLOP per UNet sample
at 512x512, DESIGN.md) come with each row.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.results import write_json

FLOP_PER_UNET_SAMPLE_512 = 0.84e12  # SD v1.5 UNet forward at 64x64 latents (DESIGN.md)


@dataclass(frozen=True)
class Row:
    """One batch size's measured figures."""

    batch: int
    unet_ms_per_sample: float
    floor_fraction: float
    independent_s: float
    independent_gpu_s_per_image: float
    shared_s: float
    shared_gpu_s_per_image: float
    shared_unet_evaluations: int
    independent_server_evaluations: int
    step_saving: float
    gpu_time_saving: float
    edge_path_s: float
    edge_overhead: float
    bytes_per_image: float


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call, in seconds."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def unet_ms_per_sample(unet, batch: int, device: str, repeats: int) -> float:
    """One forward of the UNet the shared phase calls (compiled and bucketed when configured) at `batch` samples,
    in ms per sample."""
    side = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, side, side, device=device, dtype=unet.dtype)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    c = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    with torch.inference_mode():
        seconds = timed(lambda: unet(x, t, encoder_hidden_states=c), device, repeats)
    return seconds * 1000.0 / batch


def workload(batch: int, mean_group: float) -> list[str]:
    """`batch` prompts made of paraphrase-identical repeats, so groups of about `mean_group` form whatever the
    text encoder's weights (random ones included)."""
    distinct = max(1, round(batch / mean_group))
    return [f"scene number {i % distinct} with a red object" for i in range(batch)]


def make_worker(model: str, dtype: str, tau: float, compile_mode: str = "none", buckets: str = ""):
    """An edge worker (the Ray actor's class, used in-process) holding the model, its shared-phase UNet compiled
    and bucketed as the server would run it."""
    from edge_server.config import build_config
    from edge_server.worker import EdgeWorker

    settings = {"model": model, "dtype": dtype, "tau": tau, "max_group_size": 5, "ray_num_cpus": 2,
                "unet_compile": compile_mode, "unet_buckets": buckets}
    return EdgeWorker(build_config(None, settings))


def bucket_job(worker, prompts: list[str], steps: int, share: float, guidance: float, codec: str):
    """A BucketJob of the prompts at the model's default size."""
    from edge_server.worker import BucketJob, BucketSettings, MemberSpec

    info = worker.info()
    settings = BucketSettings(steps, guidance, "ddim", info.default_height, info.default_width)
    members = tuple(MemberSpec(p, 1000 + i, share, codec) for i, p in enumerate(prompts))
    return BucketJob(settings, members)


def measure(args: argparse.Namespace, worker, batch: int) -> Row:
    """All figures for one batch size."""
    import threading

    from diffusers import StableDiffusionPipeline

    pipe, device = worker.pipe, str(worker.pipe.unet.device)
    prompts = workload(batch, args.mean_group)
    per_sample = unet_ms_per_sample(worker.unet, 2 * batch, device, args.repeats)
    stock = StableDiffusionPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)

    def independent() -> None:
        stock(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent")

    job = bucket_job(worker, prompts, args.steps, args.share, args.guidance, args.codec)
    stop = threading.Event()
    counted: dict[str, int] = {}

    def edge_path() -> None:
        groups = worker._run_bucket(job, stop)
        counted["server"] = sum(g.server_steps for g in groups)
        counted["bytes"] = sum(len(g.payloads[args.codec].data) * len(g.members) for g in groups)

    independent_s = timed(independent, device, args.windows)
    edge_s = timed(edge_path, device, args.windows)
    cfg = 2 if args.guidance > 1.0 else 1
    shared_evals = counted["server"] * cfg
    shared_unet_s = shared_evals * per_sample / 1000.0
    floor_ms = FLOP_PER_UNET_SAMPLE_512 / (args.peak_tflops * 1e12) * 1000.0
    independent_server = batch * args.steps * cfg
    return Row(
        batch=batch,
        unet_ms_per_sample=per_sample,
        floor_fraction=floor_ms / per_sample,
        independent_s=independent_s,
        independent_gpu_s_per_image=independent_s / batch,
        shared_s=shared_unet_s,
        shared_gpu_s_per_image=edge_s / batch,
        shared_unet_evaluations=shared_evals,
        independent_server_evaluations=independent_server,
        step_saving=1.0
        - (shared_evals + batch * (args.steps - round(args.share * args.steps)) * cfg) / independent_server,
        gpu_time_saving=1.0 - edge_s / independent_s,
        edge_path_s=edge_s,
        edge_overhead=max(0.0, edge_s - shared_unet_s) / shared_unet_s if shared_unet_s else 0.0,
        bytes_per_image=counted["bytes"] / batch,
    )


def environment(worker) -> dict:
    """Device name and library versions, for the committed table."""
    import diffusers

    device = str(worker.pipe.unet.device)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "device": name,
        "dtype": str(worker.pipe.unet.dtype),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def print_header(env: dict) -> None:
    """The table's heading: device, versions, columns."""
    print(f"device {env['device']}  dtype {env['dtype']}  torch {env['torch']}  diffusers {env['diffusers']}  "
          f"unet_compile {env.get('unet_compile', 'none')}  buckets {env.get('unet_buckets') or '-'}  "
          f"worker start {env.get('worker_start_s', 0.0):.1f} s")
    print(
        "batch  unet ms/sample  floor  indep s  indep GPU-s/img  edge s  edge GPU-s/img  step saving  time saving"
        "  overhead  bytes/img",
        flush=True,
    )


def print_row(r: Row) -> None:
    """One batch size's line, printed as soon as it is measured."""
    print(
        f"{r.batch:5d}  {r.unet_ms_per_sample:14.3f}  {r.floor_fraction:5.1%}  {r.independent_s:7.3f}  "
        f"{r.independent_gpu_s_per_image:15.4f}  {r.edge_path_s:6.3f}  {r.shared_gpu_s_per_image:14.4f}  "
        f"{r.step_saving:11.1%}  {r.gpu_time_saving:11.1%}  {r.edge_overhead:8.1%}  {r.bytes_per_image:9.0f}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random", help="sd15-random, tiny, default or a pipeline folder")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--batches", default="8,16,32,64", help="comma-separated prompts per window")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--share", type=float, default=0.4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--mean-group", type=float, default=2.8, help="mean group size of the workload")
    parser.add_argument("--codec", default="fp16")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet forwards per batch size")
    parser.add_argument("--windows", type=int, default=2, help="timed windows per batch size")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="dense fp16 peak for the floor")
    parser.add_argument("--unet-compile", default="none", help="torch.compile mode of the shared-phase UNet")
    parser.add_argument("--unet-buckets", default="", help="fixed UNet batch sizes (CFG rows), comma-separated")
    parser.add_argument("--json", default=None, help="write the rows and environment here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it printed as a dict."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    start = time.perf_counter()
    worker = make_worker(args.model, args.dtype, tau=0.99, compile_mode=args.unet_compile, buckets=args.unet_buckets)
    env = environment(worker) | {"unet_compile": args.unet_compile, "unet_buckets": args.unet_buckets,
                                 "worker_start_s": time.perf_counter() - start}
    print_header(env)
    rows = []
    for b in args.batches.split(","):
        rows.append(measure(args, worker, int(b)))
        print_row(rows[-1])
        result = {"environment": env, "settings": vars(args), "rows": [asdict(r) for r in rows]}
        write_json(result, args.json)  # after every row, so a run cut short keeps what it measured
    return result


if __name__ == "__main__":
    main()
