"""How many bytes each of Inductor's kernels moves, in theory, for one SD v1.5 top-level transformer block (320
channels, 8 heads of 40, cross-attention on 77 tokens of 768, fused q/k/v as the served UNet has them), compiled
without float8, with the row-wise and the static float8 layers, and with the static layers and the fused GEGLU
(`sage_core.fp8`; the fused kernel stands here as one opaque op, as its Triton kernel is on the GPU, since the
CPU's torch reference would compile to a float32 matmul). The figures are Inductor's own
estimate (`GraphLowering.count_bytes`: each buffer a kernel reads or writes, counted once), in units of one pass
over the block's activation (pixels x 320 channels x 2 bytes): what a kernel should move, not how fast the GPU
moves it.

    python docs/results/serving/cpu_fp8_bytes_probe.py float16 1 32 > docs/results/serving/cpu_fp8_bytes_probe.txt
    python docs/results/serving/cpu_fp8_bytes_probe.py bfloat16 1 32 >> docs/results/serving/cpu_fp8_bytes_probe.txt
    python docs/results/serving/cpu_fp8_bytes_probe.py float16 4 64 >> docs/results/serving/cpu_fp8_bytes_probe.txt

(dtype, rows, latent side; 32 instead of the 64 of a 512-pixel image keeps the CPU's compile short: every figure
here is per pass, which scales with the pixels, except the weights', which weigh less the more rows there are: the
last run, 4 latents of 64x64, is closer to serving)
"""
from __future__ import annotations

import copy
import sys

import torch
import torch._inductor.graph as graph_mod
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from sage_core import fp8
from sage_core.fp8 import to_float8_rowwise, to_float8_static

REFERENCE = fp8.geglu_reference  # the fused GEGLU's torch reference, before main() swaps in the opaque op
CAPTURED: list = []  # each compiled graph's (scheduler node, bytes)
_orig = graph_mod.GraphLowering.count_bytes


def _count(self):  # GraphLowering.count_bytes, keeping what it counted
    total, counts, runtimes = _orig(self)
    CAPTURED.append([(n, c * 4) for n, c in counts])
    return total, counts, runtimes


def describe(node) -> str:
    """'fused: add,amax,...' or 'extern: mm,...': the node's kind and the aten ops it was made from."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode
    ops = set()
    for sub in node.get_nodes():
        for o in getattr(sub.node, "origins", ()) or ():
            ops.add(str(getattr(o, "target", o)).replace("aten.", "").split(".")[0])
    kind = "extern" if isinstance(node, ExternKernelSchedulerNode) else "fused"
    return f"{kind}: {','.join(sorted(ops))[:150]}"


@torch.library.custom_op("probe::geglu_fp8", mutates_args=())
def opaque_geglu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                 out_scale: torch.Tensor) -> torch.Tensor:
    """The fused GEGLU as one opaque kernel, as the GPU's Triton kernel is: Inductor counts its inputs and output
    (on the CPU the module's torch reference would compile to a float32 matmul instead)."""
    return REFERENCE(x, w, b, x_scale, w_scale, out_scale)


@opaque_geglu.register_fake
def _(x, w, b, x_scale, w_scale, out_scale):
    return x.new_empty(x.shape[0], w.shape[0] // 2)


def main(dtype_name: str, rows: int, side: int) -> None:
    """Print each variant's kernels with the passes they move, and the total."""
    torch.manual_seed(0)
    torch._logging.set_logs(inductor_metrics=True)  # count_bytes runs only with this log on
    torch._inductor.config.fx_graph_cache = False  # a graph loaded from the cache is not counted
    graph_mod.GraphLowering.count_bytes = _count
    fp8.geglu_reference = opaque_geglu  # what Fp8GegluFeedForward calls off the GPU
    dtype = getattr(torch, dtype_name)
    block = Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                               cross_attention_dim=768, norm_num_groups=32).eval().to(dtype)
    for module in block.modules():
        if type(module).__name__ == "Attention":
            module.fuse_projections()
            from diffusers.models.attention_processor import FusedAttnProcessor2_0
            module.set_processor(FusedAttnProcessor2_0())
    x = torch.randn(rows, 320, side, side, dtype=dtype).to(memory_format=torch.channels_last)
    c = torch.randn(rows, 77, 768, dtype=dtype)
    pixels = rows * side * side
    for quantize in ("none", "fp8-rowwise", "fp8-static", "fp8-static-geglu"):
        net = copy.deepcopy(block)
        if quantize == "fp8-rowwise":
            to_float8_rowwise(net)
        elif quantize.startswith("fp8-static"):  # calibrated on the inputs it is then compiled for
            to_float8_static(net, lambda model: model(x, encoder_hidden_states=c, return_dict=False),
                             fuse_geglu=quantize == "fp8-static-geglu")
        torch._dynamo.reset()
        CAPTURED.clear()
        with torch.inference_mode():
            torch.compile(net, dynamic=False)(x, encoder_hidden_states=c, return_dict=False)
        nodes = CAPTURED[-1]
        total = sum(b for _, b in nodes)
        print(f"{quantize}: {len(nodes)} scheduler nodes, {total / 1e6:.1f} MB "
              f"({total / (pixels * 320 * 2):.1f} activation passes of {pixels}x320 {dtype_name})")
        for n, b in nodes:
            print(f"  {b / (pixels * 320 * 2):6.2f}  {describe(n)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "float16", int(sys.argv[2]) if len(sys.argv) > 2 else 1,
         int(sys.argv[3]) if len(sys.argv) > 3 else 32)
