"""Model loading: Stable-Diffusion-family diffusers pipelines, the CLIP tokenizer, tiny test pipelines.

Any folder in the SD v1.5 layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) is a
model. Weights must be safetensors: pickle checkpoints can execute code when loaded and are refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
CLIP_BOS, CLIP_EOS, CLIP_VOCAB_SIZE = 49406, 49407, 49408


class ModelError(ValueError):
    """A model folder or id that cannot be loaded; the message says why."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write vocab.json and merges.txt of OpenAI CLIP's tokenizer, built from open_clip's shipped BPE file."""
    import open_clip.tokenizer as oct

    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as fh:
        merges = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out_dir


def build_clip_tokenizer(cache_dir: Path | None = None) -> CLIPTokenizer:
    """A real CLIP tokenizer (same ids as SD v1.5's), built offline from open_clip's BPE vocabulary."""
    cache_dir = cache_dir or Path.home() / ".cache" / "sage-edge" / "clip-tokenizer"
    if not (cache_dir / "vocab.json").exists() or not (cache_dir / "merges.txt").exists():
        write_clip_tokenizer_files(cache_dir)
    return CLIPTokenizer.from_pretrained(str(cache_dir), model_max_length=77, pad_token="<|endoftext|>")


def _component_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def check_pipeline_folder(path: Path) -> None:
    """Raise ModelError unless `path` is a diffusers SD pipeline folder with safetensors weights."""
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ModelError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    missing = [c for c in REQUIRED_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelError(f"{path} is not a Stable Diffusion pipeline folder: missing {', '.join(missing)}/")
    for comp in WEIGHT_COMPONENTS:
        files = _component_files(path / comp)
        if not any(f.name.endswith(".safetensors") for f in files):
            pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ModelError(
                    f"{path / comp} holds only pickle weights ({', '.join(pickles)}): refused, safetensors only "
                    "(convert them with diffusers' save_pretrained(safe_serialization=True))"
                )
            raise ModelError(f"{path / comp} has no .safetensors weights")


def folder_fingerprint(path: Path) -> str:
    """SHA-256 over the configs and weights of a pipeline folder (content, not timestamps), first 16 digits."""
    return folder_sha256(path)[:16]


def verify_pin(path: str | Path, expected_sha256: str) -> None:
    """Raise ModelError unless the folder's full `folder_sha256` equals `expected_sha256` (a deployment's pin)."""
    actual = folder_sha256(Path(path))
    if actual != expected_sha256.strip().lower():
        raise ModelError(
            f"model folder {path} does not match its SHA-256 pin: expected {expected_sha256}, found {actual} "
            "(the files changed or the pin is for another model); refusing to load it"
        )


def folder_sha256(path: Path) -> str:
    """Full SHA-256 (64 hex digits) over the configs and weights of a pipeline folder, file by file in sorted
    order (relative path, NUL, content); pickle files are skipped (never loaded). A model's SHA-256 pin."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.split("/")[0] not in REQUIRED_COMPONENTS and rel != "model_index.json":
            continue
        if f.suffix in PICKLE_SUFFIXES:
            continue
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def state_fingerprint(pipe: StableDiffusionPipeline) -> str:
    """SHA-256 over the weights (as float32) and scheduler config of an in-memory pipeline."""
    h = hashlib.sha256()
    for name in WEIGHT_COMPONENTS:
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    # skip diffusers' private keys: "_use_default_values" is a set turned list, ordered by the process's hash seed
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_fingerprint(pipe: StableDiffusionPipeline) -> str:
    """The model's identity: server and device must agree on it before a latent is shared."""
    fp = getattr(pipe, "_sage_fingerprint", None)
    if fp is None:
        fp = state_fingerprint(pipe)
        pipe._sage_fingerprint = fp
    return fp


def load_pipeline(
    path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
) -> StableDiffusionPipeline:
    """Load a Stable-Diffusion-family pipeline: a local folder (default: the shipped model) or, when
    `allow_download` is set and the network allows it, a hub id. Safetensors only."""
    local = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if path is not None and not local.exists() and allow_download and "/" in str(path):
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, safety_checker=None, requires_safety_checker=False
        )
        pipe._sage_fingerprint = state_fingerprint(pipe)
        return pipe.to(device)
    if path is None and not local.exists():
        raise ModelError(f"the shipped default model is missing at {local}: reinstall the project or pass --model")
    check_pipeline_folder(local)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"could not load the pipeline in {local}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    pipe._sage_fingerprint = folder_fingerprint(local)
    return pipe.to(device)


def assemble_pipeline(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    """An SD pipeline of these components in eval mode with SD v1.5's DDIM scheduler, no safety checker."""
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(
    seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32, tokenizer_dir: Path | None = None
) -> StableDiffusionPipeline:
    """A tiny random SD pipeline of the real component classes and the real CLIP tokenizer, for tests."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=CLIP_BOS,
            eos_token_id=CLIP_EOS,
            pad_token_id=CLIP_EOS,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=77,
        )
    )
    return assemble_pipeline(unet, vae, text_encoder, build_clip_tokenizer(tokenizer_dir))


SD15_UNET = {  # Stable Diffusion v1.5's UNet2DConditionModel settings (the others are diffusers' defaults)
    "sample_size": 64,
    "cross_attention_dim": 768,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
}
SD15_VAE = {  # Stable Diffusion v1.5's AutoencoderKL settings (the others, scaling factor 0.18215 included: defaults)
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SD15_TEXT_ENCODER = {  # CLIPTextConfig of SD v1.5's text encoder, OpenAI CLIP ViT-L/14's
    "bos_token_id": CLIP_BOS,
    "eos_token_id": CLIP_EOS,
    "pad_token_id": CLIP_EOS,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB_SIZE,
    "max_position_embeddings": 77,
}


def sd15_architecture_pipeline(
    dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu", seed: int = 0
) -> StableDiffusionPipeline:
    """Stable Diffusion v1.5's architectures (UNet 859.5 M parameters, cross-attention 768, 64x64 latents;
    AutoencoderKL; CLIP ViT-L/14 text encoder) with random weights: speed does not depend on weight values,
    so this times SD-1.5-scale serving where no weights can be downloaded."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER))
    return assemble_pipeline(unet, vae, text_encoder, build_clip_tokenizer()).to(device=device, dtype=dtype)
