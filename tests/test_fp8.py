"""The float8 layers (sage_core.fp8), row-wise and static: what they compute, which layers they replace, where they
refuse."""

from __future__ import annotations

import copy

import pytest
import torch

from sage_core.fp8 import (
    FP8_MAX,
    Fp8Conv1x1,
    Fp8GegluFeedForward,
    Fp8Linear,
    Fp8StaticConv3x3,
    Fp8StaticLinear,
    check_scaled_mm,
    conv3x3_reference,
    float8_layer,
    geglu_reference,
    input_absmax,
    quantize_rows,
    quantize_tensor,
    to_float8_rowwise,
    to_float8_static,
)
from sage_core.models import tiny_pipeline


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_rows_are_scaled_to_the_float8_range_and_zero_rows_stay_zero():
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0])[:, None]
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (5, 1) and scale.dtype == torch.float32
    peaks = codes.float().abs().amax(dim=1)
    torch.testing.assert_close(peaks[:4], torch.full((4,), FP8_MAX))  # each row's absmax lands on the top code
    assert peaks[4] == 0 and torch.isfinite(scale).all()
    back = codes.float() * scale
    assert _relative(back[:4], x[:4]) < 0.05  # 3 mantissa bits: a few per cent, whatever each row's magnitude


def test_linear_is_the_float8_gemm_of_the_quantized_operands():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    fp8 = Fp8Linear.from_linear(layer)
    got = fp8(x)
    assert got.shape == (3, 7, 48) and got.dtype == x.dtype
    xq, xs = quantize_rows(x.reshape(-1, 64))
    wq, ws = quantize_rows(layer.weight.detach())
    want = (xq.float() * xs) @ (wq.float() * ws).t() + layer.bias.detach()
    torch.testing.assert_close(got.reshape(-1, 48), want, rtol=1e-2, atol=1e-2)  # the bfloat16 GEMM output
    assert 0 < _relative(got, layer(x).detach()) < 0.08
    with pytest.raises(ValueError, match="multiple of 16"):
        Fp8Linear.from_linear(torch.nn.Linear(64, 40))


def test_pointwise_convolution_becomes_a_gemm_over_pixels_and_stays_channels_last():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 1)
    x = torch.randn(2, 32, 5, 6).to(memory_format=torch.channels_last)
    got = Fp8Conv1x1(conv)(x)
    assert got.shape == (2, 16, 5, 6) and got.is_contiguous(memory_format=torch.channels_last)
    assert 0 < _relative(got, conv(x).detach()) < 0.08
    one = torch.randn(1, 32, 5, 6)  # batch 1, NCHW: its pixels are a column-major view, not the row-major GEMM input
    assert 0 < _relative(Fp8Conv1x1(conv)(one), conv(one).detach()) < 0.08
    others = (torch.nn.Conv2d(32, 16, 3), torch.nn.Conv2d(32, 16, 1, stride=2), torch.nn.Conv2d(32, 16, 1, groups=2))
    for other in others:
        assert float8_layer("conv", other) is None
        with pytest.raises(ValueError, match="not a plain 1x1 convolution"):
            Fp8Conv1x1(other)


def test_layer_choice_keeps_the_time_embedding_and_odd_sizes():
    assert isinstance(float8_layer("up.attn1.to_out.0", torch.nn.Linear(32, 32)), Fp8Linear)
    assert isinstance(float8_layer("up.proj_in", torch.nn.Conv2d(32, 32, 1)), Fp8Conv1x1)
    assert float8_layer("time_embedding.linear_1", torch.nn.Linear(32, 128)) is None  # one row per sample
    assert float8_layer("up.resnets.0.time_emb_proj", torch.nn.Linear(128, 32)) is None
    assert float8_layer("down.attn1.to_q", torch.nn.Linear(8, 32)) is None  # 8 is no multiple of 16
    assert float8_layer("norm", torch.nn.LayerNorm(32)) is None


def test_unet_in_float8_stays_close_to_the_full_precision_one():
    pipe = tiny_pipeline(seed=0)
    unet = pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([10, 500, 990])
    fp8 = copy.deepcopy(unet)
    swapped = to_float8_rowwise(fp8)
    kinds = {type(m) for m in fp8.modules()}
    assert swapped > 0 and Fp8Linear in kinds and Fp8Conv1x1 in kinds
    assert isinstance(fp8.time_embedding.linear_1, torch.nn.Linear)  # left as it was
    assert fp8.dtype == unet.dtype  # diffusers still reads the UNet's own dtype
    with torch.inference_mode():
        want = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        got = fp8(x, t, encoder_hidden_states=c, return_dict=False)[0]
    relative = _relative(got, want)
    # measured 0.035: float8 costs a few per cent per layer; a wrong scale or layout gives ~1 or more
    assert 0 < relative < 0.1


