"""Serving benchmark: independent sampling vs the edge server's shared phase, side by side in one run.

On an H100 (SD v1.5 architectures with random weights: speed does not depend on weight values):

    python -m benchmarks.bench_serving --model sd15-random --batches 8,16,32,64 --steps 30 --share 0.4 \\
        --json $OUT/bench_serving.json

Without a CUDA GPU, `--model` defaults to the shipped model (SD v1.5's architectures take hours on a CPU at these
batches); the CPU fallback kept working by tests/test_bench_serving.py:

    python -m benchmarks.bench_serving --model tiny --batches 2,4 --steps 4 --windows 1

It prints, for each batch size: (1) ms per UNet sample of a bare UNet forward; (a) a stock diffusers
StableDiffusionPipeline on the batch (independent sampling, CFG); (b) the shared phase as the edge worker runs it
(sage_core plan + run_shared_plan, one batched UNet call per step for all groups): the time its UNet calls take,
measured inside the edge path (CUDA events around each call); (c) the whole edge path per window (embedding,
grouping, shared phase, codec, up to the bytes ready to send) and its overhead over (b). GPU-seconds per image on
the server, images per second (one GPU; for the edge path: images whose shared phase is done, the devices finish
them) and the fraction of the compute floor (about 0.84 TFLOP per UNet sample at 512x512, DESIGN.md; other UNets
scaled by torch's FLOP count; at 800 TFLOP/s on a GPU, on a CPU only with --peak-tflops) come with each row.

With `--stream FILE` (made by `python -m benchmarks.coco_stream`: COCO captions in the simulator's arrival order,
their MiniLM embeddings and the simulator's sharing policy) it also runs that caption stream window by window:
the stock pipeline on each window against the edge path grouping by the file's embeddings (random SD weights
group nothing; a real SD text encoder would be used on a real deployment), and prints the steps saved and the
server's GPU-seconds per image of both.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.results import write_json
from benchmarks.stacks import sample_stacks
from sage_core.names import unet_samples_per_step
from sage_core.unet_buckets import UNetProxy, sample_inputs

FLOP_PER_UNET_SAMPLE_512 = 0.84e12  # SD v1.5 UNet forward at 64x64 latents (DESIGN.md)
CUDA_PEAK_TFLOPS = 800.0  # the floor's dense fp16 peak on a GPU (DESIGN.md's H100 figure)


@dataclass(frozen=True)
class Row:
    """One batch size's measured figures."""

    batch: int
    unet_ms_per_sample: float
    floor_fraction: float | None  # None on a CPU without --peak-tflops
    independent_s: float
    independent_gpu_s_per_image: float
    independent_images_per_s: float
    edge_unet_s: float
    edge_unet_rows: float
    shared_gpu_s_per_image: float
    edge_images_per_s: float  # windows' shared phases the server finishes per second, in images (one GPU)
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


def counted_flops(config: Any) -> float:
    """torch's FLOP count (matmuls, convolutions, attention) of one sample through a UNet2DConditionModel with
    this config at its own latent size, built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        x, t, c = sample_inputs(unet, 1)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(x, t, encoder_hidden_states=c)
    return float(counter.get_total_flops())


def config_settings(config: Any) -> dict[str, Any]:
    """A model config's settings, lists as tuples and diffusers' bookkeeping ('_name_or_path', ...) left out."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items() if not k.startswith("_")}


def unet_flop_per_sample(config: Any) -> float:
    """The compute floor's FLOPs per UNet sample: DESIGN.md's 0.84 TFLOP for SD v1.5's UNet at 64x64 latents,
    other architectures and sizes scaled by torch's count relative to SD v1.5's (0.80 TFLOP by that count)."""
    from diffusers import UNet2DConditionModel

    from sage_core.models import SD15_UNET

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET).config
    if config_settings(config) == config_settings(sd15):
        return FLOP_PER_UNET_SAMPLE_512
    return FLOP_PER_UNET_SAMPLE_512 * counted_flops(config) / counted_flops(sd15)


def unet_ms_per_sample(unet, batch: int, device: str, repeats: int) -> float:
    """One forward of the UNet the shared phase calls (compiled and bucketed when configured) at `batch` samples,
    in ms per sample."""
    x, t, c = sample_inputs(unet, batch)
    with torch.inference_mode():
        seconds = timed(lambda: unet(x, t, encoder_hidden_states=c), device, repeats)
    return seconds * 1000.0 / batch


