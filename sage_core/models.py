"""Model loading: Stable-Diffusion-family diffusers pipelines, the CLIP tokenizer, tiny test pipelines.

Any folder in the SD v1.5 layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) is a
model, and so is a Stable Diffusion v1.x single-file checkpoint in the original (LDM/CompVis) layout, e.g.
v1-5-pruned-emaonly.safetensors: its weights are converted by diffusers' own converters into components built from
SD v1.5's configs (or the configs of a folder the caller names). Weights must be safetensors: pickle checkpoints can
execute code when loaded and are refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sage_core.names import DEFAULT_MODEL_DIR
from sage_core.outputs import write_text_atomic

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MODEL_FILE_SUFFIX = ".safetensors"  # a single-file checkpoint (original LDM/CompVis layout)
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
CLIP_MERGES = 49152 - 256 - 2  # BPE merges CLIP keeps: 2 x 256 byte tokens + merges + 2 specials = its vocabulary


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
        merges = fh.read().split("\n")[1 : 1 + CLIP_MERGES]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # each file whole or not at all: a run killed mid-write must not leave a cut BPE that later runs read
    write_text_atomic(out_dir / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}))
    write_text_atomic(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


def clip_tokenizer_files_complete(folder: Path) -> bool:
    """Whether `folder` holds CLIP's whole vocab.json (49408 tokens) and merges.txt (its 48894 merges)."""
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):  # missing, unreadable, cut JSON or text
        return False
    return isinstance(vocab, dict) and len(vocab) == CLIP_VOCAB_SIZE and len(merges) == 1 + CLIP_MERGES


def build_clip_tokenizer(cache_dir: Path | None = None) -> CLIPTokenizer:
    """A real CLIP tokenizer (same ids as SD v1.5's), built offline from open_clip's BPE vocabulary; the cached
    files are written again when missing or incomplete."""
    cache_dir = cache_dir or Path.home() / ".cache" / "sage-edge" / "clip-tokenizer"
    if not clip_tokenizer_files_complete(cache_dir):
        write_clip_tokenizer_files(cache_dir)
    return CLIPTokenizer.from_pretrained(str(cache_dir), model_max_length=77, pad_token="<|endoftext|>")


def _component_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def is_single_file(path: Path) -> bool:
    """Whether `path` names a single-file checkpoint: a file, or a missing path with a weights-file suffix."""
    return path.is_file() or (not path.exists() and path.suffix.lower() in (MODEL_FILE_SUFFIX, *PICKLE_SUFFIXES))


def check_pipeline_folder(path: Path, config: str | Path | None = None) -> None:
    """Raise ModelError unless `path` is a diffusers SD pipeline folder with safetensors weights, or a Stable Diffusion
    v1.x single-file .safetensors checkpoint that fits SD v1.5's configs or those in the folder `config`
    (`check_single_file`)."""
    path = Path(path)
    if is_single_file(path):
        check_single_file(path, config)
        return
    if config is not None:
        raise config_needs_file(path)
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


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message on one line, cut to `limit` characters (else its type name): the reason in a
    one-line error about a user's file."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_needs_file(path: Path) -> ModelError:
    """The error for a config folder given with a model that is no single-file checkpoint."""
    return ModelError(f"a config folder (--model-config) is for a single-file checkpoint; {path} is not a file")


def folder_fingerprint(path: Path) -> str:
    """SHA-256 over the configs and weights of a pipeline folder (content, not timestamps), first 16 digits."""
    return folder_sha256(path)[:16]


def verify_pin(path: str | Path, expected_sha256: str) -> None:
    """Raise ModelError unless the model's full `folder_sha256` (a single file: the SHA-256 of its bytes) equals
    `expected_sha256` (a deployment's pin)."""
    path = Path(path)
    actual = folder_sha256(path)
    if actual != expected_sha256.strip().lower():
        kind = "model file" if path.is_file() else "model folder"
        raise ModelError(
            f"{kind} {path} does not match its SHA-256 pin: expected {expected_sha256}, found {actual} "
            "(the files changed or the pin is for another model); refusing to load it"
        )


