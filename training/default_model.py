"""Train the shipped default model from scratch on the procedural world (training/world.py).

Same component classes as SD v1.5 (AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel, DDIM
with SD v1.5's scheduler config), sized for 64x64 RGB images, a 4x-downsampling VAE (4x16x16 latents) and a
CPU that must sample 8 images (30 steps, CFG) in seconds.

Stages, each resumable from its checkpoint under `work_dir`:
  1. render the training scenes (deterministic by seed)
  2. train the VAE (L1 + MSE reconstruction + a small KL), then measure scaling_factor = 1 / std(latents)
  3. encode every training image once (posterior mean and std, sampled again at every step)
  4. train the text encoder and the UNet jointly (epsilon prediction, min-SNR weights, caption dropout for
     classifier-free guidance, EMA of both)
  5. save a diffusers StableDiffusionPipeline folder (fp16 safetensors) and a sample grid

One command: `sage-train default-model --config training/configs/default_model.yaml --device cuda`.

With `diffusion.init_from` (a pipeline folder of the same architecture) stage 4 continues that pipeline instead:
its VAE replaces stage 2, its text encoder and UNet are the starting weights, and `train_kind_weights` can draw
the training scenes with another kind mix (training/configs/default_model_finetune.yaml).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sage_core.config_files import read_mapping
from sage_core.config_types import differences, from_mapping
from sage_core.models import (
    CLIP_BOS,
    CLIP_EOS,
    CLIP_VOCAB_SIZE,
    SD15_SCHEDULER_CONFIG,
    assemble_pipeline,
    build_clip_tokenizer,
    write_clip_tokenizer_files,
)
from sage_core.outputs import check_work_dir
from training import world
from training.run_checks import check_device, writable_dir

# ----------------------------------------------------------------------------------------------- config


@dataclass
class VaeConfig:
    """AutoencoderKL shape and its training run."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    steps: int = 3000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-7  # on the per-image KL sum, against per-pixel mean reconstruction losses
    mse_weight: float = 1.0
    crop_size: int = 64  # train on random crops (the VAE is convolutional); < 64 is much cheaper on a CPU
    full_every: int = 4  # with crops, every n-th batch is still full-size images
    max_minutes: float = 0.0  # 0 = no time limit


@dataclass
class TextConfig:
    """CLIPTextModel shape (vocabulary and positions match the real CLIP tokenizer)."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512


@dataclass
class UNetConfig:
    """UNet2DConditionModel shape; cross_attention_dim is the text hidden size."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    cross_attention_levels: tuple[bool, ...] = (False, True, True)
    attention_head_dim: int = 8
    norm_num_groups: int = 8


@dataclass
class DiffusionConfig:
    """Joint text-encoder + UNet training run."""

    steps: int = 20000
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0
    n_scenes: int = 0  # train on the first n rendered scenes only (0 = all); saves encoding time on a CPU
    mixed_precision: str = "no"  # "bf16" autocasts the forward passes on CUDA
    max_minutes: float = 0.0  # 0 = no time limit
    init_from: str = ""  # a pipeline folder to continue: its VAE, and its text encoder + UNet unless resuming


