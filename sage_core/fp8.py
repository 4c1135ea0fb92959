"""Float8 layers for a compiled UNet, on torch._scaled_mm alone (no torchao): row-wise and static.

Each layer keeps its weight in float8 e4m3 with one scale per output channel and quantizes its input on the fly
with one scale per row (per token or pixel), then runs one float8 GEMM (cuBLAS or CUTLASS on the GPU) with both
scale vectors. Under torch.compile the input's absmax, scaling and cast fuse into the kernel that makes the input,
which is why a UNet with these layers is only served compiled. Besides the linear layers of the transformer
blocks, the 1x1 convolutions (the transformer blocks' proj_in / proj_out, the resnets' channel-changing shortcuts)
become float8 GEMMs over their pixels: a channels-last 1x1 convolution is a matmul. The time-embedding layers,
which see one row per sample, stay as they are. torchao's float8 (QUANTIZE_MODES' "fp8") does the linear layers
only.

Static float8 (`Fp8StaticLinear`, `to_float8_static`) takes the same layers with one scale per tensor: the weight's
from its absmax, the input's calibrated beforehand (its largest absmax over a few calls, times a headroom). The
input's quantization is then elementwise, with no reduction per row at run time, so it fuses into the kernel that
makes the input as an epilogue; the GEMM writes the UNet's own dtype with the bias added in its epilogue. On the
H100 the row-wise layers' quantization kernels cost 0.45 ms per sample, where their GEMMs saved 0.15 ms
(docs/results/serving, fifth lease).

`Fp8GegluFeedForward` (the "fp8-static-geglu" mode) goes one step further in the transformer blocks' feed-forward:
one Triton kernel (`sage_core.fp8_kernels`) computes both halves of the GEGLU projection, the GELU and the
product, and writes only the float8 input of the output projection, where the static layers write the projection's
2N channels in half precision and read them back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_TINY = 1e-12  # an all-zero row's scale: its codes are zeros whatever the scale


def to_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as float8 codes (computed in float32); values beyond float8's range saturate."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as float8 codes and one float32 scale per row (shape (rows, 1)): x ~= codes * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    return to_codes(x, scale), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor as float8 codes and one float32 scale (0-dim): x ~= codes * scale."""
    scale = x.abs().amax().float().clamp(min=_TINY) / FP8_MAX
    return to_codes(x, scale), scale


class Float8Gemm(torch.nn.Module):
    """What the float8 linear layers share: the weight's check, its float8 codes and scale (`quantize_weight`, the
    subclass's), the bias, and the input's rows. y = x @ W.T + b, in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.ndim != 2 or not fits_float8_gemm(weight):
            raise ValueError(f"float8 GEMMs need both sides of the weight a multiple of 16, got {tuple(weight.shape)}")
        codes, scale = self.quantize_weight(weight.detach())
        self.register_buffer("weight_fp8", codes)  # (out, in); .t() is the column-major operand _scaled_mm takes
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's float8 codes and the scale _scaled_mm takes for it."""
        raise NotImplementedError

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) as a row-major (rows, in_features) matrix, as float8 GEMMs need it (a permuted view,
        e.g. a batch-1 NCHW tensor's pixels, can be column-major; elementwise ops, compiled or not, keep the layout
        they are given)."""
        return x.reshape(-1, self.in_features).contiguous()

    def unrows(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The GEMM's (rows, out_features) output in x's leading shape."""
        return y.reshape(*x.shape[:-1], self.out_features)


class Fp8Linear(Float8Gemm):
    """A float8 linear layer with W's scale per output channel and x quantized per row on each call."""

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes with one scale per output channel, as a (1, out) row."""
        codes, scale = quantize_rows(weight)
        return codes, scale.t().contiguous()

    @staticmethod
    def from_linear(layer: torch.nn.Linear) -> Fp8Linear:
        """The float8 version of a linear layer."""
        return Fp8Linear(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on x (..., in_features), in x's dtype."""
        codes, scale = quantize_rows(self.rows(x))
        # row-wise scales need a bfloat16 output; the cast back fuses into whatever reads it. Fast accumulation, as
        # torchao's inference float8 uses it: Hopper's float8 MMA accumulates in fewer bits between promotions
        y = torch._scaled_mm(codes, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16, use_fast_accum=True).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return self.unrows(y, x)


def static_input_scale(input_amax: float, headroom: float, device: torch.device) -> torch.Tensor:
    """A static float8 layer's input scale (0-dim float32): the calibrated absmax times the headroom lands on the
    largest code."""
    if not (input_amax >= 0 and headroom >= 1):
        raise ValueError(f"a static float8 layer needs an input absmax >= 0 and a headroom >= 1, got "
                         f"{input_amax} and {headroom}")
    return torch.tensor(max(input_amax * headroom, _TINY) / FP8_MAX, device=device)


