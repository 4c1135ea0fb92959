"""The names and limits that settings are checked against, in one torch-free module: the command lines and config
objects (edge server, device) check their input with these before anything imports torch, and the modules that
implement them (sampler, codec, adapters, unet_buckets) take their names from here."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"  # the shipped default model
MODEL_CONFIG_HELP = ("with a single-file --model: a folder with its component configs (unet/, vae/ and "
                     "text_encoder/config.json; scheduler/ and tokenizer/ optional), e.g. a diffusers pipeline "
                     "folder of the same architecture; default: SD v1.5's")
SCHEDULER_NAMES: tuple[str, ...] = ("ddim", "dpmpp", "euler")  # sage_core.sampler.SCHEDULERS, in this order
MAX_STEPS = 1000  # sampler steps a request or run may ask for
MAX_PROMPT_CHARS = 1000  # characters of a prompt (or negative prompt) a local run or device may give
SHARED_CONDITIONS: tuple[str, ...] = ("mean", "medoid")  # what a group's shared steps are conditioned on


def unet_samples_per_step(guidance: float) -> int:
    """UNet samples one trajectory step costs at a guidance scale: 2 with classifier-free guidance (guidance > 1,
    diffusers' rule), else 1."""
    return 2 if guidance > 1.0 else 1


LOSSLESS_MODES: tuple[str, ...] = ("fp32", "fp16", "bf16")  # latent codec modes (sage_core.codec)
LOSSY_MODES: tuple[str, ...] = ("int8", "int6", "int5", "int4", "fp8")
CODEC_MODES: tuple[str, ...] = LOSSLESS_MODES + LOSSY_MODES

ADAPTER_AUTO = "auto"  # the model's shipped SAGE adapter, if it has one (sage_core.adapters)
ADAPTER_NONE = "none"
# What devices and the server apply unless told otherwise. "none": on the shipped default model the shipped SAGE
# adapter lowers prompt fidelity (position 97 % -> 62 % with independent sampling, 62 % -> 31 % with shared
# sampling; docs/results/sage_training/README.md), so it is opt-in (`--adapter auto` or a folder).
DEFAULT_ADAPTER_CHOICE = ADAPTER_NONE

# the shared-phase UNet's options (sage_core.unet_buckets)
COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "flash", "cudnn", "efficient", "math")  # "auto": PyTorch's choice
QUANTIZE_MODES: tuple[str, ...] = ("none", "fp8", "fp8-rowwise", "fp8-static", "fp8-static-geglu", "fp8-static-conv")
TUNING_LEVEL_NAMES: tuple[str, ...] = ("none", "light", "full")  # unet_buckets.TUNING_LEVELS' keys