@dataclass
class DefaultModelConfig:
    """Everything one training run needs, passed down explicitly."""

    seed: int = 0
    device: str = "cpu"
    num_threads: int = 1
    data_workers: int = 0  # processes that render scenes and caption/tokenize UNet batches (0 = in-process)
    n_train_scenes: int = 20000
    train_kind_weights: tuple[float, float, float] | None = None  # (single, count, pair); None: world.KIND_WEIGHTS
    output_dir: str = "runs/default_model/pipeline"
    work_dir: str = "runs/default_model"
    stages: tuple[str, ...] = ("vae", "unet")
    checkpoint_minutes: float = 5.0
    sample_every_minutes: float = 10.0
    log_every: int = 25
    scaling_samples: int = 2000
    encode_batch_size: int = 128
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def load_config(path: str | Path | None = None, **overrides: Any) -> DefaultModelConfig:
    """Read a YAML/JSON config (or take the defaults) and apply top-level or dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_mapping(path)
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    cfg = from_mapping(DefaultModelConfig, data)  # unknown keys and values of the wrong type are errors
    validate_config(cfg)
    return cfg


def validate_config(cfg: DefaultModelConfig) -> None:
    """Raise ValueError on settings that cannot work."""
    if len(cfg.unet.block_out_channels) != len(cfg.unet.cross_attention_levels):
        raise ValueError("unet.block_out_channels and unet.cross_attention_levels must have the same length")
    if any(c % cfg.unet.norm_num_groups for c in cfg.unet.block_out_channels):
        raise ValueError("every unet block_out_channels entry must be divisible by unet.norm_num_groups")
    if any(c % cfg.vae.norm_num_groups for c in cfg.vae.block_out_channels):
        raise ValueError("every vae block_out_channels entry must be divisible by vae.norm_num_groups")
    if cfg.text.hidden_size % cfg.text.num_attention_heads:
        raise ValueError("text.hidden_size must be divisible by text.num_attention_heads")
    factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
    if world.IMAGE_SIZE % factor or cfg.vae.crop_size % factor or not 0 < cfg.vae.crop_size <= world.IMAGE_SIZE:
        raise ValueError("the VAE's downsampling factor must divide the image size and vae.crop_size (<= 64)")
    bad = set(cfg.stages) - {"vae", "unet"}
    if bad:
        raise ValueError(f"unknown stages {sorted(bad)}; expected a subset of ['vae', 'unet']")
    if cfg.n_train_scenes < cfg.diffusion.batch_size or cfg.n_train_scenes < cfg.vae.batch_size:
        raise ValueError("n_train_scenes must be at least the batch size")
    if 0 < cfg.diffusion.n_scenes < cfg.diffusion.batch_size:  # the unet stage would draw no batch, and spin
        raise ValueError(f"diffusion.n_scenes must be 0 (all) or at least diffusion.batch_size "
                         f"({cfg.diffusion.batch_size}), got {cfg.diffusion.n_scenes}")
    if cfg.data_workers < 0:
        raise ValueError("data_workers must be >= 0")
    if cfg.train_kind_weights is not None:
        try:
            world.kind_probabilities(cfg.train_kind_weights)
        except ValueError as exc:
            raise ValueError(f"train_kind_weights: {exc}") from None
    if cfg.diffusion.init_from and "vae" in cfg.stages:
        raise ValueError("diffusion.init_from continues a pipeline with its own VAE: train the unet stage only "
                         "(stages: [unet])")


# ----------------------------------------------------------------------------------------------- resume
# settings that change how a run goes, not what it computes: they may differ when a stage resumes
OPERATIONAL_KEYS = frozenset({"device", "num_threads", "data_workers", "output_dir", "work_dir", "stages",
                              "checkpoint_minutes", "sample_every_minutes", "log_every", "encode_batch_size",
                              "vae.max_minutes", "diffusion.max_minutes", "diffusion.mixed_precision"})
# a stage may be resumed with another step count: its learning rate then decays from the rate reached to the
# final fraction at the new total (resumed_anchor; logged); the data draws follow the step reached, not the total.
# So with another max_minutes (an operational key): the time then counts from the resume (time_progress)
EXTENDABLE_KEYS = frozenset({"vae.steps", "diffusion.steps"})
# the top-level sections a stage's checkpoint depends on ("unet": all but the VAE's, which vae_final settles)
STAGE_SECTIONS = {"vae": ("seed", "n_train_scenes", "train_kind_weights", "vae")}


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"vae": {"lr": 1}} -> {"vae.lr": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_signature(config: dict[str, Any], stage: str) -> dict[str, Any]:
    """The settings (flattened, JSON values) of `config` (asdict form) a checkpoint of `stage` must agree on."""
    sections = STAGE_SECTIONS.get(stage, tuple(k for k in config if k != "vae"))
    flat = _flat(json.loads(json.dumps({k: config[k] for k in sections if k in config})))
    return {k: v for k, v in flat.items() if k not in OPERATIONAL_KEYS}


def check_resume(cfg: DefaultModelConfig, stage: str, log: Callable[[str], None] = print) -> None:
    """Refuse to resume the stage's checkpoint in work_dir when it was made with other settings, naming each
    differing setting with both values (a changed step count is allowed and logged, see resumed_anchor). A
    checkpoint from before signatures were stored is compared with the work_dir/config.json its run wrote."""
    work = Path(cfg.work_dir)
    meta_path = work / f"{stage}_ckpt" / "meta.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    stored = meta.get("signature")
    if stored is None and (work / "config.json").is_file():
        stored = stage_signature(json.loads((work / "config.json").read_text(encoding="utf-8")), stage)
    if stored is None:
        raise ValueError(f"checkpoint {meta_path.parent} has no record of its settings; delete it or use a new "
                         "work_dir to start over")
    wanted = stage_signature(dataclasses.asdict(cfg), stage)
    diff = differences(stored, wanted)
    extended = [d for d in diff if d.split(":")[0] in EXTENDABLE_KEYS]
    diff = [d for d in diff if d not in extended]
    if diff:
        raise ValueError(f"checkpoint {meta_path.parent} was made with other settings ({'; '.join(diff)}); resume "
                         "with those, or delete the checkpoint or use a new work_dir to start over")
    if extended:
        log(f"{stage}: resuming with another step count ({'; '.join(extended)}); the learning rate decays from the "
            "rate the checkpoint reached to its final fraction at the new total")
    limit = (cfg.vae if stage == "vae" else cfg.diffusion).max_minutes
    if meta.get("max_minutes", limit) != limit:
        log(f"{stage}: resuming with another time limit (max_minutes: {meta['max_minutes']:g} -> {limit:g}); the "
            "learning rate decays from the rate the checkpoint reached, over the time left")


# ----------------------------------------------------------------------------------------------- components
def latent_size(cfg: DefaultModelConfig) -> int:
    """Side of the latent grid."""
    return world.IMAGE_SIZE // 2 ** (len(cfg.vae.block_out_channels) - 1)


def build_vae(cfg: DefaultModelConfig) -> AutoencoderKL:
    """A fresh AutoencoderKL for 64x64 RGB images."""
    n = len(cfg.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae.block_out_channels),
        layers_per_block=cfg.vae.layers_per_block,
        latent_channels=cfg.vae.latent_channels,
        norm_num_groups=cfg.vae.norm_num_groups,
        sample_size=world.IMAGE_SIZE,
    )


def build_text_encoder(cfg: DefaultModelConfig) -> CLIPTextModel:
    """A fresh CLIPTextModel with the real CLIP vocabulary size and 77 positions."""
    t = cfg.text
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=CLIP_BOS,
            eos_token_id=CLIP_EOS,
            pad_token_id=CLIP_EOS,
        )
    )


def build_unet(cfg: DefaultModelConfig) -> UNet2DConditionModel:
    """A fresh UNet2DConditionModel over the VAE's latent grid."""
    u = cfg.unet
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size(cfg),
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.text.hidden_size,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
    )


