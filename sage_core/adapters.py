"""SAGE LoRA adapters at inference: find, check and apply a diffusers-format LoRA folder (device and server).

`check_adapter(unet, dir)` / `load_adapter(pipe, dir)`: before touching the pipeline, every LoRA matrix must name
a Linear/Conv module of this UNet with matching in/out features; otherwise `AdapterMismatchError` says which
module and which shapes (an adapter for another base model), instead of diffusers' long state-dict dump.
`resolve_adapter(choice, fingerprint)`: "none", a folder, or "auto" = the shipped adapter
(sage_core/assets/sage_adapter) when it was trained on the model with that fingerprint. A folder named explicitly
whose sage_adapter.json records another base model's fingerprint is refused (`load_adapter` checks it too); a
folder that records none (a plain diffusers LoRA) is checked by shapes only. training.lora writes them.

Key conventions read (one per file): peft's `unet.<module>.lora_A.weight` / `.lora_B.weight` (what training.lora
and current diffusers write) and diffusers' older `unet.<module>.lora.down.weight` / `.lora.up.weight` (the shipped
adapter). A file mixing both is refused: diffusers' loader picks one convention from the first key and silently
drops the other's layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from sage_core.models import DEFAULT_MODEL_DIR, ModelError
from sage_core.names import ADAPTER_AUTO, ADAPTER_NONE, DEFAULT_ADAPTER_CHOICE  # noqa: F401  (re-exported)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
INFO_FILE = "sage_adapter.json"
DEFAULT_ADAPTER_DIR = DEFAULT_MODEL_DIR.parent / "sage_adapter"


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


def check_base_model(folder: str | Path, fingerprint: str) -> None:
    """Raise AdapterMismatchError when the folder's sage_adapter.json records a base model other than
    `fingerprint` (a folder recording none passes: only the shapes can be checked)."""
    recorded = adapter_base_fingerprint(folder)
    if recorded is not None and recorded != fingerprint:
        raise AdapterMismatchError(
            f"the adapter in {folder} was trained on base model {recorded}, not on the loaded model {fingerprint}; "
            f"use an adapter trained on this model (to apply it anyway, remove base_model_fingerprint from its "
            f"{INFO_FILE})"
        )


def resolve_adapter(choice: str, fingerprint: str, shipped: Path = DEFAULT_ADAPTER_DIR) -> Path | None:
    """ "none": None; "auto": the shipped adapter if it was trained on the model of `fingerprint`, else None;
    otherwise a folder that must exist and must not record another base model (`check_base_model`)."""
    if choice == ADAPTER_NONE:
        return None
    if choice == ADAPTER_AUTO:
        return shipped if shipped.is_dir() and adapter_base_fingerprint(shipped) == fingerprint else None
    path = Path(choice)
    if not path.is_dir():
        raise ModelError(f"adapter folder {path} does not exist")
    check_base_model(path, fingerprint)
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


# key suffix -> (matrix, convention): peft's names (current diffusers) and diffusers' older ones
_LORA_SUFFIXES = {
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora.down.weight": ("down", "diffusers"),
    ".lora.up.weight": ("up", "diffusers"),
}


def split_lora_key(key: str) -> tuple[str, str, str] | None:
    """`unet.<module><suffix>` -> (module, "down" | "up", convention); None for other keys (text encoder, alphas)."""
    if not key.startswith("unet."):
        return None
    for suffix, (matrix, convention) in _LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[len("unet."):-len(suffix)], matrix, convention
    return None


def read_adapter_shapes(folder: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module name -> {'down': shape, 'up': shape} from a diffusers LoRA file (unet keys only, either convention;
    a file mixing the two is refused)."""
    path = Path(folder) / ADAPTER_FILE
    if not Path(folder).is_dir():
        raise AdapterMismatchError(f"LoRA folder {folder} does not exist")
    if not path.is_file():
        raise AdapterMismatchError(f"{folder} has no {ADAPTER_FILE} (not a diffusers LoRA folder)")
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    conventions: set[str] = set()
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                parts = split_lora_key(key)
                if parts is not None:
                    module, matrix, convention = parts
                    conventions.add(convention)
                    out.setdefault(module, {})[matrix] = tuple(fh.get_slice(key).get_shape())
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises SafetensorError (a ValueError/OSError)
        raise AdapterMismatchError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not out:
        raise AdapterMismatchError(f"{path} holds no UNet LoRA weights (keys 'unet.<module>.lora_A.weight' or "
                                   "'unet.<module>.lora.down.weight')")
    if len(conventions) > 1:
        raise AdapterMismatchError(
            f"{path} mixes 'lora_A/lora_B' and 'lora.down/lora.up' keys, so diffusers would load only part of it "
            "(an older sage-train wrote such files for extra target modules); retrain it, or rename its "
            "'.lora.down.weight'/'.lora.up.weight' keys to '.lora_A.weight'/'.lora_B.weight'"
        )
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
            problems.append(f"{module}: needs both the down (lora_A) and the up (lora_B) matrix")
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
    """Check the adapter against the pipeline (its recorded base model, `check_base_model`, and every layer's
    shape), then `pipe.load_lora_weights(folder)` (safetensors, local files only); returns the number of adapted
    modules."""
    from sage_core.models import model_fingerprint

    n = check_adapter(pipe.unet, folder)
    check_base_model(folder, model_fingerprint(pipe))
    try:
        pipe.load_lora_weights(str(folder), adapter_name=adapter_name, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AdapterMismatchError(f"could not load the adapter in {folder}: {exc}") from exc
    return n
