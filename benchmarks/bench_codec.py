"""Benchmark of the latent transport codec: bytes per latent, encode/decode time, reconstruction error, and the
effect on the final image of continuing the branch phase from the decoded latent instead of the original.

    python -m benchmarks.bench_codec                 # full run (SD-1.5-size latents + the default model)
    python -m benchmarks.bench_codec --quick         # seconds: SD-1.5-size latents, few repeats, tiny images; CI
    python -m benchmarks.bench_codec --model PATH    # any SD-family pipeline folder for the image part

Part 1 (latents): SD-1.5-size 4x64x64 latents at the real branch points. A latent at branch point beta is
x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with the SD 1.5 DDIM schedule (30 steps) at t = timesteps[round(beta T)];
z0 is a smooth random field with a 1/f^2-like spectrum, std 1 per channel (SD latents after the 0.18215 scaling),
eps is Gaussian. Part 2 (images): the pipeline's own shared phase gives the branch latents; each mode's decoded
latent is continued by the branch phase and VAE-decoded, and compared by PSNR with the image continued from the
original latent. Part 3: the finished image sent as PNG and JPEG instead.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/bench_codec.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import exit_on, output_file, write_json  # noqa: E402
from device_client.config import TINY_MODEL  # noqa: E402  (--model tiny, as sage-edge and sage-device take it)
from sage_core.codec import MAX_LEVEL, MIN_LEVEL, MODES, RECOMMENDED_LOSSY_MODE, CodecSpec, LatentCodec  # noqa: E402
from sage_core.models import SD15_SCHEDULER_CONFIG, ModelError  # noqa: E402

DEFAULT_BETAS = (0.2, 0.3, 0.4)
BUDGET_SHAPE = (1, 4, 64, 64)  # the SD 1.5 latent (512x512 images) the byte budget is about
BUDGET_BYTES = 8 * 1024  # a quarter of a raw fp16 BUDGET_SHAPE latent
TARGET_PSNR_DB = 30.0
# the synthetic latents keep their SD-1.5 size (a few ms per mode): the budget verdict is judged on them
QUICK = {"repeats": 2, "seeds": 1, "image_size": 64, "steps": 4, "prompts": 2, "betas": [0.4]}
PROMPTS = (
    "a red circle on a blue background",
    "a big red circle on a dark blue background",
    "two green squares on a white background",
    "a green square and a yellow triangle on a white background",
)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def branch_timesteps(steps: int, betas: Sequence[float]) -> dict[float, tuple[int, float]]:
    """For each beta: (timestep at the branch point, alpha_bar there) of the SD 1.5 DDIM schedule."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    out = {}
    for beta in betas:
        t = int(scheduler.timesteps[min(round(beta * steps), steps - 1)])
        out[beta] = (t, float(scheduler.alphas_cumprod[t]))
    return out


def smooth_field(shape: tuple[int, ...], generator: torch.Generator, corner: float = 2.0) -> torch.Tensor:
    """Gaussian random field [..., H, W] with power spectrum ~ 1/(f^2 + f0^2), std 1 per leading index."""
    h, w = shape[-2:]
    noise = torch.randn(shape, generator=generator)
    fy = torch.fft.fftfreq(h).reshape(-1, 1) * h
    fx = torch.fft.rfftfreq(w).reshape(1, -1) * w
    amplitude = 1.0 / torch.sqrt(fx**2 + fy**2 + corner**2)
    field = torch.fft.irfft2(torch.fft.rfft2(noise) * amplitude, s=(h, w))
    field = field - field.mean(dim=(-2, -1), keepdim=True)
    return field / field.std(dim=(-2, -1), keepdim=True)


def synthetic_branch_latent(abar: float, channels: int, size: int, seed: int) -> torch.Tensor:
    """x_t = sqrt(abar) z0 + sqrt(1 - abar) eps for an SD-like z0 (smooth, std 1, small channel offsets)."""
    g = torch.Generator().manual_seed(seed)
    z0 = smooth_field((1, channels, size, size), g)
    z0 = z0 + torch.linspace(-0.4, 0.4, channels).reshape(1, channels, 1, 1)
    eps = torch.randn((1, channels, size, size), generator=g)
    return math.sqrt(abar) * z0 + math.sqrt(1.0 - abar) * eps


