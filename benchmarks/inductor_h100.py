"""What TorchInductor makes of the served UNet for an H100, per variant, on a machine without a GPU
(`benchmarks.fake_h100`): whether each quantize mode lowers at all, how many kernels a call launches, Inductor's
estimate of the bytes its own kernels move per sample (by kind, as `benchmarks.kernel_profile` names them), the
elements its transposing kernels move, and the float8 Triton kernels' launches. A check before a lease, not a
timing: the GPU's time per byte and per launch is what the lease measures (`benchmarks.bench_variants`, on the GPU).

    python -m benchmarks.inductor_h100 --rows 128 --quantize none fp8-static fp8-static-geglu fp8-static-conv

The UNet is prepared as `compile_unet` prepares it (fused q/k/v, channels-last, the channels-last concat pass
unless --no-concat-pass, float8 layers calibrated on random inputs: values do not change the code), then lowered
at `rows` rows of 64x64 latents (SD v1.5's UNet; `--model tiny64` is a 64-channel UNet for a quick check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

import torch

from benchmarks.fake_h100 import (
    compile_for_h100,
    estimated_bytes,
    extern_calls,
    kernel_calls,
    to_fake_cuda,
    transposing_kernels,
)
from benchmarks.kernel_profile import kind_of

QUANTIZE = ("none", "fp8-rowwise", "fp8-static", "fp8-static-geglu", "fp8-static-conv")
FLOAT8_KERNELS = ("geglu_fp8_kernel", "conv3x3_fp8_kernel")  # sage_core.fp8_kernels' Triton kernels


@dataclass(frozen=True)
class Lowered:
    """One variant as Inductor lowered it: launches per call, Inductor's byte estimate per sample by kind, the
    transposing kernels' elements per sample, the float8 Triton kernels' launches and the modules that should
    launch them (one launch each), seconds to lower."""

    variant: str
    rows: int
    launches: int
    extern_calls: int
    mb_per_sample: dict[str, float]
    transposed_elements_per_sample: int
    float8_kernel_launches: dict[str, int]
    float8_modules: dict[str, int]
    seconds: float


def build_unet(model: str) -> Any:
    """SD v1.5's UNet ("sd15") or a 64-channel one ("tiny64"), float32 on the CPU, random weights."""
    from diffusers import UNet2DConditionModel

    from sage_core.models import SD15_UNET

    torch.manual_seed(0)
    if model == "sd15":
        return UNet2DConditionModel(**SD15_UNET).eval()
    return UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32).eval()


def prepare(unet: Any, quantize: str) -> Any:
    """The UNet as `compile_unet` hands it to torch.compile: fused q/k/v, channels-last, quantized (static modes
    calibrated on random text embeddings at 8x8 latents, two timesteps: the scales' values do not shape the code)."""
    from sage_core import fp8
    from sage_core.unet_buckets import STATIC_MODES, fuse_layout, quantize_unet, unet_calibration

    calibrate = None
    if quantize in STATIC_MODES:
        cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
        calibrate = unet_calibration(cond, 8, timesteps=(999, 1))
    # quantize_unet first checks that the UNet's device runs the float8 GEMMs; the CPU lacks the row-wise ones (an
    # H100 has them), and nothing runs here
    with mock.patch.object(fp8, "check_scaled_mm", lambda *args, **kwargs: None):
        return quantize_unet(fuse_layout(unet), quantize, calibrate)


class _Call(torch.nn.Module):
    """The sampler's call of the UNet as one exportable forward."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]


def lower(model: str, quantize: str, rows: int, concat_pass: bool = True) -> Lowered:
    """Prepare the UNet in `quantize` mode and lower it with Inductor for the stand-in H100 at `rows` rows."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sage_core import fp8
    from sage_core.unet_buckets import compile_options, set_inductor

    started = time.perf_counter()
    unet = prepare(build_unet(model), quantize)
    modules = {kernel: sum(isinstance(m, kind) for m in unet.modules())
               for kernel, kind in zip(FLOAT8_KERNELS, (fp8.Fp8GegluFeedForward, fp8.Fp8StaticConv3x3), strict=True)}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake_cuda(unet, mode, keep_float32=(fp8.Float8Gemm, fp8.Fp8StaticConv3x3, fp8.Fp8GegluFeedForward))
    cfg = unet.config
    with mode:
        x = torch.empty(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=torch.float16,
                        device="cuda").to(memory_format=torch.channels_last)
        t = torch.zeros(rows, dtype=torch.long, device="cuda")
        c = torch.empty(rows, 77, cfg.cross_attention_dim, dtype=torch.float16, device="cuda")
    old = set_inductor(compile_options("reduce-overhead", quantize, concat_pass))  # as the lease compiles
    try:
        out = compile_for_h100(_Call(unet), mode, x, t, c)
    finally:
        set_inductor(old)
    calls = kernel_calls(out.wrapper)
    by_kind: dict[str, float] = {}
    for name in calls:
        if name in out.kernels and not name.startswith(FLOAT8_KERNELS):
            kind = kind_of(name)
            by_kind[kind] = by_kind.get(kind, 0.0) + estimated_bytes(out.kernels[name]) / rows / 1e6
    transposed = sum(n * calls.count(name) for name, n in transposing_kernels(out.kernels).items())
    variant = quantize + ("" if concat_pass else ", no concat pass")
    return Lowered(variant, rows, len(calls), extern_calls(out.wrapper),
                   {k: round(v, 1) for k, v in sorted(by_kind.items())}, transposed // rows,
                   {k: sum(n.startswith(k) for n in calls) for k in FLOAT8_KERNELS}, modules,
                   round(time.perf_counter() - started, 1))


def table(results: Sequence[Lowered]) -> str:
    """The results as a fixed-width table."""
    kinds = sorted({k for r in results for k in r.mb_per_sample})
    head = f"{'variant':34s} {'launches':>8s} {'ATen':>5s} " + " ".join(f"{k[:18]:>18s}" for k in kinds)
    head += f" {'MB total':>9s} {'transposed/sample':>17s} {'geglu fp8':>9s} {'conv fp8':>8s}"
    lines = [head]
    for r in results:
        row = f"{r.variant:34s} {r.launches:8d} {r.extern_calls:5d} "
        row += " ".join(f"{r.mb_per_sample.get(k, 0.0):18.1f}" for k in kinds)
        row += f" {sum(r.mb_per_sample.values()):9.1f} {r.transposed_elements_per_sample:17,d}"
        row += f" {r.float8_kernel_launches['geglu_fp8_kernel']:9d} {r.float8_kernel_launches['conv3x3_fp8_kernel']:8d}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "tiny64"), default="sd15")
    parser.add_argument("--rows", type=int, default=128, help="UNet rows per call (the bucket)")
    parser.add_argument("--quantize", nargs="+", choices=QUANTIZE, default=list(QUANTIZE))
    parser.add_argument("--no-concat-pass", action="store_true",
                        help="also lower each variant without the channels-last concat pass, side by side")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    import diffusers
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, diffusers {diffusers.__version__}; "
          f"{args.model} UNet at {args.rows} rows, lowered for a stand-in H100 (nothing runs)", flush=True)
    results = []
    for quantize in args.quantize:
        for concat_pass in ((True, False) if args.no_concat_pass else (True,)):
            results.append(lower(args.model, quantize, args.rows, concat_pass))
            print(f"  {results[-1].variant}: lowered in {results[-1].seconds} s", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "triton": triton.__version__, "model": args.model,
                       "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