class TimedUNet(UNetProxy):
    """Wraps the worker's shared-phase UNet and adds up how long its calls take: CUDA events around each call
    (read after the window, no sync inside it), or wall time on a CPU. Also counts the rows it was given."""

    def __init__(self, unet) -> None:
        super().__init__(unet)
        self.cuda = str(unet.device).startswith("cuda")
        self.reset()

    def reset(self) -> None:
        """Forget the calls so far."""
        self.events: list = []
        self.cpu_s, self.rows, self.calls = 0.0, 0, 0

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        self.rows += sample.shape[0]
        self.calls += 1
        if not self.cuda:
            start = time.perf_counter()
            out = self.unet(sample, *args, **kwargs)
            self.cpu_s += time.perf_counter() - start
            return out
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = self.unet(sample, *args, **kwargs)
        end.record()
        self.events.append((begin, end))
        return out

    def seconds(self) -> float:
        """Time the calls since the last reset took (waits for the GPU)."""
        if not self.cuda:
            return self.cpu_s
        torch.cuda.synchronize()
        return sum(b.elapsed_time(e) for b, e in self.events) / 1000.0


def timed_edge_path(worker, job, repeats: int) -> tuple[float, float, float, tuple]:
    """Best of `repeats` runs of the worker's edge path on one job, after a warm-up run: (wall s, its UNet s, UNet
    rows per call, the groups)."""
    import threading

    device = str(worker.pipe.unet.device)
    bare = worker.unet
    timer = TimedUNet(bare)
    worker.unet = timer
    try:
        worker._run_bucket(job, threading.Event())
        best = (float("inf"), 0.0, 0.0, ())
        for _ in range(repeats):
            sync(device)
            timer.reset()
            start = time.perf_counter()
            groups = worker._run_bucket(job, threading.Event())
            sync(device)
            wall = time.perf_counter() - start
            if wall < best[0]:
                best = (wall, timer.seconds(), timer.rows / max(1, timer.calls), groups)
        return best
    finally:
        worker.unet = bare


def profile_edge_path(worker, job, path: str) -> None:
    """One edge-path window under cProfile (host time by function, cumulative and own) and, on CUDA, the number
    of host-device synchronisations it makes (torch.cuda sync debug mode); written as text to `path`."""
    import cProfile
    import io
    import pstats
    import threading

    from benchmarks.bench_step_loop import cuda_syncs

    device = str(worker.pipe.unet.device)
    cuda = device.startswith("cuda")
    worker._run_bucket(job, threading.Event())  # warm
    sync(device)
    profiler = cProfile.Profile()

    def window() -> None:
        profiler.enable()
        worker._run_bucket(job, threading.Event())
        sync(device)
        profiler.disable()

    syncs = cuda_syncs(window) if cuda else None
    if not cuda:
        window()
    out = io.StringIO()
    counted = f"{syncs} host-device synchronisations (CUDA)" if cuda else "synchronisations not counted on a CPU"
    out.write(f"edge path, {len(job.members)} prompts: {counted}\n")
    for key in ("cumulative", "tottime"):
        out.write(f"\n--- sorted by {key} ---\n")
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(40)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(out.getvalue())


def workload(batch: int, mean_group: float) -> list[str]:
    """`batch` prompts made of paraphrase-identical repeats, so groups of about `mean_group` form whatever the
    text encoder's weights (random ones included)."""
    distinct = max(1, round(batch / mean_group))
    return [f"scene number {i % distinct} with a red object" for i in range(batch)]


SERVER_FLAGS = ("unet_compile", "unet_buckets", "unet_compile_tuning", "unet_channels_last", "attention_backend",
                "cudnn_benchmark", "unet_quantize")  # the shared-phase UNet's settings, as ServerConfig names them


def server_flags(args: argparse.Namespace) -> dict:
    """The edge-server settings these flags give the worker (and the JSON's environment records)."""
    return {name: getattr(args, name) for name in SERVER_FLAGS}


def make_worker(args: argparse.Namespace):
    """An edge worker (the Ray actor's class, used in-process) holding the model, its shared-phase UNet compiled,
    bucketed and on the attention backend the server would run with these flags."""
    from edge_server.config import build_config
    from edge_server.worker import EdgeWorker

    settings = {"model": args.model, "dtype": args.dtype, "tau": 0.99, "max_group_size": 5, "ray_num_cpus": 2,
                **server_flags(args), **({"compile_cache": args.compile_cache} if args.compile_cache else {})}
    worker = EdgeWorker(build_config(None, settings))
    if worker.unet_warmup:
        print(f"shared-phase UNet {worker.unet_warmup}")
    return worker


