"""Image quality and steps saved of each sharing policy, through the real edge worker and device code paths.

    python -m benchmarks.bench_policy_quality --n 192 --window 64 --json docs/results/policies/world_quality.json
    (--depth-schedule docs/results/policies/depth_calibration.json: adaptive depths from the calibration)

A stream of held-out captions of the default model's world, in random order, is cut into windows. For each
policy an in-process EdgeWorker (the Ray actor's class: planning, cross-window cache, shared phase, codec) serves
every window; each request's branch phase then runs as a device runs it (sage_core.sampler.branch_phase from the
decoded latent), and the images are judged: oracle prompt fidelity, FID on oracle features against real renders
of the same captions. Independent sampling (nothing shared) is the reference row, same seeds.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch

from benchmarks.results import write_json
from sage_core.seeds import check_base_seed

POLICIES = {
    "independent": {"sharing": "flat", "max_group_size": 1, "share": 0.0, "cache_mb": 0.0},
    "flat tau 0.9 beta 0.4": {"sharing": "flat", "tau": 0.9, "share": 0.4, "cache_mb": 0.0},
    "adaptive": {"sharing": "adaptive", "share": 1.0, "cache_mb": 0.0},
    "adaptive + cache": {"sharing": "adaptive", "share": 1.0, "cache_mb": 64.0},
    # the same plans with the shared phase's UNet compiled, and compiled in row-wise float8 (its linear layers and
    # 1x1 convolutions): how far the images move from "adaptive"'s with the same seeds, by compiling alone (kernels
    # that round in another order) and with float8 rounding
    "adaptive + compiled": {"sharing": "adaptive", "share": 1.0, "cache_mb": 0.0, "reference": "adaptive",
                            "server": {"unet_compile": "default"}},
    "adaptive + fp8-rowwise": {"sharing": "adaptive", "share": 1.0, "cache_mb": 0.0, "reference": "adaptive",
                               "server": {"unet_compile": "default", "unet_quantize": "fp8-rowwise"}},
    "adaptive + fp8-static": {"sharing": "adaptive", "share": 1.0, "cache_mb": 0.0, "reference": "adaptive",
                              "server": {"unet_compile": "default", "unet_quantize": "fp8-static"}},
    # and the 3x3 convolutions in float8 as well (the fused GEGLU computes what fp8-static does, in another order)
    "adaptive + fp8-static-conv": {"sharing": "adaptive", "share": 1.0, "cache_mb": 0.0, "reference": "adaptive",
                                   "server": {"unet_compile": "default", "unet_quantize": "fp8-static-conv"}},
}
DEFAULT_POLICIES = ("independent", "flat tau 0.9 beta 0.4", "adaptive", "adaptive + cache")


def serve_stream(
    policy: dict, prompts: list[str], window: int, steps: int, model: str, schedule: tuple | None = None,
    shared_condition: str = "mean", noise_seed: int = 5000,
) -> tuple[np.ndarray, dict]:
    """Final images of every prompt served under `policy` (adaptive depths from `schedule` when given, else the
    server's default; prompt i's request seed is `noise_seed` + i), and the steps the server and devices ran."""
    from edge_server.config import ServerConfig
    from edge_server.worker import BucketJob, BucketSettings, EdgeWorker, MemberSpec, load_model
    from sage_core.codec import CodecSpec, LatentCodec
    from sage_core.generate import decode_latents, encode_prompts
    from sage_core.sampler import BranchPoint, SamplingConfig, branch_phase

    config = ServerConfig(
        model=model,
        sharing=policy["sharing"],
        tau=policy.get("tau", 0.8),
        max_group_size=policy.get("max_group_size", 5),
        cache_mb=policy["cache_mb"],
        adapter="none",
        shared_condition=shared_condition,
        **({"depth_schedule": schedule} if schedule else {}),
        **policy.get("server", {}),
    )
    worker = EdgeWorker(config)
    info = worker.info()
    # the devices' own model: a compiled worker fuses (and may quantize) its pipeline's UNet in place, for its
    # shared phase only
    pipe, codec = load_model(config), LatentCodec(CodecSpec("fp32"))
    sampling = SamplingConfig(steps=steps, guidance=7.5, share=0.0)
    settings = BucketSettings(steps, 7.5, "ddim", info.default_height, info.default_width)
    images, server_steps, device_steps, cached = [], 0, 0, 0
    for lo in range(0, len(prompts), window):
        chunk = prompts[lo : lo + window]
        members = tuple(MemberSpec(p, noise_seed + lo + i, policy["share"], "fp32", False) for i, p in enumerate(chunk))
        groups = worker._run_bucket(BucketJob(settings, members), threading.Event())
        cond, uncond = encode_prompts(pipe, chunk)
        points, order = [], []
        for g in groups:
            latent = codec.decode(g.payloads["fp32"].data[: g.payloads["fp32"].frame_sizes[0]])
            for m in g.members:
                points.append(BranchPoint(latent, g.branch_step))
                order.append(m)
            server_steps += g.server_steps
            device_steps += len(g.members) * (steps - g.branch_step)
            cached += g.cached_steps
        final = branch_phase(
            pipe.unet, pipe.scheduler.config, points, [cond[m : m + 1] for m in order], uncond, sampling
        )
        latents = torch.empty_like(final)
        latents[order] = final
        images.append(decode_latents(pipe, latents))
    counts = {"server_steps": server_steps, "device_steps": device_steps, "cached_steps_reused": cached}
    return np.concatenate(images), counts


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of `images` against `reference` (uint8 or [0, 1] floats alike)."""
    scale = 255.0 if reference.dtype == np.uint8 else 1.0
    mse = float(np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2)) / scale**2
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def main(argv: list[str] | None = None) -> dict:
    """Serve the stream under each policy and judge the images."""
    from training import judges, world

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default="default")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help=f"of: {', '.join(POLICIES)}")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--depth-schedule", default=None, help="JSON of benchmarks.calibrate_depth (its schedule)")
    parser.add_argument("--shared-condition", default="mean", help="what shared steps run on: mean or medoid")
    parser.add_argument("--noise-seed", type=int, default=5000,
                        help="prompt i's request seed is this + i (how far the figures move with the noise draws)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = args.policies.split(",")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    try:
        check_base_seed(args.noise_seed, args.n)  # prompt i asks for noise_seed + i
    except ValueError as exc:
        parser.error(f"--noise-seed: {exc}")
    schedule = None
    if args.depth_schedule:
        with open(args.depth_schedule, encoding="utf-8") as fh:
            schedule = tuple(tuple(point) for point in json.load(fh)["schedule"])
    torch.set_num_threads(2)
    examples = world.make_examples(args.n, seed=args.seed, split="test")
    prompts = [e.caption for e in examples]
    oracle = judges.load_oracle()
    _, real_feats = judges.oracle_outputs(oracle, world.render_examples(examples))
    rows, served = [], {}
    for name in names:
        start = time.perf_counter()
        images, counts = serve_stream(POLICIES[name], prompts, args.window, args.steps, args.model, schedule,
                                      args.shared_condition, args.noise_seed)
        preds, feats = judges.oracle_outputs(oracle, images)
        fidelity = judges.prompt_fidelity(preds, examples)
        total = counts["server_steps"] + counts["device_steps"]
        row = {
            "policy": name,
            "step_saving": 1.0 - total / (args.n * args.steps),
            "fidelity_mean": fidelity["mean"],
            "fidelity_all": fidelity["all"],
            "fid_oracle": judges.frechet_distance(feats, real_feats),
            **counts,
            "seconds": time.perf_counter() - start,
        }
        served[name] = images
        reference, moved = POLICIES[name].get("reference"), ""
        if reference in served:  # same seeds and plans: how far the images moved
            row[f"psnr_vs_{reference}"] = psnr(images, served[reference])
            moved = f"  PSNR vs {reference} {row[f'psnr_vs_{reference}']:.1f} dB"
        rows.append(row)
        print(
            f"{name:24s} steps saved {row['step_saving']:6.1%}  fidelity {row['fidelity_mean']:.3f} "
            f"(all {row['fidelity_all']:.3f})  FID-oracle {row['fid_oracle']:.2f}{moved}  ({row['seconds']:.0f} s)",
            flush=True,
        )
    result = {"settings": vars(args), "rows": rows}
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
