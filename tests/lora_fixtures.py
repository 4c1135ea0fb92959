"""A small diffusers-format LoRA for the tiny pipeline, shared by the device, server and adapter tests."""

from __future__ import annotations

import json

import torch


def make_lora(folder, peft_keys: bool = False) -> str:
    """A diffusers-format LoRA for the tiny UNet with non-zero weights: keys in diffusers' older
    `.lora.down/.lora.up` convention (as the shipped adapter), or in peft's `.lora_A/.lora_B` (as training writes)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sage_core.models import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    layers = get_peft_model_state_dict(pipe.unet)
    layers = layers if peft_keys else convert_state_dict_to_diffusers(layers)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return str(folder)


def make_shipped_lora(folder, base_fingerprint: str) -> str:
    """make_lora plus the sage_adapter.json that training writes (the base model it was made for)."""
    from sage_core.adapters import INFO_FILE

    make_lora(folder)
    (folder / INFO_FILE).write_text(json.dumps({"base_model_fingerprint": base_fingerprint}), encoding="utf-8")
    return str(folder)
