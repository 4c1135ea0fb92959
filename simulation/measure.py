"""Measure a step-time table and a device class for a pipeline on this machine, through the same sage_core calls
the edge worker and the device client make (shared_phase, branch_phase, encode_prompts, the codec, the VAE).

    sage-sim measure --model tiny --name cpu_tiny_model          # writes into simulation/step_times.json
    sage-sim measure --name cpu_default_model                    # the shipped default model
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulation.config import ConfigError


def _best_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn` in ms over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def load_measured_pipeline(model: str, model_config: str | None = None) -> Any:
    """'tiny' (sage_core.models.tiny_pipeline(seed=0), what `--model tiny` servers run), 'default', a folder or a
    single file (into `model_config`'s configs); a ConfigError naming the model for one that cannot load."""
    from sage_core.models import ModelError, load_pipeline, tiny_pipeline

    if model_config is not None and model in ("tiny", "default"):
        raise ConfigError(f"--model-config is for a single-file --model, not the {model} model")
    if model == "tiny":
        return tiny_pipeline(seed=0)
    try:
        return load_pipeline(None if model == "default" else model, config=model_config)
    except ModelError as exc:
        raise ConfigError(f"--model {model}: {exc}") from exc


@torch.no_grad()
def measure_pipeline(
    pipe: Any, batches: Sequence[int] = (1, 2, 4, 8, 16), steps: int = 30, share: float = 0.4, repeats: int = 3
) -> tuple[dict[str, Any], dict[str, float]]:
    """(step-table entry, device-class numbers). UNet pass times come from shared_phase over G groups (a pass
    of 2G samples with CFG) divided by its k steps; the device's from branch_phase of one prompt."""
    from sage_core.codec import CodecSpec, LatentCodec
    from sage_core.generate import decode_latents, encode_prompts, latent_shape
    from sage_core.grouping import pipeline_text_embeddings
    from sage_core.sampler import SamplingConfig, branch_phase, initial_noise, make_scheduler, shared_phase

    config = SamplingConfig(steps=steps, guidance=7.5, share=share)
    k = config.branch_step()
    shape = latent_shape(pipe, config)
    sched_cfg = pipe.scheduler.config
    cond, uncond = encode_prompts(pipe, ["a photo of a cat"])
    noise = initial_noise(shape, 0, make_scheduler(sched_cfg, config.scheduler, steps), pipe.unet.dtype)
    unet_ms: dict[str, float] = {}
    for g in batches:
        ms = _best_ms(lambda g=g: shared_phase(pipe.unet, sched_cfg, [cond] * g, [noise] * g, uncond, config), repeats)
        unet_ms[str(2 * g)] = round(ms / k / (2 * g), 4)  # per sample of a 2G-sample pass
    vae_ms = {}
    for m in (1, 4):
        lat = noise.repeat(m, 1, 1, 1)
        vae_ms[str(m)] = round(_best_ms(lambda lat=lat: decode_latents(pipe, lat), repeats) / m, 4)
    prompts = [f"a photo of a cat number {i}" for i in range(8)]
    text_ms = _best_ms(lambda: (encode_prompts(pipe, prompts), pipeline_text_embeddings(pipe, prompts)), repeats) / 8
    point = shared_phase(pipe.unet, sched_cfg, [cond], [noise], uncond, config)[0]
    codec = LatentCodec(CodecSpec("fp16", 3))
    encode_ms = _best_ms(lambda: codec.encode(point.latents.cpu()), repeats)
    branch_ms = _best_ms(lambda: branch_phase(pipe.unet, sched_cfg, [point], [cond], uncond, config), repeats)
    device = {
        "unet_ms_per_sample": round(branch_ms / (steps - k) / 2, 4),
        "vae_decode_ms": vae_ms["1"],
        "text_encode_ms": round(_best_ms(lambda: encode_prompts(pipe, ["a photo of a dog"]), repeats), 4),
    }
    table = {
        "description": (
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
            f"latent {list(shape[1:])}, float32, measured through sage_core.sampler.shared_phase"
        ),
        "source": "sage-sim measure (simulation/measure.py)",
        "unet_ms_per_sample": unet_ms,
        "vae_ms_per_image": vae_ms,
        "text_encode_ms_per_prompt": round(text_ms, 4),
        "latent_encode_ms_per_group": round(encode_ms, 4),
        "latent_shape": list(shape[1:]),
        "device_class": device,
    }
    return table, device


def read_tables(path: Path) -> dict[str, Any]:
    """The named tables of a step-times JSON file ({} for none); a file that is not one is a ConfigError."""
    if not path.is_file():
        return {}
    try:
        tables = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a step-times JSON file ({exc}); give another --out") from None
    if not isinstance(tables, dict):
        raise ConfigError(f"{path} is not a step-times JSON file (no mapping of named tables); give another --out")
    return tables


def write_table(path: Path, name: str, table: dict[str, Any]) -> None:
    """Add or replace one named table in a step-times JSON file."""
    tables = read_tables(path)
    tables[name] = table
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tables, indent=2) + "\n", encoding="utf-8")