def int_list(text: str) -> list[int]:
    """'32, 64' -> [32, 64]."""
    return [int(b) for b in text.split(",") if b.strip()]


def unet_sweep(worker, args: argparse.Namespace) -> dict[int, float]:
    """ms per sample of the UNet the shared phase calls (compiled and bucketed when configured) at each UNet batch
    of --unet-sweep (rows, CFG included): what the simulator's step tables hold (unet_ms_per_sample)."""
    device = str(worker.pipe.unet.device)
    out = {rows: round(unet_ms_per_sample(worker.unet, rows, device, args.repeats), 4)
           for rows in int_list(args.unet_sweep)}
    print("UNet ms per sample by UNet batch (rows)  " + "  ".join(f"{r}: {v:.3f}" for r, v in out.items()), flush=True)
    return out


def profile_rows(args: argparse.Namespace) -> int:
    """The UNet batch --kernel-profile profiles: the largest of --unet-sweep, else the CFG rows of the largest
    --batches, else 2."""
    sweep, batches = int_list(args.unet_sweep), int_list(args.batches)
    return max(sweep) if sweep else 2 * max(batches) if batches else 2


def kernel_profile(worker, args: argparse.Namespace) -> dict:
    """Profile the shared-phase UNet (as the sweep times it) at profile_rows(args) rows; write the table to
    --kernel-profile and return it for the JSON."""
    from benchmarks.kernel_profile import one_line, profile_unet, render

    rows = profile_rows(args)
    try:
        profile = profile_unet(worker.unet, sample_inputs(worker.unet, rows))
    except RuntimeError as exc:  # the profiler's own failure: the timings before it stand
        print(f"no kernel profile: {str(exc).splitlines()[0][:200]}", flush=True)
        return {"error": str(exc)[:500]}
    with open(args.kernel_profile, "w", encoding="utf-8") as fh:
        fh.write(render(profile))
    print(f"kernel time at {rows} rows, ms per sample by kind: {one_line(profile.kinds)} "
          f"(table in {args.kernel_profile})", flush=True)
    return profile.as_dict()


def attention_sweep(worker, args: argparse.Namespace) -> dict[str, dict[int, float | str]]:
    """ms per UNet sample of the pipeline's (eager) UNet with each SDPA backend of --attention-sweep, at each batch
    (CFG rows: 2 x prompts); a backend that cannot run this shape says why."""
    from sage_core.unet_buckets import with_attention

    device = str(worker.pipe.unet.device)
    out: dict[str, dict[int, float | str]] = {}
    for backend in (b.strip() for b in args.attention_sweep.split(",") if b.strip()):
        out[backend] = {}
        for batch in int_list(args.batches):
            try:
                ms = unet_ms_per_sample(with_attention(worker.pipe.unet, backend), 2 * batch, device, args.repeats)
                out[backend][batch] = round(ms, 4)
            except (RuntimeError, ValueError) as exc:
                out[backend][batch] = f"unavailable: {str(exc).splitlines()[0][:120]}"
        cells = "  ".join(f"{b}: {v:.3f}" if isinstance(v, float) else f"{b}: {v}" for b, v in out[backend].items())
        print(f"attention {backend:9s} eager UNet ms per sample by prompts per window  {cells}", flush=True)
    return out


def bucket_job(worker, prompts: list[str], steps: int, share: float, guidance: float, codec: str):
    """A BucketJob of the prompts at the model's default size."""
    from edge_server.worker import BucketJob, BucketSettings, MemberSpec

    info = worker.info()
    settings = BucketSettings(steps, guidance, "ddim", info.default_height, info.default_width)
    members = tuple(MemberSpec(p, 1000 + i, share, codec) for i, p in enumerate(prompts))
    return BucketJob(settings, members)