def build_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    """An SD pipeline from the components, DDIM with SD v1.5's config, no safety checker."""
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path, fp16: bool = True) -> Path:
    """Save a variant-less (fp16 by default) safetensors pipeline folder; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fp16:  # a copy, so the caller's (possibly still training) modules keep full precision
        comps = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in pipe.components.items()}
        pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
        pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    if not (out / "tokenizer" / "vocab.json").exists():  # also the slow-tokenizer files, as SD v1.5 ships them
        write_clip_tokenizer_files(out / "tokenizer")
    return out


def pipeline_megabytes(folder: str | Path) -> float:
    """Size of all files in a pipeline folder, in MB (1e6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


# config keys that do not describe the architecture (versions, dtype, the measured VAE scale, bookkeeping)
_NON_ARCHITECTURE_KEYS = {"scaling_factor", "transformers_version", "architectures", "dtype", "torch_dtype"}


def _architecture_differences(built: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys both configs hold whose values differ (config value, folder value), bookkeeping keys aside."""
    built, saved = json.loads(json.dumps(built)), json.loads(json.dumps(saved))  # tuples -> lists
    return {k: (built[k], saved[k]) for k in sorted(built.keys() & saved.keys())
            if not k.startswith("_") and k not in _NON_ARCHITECTURE_KEYS and built[k] != saved[k]}


def init_pipeline_dir(cfg: DefaultModelConfig) -> Path | None:
    """The diffusion.init_from pipeline folder (None when unset), checked to hold a VAE, text encoder and UNet of
    exactly the config's architecture; ValueError otherwise."""
    if not cfg.diffusion.init_from:
        return None
    folder = Path(cfg.diffusion.init_from)
    built = {"vae": dict(build_vae(cfg).config), "text_encoder": build_text_encoder(cfg).config.to_dict(),
             "unet": dict(build_unet(cfg).config)}
    missing = [name for name in built if not (folder / name / "config.json").is_file()]
    if missing:
        raise ValueError(f"diffusion.init_from: {folder} is not a pipeline folder (no {', '.join(missing)} "
                         "config.json)")
    for name, config in built.items():
        saved = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        diff = _architecture_differences(config, saved)
        if diff:
            details = "; ".join(f"{k}: config {a} vs folder {b}" for k, (a, b) in diff.items())
            raise ValueError(f"diffusion.init_from: the {name} in {folder} has another architecture than the "
                             f"config's ({details}); make the config's vae/text/unet sections match it")
    return folder


def load_vae(folder: Path, device: str) -> AutoencoderKL:
    """A saved AutoencoderKL in fp32 on `device`, in eval mode (its config keeps the scaling_factor)."""
    return AutoencoderKL.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()


def load_text_and_unet(folder: Path, device: str) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """The text encoder and UNet of a pipeline folder in fp32 on `device` (to continue training them)."""
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), dtype=torch.float32)
    return text_encoder.to(device), unet.to(device)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class WorldData:
    """Rendered training scenes: uint8 images (N, 3, H, W) and the examples they came from."""

    images: torch.Tensor
    examples: list[world.Example]


