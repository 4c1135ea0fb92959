"""A TorchInductor graph pass for channels-last UNets: keep the up blocks' skip concatenations channels-last.

Each up-block resnet of a diffusers UNet starts with `torch.cat([hidden, skip], dim=1)`, read by a GroupNorm and
a convolution. Eager PyTorch makes that concatenation channels-last when its inputs are. TorchInductor 2.11 (the
GPU image's) does not: the GroupNorm's decomposition reads its input as contiguous, so Inductor writes the
concatenation NCHW, and the kernel that applies the GroupNorm transposes it back for the next convolution, reading
it with a stride of H x W elements and writing a second channels-last copy for the 1x1 shortcut. In SD v1.5's
fp16 UNet such kernels move 27.9 M elements per sample (docs/results/serving, `cpu_inductor_h100_codegen.txt`).
Asking Inductor to realize each such concatenation with the strides eager gives it (`inductor_realize_to_strides`,
which Inductor reads from a node's meta) removes them. TorchInductor 2.14 already keeps these concatenations
channels-last; there the pass changes nothing in the generated code.
"""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass


def is_channels_last_4d(node: torch.fx.Node) -> bool:
    """Whether the node's value (its fake tensor in meta["val"]) is a 4-D tensor laid out channels-last and not
    also contiguous (a 1x1 image or a single channel is both)."""
    value = node.meta.get("val")
    return (isinstance(value, torch.Tensor) and value.dim() == 4
            and value.is_contiguous(memory_format=torch.channels_last) and not value.is_contiguous())


def channels_last_concats(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The graph's concatenations whose eager result is a channels-last 4-D tensor that a convolution reads: those
    Inductor's layout optimization wants channels-last (its rule for a convolution's input), and that Inductor 2.11
    writes NCHW when a GroupNorm reads them too. In the float8 UNets the 1x1 shortcuts are float8 GEMMs, not
    convolutions, and their concatenations are left to Inductor."""
    return [node for node in graph.nodes
            if node.op == "call_function" and node.target is torch.ops.aten.cat.default and is_channels_last_4d(node)
            and any(user.target is torch.ops.aten.convolution.default for user in node.users)]


class ChannelsLastConcat(CustomGraphPass):
    """Inductor's post-grad pass (`post_grad_custom_post_pass`) that makes Inductor realize each channels-last
    concatenation (`channels_last_concats`) with eager's strides. It changes layouts only, never values; its uuid
    keys Inductor's compile cache."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in channels_last_concats(graph):
            node.meta["inductor_realize_to_strides"] = True

    def uuid(self) -> str:
        return "sage-edge.channels-last-concat.1"
