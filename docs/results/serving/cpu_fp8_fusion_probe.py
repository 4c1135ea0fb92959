"""Does Inductor fuse the row-wise float8 layers' input quantization into the kernel that makes the input? One
SD-style transformer block (GroupNorm, proj_in, self- and cross-attention with fused projections, GEGLU
feed-forward, proj_out; 64 channels) compiled with Inductor's CPU backend with and without `to_float8_rowwise`;
prints the generated fused kernels by name (Inductor names a kernel after the ops in it).

    python docs/results/serving/cpu_fp8_fusion_probe.py      # output: cpu_fp8_fusion_probe.txt

The scheduler that decides fusion is the same for the GPU's Triton kernels; the kernel names on the H100 may differ.
"""

from __future__ import annotations

import copy
import re

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch._inductor.utils import run_and_get_code

from sage_core.fp8 import to_float8_rowwise


def fused_kernels(net: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> list[str]:
    """The names of the fused kernels Inductor generates for one call of `net`."""
    torch._dynamo.reset()
    with torch.inference_mode():
        _, codes = run_and_get_code(torch.compile(net, dynamic=False), x, encoder_hidden_states=c, return_dict=False)
    return sorted(set(re.findall(r"cpp_fused_\w+", "\n".join(codes))))


def main() -> None:
    torch.manual_seed(0)
    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=64, cross_attention_dim=64,
                               norm_num_groups=16).eval()
    for module in block.modules():
        if type(module).__name__ == "Attention":
            module.fuse_projections()
    x = torch.randn(2, 64, 16, 16).to(memory_format=torch.channels_last)
    c = torch.randn(2, 77, 64)
    for quantize in ("none", "fp8-rowwise"):
        net = copy.deepcopy(block)
        if quantize != "none":
            to_float8_rowwise(net)
        names = fused_kernels(net, x, c)
        print(f"{quantize}: {len(names)} fused kernels")
        for name in names:
            print(f"  {name}")


if __name__ == "__main__":
    main()