def test_compiled_float8_layers_match_their_eager_selves():
    torch.manual_seed(0)
    net = torch.nn.Sequential(Fp8Conv1x1(torch.nn.Conv2d(32, 64, 1)), torch.nn.SiLU(),
                              Fp8Conv1x1(torch.nn.Conv2d(64, 32, 1))).eval()
    compiled = torch.compile(net, dynamic=False)
    for x in (torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last), torch.randn(1, 32, 8, 8)):
        with torch.inference_mode():
            want = net(x)
            got = compiled(x)
        # the compiled quantization rounds in its own order: a rare code one step apart, no more
        assert _relative(got, want) < 0.02


def test_a_device_without_row_wise_float8_gemms_is_refused_with_the_reason(monkeypatch):
    check_scaled_mm(torch.device("cpu"))  # this torch's CPU has them

    def lacking(*args, **kwargs):
        raise RuntimeError("row-wise scaling needs sm90\nmore detail")

    monkeypatch.setattr(torch, "_scaled_mm", lacking)
    with pytest.raises(ValueError, match="fp8-rowwise needs float8 GEMMs with row-wise scales .* row-wise scaling "
                                         "needs sm90$"):
        to_float8_rowwise(tiny_pipeline(seed=0).unet)


@pytest.mark.parametrize(("mode", "quantize", "aten_only"), [("default", "fp8-rowwise", True),
                                                              ("reduce-overhead", "fp8-rowwise", True),
                                                              ("max-autotune-no-cudagraphs", "fp8-rowwise", False),
                                                              ("reduce-overhead", "none", False)])
def test_float8_gemms_are_left_to_aten_unless_autotuning_was_asked_for(mode, quantize, aten_only):
    import torch._inductor.config as inductor

    from sage_core.unet_buckets import compile_unet

    with inductor.patch(max_autotune_gemm_backends="ATEN,TRITON"):  # restored after the test
        compile_unet(tiny_pipeline(seed=0).unet, mode, quantize=quantize)  # compiles lazily: nothing runs here
        assert (inductor.max_autotune_gemm_backends == "ATEN") == aten_only


def _static_unet(headroom: float = 2.0):
    """The tiny UNet, its static float8 copy calibrated on the sampler's kind of inputs, and fresh inputs."""
    from sage_core.unet_buckets import unet_calibration

    unet = tiny_pipeline(seed=0).unet.eval()
    g = torch.Generator().manual_seed(1)
    calibrate = unet_calibration(torch.randn(4, 77, 32, generator=g), 16)
    fp8 = copy.deepcopy(unet)
    swapped = to_float8_static(fp8, calibrate, headroom)
    x, c = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 77, 32, generator=g)
    return unet, fp8, swapped, (x, torch.tensor([10, 500, 990]), c)