def _render_chunk(seed: int, start: int, n: int, kind_weights: tuple[float, float, float] | None = None
                  ) -> tuple[list[world.Example], np.ndarray]:
    """Training examples start..start+n and their renders (a worker process's share)."""
    examples = world.make_examples(n, seed, "train", start, kind_weights)
    return examples, world.render_examples(examples)


def render_training_data(cfg: DefaultModelConfig, chunk: int = 5000) -> WorldData:
    """Render the training split (scene kinds drawn with cfg.train_kind_weights when set), in `cfg.data_workers`
    processes when > 1 (same scenes either way)."""
    starts = range(0, cfg.n_train_scenes, chunk)
    sizes = [min(chunk, cfg.n_train_scenes - s) for s in starts]
    weights = cfg.train_kind_weights
    if cfg.data_workers > 1:
        with ProcessPoolExecutor(cfg.data_workers) as pool:
            parts = list(tqdm(pool.map(_render_chunk, [cfg.seed] * len(sizes), starts, sizes, [weights] * len(sizes)),
                              total=len(sizes), desc="scenes", mininterval=2))
    else:
        parts = [_render_chunk(cfg.seed, s, n, weights) for s, n in tqdm(list(zip(starts, sizes, strict=True)),
                                                                         desc="scenes", mininterval=2)]
    examples = [e for part, _ in parts for e in part]
    images = np.concatenate([imgs for _, imgs in parts])
    return WorldData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), examples)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1]."""
    return images_u8.float().div(127.5).sub(1.0)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to 77, exactly as StableDiffusionPipeline.encode_prompt does."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------- helpers
Anchor = tuple[int, float, float]  # where a stage's cosine decay starts: (step, lr factor, seconds into the stage)
NO_ANCHOR: Anchor = (0, 1.0, 0.0)


def lr_factor(step: int, total: int, warmup: int, final_fraction: float, time_fraction: float = 0.0,
              anchor: Anchor = NO_ANCHOR) -> float:
    """Linear warm-up, then cosine decay to final_fraction at `total`; progress is the larger of steps and time
    used (time_fraction, see time_progress). The decay starts at the end of the warm-up from 1, or from the
    `anchor`'s step and factor when a resumed run changed its total or time limit there (resumed_anchor)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    start, top = max(warmup, anchor[0]), anchor[1]
    progress = min(1.0, max((step - start) / max(1, total - start), time_fraction))
    return final_fraction + (top - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def time_progress(seconds: float, limit: float, anchor: Anchor = NO_ANCHOR) -> float:
    """The share of a stage's time limit (seconds, inf for none) used since the `anchor`'s time, as lr_factor
    counts steps from its step: 0 without a limit, 1 once it is reached."""
    if math.isinf(limit):
        return 0.0
    since = anchor[2]
    return 1.0 if limit <= since else (seconds - since) / (limit - since)


def resumed_anchor(meta: dict[str, Any], optim: dict, base_lr: float, total: int, warmup: int, steps_key: str,
                   max_minutes: float) -> Anchor:
    """Where a resumed stage's cosine decay starts (lr_factor's `anchor`): the checkpoint's own while the total
    step count (`steps_key` of its signature) and the time limit are unchanged; with another of either past the
    warm-up, the step and time reached and the rate last used, so the rate goes on from there to the final
    fraction at the new total or limit instead of jumping onto the new one's curve."""
    anchor = (*meta.get("lr_anchor", NO_ANCHOR), 0.0)[:3]  # a checkpoint from before the time was anchored: 0 s
    same_steps = meta.get("signature", {}).get(steps_key, total) == total
    if (same_steps and meta.get("max_minutes", max_minutes) == max_minutes) or meta["step"] <= warmup:
        return anchor
    return meta["step"], optim["param_groups"][0]["lr"] / base_lr, meta["seconds"]


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon prediction (gamma <= 0: all ones)."""
    if gamma <= 0:
        return torch.ones_like(timesteps, dtype=torch.float32)
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = ac / (1 - ac)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


class Stopwatch:
    """Wall time of a stage, including time spent in earlier (resumed) runs."""

    def __init__(self, already: float = 0.0) -> None:
        self.start = time.monotonic() - already

    def seconds(self) -> float:
        """Elapsed seconds."""
        return time.monotonic() - self.start


def _save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], optim: dict) -> None:
    """Write a resumable checkpoint: weights as safetensors, optimizer state with torch.save, meta as JSON."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / "weights.safetensors"))
    torch.save(optim, path / "optimizer.pt")
    (path / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict] | None:
    """Read a checkpoint written by _save_state, or None when there is none."""
    if not (path / "meta.json").exists():
        return None
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return load_file(str(path / "weights.safetensors")), meta, optim


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches (epochs without replacement)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


class CaptionBatches(torch.utils.data.IterableDataset):
    """Endless (scene indices, token ids) batches: each drawn scene gets a fresh caption from its templates,
    replaced by the empty caption with probability `dropout` (for classifier-free guidance).

    Runs in DataLoader worker processes on a GPU run so that captioning and tokenizing overlap the training step;
    each worker draws its own stream (seeded by seed, first step and worker id)."""

    def __init__(self, examples: list[world.Example], tokenizer: CLIPTokenizer, batch_size: int, dropout: float,
                 seed: int, start_step: int = 0) -> None:
        super().__init__()
        self.examples, self.tokenizer, self.batch_size = examples, tokenizer, batch_size
        self.dropout, self.seed, self.start_step = dropout, seed, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        gen = torch.Generator().manual_seed(self.seed * 1000 + 3 + self.start_step + 7919 * worker)
        rng = np.random.default_rng([self.seed, 7, self.start_step, worker])
        cache: dict[str, torch.Tensor] = {}
        for idx in _batches(len(self.examples), self.batch_size, gen):
            captions = []
            for i in idx.tolist():
                caption, _ = world.caption_scene(self.examples[i].scene, rng)
                captions.append("" if rng.random() < self.dropout else caption)
            if len(cache) > 200_000:
                cache.clear()
            missing = sorted({c for c in captions if c not in cache})
            if missing:
                cache.update(zip(missing, tokenize(self.tokenizer, missing), strict=True))
            yield idx, torch.stack([cache[c] for c in captions])


def caption_loader(batches: CaptionBatches, workers: int, pin: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate `batches` in-process (workers=0) or from worker processes with a few batches prefetched."""
    if workers == 0:
        return iter(batches)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, prefetch_factor=4,
                                         pin_memory=pin, persistent_workers=False)
    return iter(loader)


# ----------------------------------------------------------------------------------------------- stage 2: VAE
def train_vae(cfg: DefaultModelConfig, data: WorldData, log: Callable[[str], None] = print) -> AutoencoderKL:
    """Train (or resume) the VAE; returns it with scaling_factor measured and set in its config."""
    device = torch.device(cfg.device)
    vc = cfg.vae
    ckpt_dir = Path(cfg.work_dir) / "vae_ckpt"
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=vc.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, already, history, anchor = 0, 0.0, [], NO_ANCHOR
    state = _load_state(ckpt_dir)
    if state is not None:
        tensors, meta, optim = state
        vae.load_state_dict(_unprefixed("vae", tensors))
        opt.load_state_dict(optim)
        step, already, history = meta["step"], meta["seconds"], meta.get("history", [])
        anchor = resumed_anchor(meta, optim, vc.lr, vc.steps, vc.warmup_steps, "vae.steps", vc.max_minutes)
        log(f"vae: resumed at step {step} ({already / 60:.1f} min)")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 1 + step)
    batches = _batches(len(data.images), vc.batch_size, gen)
    watch = Stopwatch(already)
    last_ckpt = watch.seconds()
    limit = vc.max_minutes * 60 if vc.max_minutes > 0 else math.inf
    vae.train()
    bar = tqdm(total=vc.steps, initial=step, desc="vae", mininterval=5)
    running = []

    def checkpoint() -> None:
        _save_state(ckpt_dir, _prefixed("vae", vae), {"step": step, "seconds": watch.seconds(), "history": history,
                    "signature": stage_signature(dataclasses.asdict(cfg), "vae"), "lr_anchor": anchor,
                    "max_minutes": vc.max_minutes},
                    opt.state_dict())

    while step < vc.steps and watch.seconds() < limit:
        for g in opt.param_groups:
            g["lr"] = vc.lr * lr_factor(step, vc.steps, vc.warmup_steps, 0.1,
                                        time_progress(watch.seconds(), limit, anchor), anchor)
        x = to_unit(data.images[next(batches)])
        if vc.crop_size < world.IMAGE_SIZE and step % max(1, vc.full_every) != 0:
            oy, ox = torch.randint(0, world.IMAGE_SIZE - vc.crop_size + 1, (2,), generator=gen).tolist()
            x = x[:, :, oy:oy + vc.crop_size, ox:ox + vc.crop_size]
        x = x.to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()  # summed over the latent, averaged over the batch
        loss = l1 + vc.mse_weight * mse + vc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        running.append(l1.item())
        bar.update(1)
        if step % cfg.log_every == 0:
            history.append([step, round(watch.seconds(), 1), float(np.mean(running))])
            bar.set_postfix(l1=f"{np.mean(running):.4f}")
            log(f"vae step {step} l1 {np.mean(running):.4f} mse {mse.item():.5f} t {watch.seconds() / 60:.1f}min")
            running = []
        if watch.seconds() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = watch.seconds()
    bar.close()
    checkpoint()
    vae.eval()
    scale = measure_scaling_factor(vae, data, cfg)
    vae.register_to_config(scaling_factor=scale)
    log(f"vae: done at step {step} after {watch.seconds() / 60:.1f} min; scaling_factor {scale:.4f}")
    return vae


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, data: WorldData, cfg: DefaultModelConfig) -> float:
    """1 / std of posterior samples over the first `scaling_samples` training images (as SD did)."""
    device = next(vae.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    zs = []
    n = min(cfg.scaling_samples, len(data.images))
    for i in range(0, n, cfg.encode_batch_size):
        post = vae.encode(to_unit(data.images[i:i + cfg.encode_batch_size]).to(device)).latent_dist
        zs.append((post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)).cpu())
    return float(1.0 / torch.cat(zs).std())


@torch.no_grad()
def encode_posteriors(
    vae: AutoencoderKL, data: WorldData, cfg: DefaultModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (fp16, CPU), cached in work_dir."""
    cache = Path(cfg.work_dir) / "posteriors.safetensors"
    fp = f"{cfg.seed}-{len(data.images)}-{vae.config.scaling_factor:.6f}-{len(cfg.vae.block_out_channels)}"
    if cfg.train_kind_weights is not None:  # other scenes under the same indices
        fp += f"-kinds{list(cfg.train_kind_weights)}"
    stamp = Path(cfg.work_dir) / "posteriors.txt"
    if cache.exists() and stamp.exists() and stamp.read_text() == fp:
        t = load_file(str(cache))
        return t["mean"], t["std"]
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(data.images), cfg.encode_batch_size), desc="encode", mininterval=5):
        post = vae.encode(to_unit(data.images[i:i + cfg.encode_batch_size]).to(device)).latent_dist
        means.append(post.mean.half().cpu())
        stds.append(post.std.half().cpu())
    mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    save_file({"mean": mean, "std": std}, str(cache))
    (Path(cfg.work_dir) / "posteriors.txt").write_text(fp)
    return mean, std