def stock_pipeline(worker):
    """A stock diffusers StableDiffusionPipeline of the worker's model: the independent baseline. A compiled worker
    has fused (and maybe quantized) its pipeline's UNet in place, so the stock pipeline then gets a UNet of the
    same architecture of its own, as diffusers builds it, with fresh random weights (speed does not depend on
    weight values, and only the baseline's time and step counts are used)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    components = dict(worker.pipe.components)
    if worker.config.unet_compile != "none":
        unet = worker.pipe.unet
        with torch.device(unet.device):
            components["unet"] = UNet2DConditionModel.from_config(unet.config).to(dtype=unet.dtype).eval()
    stock = StableDiffusionPipeline(**components)
    stock.set_progress_bar_config(disable=True)
    return stock


def measure(args: argparse.Namespace, worker, batch: int, stock, flop_per_sample: float) -> Row:
    """All figures for one batch size (`stock`: the stock pipeline of stock_pipeline(worker); `flop_per_sample`:
    the compute floor's FLOPs per UNet sample)."""
    device = str(worker.pipe.unet.device)
    prompts = workload(batch, args.mean_group)
    per_sample = unet_ms_per_sample(worker.unet, 2 * batch, device, args.repeats)

    def independent() -> None:
        stock(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent")

    job = bucket_job(worker, prompts, args.steps, args.share, args.guidance, args.codec)
    independent_s = timed(independent, device, args.windows)
    edge_s, unet_s, rows, groups = timed_edge_path(worker, job, args.windows)
    cfg = unet_samples_per_step(args.guidance)
    shared_evals = sum(g.server_steps for g in groups) * cfg
    peak = args.peak_tflops or (CUDA_PEAK_TFLOPS if device.startswith("cuda") else None)
    independent_server = batch * args.steps * cfg
    return Row(
        batch=batch,
        unet_ms_per_sample=per_sample,
        floor_fraction=flop_per_sample / (peak * 1e12) * 1000.0 / per_sample if peak else None,
        independent_s=independent_s,
        independent_gpu_s_per_image=independent_s / batch,
        independent_images_per_s=batch / independent_s,
        edge_unet_s=unet_s,
        edge_unet_rows=rows,
        shared_gpu_s_per_image=edge_s / batch,
        edge_images_per_s=batch / edge_s,
        shared_unet_evaluations=shared_evals,
        independent_server_evaluations=independent_server,
        step_saving=1.0 - (shared_evals + device_steps(job, groups) * cfg) / independent_server,
        gpu_time_saving=1.0 - edge_s / independent_s,
        edge_path_s=edge_s,
        edge_overhead=max(0.0, edge_s - unet_s) / unet_s if unet_s else 0.0,
        bytes_per_image=sum(len(g.payloads[args.codec].data) * len(g.members) for g in groups) / batch,
    )


def device_steps(job, groups) -> int:
    """Trajectory steps the devices run after the branch points (each member from its group's branch step)."""
    return sum((job.settings.steps - g.branch_step) * len(g.members) for g in groups)


def measure_stream(args: argparse.Namespace, worker, stock) -> dict:
    """The stream file's windows through the stock pipeline and through the edge path (grouping by the file's
    embeddings under the file's sharing policy): steps saved and server GPU-seconds per image of both."""
    import json

    import numpy as np

    from edge_server.config import build_config
    from edge_server.worker import sharing_policy

    data = np.load(args.stream)
    meta = json.loads(str(data["meta"]))
    prompts, emb = [str(p) for p in data["prompts"]], data["embeddings"].astype(np.float32)
    table = dict(zip(prompts, emb, strict=True))
    worker.policy = sharing_policy(build_config(None, meta["policy"]))
    worker.embedder = lambda batch: np.stack([table[p] for p in batch])
    device, window, steps = str(worker.pipe.unet.device), args.stream_window, meta["steps"]
    cfg = unet_samples_per_step(meta["guidance"])
    n = min(len(prompts), window * args.stream_windows)
    totals = dict.fromkeys(("independent_s", "edge_s", "edge_unet_s", "server_evals", "device_evals"), 0.0)
    for lo in range(0, n, window):
        batch = prompts[lo : lo + window]
        totals["independent_s"] += timed(lambda b=batch: stock(b, num_inference_steps=steps, guidance_scale=meta[
            "guidance"], output_type="latent"), device, 1)
        job = bucket_job(worker, batch, steps, meta["share"], meta["guidance"], args.codec)
        edge_s, unet_s, _, groups = timed_edge_path(worker, job, 1)
        totals["edge_s"] += edge_s
        totals["edge_unet_s"] += unet_s
        totals["server_evals"] += sum(g.server_steps for g in groups) * cfg
        totals["device_evals"] += device_steps(job, groups) * cfg
    independent_evals = n * steps * cfg
    return {
        "stream": meta | {"file": args.stream, "window": window, "requests": n},
        "independent_gpu_s_per_image": totals["independent_s"] / n,
        "edge_gpu_s_per_image": totals["edge_s"] / n,
        "server_gpu_time_saving": 1.0 - totals["edge_s"] / totals["independent_s"],
        "step_saving": 1.0 - (totals["server_evals"] + totals["device_evals"]) / independent_evals,
        "server_step_saving": 1.0 - totals["server_evals"] / independent_evals,
        "edge_overhead": max(0.0, totals["edge_s"] - totals["edge_unet_s"]) / max(1e-9, totals["edge_unet_s"]),
        "totals": totals,
    }


def print_stream(r: dict) -> None:
    """The stream's figures."""
    st = r["stream"]
    print(f"stream {st['file']}: {st['requests']} requests in windows of {st['window']} ({st['description']})")
    print(f"  steps saved (server + devices) {r['step_saving']:.1%}; server GPU-s per image: independent "
          f"{r['independent_gpu_s_per_image']:.4f}, edge path {r['edge_gpu_s_per_image']:.4f} "
          f"({r['server_gpu_time_saving']:.1%} less); edge overhead {r['edge_overhead']:.1%}", flush=True)


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


def tuning_note(env: dict) -> str:
    """' (tuning light, no channels-last)' for a compiled run's heading; '' for the defaults (which an eager run
    must keep: the server refuses both without a compile)."""
    notes = [f"tuning {env['unet_compile_tuning']}"] if env["unet_compile_tuning"] != "none" else []
    notes += [] if env["unet_channels_last"] else ["no channels-last"]
    return f" ({', '.join(notes)})" if notes else ""


def print_header(env: dict) -> None:
    """The table's heading: device, versions, columns."""
    print(f"device {env['device']}  dtype {env['dtype']}  torch {env['torch']}  diffusers {env['diffusers']}  "
          f"unet_compile {env.get('unet_compile', 'none')}{tuning_note(env)}  "
          f"buckets {env.get('unet_buckets') or '-'}  attention {env.get('attention_backend', 'auto')}  "
          f"{'cudnn benchmark  ' if env.get('cudnn_benchmark') else ''}"
          f"{'quantize ' + env['unet_quantize'] + '  ' if env.get('unet_quantize', 'none') != 'none' else ''}"
          f"worker start {env.get('worker_start_s', 0.0):.1f} s"
          + (f"  floor {env['unet_flop_per_sample'] / 1e9:,.2f} GFLOP per UNet sample"
             if env.get("unet_flop_per_sample") else ""))
    if env.get("unet_compile", "none") != "none":
        changed = "fused and quantized" if env.get("unet_quantize", "none") != "none" else "fused"
        print(f"note: the worker's compile {changed} its pipeline's UNet in place; the indep columns run a stock "
              "eager UNet of the same architecture of their own", flush=True)
    print(
        "batch  unet ms/sample  floor  indep s  indep GPU-s/img  indep img/s  edge s  edge UNet s  rows/call"
        "  edge GPU-s/img  edge img/s  step saving  time saving  overhead  bytes/img",
        flush=True,
    )


def floor_text(fraction: float | None) -> str:
    """'37.5%', or '-' where no floor applies (a CPU without --peak-tflops)."""
    return "-" if fraction is None else f"{fraction:.1%}"


def print_row(r: Row) -> None:
    """One batch size's line, printed as soon as it is measured."""
    print(
        f"{r.batch:5d}  {r.unet_ms_per_sample:14.3f}  {floor_text(r.floor_fraction):>5}  {r.independent_s:7.3f}  "
        f"{r.independent_gpu_s_per_image:15.4f}  {r.independent_images_per_s:11.1f}  {r.edge_path_s:6.3f}  "
        f"{r.edge_unet_s:11.3f}  {r.edge_unet_rows:9.1f}  {r.shared_gpu_s_per_image:14.4f}  "
        f"{r.edge_images_per_s:10.1f}  {r.step_saving:11.1%}  {r.gpu_time_saving:11.1%}  {r.edge_overhead:8.1%}  "
        f"{r.bytes_per_image:9.0f}",
        flush=True,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="auto", help="sd15-random, tiny, default or a pipeline folder; auto: "
                        "sd15-random on a CUDA GPU, else the shipped default model")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--batches", default="8,16,32,64", help="comma-separated prompts per window")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--share", type=float, default=0.4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--mean-group", type=float, default=2.8, help="mean group size of the workload")
    parser.add_argument("--codec", default="fp16")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet forwards per batch size")
    parser.add_argument("--windows", type=int, default=2, help="timed windows per batch size")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak for the compute floor (default "
                        f"{CUDA_PEAK_TFLOPS:g} on a GPU; on a CPU no floor unless given)")
    parser.add_argument("--unet-compile", default="none", help="torch.compile mode of the shared-phase UNet")
    parser.add_argument("--unet-buckets", default="", help="fixed UNet batch sizes (CFG rows), comma-separated")
    parser.add_argument("--unet-compile-tuning", default="none", help="TorchInductor options for diffusion UNets: "
                        "none, light (1x1 convolutions as matmuls), full (and coordinate-descent tuning)")
    parser.add_argument("--no-unet-channels-last", dest="unet_channels_last", action="store_false",
                        help="with --unet-compile: keep the UNet's weights in their own memory layout "
                        "(and the compiled code's skip concatenations as Inductor lays them out)")
    parser.add_argument("--attention-backend", default="auto", help="SDPA kernel of the shared-phase UNet: auto, "
                        "flash, cudnn, efficient, math")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN times its convolution algorithms per "
                        "shape (process-wide: the stock pipeline gets it too); needs --unet-buckets")
    parser.add_argument("--unet-quantize", default="none", help="with --unet-compile: 'fp8' runs the UNet's linear "
                        "layers in float8 (torchao; a GPU of compute capability 8.9+); 'fp8-rowwise' its linear layers "
                        "and 1x1 convolutions with row-wise scales (torch._scaled_mm); 'fp8-static' those layers with "
                        "one scale per tensor, the inputs' calibrated at the worker's start; 'fp8-static-geglu' "
                        "and the feed-forward GEGLU fused into one Triton kernel; 'fp8-static-conv' and the 3x3 "
                        "convolutions in float8 (Triton)")
    parser.add_argument("--compile-cache", default="", help="with --unet-compile: folder of TorchInductor's caches "
                        "(default: the server's, ~/.cache/sage-edge/torch-compile)")
    parser.add_argument("--unet-sweep", default="", help="first time the shared-phase UNet at these UNet batches "
                        "(rows, CFG included; comma-separated, e.g. 2,4,8,16,32,64,128): a simulator step table")
    parser.add_argument("--attention-sweep", default="", help="first time the eager UNet with each of these SDPA "
                        "kernels (comma-separated, e.g. auto,flash,cudnn,efficient)")
    parser.add_argument("--stream", default=None, help="also run this caption stream (benchmarks.coco_stream)")
    parser.add_argument("--stream-window", type=int, default=64, help="requests per window of the stream")
    parser.add_argument("--stream-windows", type=int, default=2, help="windows of the stream to run")
    parser.add_argument("--profile", default=None, help="write a host profile of one edge-path window (last batch)")
    parser.add_argument("--kernel-profile", default=None, help="write where the shared-phase UNet's time goes, by "
                        "kernel and kind (torch.profiler), at the largest --unet-sweep batch (else 2 x --batches)")
    parser.add_argument("--json", default=None, help="write the rows and environment here")
    parser.add_argument("--wait-for", default=None, help="once the worker has started (compiled, warmed; written to "
                        "--json), wait until this file exists before measuring: benchmarks.bench_variants compiles "
                        "variants side by side and times them one at a time")
    parser.add_argument("--stack-dumps-every", type=float, default=0.0, help="print every thread's stack to stderr "
                        "every this many seconds (benchmarks.stacks): where a long compile spends its time")
    args = parser.parse_args(argv)
    for flag in ("batches", "unet_sweep"):
        try:
            sizes = int_list(getattr(args, flag))
        except ValueError:
            sizes = [0]
        if any(n < 1 for n in sizes):
            parser.error(f"--{flag.replace('_', '-')} takes positive whole numbers, comma-separated")
    if min(args.steps, args.repeats, args.windows, args.stream_window, args.stream_windows) < 1:
        parser.error("--steps, --repeats, --windows, --stream-window and --stream-windows take positive whole numbers")
    if not (args.mean_group > 0 and (args.peak_tflops is None or args.peak_tflops > 0) and 0.0 <= args.share <= 1.0):
        parser.error("--mean-group and --peak-tflops take positive numbers, --share a fraction in [0, 1]")
    if args.stream:
        check_stream(parser, args.stream)
    if args.model == "auto":
        args.model = auto_model()
    return args


def auto_model() -> str:
    """SD v1.5's architectures on a CUDA GPU; on a CPU, where they take hours at these batches, the shipped model."""
    if torch.cuda.is_available():
        return "sd15-random"
    print("note: no CUDA GPU; timing the shipped default model (--model sd15-random: SD v1.5 size, slow on a CPU)",
          file=sys.stderr, flush=True)
    return "default"


def check_stream(parser: argparse.ArgumentParser, path: str) -> None:
    """Refuse, before anything runs, a --stream file that does not load or whose policy keeps a latent cache
    (each window runs twice, a warm-up and then timed: the timed run would be served from the warm-up's latents)."""
    import json

    import numpy as np

    try:
        with np.load(path) as data:
            policy = json.loads(str(data["meta"]))["policy"]
    except (OSError, KeyError, ValueError) as exc:
        parser.error(f"--stream {path}: not a stream file of benchmarks.coco_stream ({exc})")
    if policy.get("cache_mb"):
        parser.error(f"--stream {path}: its policy keeps a {policy['cache_mb']:g} MiB latent cache, which the "
                     "timed windows would be served from; make the stream with a policy without one")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it printed as a dict."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    start, parent = time.perf_counter(), os.getppid()
    sampling = sample_stacks(args.stack_dumps_every) if args.stack_dumps_every > 0 else None
    from edge_server.config import ConfigError

    try:
        worker = make_worker(args)
    except (ConfigError, ValueError) as exc:  # ValueError: what the worker's device cannot run (attention, fp8)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None  # bad input, as the other tools exit
    env = environment(worker) | server_flags(args) | {
        "unet_warmup": worker.unet_warmup,
        "worker_start_s": time.perf_counter() - start,
        "unet_flop_per_sample": unet_flop_per_sample(worker.pipe.unet.config),
    }
    result: dict = {"environment": env, "settings": vars(args), "rows": []}
    write_json(result, args.json)  # the worker's start (its compile, warm-up) even if nothing else follows
    if args.wait_for:
        wait_for_file(Path(args.wait_for), parent)
    run_measurements(args, worker, result)
    if sampling:
        sampling.set()
    return result


def wait_for_file(path: Path, parent: int, every_s: float = 0.1) -> None:
    """Return once `path` exists (the GPU is idle meanwhile); exit if this process's `parent` (its pid at the
    start) ends first: a driver stopped by a lease's time limit must not leave workers holding the GPU's memory."""
    print(f"worker ready; waiting for {path}", flush=True)
    while not path.exists():
        if os.getppid() != parent:
            raise SystemExit(f"error: the process that started this run ended before {path} appeared")
        time.sleep(every_s)


def run_measurements(args: argparse.Namespace, worker, result: dict) -> None:
    """The sweeps, the kernel profile, the windows, the host profile and the stream that `args` ask for, into
    `result` (and --json after each)."""
    if args.unet_sweep:
        result["unet_sweep"] = unet_sweep(worker, args)
        write_json(result, args.json)
    if args.kernel_profile:
        result["kernel_profile"] = kernel_profile(worker, args)
        write_json(result, args.json)
    if args.attention_sweep:
        result["attention_sweep"] = attention_sweep(worker, args)
        write_json(result, args.json)
    print_header(result["environment"])
    stock = stock_pipeline(worker) if args.batches or args.stream else None
    for b in int_list(args.batches):
        row = measure(args, worker, b, stock, result["environment"]["unet_flop_per_sample"])
        print_row(row)
        result["rows"].append(asdict(row))
        write_json(result, args.json)  # after every row, so a run cut short keeps what it measured
    if args.profile and result["rows"]:
        last = result["rows"][-1]["batch"]
        job = bucket_job(worker, workload(last, args.mean_group), args.steps, args.share, args.guidance, args.codec)
        profile_edge_path(worker, job, args.profile)
        print(f"wrote a profile of one {last}-prompt edge-path window to {args.profile}", flush=True)
    if args.stream:
        result["stream"] = measure_stream(args, worker, stock)
        print_stream(result["stream"])
        write_json(result, args.json)


if __name__ == "__main__":
    main()