def test_static_linear_is_the_float8_gemm_of_the_calibrated_operands_and_saturates_beyond():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    amax = float(x.abs().amax())
    fp8 = Fp8StaticLinear.from_linear(layer, amax, headroom=2.0)
    got = fp8(x)
    assert got.shape == (3, 7, 48) and got.dtype == x.dtype
    scale = amax * 2.0 / FP8_MAX  # the calibrated absmax, with headroom, lands on code 224 of 448
    xq = (x.reshape(-1, 64) / scale).to(torch.float8_e4m3fn)
    wq, ws = quantize_tensor(layer.weight.detach())
    assert ws.ndim == 0 and wq.float().abs().max() == FP8_MAX
    want = (xq.float() * scale) @ (wq.float() * ws).t() + layer.bias.detach()
    torch.testing.assert_close(got.reshape(-1, 48), want, rtol=1e-4, atol=1e-4)
    assert 0 < _relative(got, layer(x).detach()) < 0.08
    big = x * 10  # five times beyond the headroom: the codes saturate at the top one instead of overflowing
    clipped = (big.reshape(-1, 64) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    want_big = (clipped.float() * scale) @ (wq.float() * ws).t() + layer.bias.detach()
    torch.testing.assert_close(fp8(big).reshape(-1, 48), want_big, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(fp8(big)).all()
    half = Fp8StaticLinear.from_linear(layer, amax)(x.half())  # bias in the GEMM's epilogue, half out
    assert half.dtype == torch.float16 and _relative(half, got) < 0.01
    for bad in ((-1.0, 2.0), (1.0, 0.5)):
        with pytest.raises(ValueError, match="absmax >= 0 and a headroom >= 1"):
            Fp8StaticLinear.from_linear(layer, *bad)


def test_calibration_records_each_float8_layers_largest_input():
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 48))
    inputs = [torch.randn(5, 32), 3 * torch.randn(5, 32)]

    def calibrate(model):
        for x in inputs:
            model(x)

    seen = input_absmax(net, calibrate)
    assert seen["0"] == pytest.approx(max(float(x.abs().max()) for x in inputs))
    with torch.no_grad():
        hidden = [torch.relu(net[0](x)) for x in inputs]
    assert seen["2"] == pytest.approx(max(float(h.abs().max()) for h in hidden))
    assert not net[0]._forward_pre_hooks  # the hooks are gone afterwards
    skipped = copy.deepcopy(net)  # layers the calibration does not run are not called by the model either
    assert to_float8_static(skipped, lambda model: model[2](torch.randn(3, 16))) == 1
    assert type(skipped[0]) is torch.nn.Linear and isinstance(skipped[2], Fp8StaticLinear)


def test_unet_in_static_float8_stays_close_and_quantizes_without_a_reduction():
    from torch._inductor.utils import run_and_get_code

    unet, fp8, swapped, (x, t, c) = _static_unet()
    statics = [m for m in fp8.modules() if isinstance(m, Fp8StaticLinear)]
    assert swapped > 0 and len(statics) == swapped
    assert any(isinstance(m, Fp8Conv1x1) and isinstance(m.linear, Fp8StaticLinear) for m in fp8.modules())
    assert isinstance(fp8.time_embedding.linear_1, torch.nn.Linear)
    with torch.inference_mode():
        want = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        got = fp8(x, t, encoder_hidden_states=c, return_dict=False)[0]
    relative = _relative(got, want)
    print(f"static float8 against full precision, relative L2: {relative:.4f}")
    assert 0 < relative < 0.1  # row-wise measured 0.035 on the same UNet
    # the point of static scales: compiled, the inputs' quantization is elementwise (no absmax), where the row-wise
    # layers reduce each row first
    torch.manual_seed(0)
    block = [torch.nn.Conv2d(32, 64, 1), torch.nn.SiLU(), torch.nn.Conv2d(64, 32, 1)]
    x8 = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last)
    rowwise = torch.nn.Sequential(Fp8Conv1x1(block[0]), block[1], Fp8Conv1x1(block[2])).eval()
    static = torch.nn.Sequential(*copy.deepcopy(block)).eval()
    to_float8_static(static, lambda model: model(x8))
    codes = {}
    for name, net in (("rowwise", rowwise), ("static", static)):
        torch._dynamo.reset()
        with torch.inference_mode():
            _, code = run_and_get_code(torch.compile(net, dynamic=False), x8)
        codes[name] = "\n".join(code)
    assert "amax" in codes["rowwise"] and "amax" not in codes["static"]
    torch._dynamo.reset()  # and none in the whole UNet, q/k/v fused as the worker serves it
    from sage_core.unet_buckets import fuse_layout

    fused = copy.deepcopy(unet)
    to_float8_static(fuse_layout(fused), lambda model: model(x, t, encoder_hidden_states=c, return_dict=False))
    with torch.inference_mode():
        _, code = run_and_get_code(torch.compile(fused, dynamic=False), x.to(memory_format=torch.channels_last), t,
                                   encoder_hidden_states=c, return_dict=False)
    unet_code = "\n".join(code)
    assert "_scaled_mm" in unet_code and "amax" not in unet_code


