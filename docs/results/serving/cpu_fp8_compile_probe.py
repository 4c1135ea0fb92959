"""Where does float8's compile time go? On the CPU (no float8 GEMMs to run fast, but the same tracing and much of the
same lowering), the compile of a UNet with and without torchao's dynamic float8 linears, and with the project's own
row-wise float8 layers (sage_core.fp8, `--unet-quantize fp8-rowwise`), side by side.

    PYTHONPATH=/tmp/tao:. python docs/results/serving/cpu_fp8_compile_probe.py --unet sd15 --backend aot_eager
    PYTHONPATH=/tmp/tao:. python docs/results/serving/cpu_fp8_compile_probe.py --unet narrow --backend inductor

(/tmp/tao: `pip install --no-deps --target /tmp/tao .whl/torchao-*.whl`.) `sd15` is SD v1.5's UNet (random
weights, batch 1); `narrow` has SD v1.5's block structure (the same graph, so about the same number of kernels to
generate) with 48-64 channels, so that Inductor's CPU backend compiles it in minutes. torchao refuses float8 on a
CPU; its hardware check is switched off here, which is only for this probe (the server refuses float8 where the GPU
lacks float8 tensor cores). Each configuration runs in a process of its own. Output: cpu_fp8_compile_probe.txt.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch


def build(unet: str) -> torch.nn.Module:
    """The UNet to compile, bfloat16, q/k/v fused and channels-last as the server's compile does."""
    from diffusers import UNet2DConditionModel

    from sage_core.models import sd15_architecture_pipeline
    from sage_core.unet_buckets import fuse_layout

    torch.manual_seed(0)
    if unet == "sd15":
        net = sd15_architecture_pipeline(dtype=torch.bfloat16).unet
    else:  # 48 channels, not 32: torchao takes a 128x128 tensor-wise weight for a 128x128-block one
        net = UNet2DConditionModel(sample_size=16, cross_attention_dim=64, block_out_channels=(48, 64, 64, 64),
                                   layers_per_block=2, attention_head_dim=8, norm_num_groups=16).to(torch.bfloat16)
    return fuse_layout(net.eval())


def one(unet: str, backend: str, quantize: str) -> None:
    """Compile once and print the first call's seconds and dynamo's phase times."""
    import torch._dynamo.utils as du

    net = build(unet)
    if quantize == "fp8":
        import torchao.quantization.quant_api as qa
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

        from sage_core.unet_buckets import fp8_linear

        qa._check_hardware_support = lambda granularity: None  # this probe only: float8 on a CPU
        quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()), filter_fn=fp8_linear)
    elif quantize == "fp8-rowwise":
        from sage_core.fp8 import to_float8_rowwise

        to_float8_rowwise(net)
    side, channels = net.config.sample_size, net.config.cross_attention_dim
    x = torch.randn(1, 4, side, side, dtype=torch.bfloat16)
    c = torch.randn(1, 77, channels, dtype=torch.bfloat16)
    t = torch.full((1,), 500)
    with torch.inference_mode():
        start = time.perf_counter()
        torch.compile(net, backend=backend, dynamic=False)(x, t, encoder_hidden_states=c)
    names, values = du.compile_times(repr="csv", aggregate=True)
    keep = ("_compile.compile_inner", "OutputGraph.call_user_compiler", "fx_codegen_and_compile",
            "async_compile.wait")
    times = "  ".join(f"{k} {float(v):.1f} s" for k, v in zip(names, values, strict=True) if k in keep)
    print(f"{unet} {backend} {quantize}: first compiled call {time.perf_counter() - start:.1f} s  ({times})",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=("sd15", "narrow"), default="narrow")
    parser.add_argument("--backend", choices=("aot_eager", "inductor"), default="inductor")
    parser.add_argument("--quantize", choices=("none", "fp8", "fp8-rowwise", "all"), default="all")
    args = parser.parse_args()
    if args.quantize != "all":
        one(args.unet, args.backend, args.quantize)
        return
    for q in ("none", "fp8", "fp8-rowwise"):  # each in a fresh process with an empty compile cache
        with tempfile.TemporaryDirectory() as cache:
            subprocess.run([sys.executable, __file__, "--unet", args.unet, "--backend", args.backend, "--quantize", q],
                           check=True, env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache})


if __name__ == "__main__":
    main()