class Fp8StaticLinear(Float8Gemm):
    """A float8 linear layer with one scale for W and x quantized with a calibrated constant scale: the input's
    quantization is elementwise, and the GEMM writes x's dtype with the bias in its epilogue."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_amax: float,
                 headroom: float = 2.0) -> None:
        scale = static_input_scale(input_amax, headroom, weight.device)
        super().__init__(weight, bias)
        self.register_buffer("input_scale", scale)

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes with one scale for the whole weight (0-dim)."""
        return quantize_tensor(weight)

    @staticmethod
    def from_linear(layer: torch.nn.Linear, input_amax: float, headroom: float = 2.0) -> Fp8StaticLinear:
        """The static float8 version of a linear layer whose inputs' absmax was `input_amax`."""
        return Fp8StaticLinear(layer.weight, layer.bias, input_amax, headroom)

    def quantize(self, rows: torch.Tensor) -> torch.Tensor:
        """The input rows' float8 codes with the calibrated scale; values beyond the calibrated range saturate."""
        return to_codes(rows, self.input_scale)

    def gemm(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer on input codes (rows, in_features) made with `input_scale`: (rows, out_features) in `dtype`."""
        # the bias in the GEMM's epilogue for a half-precision output (cuBLASLt takes none with a float32 one)
        fused = self.bias is not None and dtype in (torch.float16, torch.bfloat16)
        y = torch._scaled_mm(codes, self.weight_fp8.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                             bias=self.bias.to(dtype) if fused else None, out_dtype=dtype, use_fast_accum=True)
        return y + self.bias if self.bias is not None and not fused else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on x (..., in_features), in x's dtype; inputs beyond the calibrated range saturate."""
        return self.unrows(self.gemm(self.quantize(self.rows(x)), x.dtype), x)


def float32_bias(layer: torch.nn.Linear | torch.nn.Conv2d) -> torch.Tensor:
    """A layer's bias as a float32 copy (zeros where it has none), as the float8 Triton kernels read it."""
    if layer.bias is None:
        return torch.zeros(layer.weight.shape[0], device=layer.weight.device)
    return layer.bias.detach().float().clone()


def geglu_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor,
                    w_scale: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """What the fused GEGLU kernel (`sage_core.fp8_kernels`) computes, in float32 torch ops: x (M, K) and w (2N, K)
    float8 codes, b (2N,) float32, 0-dim float32 scales; returns the (M, N) float8 codes, with `out_scale`, of
    h * gelu(g) where [h | g] = x @ w.T * x_scale * w_scale + b."""
    h, g = ((x.float() @ w.float().t()) * (x_scale * w_scale) + b).chunk(2, dim=-1)
    return to_codes(h * torch.nn.functional.gelu(g), out_scale)


class Fp8GegluFeedForward(torch.nn.Module):
    """A diffusers GEGLU feed-forward block (`FeedForward`: GEGLU, dropout, linear) in static float8 with the GEGLU
    fused: the input is quantized with its calibrated scale, one kernel (`sage_core.fp8_kernels` on the GPU,
    `geglu_reference` elsewhere) makes the float8 input of the output projection, whose GEMM writes the block's
    dtype. For inference: the dropout is left out."""

    def __init__(self, ff: torch.nn.Module, input_amax: float, inner_amax: float, headroom: float = 2.0) -> None:
        super().__init__()
        proj, out = ff.net[0].proj, ff.net[2]
        self.proj = Fp8StaticLinear(proj.weight, None, input_amax, headroom)
        self.register_buffer("proj_bias", float32_bias(proj))
        self.out = Fp8StaticLinear.from_linear(out, inner_amax, headroom)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The block on hidden_states (..., channels), in their dtype."""
        codes = self.proj.quantize(self.proj.rows(hidden_states))
        inputs = (codes, self.proj.weight_fp8, self.proj_bias, self.proj.input_scale, self.proj.weight_scale,
                  self.out.input_scale)
        if codes.is_cuda:
            from sage_core.fp8_kernels import geglu_fp8

            inner = geglu_fp8(*inputs)
        else:
            inner = geglu_reference(*inputs)
        return self.out.unrows(self.out.gemm(inner, hidden_states.dtype), hidden_states)


def conv3x3_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor,
                      w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """What the float8 3x3 convolution kernel (`sage_core.fp8_kernels`) computes, in float32 torch ops:
    channels-last codes x (N, H, W, C) and w (F, 3, 3, C), b (F,) float32, a 0-dim x_scale and w_scale (F,);
    returns (N, H, W, F) in `out_dtype`."""
    weight = (w.float() * w_scale[:, None, None, None]).permute(0, 3, 1, 2)
    y = torch.nn.functional.conv2d((x.float() * x_scale).permute(0, 3, 1, 2), weight, b, padding=1)
    return y.permute(0, 2, 3, 1).to(out_dtype)


CONV_CHANNELS = 64  # the float8 convolution kernel's reduction chunk: input channels a multiple of it


def is_conv3x3(conv: torch.nn.Module) -> bool:
    """A Conv2d the float8 convolution kernel takes: 3x3, stride 1, padding 1, no groups or dilation, input
    channels a multiple of CONV_CHANNELS, output channels a multiple of 16."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and conv.in_channels % CONV_CHANNELS == 0
            and conv.out_channels % 16 == 0)