@pytest.mark.parametrize("mode", ["fp8-static", "fp8-static-geglu"])
def test_the_worker_s_calibration_reaches_every_layer_the_fused_unet_calls(mode):
    # compile_unet fuses q/k/v before quantizing; diffusers keeps the unfused projections beside the fused one,
    # unused, and those stay as they are
    from edge_server.worker import float8_calibration
    from sage_core.unet_buckets import fuse_layout, quantize_unet

    pipe = tiny_pipeline(seed=0)
    reference = copy.deepcopy(pipe.unet).eval()
    unet = quantize_unet(fuse_layout(pipe.unet.eval()), mode, float8_calibration(pipe))
    block = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert isinstance(block.attn1.to_qkv, Fp8StaticLinear) and type(block.attn1.to_q) is torch.nn.Linear
    assert isinstance(block.attn2.to_kv, Fp8StaticLinear)
    fused = [m for m in unet.modules() if isinstance(m, Fp8GegluFeedForward)]
    transformer_blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(fused) == (len(transformer_blocks) if mode == "fp8-static-geglu" else 0) > 0 or mode == "fp8-static"
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 300])
    with torch.inference_mode():
        got = unet(x.to(memory_format=torch.channels_last), t, encoder_hidden_states=c, return_dict=False)[0]
        want = reference(x, t, encoder_hidden_states=c, return_dict=False)[0]
    assert 0 < _relative(got, want) < 0.1


def test_unet_with_fused_geglu_computes_what_the_static_unet_computes():
    # the same calibration, the same float8 operands: only the GEGLU's float32 sums' order differs
    from edge_server.worker import float8_calibration
    from sage_core.unet_buckets import quantize_unet

    pipe = tiny_pipeline(seed=0)
    static, fused = (quantize_unet(copy.deepcopy(pipe.unet).eval(), mode, float8_calibration(pipe))
                     for mode in ("fp8-static", "fp8-static-geglu"))
    g = torch.Generator().manual_seed(4)
    x, c, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([999, 20])
    with torch.inference_mode():
        want, got = (unet(x, t, encoder_hidden_states=c, return_dict=False)[0] for unet in (static, fused))
    assert any(isinstance(m, Fp8GegluFeedForward) for m in fused.modules())
    assert _relative(got, want) < 1e-3