def synthetic_image(size: int, seed: int) -> np.ndarray:
    """An RGB uint8 image with natural-image statistics (1/f spectrum) and hard-edged shapes."""
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    field = smooth_field((3, size, size), g, corner=1.0).numpy()
    rgb = np.clip(128 + 40 * field.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        r = int(rng.integers(size // 16, size // 5))
        draw.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentRow:
    """One (latent, mode) measurement."""

    source: str
    beta: float
    mode: str
    shape: tuple[int, ...]
    bytes: int
    raw_fp16_bytes: int
    encode_ms: float
    decode_ms: float
    snr_db: float  # 10 log10(mean x^2 / mse), inf when exact
    max_abs_err: float


@dataclass(frozen=True)
class ImageRow:
    """Final images continued from a decoded latent, against those continued from the original one."""

    beta: float
    mode: str
    bytes: int
    psnr_db: float  # mean over the members whose image differs from the reference; inf when all are identical
    min_psnr_db: float
    fidelity: float | None  # oracle prompt fidelity (None: no oracle available)


def _best_ms(fn, repeats: int) -> float:
    """Best-of-`repeats` wall time of fn() in milliseconds (stable on a shared CPU)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def snr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-error ratio in dB (inf when bit-equal values)."""
    mse = float((test.float() - ref.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(float(ref.float().pow(2).mean()) / mse)


def psnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR of images in [0, 1] (inf when identical)."""
    mse = float(np.mean((np.asarray(test, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def measure_latent(
    source: str, beta: float, x: torch.Tensor, modes: Sequence[str], level: int, repeats: int
) -> list[LatentRow]:
    """Bytes, times and reconstruction error of every mode on one latent."""
    rows = []
    for mode in modes:
        codec = LatentCodec(CodecSpec(mode, level))
        frame = codec.encode(x)
        decoded = codec.decode(frame)
        rows.append(
            LatentRow(
                source=source,
                beta=beta,
                mode=mode,
                shape=tuple(x.shape),
                bytes=len(frame),
                raw_fp16_bytes=2 * x.numel(),
                encode_ms=_best_ms(lambda c=codec: c.encode(x), repeats),
                decode_ms=_best_ms(lambda c=codec, f=frame: c.decode(f), repeats),
                snr_db=snr_db(x, decoded),
                max_abs_err=float((decoded.float() - x.float()).abs().max()),
            )
        )
    return rows


def image_bytes(image: np.ndarray) -> dict[str, int]:
    """Bytes of a uint8 RGB image as PNG (default and max compression) and JPEG (quality 95, 90, 75)."""
    from PIL import Image

    pil = Image.fromarray(image)
    out = {}
    for name, kwargs in [
        ("png", {"format": "PNG"}),
        ("png_c9", {"format": "PNG", "optimize": True, "compress_level": 9}),
        ("jpeg_q95", {"format": "JPEG", "quality": 95}),
        ("jpeg_q90", {"format": "JPEG", "quality": 90}),
        ("jpeg_q75", {"format": "JPEG", "quality": 75}),
    ]:
        buf = io.BytesIO()
        pil.save(buf, **kwargs)
        out[name] = buf.tell()
    return out


# ----------------------------------------------------------------------------------------------------------
# Pipeline part: real branch points of a model
# ----------------------------------------------------------------------------------------------------------


def load_model(path: str | None, allow_tiny: bool):
    """The pipeline for the image part: `path`, else the default model, else (if allowed) the tiny random one;
    ModelError when none of them loads."""
    from sage_core.models import ModelError, load_pipeline, tiny_pipeline

    if path == TINY_MODEL:
        return tiny_pipeline(seed=0), "tiny random pipeline"
    try:
        return load_pipeline(path), (path or "default model")
    except ModelError as exc:
        if path is not None or not allow_tiny:
            raise
        print(f"# NOTE: {exc}\n# NOTE: using tiny_pipeline() (random weights): image numbers only exercise the path")
        return tiny_pipeline(seed=0), "tiny random pipeline"


def world_prompts(n: int, seed: int = 0) -> tuple[list[str], list | None]:
    """`n` captions of the procedural world's test split (and their examples, for the oracle), or the fixed
    PROMPTS when the world module is not available."""
    try:
        from training import world

        examples = world.make_examples(n, seed=seed, split="test")
        return [e.caption for e in examples], examples
    except (ImportError, AttributeError, ValueError):
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)], None


def load_fidelity_judge():
    """fidelity(images, examples) -> mean per-attribute oracle accuracy, or None without an oracle."""
    try:
        from training import judges

        oracle = judges.load_oracle()
    except (ImportError, AttributeError, FileNotFoundError, RuntimeError) as exc:
        print(f"# NOTE: no oracle for prompt fidelity ({type(exc).__name__}: {exc})")
        return None

    def fidelity(images: np.ndarray, examples: Sequence) -> float:
        predictions, _ = judges.oracle_outputs(oracle, images)
        return float(judges.prompt_fidelity(predictions, examples)["mean"])

    return fidelity


@torch.no_grad()
def model_branch_point(pipe, prompts: Sequence[str], beta: float, steps: int, guidance: float, seed: int):
    """Shared phase of one group (`prompts`, mean embedding, one seeded noise) up to branch point beta.
    Returns (branch point, per-member conditions, uncond, config)."""
    from sage_core.generate import encode_prompts, latent_shape
    from sage_core.sampler import SamplingConfig, initial_noise, make_scheduler, shared_phase

    config = SamplingConfig(steps=steps, guidance=guidance, share=beta)
    cond, uncond = encode_prompts(pipe, prompts)
    scheduler = make_scheduler(pipe.scheduler.config, config.scheduler, config.steps)
    noise = initial_noise(latent_shape(pipe, config), seed, scheduler, pipe.unet.dtype, pipe.unet.device)
    (point,) = shared_phase(pipe.unet, pipe.scheduler.config, [cond.mean(dim=0, keepdim=True)], [noise], uncond, config)
    return point, [cond[m : m + 1] for m in range(len(prompts))], uncond, config


@torch.no_grad()
def finish_images(pipe, point, conds, uncond, config) -> np.ndarray:
    """Branch phase of every member from `point`, then VAE decode: images [M, H, W, 3] in [0, 1]."""
    from sage_core.generate import decode_latents
    from sage_core.sampler import branch_phase

    final = branch_phase(pipe.unet, pipe.scheduler.config, [point] * len(conds), conds, uncond, config)
    return decode_latents(pipe, final)


def measure_images(pipe, prompts, examples, betas, modes, level, steps, guidance, group_size, repeats, fidelity):
    """Latent rows for the model's real branch latents and image rows for every mode (plus an 'original' row:
    the images continued from the original latent, for the oracle's reference fidelity)."""
    from sage_core.sampler import BranchPoint

    groups = [list(range(i, min(i + group_size, len(prompts)))) for i in range(0, len(prompts), group_size)]
    latent_rows, image_rows, finished = [], [], None
    for beta in betas:
        refs, outs, sizes = [], {m: [] for m in modes}, {m: [] for m in modes}
        for gi, members in enumerate(groups):
            point, conds, uncond, config = model_branch_point(
                pipe, [prompts[m] for m in members], beta, steps, guidance, seed=gi
            )
            refs.append(finish_images(pipe, point, conds, uncond, config))
            latent_rows += measure_latent("model", beta, point.latents, modes, level, repeats)
            for mode in modes:
                codec = LatentCodec(CodecSpec(mode, level))
                frame = codec.encode(point.latents)
                decoded = codec.decode(frame).to(point.latents.dtype).to(point.latents.device)
                branch = BranchPoint(decoded, point.step, point.solver_state)
                outs[mode].append(finish_images(pipe, branch, conds, uncond, config))
                sizes[mode].append(len(frame))
        reference = np.concatenate(refs)
        finished = reference
        ordered = [examples[m] for g in groups for m in g] if examples is not None else None

        def score(images: np.ndarray, ordered=ordered) -> float | None:
            return fidelity(images, ordered) if fidelity is not None and ordered else None

        image_rows.append(ImageRow(beta, "original", 0, math.inf, math.inf, score(reference)))
        for mode in modes:
            images = np.concatenate(outs[mode])
            psnrs = [psnr_db(r, i) for r, i in zip(reference, images, strict=True)]
            mean_psnr = (
                math.inf
                if all(math.isinf(v) for v in psnrs)
                else statistics.fmean([v for v in psnrs if not math.isinf(v)])
            )
            image_rows.append(
                ImageRow(beta, mode, round(statistics.fmean(sizes[mode])), mean_psnr, min(psnrs), score(images))
            )
    return average_rows(latent_rows), image_rows, finished


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def _fmt_db(v: float) -> str:
    return "exact" if math.isinf(v) else f"{v:.1f}"


def print_latent_table(rows: Sequence[LatentRow]) -> None:
    """Markdown table of latent rows; '<= 8 KiB' is judged only for latents of BUDGET_SHAPE ('-' for others)."""
    print(
        "| source | beta | shape | mode | bytes | vs raw fp16 | <= 8 KiB | encode ms | decode ms "
        "| latent SNR dB | max abs err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fits = "-" if r.shape != BUDGET_SHAPE else "yes" if r.bytes <= BUDGET_BYTES else "no"  # other sizes: no verdict
        print(
            f"| {r.source} | {r.beta:.1f} | {'x'.join(map(str, r.shape))} | {r.mode} | {r.bytes} | "
            f"{r.bytes / r.raw_fp16_bytes:.3f} | {fits} | {r.encode_ms:.2f} | {r.decode_ms:.2f} | "
            f"{_fmt_db(r.snr_db)} | {r.max_abs_err:.3g} |"
        )


def print_image_table(rows: Sequence[ImageRow]) -> None:
    """Markdown table of image rows."""
    print("| beta | mode | latent bytes | final-image PSNR dB (mean) | (min) | oracle fidelity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fid = "n/a" if r.fidelity is None else f"{r.fidelity:.3f}"
        print(f"| {r.beta:.1f} | {r.mode} | {r.bytes} | {_fmt_db(r.psnr_db)} | {_fmt_db(r.min_psnr_db)} | {fid} |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repeats, one seed and beta, small images (CI smoke run)")
    p.add_argument("--size", type=int, default=64, help="latent side of the synthetic SD-size latents")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--betas", type=float, nargs="+", default=list(DEFAULT_BETAS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument("--repeats", type=int, default=20, help="timing repeats (best of them reported)")
    p.add_argument("--seeds", type=int, default=4, help="synthetic latents per beta (rows are averaged)")
    p.add_argument("--image-size", type=int, default=512, help="side of the PNG/JPEG comparison image")
    p.add_argument("--model", default=None,
                   help=f"pipeline folder for the image part, or '{TINY_MODEL}' (default: the shipped model)")
    p.add_argument("--no-images", action="store_true", help="skip the pipeline part")
    p.add_argument("--no-tiny-fallback", action="store_true", help="fail if the default model is missing")
    p.add_argument("--prompts", type=int, default=8, help="prompts for the image part (world test captions)")
    p.add_argument("--group-size", type=int, default=2, help="prompts per group in the image part")
    p.add_argument("--json", type=output_file, default=None, help="also write all rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:  # its sizes are defaults: what the command line gives stands
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if min(args.size, args.channels, args.steps, args.repeats, args.seeds, args.prompts, args.group_size) < 1 \
            or args.image_size < 16:
        p.error("--size, --channels, --steps, --repeats, --seeds, --prompts and --group-size take positive whole "
                "numbers, --image-size at least 16")
    if not all(0.0 <= b <= 1.0 for b in args.betas) or not MIN_LEVEL <= args.level <= MAX_LEVEL:
        p.error(f"--betas take fractions in [0, 1], --level a zstd level in [{MIN_LEVEL}, {MAX_LEVEL}]")
    for option, values in (("--modes", args.modes), ("--betas", args.betas)):
        if len(set(values)) != len(values):
            p.error(f"{option} must name each value once, got {' '.join(map(str, values))}")
    if not args.no_images and args.model != TINY_MODEL and (args.model is not None or args.no_tiny_fallback):
        check_model_folder(p, args.model)
    return args


def check_model_folder(p: argparse.ArgumentParser, model: str | None) -> None:
    """Refuse a --model that is no pipeline folder, or (no --model, --no-tiny-fallback) a missing or broken shipped
    default model, before part 1 runs, not after it."""
    from sage_core import models

    try:
        models.check_pipeline_folder(Path(model) if model else models.DEFAULT_MODEL_DIR)
    except models.ModelError as exc:
        p.error(f"--model: {exc}" if model else f"--no-tiny-fallback: the shipped default model: {exc}")


def average_rows(rows: Sequence[LatentRow]) -> list[LatentRow]:
    """Average rows of the same (source, beta, mode) over seeds."""
    keys = list(dict.fromkeys((r.source, r.beta, r.mode) for r in rows))
    out = []
    for key in keys:
        group = [r for r in rows if (r.source, r.beta, r.mode) == key]
        snrs = [r.snr_db for r in group]
        out.append(
            LatentRow(
                *key[:2],
                key[2],
                group[0].shape,
                round(statistics.fmean(r.bytes for r in group)),
                group[0].raw_fp16_bytes,
                statistics.fmean(r.encode_ms for r in group),
                statistics.fmean(r.decode_ms for r in group),
                math.inf if any(math.isinf(s) for s in snrs) else statistics.fmean(snrs),
                max(r.max_abs_err for r in group),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print markdown tables, return every row (JSON-ready)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # codec work is single-threaded; avoids oversubscription noise in the timings
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    """The three parts of the benchmark."""
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    # 1. SD-1.5-size synthetic latents at the real branch points
    schedule = branch_timesteps(args.steps, args.betas)
    rows = []
    for beta, (_t, abar) in schedule.items():
        for seed in range(args.seeds):
            x = synthetic_branch_latent(abar, args.channels, args.size, seed)
            rows += measure_latent("synthetic", beta, x, args.modes, args.level, args.repeats)
    rows = average_rows(rows)
    print(f"## Latents: synthetic 1x{args.channels}x{args.size}x{args.size}, DDIM {args.steps} steps, "
          f"zstd level {args.level}")  # fmt: skip
    print("branch points: " + ", ".join(f"beta {b} -> t {t}, abar {a:.4f}" for b, (t, a) in schedule.items()))
    print_latent_table(rows)
    result["latents"] = [asdict(r) for r in rows]

    # 2. the model's own branch latents and final images
    finished = None
    if not args.no_images:
        with exit_on(ModelError):  # weights that do not load: one line, exit 2
            pipe, name = load_model(args.model, allow_tiny=not args.no_tiny_fallback)
        prompts, examples = world_prompts(args.prompts)
        fidelity = load_fidelity_judge() if examples is not None else None
        model_rows, image_rows, finished = measure_images(
            pipe,
            prompts,
            examples,
            args.betas,
            args.modes,
            args.level,
            args.steps,
            args.guidance,
            args.group_size,
            args.repeats,
            fidelity,
        )
        print(
            f"\n## Model branch latents and final images: {name}, {len(prompts)} prompts in groups of "
            f"{args.group_size}, {args.steps} steps, guidance {args.guidance}"
        )
        print_latent_table(model_rows)
        print()
        print_image_table(image_rows)
        result["model"] = name
        result["model_latents"] = [asdict(r) for r in model_rows]
        result["images"] = [asdict(r) for r in image_rows]

    # 3. the finished image instead of the latent
    image = synthetic_image(args.image_size, 0)
    sizes = {"synthetic": image_bytes(image)}
    if finished is not None:
        sizes["model"] = image_bytes((np.clip(finished[0], 0, 1) * 255).round().astype(np.uint8))
    print("\n## Sending the finished image instead (bytes)")
    print("| image | size | " + " | ".join(sizes["synthetic"]) + " |")
    print("|---|---|" + "---|" * len(sizes["synthetic"]))
    shapes = {"synthetic": f"{args.image_size}x{args.image_size}"}
    if finished is not None:
        shapes["model"] = "x".join(map(str, finished[0].shape[:2]))
    for name, s in sizes.items():
        print(f"| {name} | {shapes[name]} | " + " | ".join(str(v) for v in s.values()) + " |")
    result["finished_image_bytes"] = sizes

    fitting = modes_within_budget(rows, args.modes)
    print(f"\n{budget_line(fitting, rows[0].shape)}")
    result["modes_within_budget"] = fitting
    return write_json(result, args.json)


def modes_within_budget(rows: Sequence[LatentRow], modes: Sequence[str]) -> list[str] | None:
    """The modes whose frames fit BUDGET_BYTES on every synthetic latent; None (no verdict) when the latents are not
    of BUDGET_SHAPE: the bytes of a smaller latent say nothing about the budget (every mode fits at 4x16x16)."""
    synthetic = [r for r in rows if r.source == "synthetic"]
    if not synthetic or any(r.shape != BUDGET_SHAPE for r in synthetic):
        return None
    return [m for m in modes if all(r.bytes <= BUDGET_BYTES for r in synthetic if r.mode == m)]


def budget_line(fitting: list[str] | None, shape: tuple[int, ...]) -> str:
    """The closing line: the recommended mode and the modes within the byte budget, or why there is no verdict."""
    budget_shape = "x".join(map(str, BUDGET_SHAPE))
    if fitting is None:
        verdict = (f"no verdict on the {BUDGET_BYTES} B budget: it is about {budget_shape} latents, these are "
                   f"{'x'.join(map(str, shape))} (leave --size and --channels at 64 and 4)")  # fmt: skip
    else:
        verdict = f"within {BUDGET_BYTES} B on every synthetic {budget_shape} latent: {', '.join(fitting) or 'none'}"
    return f"recommended lossy mode: {RECOMMENDED_LOSSY_MODE}; {verdict}"


if __name__ == "__main__":
    main()