# ----------------------------------------------------------------------------------------------- stage 4: UNet
def train_unet(
    cfg: DefaultModelConfig, data: WorldData, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
    log: Callable[[str], None] = print, init_from: Path | None = None,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Train (or resume) the text encoder and UNet jointly; returns their EMA copies. Without a checkpoint to
    resume, both start from the weights in `init_from` (diffusion.init_from, as init_pipeline_dir checked it) when
    given (fresh ones otherwise)."""
    device = torch.device(cfg.device)
    dc = cfg.diffusion
    ckpt_dir = Path(cfg.work_dir) / "unet_ckpt"
    torch.manual_seed(cfg.seed + 1)
    state = _load_state(ckpt_dir)
    init = init_from if state is None else None
    if init is not None:
        text_encoder, unet = load_text_and_unet(init, cfg.device)
        log(f"unet: starting from the text encoder and UNet in {init}")
    else:
        text_encoder, unet = build_text_encoder(cfg).to(device), build_unet(cfg).to(device)
    ema_text, ema_unet = build_text_encoder(cfg).to(device), build_unet(cfg).to(device)
    ema_text.load_state_dict(text_encoder.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    for p in [*ema_text.parameters(), *ema_unet.parameters()]:
        p.requires_grad_(False)
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=dc.lr, weight_decay=dc.weight_decay, betas=(0.9, 0.99))
    noise_sched = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER_CONFIG.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    step, already, history, anchor = 0, 0.0, [], NO_ANCHOR
    if state is not None:
        tensors, meta, optim = state
        text_encoder.load_state_dict(_unprefixed("text", tensors))
        unet.load_state_dict(_unprefixed("unet", tensors))
        ema_text.load_state_dict(_unprefixed("ema_text", tensors))
        ema_unet.load_state_dict(_unprefixed("ema_unet", tensors))
        opt.load_state_dict(optim)
        step, already, history = meta["step"], meta["seconds"], meta.get("history", [])
        anchor = resumed_anchor(meta, optim, dc.lr, dc.steps, dc.warmup_steps, "diffusion.steps", dc.max_minutes)
        log(f"unet: resumed at step {step} ({already / 60:.1f} min)")
    if 0 < dc.n_scenes < len(data.images):
        data = WorldData(data.images[:dc.n_scenes], data.examples[:dc.n_scenes])
    mean, std = encode_posteriors(vae, data, cfg)
    mean, std = mean.to(device), std.to(device)
    scale = float(vae.config.scaling_factor)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=dc.mixed_precision == "bf16" and device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2 + step)
    batches = caption_loader(CaptionBatches(data.examples, tokenizer, dc.batch_size, dc.caption_dropout, cfg.seed,
                                            step), cfg.data_workers, pin=device.type == "cuda")
    watch = Stopwatch(already)
    last_ckpt = last_sample = watch.seconds()
    limit = dc.max_minutes * 60 if dc.max_minutes > 0 else math.inf
    text_encoder.train()
    unet.train()
    bar = tqdm(total=dc.steps, initial=step, desc="unet", mininterval=5)
    running: list[float] = []

    def checkpoint() -> None:
        tensors = _prefixed("text", text_encoder) | _prefixed("unet", unet)
        tensors |= _prefixed("ema_text", ema_text) | _prefixed("ema_unet", ema_unet)
        _save_state(ckpt_dir, tensors, {"step": step, "seconds": watch.seconds(), "history": history,
                    "signature": stage_signature(dataclasses.asdict(cfg), "unet"), "lr_anchor": anchor,
                    "max_minutes": dc.max_minutes},
                    opt.state_dict())

    while step < dc.steps and watch.seconds() < limit:
        for g in opt.param_groups:
            g["lr"] = dc.lr * lr_factor(step, dc.steps, dc.warmup_steps, dc.final_lr_fraction,
                                        time_progress(watch.seconds(), limit, anchor), anchor)
        idx, ids = next(batches)
        ids = ids.to(device, non_blocking=True)
        idx_d = idx.to(device)
        eps_z = torch.randn(mean[idx_d].shape, generator=gen).to(device)
        z0 = (mean[idx_d].float() + std[idx_d].float() * eps_z) * scale
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        zt = noise_sched.add_noise(z0, noise, t)
        with autocast:
            cond = text_encoder(ids)[0]
            pred = unet(zt, t, cond).sample
        per = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(noise_sched, t, dc.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, dc.grad_clip)
        opt.step()
        # a model continued from trained weights keeps its EMA at full decay; a fresh one warms it up
        decay = dc.ema_decay if dc.init_from else min(dc.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        step += 1
        running.append(per.mean().item())
        bar.update(1)
        if step % cfg.log_every == 0:
            history.append([step, round(watch.seconds(), 1), float(np.mean(running))])
            bar.set_postfix(mse=f"{np.mean(running):.4f}")
            log(f"unet step {step} mse {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"t {watch.seconds() / 60:.1f}min")
            running = []
        if watch.seconds() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = watch.seconds()
        if cfg.sample_every_minutes > 0 and watch.seconds() - last_sample > cfg.sample_every_minutes * 60:
            pipe = build_pipeline(vae, ema_text, ema_unet, tokenizer)
            save_pipeline(pipe, Path(cfg.work_dir) / "latest_pipeline")
            sample_grid(pipe, Path(cfg.work_dir) / f"samples_step{step:06d}.png", device=cfg.device)
            last_sample = watch.seconds()
            text_encoder.train()
            unet.train()
    bar.close()
    checkpoint()
    log(f"unet: done at step {step} after {watch.seconds() / 60:.1f} min")
    return ema_text.eval(), ema_unet.eval()


# ----------------------------------------------------------------------------------------------- samples
GRID_PROMPTS = (
    "a red circle", "a large blue square", "a yellow star in the center", "a small green triangle at the top",
    "a purple heart on a white background", "an orange cross on the left", "a white star on a black background",
    "a big red triangle in the bottom right corner", "two blue circles", "three yellow hearts",
    "a red circle to the left of a blue square", "a green star above an orange heart",
    "a small white square in the top left corner", "a large purple circle on a gray background",
    "a blue plus sign at the bottom", "a yellow triangle to the right of a red star",
)


@torch.no_grad()
def sample_grid(pipe: StableDiffusionPipeline, out: str | Path, prompts: tuple[str, ...] = GRID_PROMPTS,
                seed: int = 0, steps: int = 30, guidance: float = 7.5, device: str = "cpu",
                scale: int = 2) -> Path:
    """Generate one image per prompt and write a captioned grid PNG (4 columns)."""
    from PIL import Image, ImageDraw

    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                  output_type="np").images
    size, cols = world.IMAGE_SIZE * scale, 4
    rows = math.ceil(len(prompts) / cols)
    cell_w, text_h = size + 96, 30
    canvas = Image.new("RGB", (cols * cell_w, rows * (size + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (prompt, img) in enumerate(zip(prompts, images, strict=True)):
        r, c = divmod(k, cols)
        tile = Image.fromarray((img * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
        x0, y0 = c * cell_w + 48, r * (size + text_h)
        canvas.paste(tile, (x0, y0))
        words, lines, line = prompt.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 34:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:2]):
            draw.text((c * cell_w + 4, y0 + size + 2 + 12 * j), text, fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


# ----------------------------------------------------------------------------------------------- entry point
def train_default_model(cfg: DefaultModelConfig, log: Callable[[str], None] = print) -> Path:
    """Run the configured stages and save the pipeline to cfg.output_dir; returns that folder."""
    validate_config(cfg)
    check_device(cfg.device)
    torch.set_num_threads(cfg.num_threads)
    if cfg.data_workers:  # the tokenizer is used in forked workers: keep its own thread pool out of them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    work = writable_dir(cfg.work_dir)
    if "unet" in cfg.stages:  # the pipeline's folder, written at the end: refused now, not after the training
        check_work_dir(Path(cfg.output_dir))
    init = init_pipeline_dir(cfg)  # a bad init_from fails here, before any rendering
    vae_dir = work / "vae_final"
    train_vae_stage = init is None and ("vae" in cfg.stages or not (vae_dir / "config.json").exists())
    for stage, runs in (("vae", train_vae_stage), ("unet", "unet" in cfg.stages)):
        if runs:
            check_resume(cfg, stage, log)  # before config.json records this run's settings
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1), encoding="utf-8")
    started = time.monotonic()
    data = render_training_data(cfg)
    log(f"rendered {len(data.images)} training scenes in {time.monotonic() - started:.1f}s")
    tokenizer = build_clip_tokenizer()
    if train_vae_stage:
        vae = train_vae(cfg, data, log)
        vae.save_pretrained(str(vae_dir), safe_serialization=True)
    else:
        vae_dir = vae_dir if init is None else init / "vae"
        vae = load_vae(vae_dir, cfg.device)
        log(f"vae: loaded from {vae_dir} (scaling_factor {vae.config.scaling_factor:.4f})")
    if "unet" not in cfg.stages:
        return vae_dir
    text_encoder, unet = train_unet(cfg, data, vae, tokenizer, log, init)
    pipe = build_pipeline(vae, text_encoder, unet, tokenizer).to("cpu")
    out = save_pipeline(pipe, cfg.output_dir)
    meta = {"seconds_total": round(time.monotonic() - started, 1), "device": cfg.device,
            "megabytes": round(pipeline_megabytes(out), 2)}
    (work / "result.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    log(f"saved pipeline to {out} ({meta['megabytes']} MB)")
    if cfg.sample_every_minutes > 0:
        sample_grid(pipe, work / "samples_final.png")
    return out