def _feed_forward(dim: int = 64, seed: int = 0):
    """A diffusers GEGLU feed-forward block (as SD's transformer blocks have it) in a container, and inputs."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(seed)
    net = torch.nn.Sequential(FeedForward(dim, activation_fn="geglu")).eval()
    return net, torch.randn(2, 24, dim), torch.randn(2, 24, dim) * 1.5


def test_fused_geglu_block_computes_what_the_static_layers_it_replaces_compute():
    net, calibration, x = _feed_forward()
    static, fused = copy.deepcopy(net), copy.deepcopy(net)
    assert to_float8_static(static, lambda model: model(calibration)) == 2  # the GEGLU's projection, the output
    assert to_float8_static(fused, lambda model: model(calibration), fuse_geglu=True) == 1
    assert isinstance(fused[0], Fp8GegluFeedForward)
    with torch.inference_mode():
        want, unfused, got = net(x), static(x), fused(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    # the same float8 operands and scales, one kernel instead of three: equal up to float32 summation order
    assert _relative(got, unfused) < 1e-3
    assert 0 < _relative(got, want) < 0.1
    inner = fused[0]
    codes = inner.proj.quantize(inner.proj.rows(x))
    mid = geglu_reference(codes, inner.proj.weight_fp8, inner.proj_bias, inner.proj.input_scale,
                          inner.proj.weight_scale, inner.out.input_scale)
    hidden, gate = torch.nn.functional.linear(codes.float() * inner.proj.input_scale,
                                              inner.proj.weight_fp8.float() * inner.proj.weight_scale,
                                              inner.proj_bias).chunk(2, dim=-1)
    decoded = hidden * torch.nn.functional.gelu(gate)  # GEGLU as diffusers writes it, on the dequantized operands
    assert _relative(mid.float() * inner.out.input_scale, decoded) < 0.05  # float8 codes of it: 3 mantissa bits
    unfit = torch.nn.Sequential(_feed_forward(dim=40)[0][0]).eval()  # 40 is no multiple of 16: no float8 GEMM
    assert to_float8_static(unfit, lambda model: model(torch.randn(2, 3, 40)), fuse_geglu=True) == 0


def test_float8_conv3x3_is_the_convolution_of_the_quantized_operands():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    x = torch.randn(2, 64, 6, 5).to(memory_format=torch.channels_last)
    fp8 = Fp8StaticConv3x3(conv, float(x.abs().amax()), headroom=2.0)
    got = fp8(x)
    assert got.shape == (2, 32, 6, 5) and got.dtype == x.dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert fp8.weight_scale.shape == (32,)  # one scale per output channel
    scale = fp8.input_scale
    codes = (x.permute(0, 2, 3, 1) / scale).to(torch.float8_e4m3fn)
    weight = fp8.weight_fp8.float().permute(0, 3, 1, 2) * fp8.weight_scale[:, None, None, None]
    want = torch.nn.functional.conv2d(codes.float().permute(0, 3, 1, 2) * scale, weight, conv.bias, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert 0 < _relative(got, conv(x).detach()) < 0.08
    torch.testing.assert_close(conv3x3_reference(codes, fp8.weight_fp8, fp8.bias, scale, fp8.weight_scale,
                                                 torch.float32), want.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    for bad in (torch.nn.Conv2d(64, 32, 3, padding=1, stride=2), torch.nn.Conv2d(48, 32, 3, padding=1),
                torch.nn.Conv2d(64, 32, 1)):
        with pytest.raises(ValueError, match="not a 3x3 convolution the float8 kernel takes"):
            Fp8StaticConv3x3(bad, 1.0)


def _unet64():
    """A small random UNet with 64 channels (the tiny UNet's 8 and 16 are no multiple of the float8 convolution
    kernel's 64), and its static float8 calibration."""
    from diffusers import UNet2DConditionModel

    from sage_core.unet_buckets import unet_calibration

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(64, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32).eval()
    return unet, unet_calibration(torch.randn(4, 77, 32), 8)


def test_unet_with_float8_convolutions_stays_close_and_converts_only_what_the_kernel_takes():
    from sage_core.unet_buckets import quantize_unet

    unet, calibrate = _unet64()
    static, convs = (quantize_unet(copy.deepcopy(unet), mode, calibrate) for mode in ("fp8-static", "fp8-static-conv"))
    converted = [m for m in convs.modules() if isinstance(m, Fp8StaticConv3x3)]
    takes = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and m.stride == (1, 1) and m.in_channels % 64 == 0 and m.out_channels % 16 == 0]
    assert len(converted) == len(takes) > 0
    assert type(convs.conv_in) is torch.nn.Conv2d and type(convs.conv_out) is torch.nn.Conv2d  # 4 channels in, out
    assert type(convs.down_blocks[0].downsamplers[0].conv) is torch.nn.Conv2d  # stride 2
    g = torch.Generator().manual_seed(5)
    x, c, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([999, 20])
    with torch.inference_mode():
        want, got_static, got = (net(x, t, encoder_hidden_states=c, return_dict=False)[0]
                                 for net in (unet, static, convs))
    print(f"float8 3x3 convolutions: relative L2 {_relative(got, want):.4f} "
          f"(static alone {_relative(got_static, want):.4f})")
    assert 0 < _relative(got, want) < 0.15


_INTERPRETER_FIX = """
import numpy as np, torch
import triton.runtime.interpreter as interpreter

DTYPES = {"fp8e4nv": torch.float8_e4m3fn, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BITS = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def convert(values, input_dtype, output_dtype, rounding_mode):
    # the interpreter's float conversion drops a rounding carry into the exponent (7.96 -> 4.0 in float8); torch's
    # conversion, which the GPU's matches, instead
    raw = torch.from_numpy(values.view(np.dtype(f"uint{input_dtype.primitive_bitwidth}")).copy())
    if input_dtype.primitive_bitwidth > 8:
        raw = raw.view(BITS[input_dtype.primitive_bitwidth])
    out = raw.view(DTYPES[input_dtype.name]).to(DTYPES[output_dtype.name]).view(BITS[output_dtype.primitive_bitwidth])
    return out.numpy().view(np.dtype(f"uint{output_dtype.primitive_bitwidth}")).reshape(values.shape)


interpreter._convert_float = convert
torch.manual_seed(0)
"""

