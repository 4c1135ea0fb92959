"""SAGE LoRA adapters at inference: find, check and apply a diffusers-format LoRA folder (device and server).

`check_adapter(unet, dir)` / `load_adapter(pipe, dir)`: before touching the pipeline, every LoRA matrix must name
a Linear/Conv module of this UNet with matching in/out features; otherwise `AdapterMismatchError` says which
module and which shapes (an adapter for another base model), instead of diffusers' long state-dict dump.
`resolve_adapter(choice, fingerprint)`: "none", a folder, or "auto" = the shipped adapter
(sage_core/assets/sage_adapter) when it was trained on the model with that fingerprint. training.lora writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from sage_core.models import DEFAULT_MODEL_DIR, ModelError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
INFO_FILE = "sage_adapter.json"
DEFAULT_ADAPTER_DIR = DEFAULT_MODEL_DIR.parent / "sage_adapter"
ADAPTER_AUTO = "auto"
ADAPTER_NONE = "none"
# What devices and the server apply unless told otherwise. "none": on the shipped default model the shipped SAGE
# adapter lowers prompt fidelity (position 97 % -> 62 % with independent sampling, 62 % -> 31 % with shared
# sampling; docs/results/sage_training/README.md), so it is opt-in (`--adapter auto` or a folder).
DEFAULT_ADAPTER_CHOICE = ADAPTER_NONE


class AdapterMismatchError(ModelError):
    """A LoRA folder that does not fit this base model (missing modules or other shapes), or is unreadable."""


def adapter_base_fingerprint(folder: str | Path) -> str | None:
    """The base-model fingerprint recorded in the folder's sage_adapter.json (None when it records none)."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("base_model_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_adapter(choice: str, fingerprint: str, shipped: Path = DEFAULT_ADAPTER_DIR) -> Path | None:
    """ "none": None; "auto": the shipped adapter if it was trained on the model of `fingerprint`, else None;
    otherwise a folder that must exist."""
    if choice == ADAPTER_NONE:
        return None
    if choice == ADAPTER_AUTO:
        return shipped if shipped.is_dir() and adapter_base_fingerprint(shipped) == fingerprint else None
    path = Path(choice)
    if not path.is_dir():
        raise ModelError(f"adapter folder {path} does not exist")
    return path


def _module_shapes(unet) -> dict[str, tuple[int, int]]:
    """(in, out) features of every Linear and Conv2d of the UNet, by module name (base layers of a peft-wrapped
    module under their plain name)."""
    shapes = {}
    for name, mod in unet.named_modules():
        name = name.replace(".base_layer", "")
        if isinstance(mod, torch.nn.Linear):
            shapes[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            shapes[name] = (mod.in_channels, mod.out_channels)
    return shapes


def read_adapter_shapes(folder: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module name -> {'down': shape, 'up': shape} from a diffusers LoRA file (unet keys only)."""
    path = Path(folder) / ADAPTER_FILE
    if not Path(folder).is_dir():
        raise AdapterMismatchError(f"LoRA folder {folder} does not exist")
    if not path.is_file():
        raise AdapterMismatchError(f"{folder} has no {ADAPTER_FILE} (not a diffusers LoRA folder)")
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if not key.startswith("unet.") or ".lora." not in key:
                    continue
                module, rest = key[len("unet."):].split(".lora.", 1)
                out.setdefault(module, {})[rest.split(".")[0]] = tuple(fh.get_slice(key).get_shape())
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises SafetensorError (a ValueError/OSError)
        raise AdapterMismatchError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not out:
        raise AdapterMismatchError(f"{path} holds no UNet LoRA weights (keys 'unet.<module>.lora.down.weight')")
    return out


def check_adapter(unet, folder: str | Path) -> int:
    """Raise AdapterMismatchError unless every LoRA matrix in `folder` fits a module of `unet`; returns the
    number of adapted modules."""
    shapes = _module_shapes(unet)
    problems = []
    adapter = read_adapter_shapes(folder)
    for module, parts in sorted(adapter.items()):
        if module not in shapes:
            problems.append(f"{module}: no such layer in this UNet")
            continue
        fan_in, fan_out = shapes[module]
        down, up = parts.get("down"), parts.get("up")
        if down is None or up is None:
            problems.append(f"{module}: needs both lora.down and lora.up")
        elif down[1] != fan_in or up[0] != fan_out:
            problems.append(f"{module}: adapter maps {down[1]} -> {up[0]} features, the model's layer {fan_in} -> "
                            f"{fan_out}")
    if problems:
        raise AdapterMismatchError(
            f"the LoRA in {folder} was made for another base model ({len(problems)} of {len(adapter)} layers do not "
            f"fit): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        )
    return len(adapter)


def load_adapter(pipe, folder: str | Path, adapter_name: str = "sage") -> int:
    """Check the adapter against the pipeline's UNet, then `pipe.load_lora_weights(folder)` (safetensors, local
    files only); returns the number of adapted modules."""
    n = check_adapter(pipe.unet, folder)
    try:
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AdapterMismatchError(f"could not load the adapter in {folder}: {exc}") from exc
    return n