class Fp8StaticConv3x3(torch.nn.Module):
    """A 3x3 convolution in float8: the input quantized with a calibrated scale (elementwise, so it fuses into the
    kernel that makes the input, e.g. a GroupNorm and SiLU), the weights with one scale per output channel, one
    implicit-GEMM kernel (`sage_core.fp8_kernels.conv3x3_fp8` on the GPU, `conv3x3_reference` elsewhere);
    channels-last in and out, in the input's dtype."""

    def __init__(self, conv: torch.nn.Conv2d, input_amax: float, headroom: float = 2.0) -> None:
        super().__init__()
        if not is_conv3x3(conv):
            raise ValueError(f"not a 3x3 convolution the float8 kernel takes: {conv}")
        weight = conv.weight.detach().permute(0, 2, 3, 1).contiguous()  # (out, 3, 3, in): the reduction innermost
        codes, scale = quantize_rows(weight.flatten(1))
        self.register_buffer("weight_fp8", codes.reshape(weight.shape))
        self.register_buffer("weight_scale", scale.flatten())
        self.register_buffer("bias", float32_bias(conv))
        self.register_buffer("input_scale", static_input_scale(input_amax, headroom, weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution on x (batch, channels, height, width)."""
        pixels = x.permute(0, 2, 3, 1).contiguous()  # a view when x is channels-last
        codes = to_codes(pixels, self.input_scale)
        inputs = (codes, self.weight_fp8, self.bias, self.input_scale, self.weight_scale, x.dtype)
        if codes.is_cuda:
            from sage_core.fp8_kernels import conv3x3_fp8

            y = conv3x3_fp8(*inputs)
        else:
            y = conv3x3_reference(*inputs)
        return y.permute(0, 3, 1, 2)


def geglu_feed_forwards(model: Any) -> list[str]:
    """The names of `model`'s diffusers feed-forward blocks that `Fp8GegluFeedForward` takes: GEGLU (exact GELU),
    dropout, a linear layer, both GEMMs float8-sized."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    return [name for name, m in model.named_modules()
            if isinstance(m, FeedForward) and len(m.net) in (3, 4) and type(m.net[0]) is GEGLU
            and isinstance(m.net[2], torch.nn.Linear)
            and fits_float8_gemm(m.net[0].proj.weight) and fits_float8_gemm(m.net[2].weight)]


class Fp8Conv1x1(torch.nn.Module):
    """A 1x1 convolution (stride 1, no groups) as a float8 GEMM over the pixels; channels-last in and out. The GEMM
    is row-wise (Fp8Linear) unless `linear` gives another float8 layer of the convolution's weight."""

    def __init__(self, conv: torch.nn.Conv2d, linear: torch.nn.Module | None = None) -> None:
        super().__init__()
        if not is_pointwise_conv(conv):
            raise ValueError(f"not a plain 1x1 convolution: {conv}")
        self.linear = linear if linear is not None else Fp8Linear(conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution on x (batch, channels, height, width)."""
        pixels = x.permute(0, 2, 3, 1)  # a view when x is channels-last
        return self.linear(pixels).permute(0, 3, 1, 2)


def is_pointwise_conv(conv: torch.nn.Module) -> bool:
    """A Conv2d that is a matmul over channels: kernel 1x1, stride 1, no padding, no groups, no dilation."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros")


def fits_float8_gemm(weight: torch.Tensor) -> bool:
    """A 2-D weight whose GEMM sides are both a multiple of 16, as float8 GEMMs need."""
    return weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the device as torch writes it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def takes_float8(name: str, module: torch.nn.Module) -> bool:
    """Whether a UNet layer becomes a float8 one: linear layers outside the time embedding (which sees one row per
    sample) and 1x1 convolutions, both sides a multiple of 16."""
    if isinstance(module, torch.nn.Linear):
        return "time_emb" not in name and fits_float8_gemm(module.weight)
    return is_pointwise_conv(module) and fits_float8_gemm(module.weight.flatten(1))


def float8_layer(name: str, module: torch.nn.Module) -> torch.nn.Module | None:
    """The row-wise float8 replacement of one UNet layer, or None where it stays (`takes_float8`)."""
    if not takes_float8(name, module):
        return None
    return Fp8Linear.from_linear(module) if isinstance(module, torch.nn.Linear) else Fp8Conv1x1(module)


def static_float8_layer(module: torch.nn.Module, input_amax: float, headroom: float) -> torch.nn.Module:
    """The static float8 replacement of a layer `takes_float8` takes, whose inputs' absmax was `input_amax`."""
    if isinstance(module, torch.nn.Linear):
        return Fp8StaticLinear.from_linear(module, input_amax, headroom)
    return Fp8Conv1x1(module, Fp8StaticLinear(module.weight.flatten(1), module.bias, input_amax, headroom))


def check_scaled_mm(device: torch.device, rowwise: bool = True) -> None:
    """Raise ValueError where torch._scaled_mm with row-wise scales (else one scale per tensor) cannot run on
    `device`."""
    codes = torch.zeros(16, 16, device=device, dtype=FP8)
    rows, cols = ((16, 1), (1, 16)) if rowwise else ((), ())
    try:
        torch._scaled_mm(codes, codes.t(), scale_a=torch.ones(rows, device=device),
                         scale_b=torch.ones(cols, device=device), out_dtype=torch.bfloat16, use_fast_accum=True)
    except (RuntimeError, NotImplementedError) as exc:
        mode, scales = ("fp8-rowwise", "row-wise scales") if rowwise else ("fp8-static", "one scale per tensor")
        raise ValueError(f"{mode} needs float8 GEMMs with {scales} (torch._scaled_mm), which "
                         f"{device_name(device)} "
                         f"lacks: {str(exc).splitlines()[0]}") from exc


def to_float8_rowwise(model: Any) -> int:
    """Replace `model`'s linear layers and 1x1 convolutions by their float8 versions, in place (`float8_layer`
    says which); returns how many were replaced."""
    check_scaled_mm(next(model.parameters()).device)
    swaps = [(name, new) for name, module in model.named_modules()
             if (new := float8_layer(name, module)) is not None]
    return _swap(model, swaps)


def _swap(model: Any, swaps: list[tuple[str, torch.nn.Module]]) -> int:
    """Put each (name, module) in place of `model`'s submodule of that name; returns how many."""
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return len(swaps)


def input_absmax(model: Any, calibrate: Callable[[Any], None],
                 takes: Callable[[str, torch.nn.Module], bool] = takes_float8) -> dict[str, float]:
    """Each float8-bound layer's (`takes`, by default `takes_float8`) largest input absmax while `calibrate(model)`
    runs it."""
    seen: dict[str, float] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            seen[name] = max(seen.get(name, 0.0), float(args[0].detach().abs().amax()))
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
               if takes(name, module)]
    try:
        with torch.inference_mode():
            calibrate(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def to_float8_static(model: Any, calibrate: Callable[[Any], None], headroom: float = 2.0,
                     fuse_geglu: bool = False, convs: bool = False) -> int:
    """Replace `model`'s float8-bound layers (`takes_float8`) by static float8 ones, in place, their input scales
    from the inputs they see while `calibrate(model)` runs it (each layer's largest absmax times `headroom`);
    returns how many modules were replaced. A layer the calibration never ran stays as it is: it has no input
    scale, and the model's forward does not call it either (e.g. the q/k/v projections that diffusers keeps beside
    the fused one, `fuse_qkv_projections`). With `fuse_geglu` each GEGLU feed-forward block whose two GEMMs were
    calibrated becomes one `Fp8GegluFeedForward`; with `convs` each 3x3 convolution `is_conv3x3` takes becomes a
    `Fp8StaticConv3x3` (both need Triton on a GPU)."""
    device = next(model.parameters()).device
    check_scaled_mm(device, rowwise=False)
    if (fuse_geglu or convs) and device.type == "cuda":
        try:
            import sage_core.fp8_kernels  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"the fused float8 kernels need Triton on the GPU: {exc}") from exc
    amax = input_absmax(model, calibrate, lambda name, m: takes_float8(name, m) or (convs and is_conv3x3(m)))
    blocks = [name for name in geglu_feed_forwards(model) if fuse_geglu
              and f"{name}.net.0.proj" in amax and f"{name}.net.2" in amax]
    fused = [(name, Fp8GegluFeedForward(model.get_submodule(name), amax[f"{name}.net.0.proj"],
                                        amax[f"{name}.net.2"], headroom)) for name in blocks]
    inside = tuple(f"{name}." for name in blocks)
    return _swap(model, fused + [(name, Fp8StaticConv3x3(m, amax[name], headroom) if is_conv3x3(m)
                                  else static_float8_layer(m, amax[name], headroom))
                                 for name, m in model.named_modules()
                                 if name in amax and not name.startswith(inside)])