_INTERPRETED = {
    "geglu": """
from sage_core.fp8 import geglu_reference, quantize_tensor
from sage_core.fp8_kernels import launch_geglu

m, k, n = 50, 80, 48  # none a multiple of its tile: every edge masked
x, x_scale = quantize_tensor(torch.randn(m, k))
w, w_scale = quantize_tensor(torch.randn(2 * n, k) / k ** 0.5)
b = torch.randn(2 * n)
h, g = ((x.float() @ w.float().t()) * x_scale * w_scale + b).chunk(2, dim=-1)
out_scale = (h * torch.nn.functional.gelu(g)).abs().max() * 1.1 / 448  # the codes span the range unsaturated
got = launch_geglu(x, w, b, x_scale, w_scale, out_scale, blocks=(32, 32, 32)).float()
want = geglu_reference(x, w, b, x_scale, w_scale, out_scale).float()
""",
    "conv3x3": """
from sage_core.fp8 import conv3x3_reference, quantize_rows, quantize_tensor
from sage_core.fp8_kernels import launch_conv3x3

x, x_scale = quantize_tensor(torch.randn(2, 5, 7, 128))  # 70 pixels, 128 channels: two chunks per tap
codes, scale = quantize_rows(torch.randn(48, 3 * 3 * 128) / 30)  # 48 outputs: a ragged tile
w, w_scale = codes.reshape(48, 3, 3, 128), scale.flatten()
b = torch.randn(48)
got = launch_conv3x3(x, w, b, x_scale, w_scale, torch.float32, blocks=(32, 32))
want = conv3x3_reference(x, w, b, x_scale, w_scale, torch.float32)
""",
}
_REPORT = """
print(float(((got.float() - want.float()).norm() / want.float().norm())), int((got != want).sum()),
      float((got.float() - want.float()).abs().max()), float(want.float().abs().max()),
      float(want.float().abs().mean()), got.numel())
"""


@pytest.mark.parametrize("kernel", sorted(_INTERPRETED))
def test_kernel_computes_its_reference_in_triton_s_interpreter(kernel):
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_FIX + _INTERPRETED[kernel] + _REPORT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    relative, differ, worst, peak, mean, count = map(float, done.stdout.split())
    assert mean > 0.02 * peak  # values across the range (not all zeros or all saturated): the comparison sees them
    if kernel == "geglu":  # float8 codes out: float32 sums in another order may round a code the other way at a tie
        assert peak < FP8_MAX and differ <= 0.01 * count and worst <= 0.125 * peak
    else:  # float32 out, sums in another order
        assert relative < 1e-5


def _hopper_target():
    """Triton's compile target for an H100 (sm90, 32-thread warps)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def _hopper_resources(kernel, signature: dict[str, str], config, aligned: tuple[int, ...]) -> tuple[str, int, str]:
    """Compile a Triton kernel for sm90 with Triton's own ptxas (no GPU) as its launcher specializes it (16-byte
    aligned tensors, sizes divisible by 16); its PTX, shared memory and cuobjdump's register line."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature, constexprs=config.kwargs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    compiled = triton.compile(source, target=_hopper_target(),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return compiled.asm["ptx"], compiled.metadata.shared, usage


@pytest.mark.parametrize("kernel", ["geglu", "conv3x3"])
def test_kernel_compiles_for_hopper_to_float8_tensor_core_code_without_spilling(kernel):
    pytest.importorskip("triton")
    import re

    from sage_core import fp8_kernels

    pointers = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "b_ptr": "*fp32", "x_scale_ptr": "*fp32",
                "w_scale_ptr": "*fp32"}
    blocks = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    if kernel == "geglu":
        fn, tuned, aligned = fp8_kernels.geglu_fp8_kernel, fp8_kernels.GEGLU_TUNED, (0, 1, 2, 6, 7, 8, 9)
        signature = {**pointers, "out_scale_ptr": "*fp32", "out_ptr": "*fp8e4nv", "M": "i32", "N": "i32",
                     "K": "i32", **blocks}
    else:
        fn, tuned, aligned = fp8_kernels.conv3x3_fp8_kernel, fp8_kernels.CONV_TUNED, (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)
        signature = {**pointers, "out_ptr": "*fp16", "P": "i32", "H": "i32", "W": "i32", "C": "i32", "F": "i32",
                     **blocks}
    for config in tuned.configs:
        ptx, shared, usage = _hopper_resources(fn, signature, config, aligned)
        assert re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx), config  # Hopper's float8 MMA
        assert "cp.async" in ptx, config  # tiles copied to shared memory asynchronously, stages ahead
        assert shared <= 227 * 1024, config  # fits an H100's shared memory per block
        assert re.search(r"STACK:0\b", usage) and re.search(r"LOCAL:0\b", usage), (config, usage)  # no spills