def folder_sha256(path: Path) -> str:
    """Full SHA-256 (64 hex digits) over the configs and weights of a pipeline folder, file by file in sorted
    order (relative path, NUL, content); pickle files are skipped (never loaded). A model's SHA-256 pin. For a
    single-file checkpoint it is the SHA-256 of the file's bytes (what `sha256sum FILE` prints)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
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


def file_sha256(path: Path) -> str:
    """SHA-256 (64 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
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
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable-Diffusion-family pipeline: a local folder (default: the shipped model), a Stable Diffusion v1.x
    single-file .safetensors checkpoint (`load_single_file`; `config` names a folder with the component configs to
    load it into, default SD v1.5's) or, when `allow_download` is set and the network allows it, a hub id.
    Safetensors only."""
    local = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if path is not None and is_single_file(local):
        return load_single_file(local, dtype=dtype, device=device, config=config)
    if config is not None:
        raise config_needs_file(local)
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


# ------------------------------------------------------------------------------------------ single-file checkpoints

LDM_PREFIXES = {  # where an SD v1.x single file keeps each component's weights
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
LDM_PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}
LDM_SCHEDULE_BUFFERS = frozenset(  # LatentDiffusion's noise-schedule buffers: not weights (betas is checked)
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
LDM_EMA_PREFIX = "model_ema."  # the UNet's EMA copy (flattened names) or its counters: not loaded (load_single_file)
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",  # optional: SD v1.5's DDIM settings otherwise
}


@dataclass(frozen=True)
class SingleFileConfig:
    """The component configs a single-file checkpoint is loaded into, and where they came from."""

    unet: dict
    vae: dict
    text_encoder: CLIPTextConfig
    scheduler: dict
    tokenizer_dir: Path | None  # None: build_clip_tokenizer's (SD v1.5's token ids)
    source: str  # "SD v1.5's configs" or "the configs in DIR", for messages
    digest: str | None = None  # SHA-256 over the config files read; None: the built-in SD v1.5 configs


def sd15_single_file_config() -> SingleFileConfig:
    """SD v1.5's component configs (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER, SD15_SCHEDULER_CONFIG), the default."""
    return SingleFileConfig(
        unet=dict(SD15_UNET),
        vae=dict(SD15_VAE),
        text_encoder=CLIPTextConfig(**SD15_TEXT_ENCODER),
        scheduler=dict(SD15_SCHEDULER_CONFIG),
        tokenizer_dir=None,
        source="SD v1.5's configs",
    )


def read_single_file_config(folder: str | Path) -> SingleFileConfig:
    """The component configs in `folder`: a diffusers SD pipeline folder, or one holding only its config files
    (unet/config.json, vae/config.json, text_encoder/config.json; scheduler/scheduler_config.json and tokenizer/
    are optional, SD v1.5's DDIM settings and the CLIP tokenizer otherwise). Weights there are never read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"config folder {folder} does not exist or is not a folder")
    configs: dict[str, dict] = {}
    read: list[Path] = []
    for name, rel in CONFIG_FILES.items():
        file = folder / rel
        if not file.is_file():
            if name == "scheduler":
                continue
            raise ModelError(f"config folder {folder} has no {rel}")
        try:
            configs[name] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{file} is not a readable JSON config: {exc}") from exc
        if not isinstance(configs[name], dict):
            raise ModelError(f"{file} is not a JSON object")
        read.append(file)
    try:  # a wrong value type raises huggingface_hub's StrictDataclassFieldValidationError, a plain Exception
        text_encoder = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the user's file, whatever is wrong in it: one line
        raise ModelError(f"could not read {folder / CONFIG_FILES['text_encoder']}: {_one_line(exc)}") from exc
    scheduler = configs.get("scheduler", dict(SD15_SCHEDULER_CONFIG))
    try:  # checked here, where a server's start and a device's check read the folder, not first at loading
        DDIMScheduler.from_config(scheduler)
    except Exception as exc:  # noqa: BLE001 - e.g. a TypeError for a string where a number belongs
        raise ModelError(f"{folder / CONFIG_FILES['scheduler']} does not make a DDIM scheduler: {_one_line(exc)}") \
            from exc
    tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    if tokenizer_dir is not None:
        read += sorted(p for p in tokenizer_dir.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for file in read:
        h.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes())
    return SingleFileConfig(
        unet=configs["unet"],
        vae=configs["vae"],
        text_encoder=text_encoder,
        scheduler=scheduler,
        tokenizer_dir=tokenizer_dir,
        source=f"the configs in {folder}",
        digest=h.hexdigest(),
    )


def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no weights read); ModelError for an unreadable file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file (truncated or garbled?): {exc}") from exc


def _not_sd1(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What the checkpoint is when it is not an SD v1.x one (UNet, VAE and CLIP text encoder in the LDM layout),
    else None. diffusers' `infer_diffusers_model_type` names the other families; it calls anything it does not
    know "v1", so the v1 parts are checked here."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not shapes:
        return "it holds no tensors"
    try:
        kind = infer_diffusers_model_type({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
    except (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError):
        kind = None  # a partial file that trips one of diffusers' guesses: the checks below name it
    if kind in ("v2", "inpainting_v2") or any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "it is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cross-attention 1024)"
    if kind is not None and kind.startswith("xl"):
        return f"it is a Stable Diffusion XL checkpoint ({kind})"
    if kind == "inpainting":
        return "it is an SD v1.x inpainting checkpoint (a 9-channel UNet input), not a text-to-image one"
    if kind not in (None, "v1"):
        return f"diffusers takes it for a {kind!r} checkpoint"
    present = {name for name, prefix in LDM_PREFIXES.items() if any(k.startswith(prefix) for k in shapes)}
    absent = [f"{LDM_PART_NAMES[name]} ({prefix}*)" for name, prefix in LDM_PREFIXES.items() if name not in present]
    if not absent:
        return None
    if any("lora" in key.lower() for key in shapes):
        return f"it looks like a LoRA file ({len(shapes)} tensors, no full model)"
    return f"it has no {', no '.join(absent)} weights ({len(shapes)} tensors, e.g. {', '.join(sorted(shapes)[:3])})"


def _empty_components(cfg: SingleFileConfig) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder built from `cfg` with empty (meta) parameters: nothing allocated."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():  # parameters on the meta device, buffers (CLIP's position ids) real
            return {
                "unet": UNet2DConditionModel.from_config(cfg.unet),
                "vae": AutoencoderKL.from_config(cfg.vae),
                "text_encoder": CLIPTextModel(cfg.text_encoder),
            }
    except Exception as exc:  # noqa: BLE001 - the user's config files, whatever is wrong in them: one line
        raise ModelError(f"{cfg.source} do not make a Stable Diffusion pipeline: {_one_line(exc)}") from exc


def _convert_ldm(
    checkpoint: dict[str, torch.Tensor], components: dict[str, torch.nn.Module], path: Path, account: bool
) -> dict[str, dict[str, torch.Tensor]]:
    """The diffusers state dict of each component, by diffusers' own LDM converters. ModelError for a tensor that
    belongs to no component; with `account`, also for one the converters left unused (identity of the tensors, so
    run it on fresh tensors: the meta ones of the header)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    prefixes = tuple(LDM_PREFIXES.values())
    stray = sorted(
        k for k in checkpoint
        if not k.startswith(prefixes) and k not in LDM_SCHEDULE_BUFFERS and not k.startswith(LDM_EMA_PREFIX)
    )  # fmt: skip
    if stray:
        raise ModelError(
            f"{path} holds {len(stray)} tensors that are no part of an SD v1.x checkpoint's UNet, VAE or text encoder "
            f"(e.g. {', '.join(stray[:3])}): refused rather than loaded in part"
        )
    parts = {name: {k: v for k, v in checkpoint.items() if k.startswith(p)} for name, p in LDM_PREFIXES.items()}
    for key in [k for k in parts["text_encoder"] if k.endswith("embeddings.position_ids")]:
        del parts["text_encoder"][key]  # the buffer 0..76, not a weight: transformers makes its own
    try:
        converted = {
            # the UNet's own weights, not a model_ema.* copy: diffusers' default (extract_ema=False)
            "unet": convert_ldm_unet_checkpoint(parts["unet"], dict(components["unet"].config)),
            "vae": convert_ldm_vae_checkpoint(parts["vae"], dict(components["vae"].config)),
            "text_encoder": convert_ldm_clip_checkpoint(parts["text_encoder"]),
        }
    except (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: diffusers could not convert its weights ({type(exc).__name__}: {exc})") from exc
    wrapped = hasattr(components["text_encoder"], "text_model")  # transformers >= 5.6 flattened CLIPTextModel
    converted["text_encoder"] = {
        ("text_model." if wrapped else "") + k.removeprefix("text_model."): v
        for k, v in converted["text_encoder"].items()
    }
    if account:
        for name, source in parts.items():
            used = {id(t) for t in converted[name].values()}
            used |= {id(t._base) for t in converted[name].values() if t._base is not None}  # reshaped VAE attention
            unused = sorted(k for k, t in source.items() if id(t) not in used)
            if unused:
                raise ModelError(
                    f"{path}: diffusers' conversion left {len(unused)} {LDM_PART_NAMES[name]} tensors unused "
                    f"(e.g. {', '.join(unused[:3])}): refused rather than loaded in part"
                )
    return converted


def _check_fit(path: Path, name: str, state: dict[str, torch.Tensor], model: torch.nn.Module, cfg: SingleFileConfig):
    """ModelError unless the converted `state` has exactly the model's tensors, with its shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(state[k].shape)} where {expected[k]} is expected"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:2])})")
    if extra:
        problems.append(f"{len(extra)} tensors without a place (e.g. {', '.join(extra[:2])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
    if problems:
        hint = " (give its own configs with --model-config)" if cfg.digest is None else ""
        raise ModelError(f"{path}: its {LDM_PART_NAMES[name]} does not fit {cfg.source}{hint}: {'; '.join(problems)}")


def _plan_single_file(path: Path, cfg: SingleFileConfig) -> dict[str, torch.nn.Module]:
    """ModelError unless `path` is a readable SD v1.x .safetensors checkpoint whose every weight converts onto the
    components of `cfg` with their shapes; returns those components, still empty. Reads the file's header only."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path} is a pickle checkpoint ({path.suffix}): refused, safetensors only (loading a pickle can execute "
            "code; convert it to .safetensors)"
        )
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if suffix != MODEL_FILE_SUFFIX:
        raise ModelError(
            f"{path} is a file but not a .safetensors checkpoint: a model is a diffusers pipeline folder or a "
            "Stable Diffusion v1.x .safetensors file"
        )
    shapes = _read_header(path)
    found = _not_sd1(shapes)
    if found is not None:
        raise ModelError(f"{path} is not a Stable Diffusion v1.x checkpoint: {found}")
    components = _empty_components(cfg)
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    converted = _convert_ldm(meta, components, path, account=True)
    for name, model in components.items():
        _check_fit(path, name, converted[name], model, cfg)
    return components


def _single_file_config(config: str | Path | None) -> SingleFileConfig:
    return sd15_single_file_config() if config is None else read_single_file_config(config)


def check_single_file(path: str | Path, config: str | Path | None = None) -> None:
    """Raise ModelError unless `path` is a Stable Diffusion v1.x single-file .safetensors checkpoint (original
    LDM layout) whose every tensor converts onto the components of `config` (a folder, `read_single_file_config`;
    default SD v1.5's) with their shapes. Reads the header only: fast at any size."""
    _plan_single_file(Path(path), _single_file_config(config))


def load_single_file(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """A pipeline from a Stable Diffusion v1.x single-file .safetensors checkpoint in the original LDM/CompVis layout
    (e.g. v1-5-pruned-emaonly.safetensors), offline: components built from `config` (a folder with their configs,
    `read_single_file_config`; default SD v1.5's), weights converted by diffusers' own converters and loaded
    strictly. A tensor not used or a weight not found is a ModelError, never a partial load. Not loaded: the noise
    schedule buffers (the file's betas must match the scheduler's), CLIP's position ids, and a model_ema.* copy of
    the UNet: as diffusers' from_single_file does by default, the UNet's own weights are taken (in an "emaonly"
    file those are the EMA weights). The fingerprint is the file's SHA-256 (first 16 digits), combined with the
    config files' when `config` is given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = _single_file_config(config)
    components = _plan_single_file(path, cfg)
    try:
        tensors = load_file(str(path))
        scheduler = DDIMScheduler.from_config(cfg.scheduler)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"could not read the weights in {path}: {exc}") from exc
    betas = tensors.get("betas")
    # stored in the file's precision: bfloat16 rounds SD v1.5's betas by up to 0.4 %; another schedule differs by more
    rtol = max(1e-3, 2 * torch.finfo(betas.dtype).eps) if betas is not None and betas.is_floating_point() else 1e-3
    if betas is not None and (
        tuple(betas.shape) != tuple(scheduler.betas.shape)
        or not torch.allclose(betas.double(), scheduler.betas.double(), rtol=rtol, atol=1e-8)
    ):
        raise ModelError(
            f"{path} was trained with another noise schedule than {cfg.source} give (its betas differ): "
            "refusing to sample it with the wrong one"
        )
    converted = _convert_ldm(tensors, components, path, account=False)
    del tensors
    for name, model in components.items():
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.pop(name).items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # _plan_single_file checked keys and shapes: not expected
            raise ModelError(f"{path}: could not load its {LDM_PART_NAMES[name]}: {exc}") from exc
    try:
        tokenizer = (
            build_clip_tokenizer()
            if cfg.tokenizer_dir is None
            else CLIPTokenizer.from_pretrained(str(cfg.tokenizer_dir), local_files_only=True)
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the tokenizer in {cfg.tokenizer_dir}: {exc}") from exc
    pipe = assemble_pipeline(
        components["unet"], components["vae"], components["text_encoder"], tokenizer, scheduler=scheduler
    )
    pipe._sage_fingerprint = single_file_fingerprint(path, cfg)
    return pipe.to(device)  # already in `dtype`: diffusers warns about any .to(dtype=...)


def single_file_fingerprint(path: Path, cfg: SingleFileConfig | None = None) -> str:
    """The model fingerprint of a single-file checkpoint: the first 16 digits of its SHA-256 (its pin), or, loaded
    with a config folder, of the SHA-256 over that and the config files' digest."""
    digest = file_sha256(path)
    if cfg is None or cfg.digest is None:
        return digest[:16]
    return hashlib.sha256(f"{digest}\0{cfg.digest}".encode()).hexdigest()[:16]


def files_fingerprint(path: Path, config: str | Path | None = None) -> str:
    """The fingerprint `load_pipeline(path, config=config)` gives a pipeline folder or single file, from its files
    alone (nothing is loaded): a ModelError for a config folder that cannot be read."""
    if config is not None and is_single_file(path):
        return single_file_fingerprint(path, read_single_file_config(config))
    return folder_fingerprint(path)


def assemble_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler | None = None,
) -> StableDiffusionPipeline:
    """An SD pipeline of these components in eval mode with `scheduler` (default: SD v1.5's DDIM scheduler), no
    safety checker."""
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler if scheduler is not None else DDIMScheduler(**SD15_SCHEDULER_CONFIG),
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
