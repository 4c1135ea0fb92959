"""LoRA on the UNet with peft, saved and loaded in diffusers' LoRA format.

- `add_lora(unet, cfg)`: peft LoraConfig injected through diffusers' `unet.add_adapter` (rank, alpha, target
  modules from `LoraSettings`); only the LoRA parameters train.
- `save_adapter(unet, dir, ...)`: `get_peft_model_state_dict` -> `StableDiffusionPipeline.save_lora_weights`,
  i.e. `dir/pytorch_lora_weights.safetensors` with every key in peft's convention,
  `unet.<module>.lora_A.weight` / `.lora_B.weight` (what current diffusers writes and loads as is), the LoraConfig
  in the safetensors metadata (so alpha survives), plus `sage_adapter.json` (base model fingerprint, settings, how
  it was trained). `pipe.load_lora_weights(dir)` loads every layer. (diffusers' `convert_state_dict_to_diffusers`
  is not used: it renames only the attention projections to `.lora.down/.lora.up`, and the loader, which picks the
  convention from the first key, then drops one of the two kinds.)
- `check_adapter(unet, dir)` / `load_adapter(pipe, dir)` live in sage_core.adapters (the device client and the
  edge server load adapters too) and are re-exported here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sage_core.adapters import (  # noqa: F401  (re-exported: training code and tests import them from here)
    ADAPTER_FILE,
    INFO_FILE,
    AdapterMismatchError,
    check_adapter,
    load_adapter,
    read_adapter_shapes,
)
from sage_core.config_types import check_fields

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters. Targets are module-name suffixes inside the UNet: the attention projections by
    default (as diffusers' text-to-image LoRA script); add e.g. "proj_in", "proj_out", "ff.net.2" for more."""

    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    init_seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def lora_config(settings: LoraSettings):
    """The peft LoraConfig of the settings (gaussian A, zero B: the adapter starts as the identity)."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian",
        target_modules=list(settings.target_modules),
    )


def add_lora(unet, settings: LoraSettings) -> list[torch.nn.Parameter]:
    """Freeze the UNet, inject a LoRA adapter, return its trainable parameters (kept in float32)."""
    unet.requires_grad_(False)
    torch.manual_seed(settings.init_seed)
    try:
        unet.add_adapter(lora_config(settings))
    except ValueError as exc:
        raise ValueError(f"cannot add LoRA with targets {settings.target_modules}: {exc}") from exc
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (for checkpoints)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def set_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Load tensors saved by `lora_state_dict` back into an adapter of the same settings."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise AdapterMismatchError(f"checkpoint has LoRA tensors this adapter lacks: {unexpected[:3]}")


def _new_file_mode(folder: Path) -> int:
    """Permission bits a file created in `folder` gets under the process's umask (read without changing it)."""
    probe = folder / f".mode-probe-{os.getpid()}"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def save_adapter(
    unet, out_dir: str | Path, settings: LoraSettings, info: dict[str, Any] | None = None, dtype=torch.float16
) -> Path:
    """Write the adapter in diffusers' LoRA format, peft key names (+ sage_adapter.json); returns the folder."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=state, safe_serialization=True,
        unet_lora_adapter_metadata=lora_config(settings).to_dict(),
    )
    os.chmod(out / ADAPTER_FILE, _new_file_mode(out))  # safetensors writes 0600; give it the umask's mode
    meta = {"format": "diffusers-lora", "weights": ADAPTER_FILE, "lora": asdict(settings)} | (info or {})
    (out / INFO_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return out