def _float8_gpu_or_skip() -> None:
    """Skip the test unless this GPU has float8 GEMMs with one scale per tensor (what the static modes need)."""
    try:
        check_scaled_mm(torch.device("cuda"), rowwise=False)
    except ValueError as exc:
        pytest.skip(str(exc))


def _as_compiled(op):
    """torch.compile of a function calling `op`, as a compiled graph calls the custom op."""
    return torch.compile(lambda *args: op(*args), dynamic=False)


@pytest.mark.gpu
def test_kernels_on_the_gpu_compute_their_references_compiled_and_not():
    _float8_gpu_or_skip()
    from sage_core.fp8_kernels import conv3x3_fp8, geglu_fp8

    torch.manual_seed(0)
    m, k, n = 4096 + 100, 320, 1280  # SD v1.5's top-level feed-forward on one latent and a ragged edge
    x, x_scale = quantize_tensor(torch.randn(m, k, device="cuda"))
    w, w_scale = quantize_tensor(torch.randn(2 * n, k, device="cuda") / k ** 0.5)
    b = torch.randn(2 * n, device="cuda")
    out_scale = torch.tensor(8.0 / 448, device="cuda")
    want = geglu_reference(x, w, b, x_scale, w_scale, out_scale).float()
    for run in (geglu_fp8, _as_compiled(geglu_fp8)):
        got = run(x, w, b, x_scale, w_scale, out_scale).float()
        assert (got != want).float().mean().item() < 0.01
        assert (got - want).abs().max().item() <= 0.125 * want.abs().max().item()
    cx, cx_scale = quantize_tensor(torch.randn(3, 64, 64, 320, device="cuda"))  # a top-level resnet's conv
    codes, scale = quantize_rows(torch.randn(640, 9 * 320, device="cuda") / 50)
    cw, cw_scale, cb = codes.reshape(640, 3, 3, 320), scale.flatten(), torch.randn(640, device="cuda")
    want = conv3x3_reference(cx, cw, cb, cx_scale, cw_scale, torch.float32)
    for run in (conv3x3_fp8, _as_compiled(conv3x3_fp8)):
        got = run(cx, cw, cb, cx_scale, cw_scale, torch.float16).float()
        assert _relative(got, want) < 5e-3  # float16 out; Hopper's float8 MMA may accumulate in fewer bits


@pytest.mark.gpu
def test_compiled_unet_with_float8_convolutions_stays_close_to_the_half_precision_one():
    from sage_core.unet_buckets import compile_unet

    _float8_gpu_or_skip()
    unet, calibrate = _unet64()
    unet = unet.to("cuda", torch.float16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 8, 8, generator=g).to("cuda", torch.float16)
    c = torch.randn(4, 77, 32, generator=g).to("cuda", torch.float16)
    t = torch.tensor([999, 500, 200, 20], device="cuda")
    with torch.inference_mode():
        want = unet(x, t, encoder_hidden_states=c, return_dict=False)[0].float()
    compiled = compile_unet(unet, "default", quantize="fp8-static-conv", calibrate=calibrate)
    assert any(isinstance(m, Fp8StaticConv3x3) for m in unet.modules())
    assert any(isinstance(m, Fp8GegluFeedForward) for m in unet.modules())
    with torch.inference_mode():
        got = compiled(x.to(memory_format=torch.channels_last), t, encoder_hidden_states=c, return_dict=False)[0]
    relative = _relative(got, want)
    print(f"fp8-static-conv compiled against fp16, relative L2 difference of the UNet's output: {relative:.4f}")
    assert relative < 0.2  # the CPU's float32 run of the same UNet: 0.091


class _HopperTarget:
    """A stand-in for Triton's GPU driver on a machine without one: names an sm90 target, so that torch's tracing
    of a Triton kernel (its mutation analysis compiles the kernel to Triton IR for that target) runs on the CPU."""

    def get_current_target(self):
        return _hopper_target()

    def get_current_device(self) -> int:
        return 0

    def get_benchmarker(self):
        raise AssertionError("nothing is timed while tracing")

    def get_device_interface(self):
        return torch.cpu


def test_compiled_unet_graph_calls_each_float8_kernel_once_per_converted_layer(monkeypatch):
    # what torch.compile makes of the custom ops before Inductor: one graph (fullgraph: no break), each fused GEGLU
    # and 3x3 convolution one Triton kernel node, writing only its output, on dense operands. The modules take
    # their CPU reference off the GPU; here the custom ops stand in for it, so the trace goes the GPU's way.
    # Inductor's own lowering needs a GPU (the GPU-marked tests above).
    pytest.importorskip("triton")
    from torch._functorch.aot_autograd import aot_module_simplified
    from triton.runtime import driver

    from sage_core import fp8
    from sage_core.fp8_kernels import conv3x3_fp8, geglu_fp8
    from sage_core.unet_buckets import fuse_layout, quantize_unet

    unet, calibrate = _unet64()
    unet = quantize_unet(fuse_layout(unet), "fp8-static-conv", calibrate)
    fused = sum(isinstance(m, Fp8GegluFeedForward) for m in unet.modules())
    convs = sum(isinstance(m, Fp8StaticConv3x3) for m in unet.modules())
    monkeypatch.setattr(driver, "_active", _HopperTarget())
    monkeypatch.setattr(fp8, "geglu_reference", geglu_fp8)
    monkeypatch.setattr(fp8, "conv3x3_reference", conv3x3_fp8)
    graphs = []

    def capture(gm, example_inputs):
        def forward_compiler(graph, inputs):
            graphs.append(graph)
            outputs = len(next(n for n in graph.graph.nodes if n.op == "output").args[0])
            return lambda *args: [torch.zeros(())] * outputs  # nothing runs: the graph is what is checked

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler)

    x, c = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last), torch.randn(2, 77, 32)
    t = torch.tensor([999, 20])
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            torch.compile(unet, backend=capture, dynamic=False, fullgraph=True)(x, t, encoder_hidden_states=c,
                                                                                return_dict=False)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    launches = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    kernels = [n.kwargs["kernel_idx"] for n in launches]
    assert fused > 0 and convs > 0 and len(launches) == fused + convs and len(set(kernels)) == 2
    assert sorted(kernels.count(k) for k in set(kernels)) == sorted([fused, convs])
    assert all(n.kwargs["tensors_to_clone"] == ["out_ptr"] for n in launches)  # the kernels write their output only
    # Inductor gives a Triton kernel its operands with the strides recorded here (eager_input_vals), and the
    # kernels index them as dense row-major arrays
    recorded = [v for n in launches for v in n.meta["eager_input_vals"][1]["kwargs"].values()
                if isinstance(v, torch.Tensor)]
    assert len(recorded) == 7 * len(launches) - convs and all(v.is_contiguous() for v in recorded)


def test_kernels_refuse_strided_operands_rather_than_misread_them():
    pytest.importorskip("triton")
    from sage_core.fp8_kernels import launch_conv3x3, launch_geglu

    x, x_scale = quantize_tensor(torch.randn(32, 64))
    w, w_scale = quantize_tensor(torch.randn(64, 64))
    with pytest.raises(ValueError, match="dense row-major operands; x strided"):
        launch_geglu(x.t().contiguous().t(), w, torch.zeros(64), x_scale, w_scale, x_scale)
    pixels, _ = quantize_tensor(torch.randn(2, 64, 4, 4))  # channels first: the kernel wants them last
    codes, scale = quantize_rows(torch.randn(16, 9 * 64))
    with pytest.raises(ValueError, match="dense row-major operands; x strided"):
        launch_conv3x3(pixels.permute(0, 2, 3, 1), codes.reshape(16, 3, 3, 64), torch.zeros(16), x_scale,
                       scale.flatten(), torch.float32)
    narrow, _ = quantize_tensor(torch.randn(2, 4, 4, 96))  # 96 channels: chunks of 64 would straddle two taps
    codes, scale = quantize_rows(torch.randn(16, 9 * 96))
    with pytest.raises(ValueError, match="input channels in multiples of 64, got 96"):
        launch_conv3x3(narrow, codes.reshape(16, 3, 3, 96), torch.zeros(16), x_scale, scale.flatten(), torch.float32)


def test_the_layer_filter_and_the_kernel_agree_on_the_channel_chunk():
    """`is_conv3x3` admits the input channels `launch_conv3x3` takes (fp8 cannot import the Triton module)."""
    pytest.importorskip("triton")
    from sage_core.fp8 import CONV_CHANNELS
    from sage_core.fp8_kernels import CONV_BLOCK_K

    assert CONV_CHANNELS == CONV_BLOCK_K
