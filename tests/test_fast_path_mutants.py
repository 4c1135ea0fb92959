"""Fast-path behaviour a mutation audit found unchecked by the fast tests: the float8 layers (sage_core.fp8: scales,
saturation, the refusals and their reasons, which layers and convolutions are taken, calibration, bias and dtype
handling), the float8 Triton kernels (sage_core.fp8_kernels: operand checks, tiles of unequal sides, saturation, in
Triton's interpreter) and the channels-last concatenation pass (sage_core.layout_pass, on hand-built FX graphs).

All on the CPU: torch casts to float8 there and runs torch._scaled_mm; the kernels run in one Triton interpreter
subprocess."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from sage_core import fp8
from sage_core.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Conv1x1,
    Fp8GegluFeedForward,
    Fp8Linear,
    Fp8StaticConv3x3,
    Fp8StaticLinear,
    check_scaled_mm,
    float8_layer,
    geglu_reference,
    input_absmax,
    is_conv3x3,
    quantize_rows,
    quantize_tensor,
    static_input_scale,
    to_codes,
    to_float8_static,
)
from sage_core.layout_pass import ChannelsLastConcat, channels_last_concats

pytestmark = pytest.mark.timeout(60)
_SCALED_MM = torch._scaled_mm  # the real one, before any test replaces it


# ---- helpers ------------------------------------------------------------------------------------------------------
def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 distance of got from want."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _linear(inputs: int = 64, outputs: int = 48, seed: int = 0, bias: bool = True) -> torch.nn.Linear:
    """A seeded linear layer."""
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs, outputs, bias=bias)


def _conv3x3(inputs: int = 64, outputs: int = 32, seed: int = 0, **options: Any) -> torch.nn.Conv2d:
    """A seeded 3x3 convolution (padding 1 unless `options` say otherwise)."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(inputs, outputs, 3, **{"padding": 1, **options})


def _feed_forward(dim: int = 64, seed: int = 0, **options: Any) -> torch.nn.Sequential:
    """A diffusers GEGLU feed-forward block in a container."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(seed)
    return torch.nn.Sequential(FeedForward(dim, activation_fn="geglu", **options)).eval()


def _runs(*inputs: torch.Tensor) -> Callable[[torch.nn.Module], None]:
    """A calibration that runs the model on each input."""

    def calibrate(model: torch.nn.Module) -> None:
        for x in inputs:
            model(x)

    return calibrate


def _failing_scaled_mm(error: type[Exception], when: Callable[[dict[str, Any]], bool]) -> Callable[..., torch.Tensor]:
    """torch._scaled_mm raising `error` for the calls `when` picks (by its keyword arguments), else the real one."""
    def scaled_mm(*args: Any, **kwargs: Any) -> torch.Tensor:
        if when(kwargs):
            raise error("no such float8 GEMM here\nsecond line")
        return _SCALED_MM(*args, **kwargs)

    return scaled_mm


def _rowwise(kwargs: dict[str, Any]) -> bool:
    """Whether a _scaled_mm call has row-wise (not 0-dim) scales."""
    return kwargs["scale_a"].ndim > 0


# ---- sage_core.fp8: scales and codes ------------------------------------------------------------------------------
def test_tensor_scale_is_the_absmax_over_the_top_code_even_when_the_peak_is_negative():
    """quantize_tensor's scale: |x|'s max / 448, so the most negative value lands on -448; zeros stay finite."""
    x = torch.tensor([[0.5, -3.0], [1.0, 2.0]])
    codes, scale = quantize_tensor(x)
    assert scale.ndim == 0 and scale.item() == pytest.approx(3.0 / FP8_MAX)
    assert codes.float().min().item() == -FP8_MAX
    zero_codes, zero_scale = quantize_tensor(torch.zeros(4, 4))
    assert torch.isfinite(zero_scale) and (zero_codes.float() == 0).all()


def test_half_inputs_are_divided_in_float32_before_rounding_to_float8():
    """to_codes divides in float32: a half-precision quotient would round twice (11 bits, then 3) and move codes."""
    torch.manual_seed(0)
    x = torch.randn(20000).half()
    scale = torch.tensor(0.0123)
    want = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(to_codes(x, scale).float(), want.float())


def test_rowwise_linear_writes_bfloat16_range_outputs_without_overflow():
    """The row-wise GEMM writes bfloat16 (float16 would overflow past 65504) before the cast to x's dtype."""
    layer = _linear(64, 32)
    with torch.no_grad():
        layer.weight.mul_(1e4)
    x = torch.randn(4, 64) * 100
    got = Fp8Linear.from_linear(layer)(x)
    assert got.abs().max() > 65504 and torch.isfinite(got).all()
    assert 0 < _relative(got, layer(x).detach()) < 0.08


def test_rowwise_linear_returns_its_input_s_dtype_with_or_without_a_bias():
    """Fp8Linear casts the GEMM's bfloat16 back to x's dtype (a bias-less layer has no bias add to promote it)."""
    x = torch.randn(3, 64)
    assert Fp8Linear.from_linear(_linear(bias=False))(x).dtype == torch.float32
    assert Fp8Linear.from_linear(_linear().half())(x.half()).dtype == torch.float16


def test_rows_are_made_row_major_for_the_gemm():
    """Float8Gemm.rows makes a column-major view (a batch-1 NCHW tensor's pixels) row-major, as GPU GEMMs need."""
    rows = Fp8Linear.from_linear(_linear(32, 16)).rows(torch.randn(1, 32, 5, 6).permute(0, 2, 3, 1))
    assert rows.shape == (30, 32) and rows.is_contiguous()


# ---- static scales ------------------------------------------------------------------------------------------------
def test_static_input_scale_takes_the_boundaries_and_a_zero_absmax():
    """headroom 1 and absmax 0 are allowed; a zero absmax still gives a finite, positive scale."""
    assert static_input_scale(3.0, 1.0, torch.device("cpu")).item() == pytest.approx(3.0 / FP8_MAX)
    zero = static_input_scale(0.0, 2.0, torch.device("cpu"))
    assert zero.item() > 0 and zero.dtype == torch.float32
    layer = _linear()
    fp8_layer = Fp8StaticLinear.from_linear(layer, 0.0)
    got = fp8_layer(torch.zeros(2, 64))
    torch.testing.assert_close(got, layer.bias.detach().expand(2, -1), rtol=0, atol=1e-6)


def test_static_layers_default_to_a_headroom_of_two():
    """Fp8StaticLinear, its from_linear and to_float8_static all default to headroom 2."""
    layer = _linear()
    assert Fp8StaticLinear(layer.weight, layer.bias, 3.0).input_scale.item() == pytest.approx(6.0 / FP8_MAX)
    assert Fp8StaticLinear.from_linear(layer, 3.0).input_scale.item() == pytest.approx(6.0 / FP8_MAX)
    net = torch.nn.Sequential(_linear())
    x = torch.randn(5, 64)
    to_float8_static(net, _runs(x))
    assert net[0].input_scale.item() == pytest.approx(2 * x.abs().max().item() / FP8_MAX)


def test_calibration_keeps_the_largest_absolute_input_of_all_calls():
    """input_absmax keeps the max over calls (the largest first here) of |x| (a negative peak here)."""
    net = torch.nn.Sequential(_linear(32, 16))
    first, second = torch.zeros(3, 32), torch.zeros(3, 32)
    first[0, 0], second[1, 1] = -5.0, 1.0
    assert input_absmax(net, _runs(first, second)) == {"0": 5.0}


def test_static_pointwise_convolution_keeps_its_bias_and_headroom():
    """static_float8_layer's 1x1 convolution: its bias in the GEMM, the calibrated absmax times the headroom."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 16, 1)
    with torch.no_grad():
        conv.bias.fill_(3.0)
    net = torch.nn.Sequential(conv)
    x = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)
    to_float8_static(net, _runs(x), headroom=3.0)
    assert isinstance(net[0], Fp8Conv1x1) and isinstance(net[0].linear, Fp8StaticLinear)
    assert net[0].linear.input_scale.item() == pytest.approx(3 * x.abs().max().item() / FP8_MAX)
    with torch.inference_mode():
        assert _relative(net(x), conv(x)) < 0.08


# ---- refusals and their reasons -----------------------------------------------------------------------------------
def test_static_refusal_names_the_static_mode_and_any_gemm_error(monkeypatch: pytest.MonkeyPatch):
    """check_scaled_mm(rowwise=False) tries one scale per tensor, names fp8-static, and catches NotImplementedError."""
    monkeypatch.setattr(torch, "_scaled_mm", _failing_scaled_mm(NotImplementedError, lambda kwargs: True))
    with pytest.raises(ValueError, match="^fp8-static needs float8 GEMMs with one scale per tensor .*here$"):
        check_scaled_mm(torch.device("cpu"), rowwise=False)
    with pytest.raises(ValueError, match="^fp8-rowwise needs float8 GEMMs with row-wise scales"):
        check_scaled_mm(torch.device("cpu"))


def test_static_conversion_needs_only_per_tensor_gemms(monkeypatch: pytest.MonkeyPatch):
    """A device with per-tensor but no row-wise float8 GEMMs takes static float8; the row-wise mode is refused."""
    monkeypatch.setattr(torch, "_scaled_mm", _failing_scaled_mm(RuntimeError, _rowwise))
    net = torch.nn.Sequential(_linear())
    assert to_float8_static(net, _runs(torch.randn(3, 64))) == 1
    with pytest.raises(ValueError, match="fp8-rowwise needs"):
        check_scaled_mm(torch.device("cpu"))
    monkeypatch.setattr(torch, "_scaled_mm", _failing_scaled_mm(RuntimeError, lambda kwargs: not _rowwise(kwargs)))
    check_scaled_mm(torch.device("cpu"))  # row-wise only: that check passes


def test_cpu_conversion_with_float8_convolutions_does_not_need_triton(monkeypatch: pytest.MonkeyPatch):
    """Only a CUDA model needs the Triton kernels: on the CPU the references run, importable or not."""
    monkeypatch.setitem(sys.modules, "sage_core.fp8_kernels", None)  # import raises ImportError
    net = torch.nn.Sequential(_conv3x3())
    x = torch.randn(1, 64, 4, 4).to(memory_format=torch.channels_last)
    assert to_float8_static(net, _runs(x), convs=True) == 1
    assert isinstance(net[0], Fp8StaticConv3x3)


# ---- which layers are taken ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"padding": 0}, {"dilation": 2}, {"groups": 2},
                                     {"padding_mode": "reflect"}], ids=["padding0", "dilation", "groups", "reflect"])
def test_only_plain_3x3_convolutions_are_taken(options: dict[str, Any]):
    """is_conv3x3 refuses other paddings, dilations, groups and padding modes."""
    conv = _conv3x3(**options)
    assert not is_conv3x3(conv)
    with pytest.raises(ValueError, match="not a 3x3 convolution the float8 kernel takes"):
        Fp8StaticConv3x3(conv, 1.0)


def test_3x3_convolution_channels_must_fit_the_kernel_s_tiles():
    """Input channels a multiple of 64, output channels of 16."""
    assert is_conv3x3(_conv3x3(64, 16)) and is_conv3x3(_conv3x3(128, 48))
    assert not is_conv3x3(_conv3x3(32, 32)) and not is_conv3x3(_conv3x3(64, 24))


def test_pointwise_convolutions_with_padding_or_odd_channels_stay():
    """A padded 1x1 convolution is no matmul over pixels; 8 channels fit no float8 GEMM."""
    assert float8_layer("proj", torch.nn.Conv2d(32, 16, 1, padding=1)) is None
    assert float8_layer("proj", torch.nn.Conv2d(8, 32, 1)) is None


def test_unconverted_3x3_convolutions_stay_without_the_convs_option():
    """to_float8_static leaves 3x3 convolutions alone unless asked for them."""
    net = torch.nn.Sequential(_conv3x3(), torch.nn.Conv2d(32, 16, 1))
    x = torch.randn(1, 64, 4, 4).to(memory_format=torch.channels_last)
    assert to_float8_static(net, _runs(x)) == 1
    assert type(net[0]) is torch.nn.Conv2d and isinstance(net[1], Fp8Conv1x1)


def test_feed_forward_with_a_final_dropout_is_fused():
    """diffusers' FeedForward(final_dropout=True) has 4 modules: still a GEGLU block the fused kernel takes."""
    net = _feed_forward(final_dropout=True)
    x = torch.randn(2, 8, 64)
    assert len(net[0].net) == 4
    assert to_float8_static(net, _runs(x), fuse_geglu=True) == 1 and isinstance(net[0], Fp8GegluFeedForward)


def test_feed_forward_whose_output_projection_was_not_calibrated_is_not_fused():
    """A block whose second GEMM never ran has no scale for it: the projection alone becomes float8."""
    net = _feed_forward()
    assert to_float8_static(net, lambda model: model[0].net[0](torch.randn(2, 8, 64)), fuse_geglu=True) == 1
    assert isinstance(net[0].net[0].proj, Fp8StaticLinear) and type(net[0].net[2]) is torch.nn.Linear


def test_fused_feed_forward_scales_its_output_input_with_the_headroom():
    """Fp8GegluFeedForward passes its headroom to the output projection's input scale too."""
    net = _feed_forward()
    block = Fp8GegluFeedForward(net[0], input_amax=2.0, inner_amax=5.0, headroom=3.0)
    assert block.proj.input_scale.item() == pytest.approx(6.0 / FP8_MAX)
    assert block.out.input_scale.item() == pytest.approx(15.0 / FP8_MAX)


# ---- the references the kernels are checked against --------------------------------------------------------------
def test_geglu_reference_uses_the_exact_gelu():
    """geglu_reference's GELU is the exact (erf) one diffusers' GEGLU uses: on gates in [-4, -2.5] the tanh
    approximation is ~10 % off, several float8 steps."""
    n = 64
    gates = torch.linspace(-4.0, -2.5, n)
    b = torch.cat([torch.ones(n), gates])  # x and w zero: h = 1, g = the bias
    x, w = torch.zeros(1, 16, dtype=FP8), torch.zeros(2 * n, 16, dtype=FP8)
    one = torch.tensor(1.0)
    exact = 0.5 * gates * (1 + torch.erf(gates / 2 ** 0.5))
    out_scale = exact.abs().max() / FP8_MAX
    got = geglu_reference(x, w, b, one, one, out_scale).float().flatten()
    want = to_codes(exact, out_scale).float()
    assert (got == want).float().mean() > 0.95


def test_float8_conv3x3_without_bias_adds_none_and_keeps_a_float32_bias():
    """A bias-less convolution gets zeros (float32, as the kernel reads it); weight scales are per output channel."""
    conv = _conv3x3(bias=False)
    x = torch.randn(1, 64, 5, 5).to(memory_format=torch.channels_last)
    layer = Fp8StaticConv3x3(conv, float(x.abs().amax()))
    assert layer.bias.dtype == torch.float32 and (layer.bias == 0).all()
    per_channel = conv.weight.detach().flatten(1).abs().amax(1) / FP8_MAX
    torch.testing.assert_close(layer.weight_scale, per_channel, rtol=1e-6, atol=0)
    with torch.inference_mode():
        assert _relative(layer(x), conv(x)) < 0.08
    half = Fp8StaticConv3x3(_conv3x3().half(), 1.0)
    assert half.bias.dtype == torch.float32


def test_float8_conv3x3_hands_the_kernel_dense_channels_last_codes(monkeypatch: pytest.MonkeyPatch):
    """An NCHW input is made channels-last before its codes go to the kernel, which indexes them densely."""
    seen: list[bool] = []
    reference = fp8.conv3x3_reference

    def dense_only(x: torch.Tensor, *rest: Any) -> torch.Tensor:
        seen.append(x.is_contiguous())
        return reference(x, *rest)

    monkeypatch.setattr(fp8, "conv3x3_reference", dense_only)
    Fp8StaticConv3x3(_conv3x3(), 1.0)(torch.randn(1, 64, 4, 4))
    assert seen == [True]


# ---- sage_core.fp8_kernels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strided", ["w", "b"])
def test_geglu_kernel_refuses_each_strided_operand(strided: str):
    """launch_geglu checks w and b as well as x."""
    pytest.importorskip("triton")
    from sage_core.fp8_kernels import launch_geglu

    x, scale = quantize_tensor(torch.randn(32, 64))
    operands = {"w": quantize_tensor(torch.randn(64, 64))[0], "b": torch.zeros(64)}
    operands[strided] = torch.stack([operands[strided]] * 2, dim=-1)[..., 0]  # same values, not dense
    with pytest.raises(ValueError, match=f"dense row-major operands; {strided} strided"):
        launch_geglu(x, operands["w"], operands["b"], scale, scale, scale)


@pytest.mark.parametrize("strided", ["w", "b", "w_scale"])
def test_conv3x3_kernel_refuses_each_strided_operand(strided: str):
    """launch_conv3x3 checks w, b and w_scale as well as x."""
    pytest.importorskip("triton")
    from sage_core.fp8_kernels import launch_conv3x3

    x, x_scale = quantize_tensor(torch.randn(1, 4, 4, 64))
    codes, scale = quantize_rows(torch.randn(16, 9 * 64))
    operands = {"w": codes.reshape(16, 3, 3, 64), "b": torch.zeros(16), "w_scale": scale.flatten()}
    operands[strided] = torch.stack([operands[strided]] * 2, dim=-1)[..., 0]
    with pytest.raises(ValueError, match=f"dense row-major operands; {strided} strided"):
        launch_conv3x3(x, operands["w"], operands["b"], x_scale, operands["w_scale"], torch.float32)


_KERNELS = """
from sage_core.fp8 import conv3x3_reference, geglu_reference, quantize_rows, quantize_tensor
from sage_core.fp8_kernels import launch_conv3x3, launch_geglu

m, k, n = 50, 80, 48
x, x_scale = quantize_tensor(torch.randn(m, k))
w, w_scale = quantize_tensor(torch.randn(2 * n, k) / k ** 0.5)
b = torch.randn(2 * n)
h, g = ((x.float() @ w.float().t()) * x_scale * w_scale + b).chunk(2, dim=-1)
out_scale = (h * torch.nn.functional.gelu(g)).abs().max() / 4 / 448  # a quarter of the range: many codes saturate
got = launch_geglu(x, w, b, x_scale, w_scale, out_scale, blocks=(32, 16, 32)).float()  # tiles taller than wide
want = geglu_reference(x, w, b, x_scale, w_scale, out_scale).float()
print(int(got.isnan().sum()), int((want.abs() == 448).sum()), float((got != want).float().mean()))
cx, cx_scale = quantize_tensor(torch.randn(2, 5, 7, 128))
codes, scale = quantize_rows(torch.randn(48, 9 * 128) / 30)
cw, cw_scale, cb = codes.reshape(48, 3, 3, 128), scale.flatten(), torch.randn(48)
got = launch_conv3x3(cx, cw, cb, cx_scale, cw_scale, torch.float32, blocks=(32, 16))
want = conv3x3_reference(cx, cw, cb, cx_scale, cw_scale, torch.float32)
print(float((got - want).norm() / want.norm()))
"""


def test_kernels_compute_their_references_with_unequal_tiles_and_saturate_in_triton_s_interpreter():
    """Both kernels' grids and tile indexing with BLOCK_M != BLOCK_N, and the GEGLU's codes saturating at +-448."""
    pytest.importorskip("triton")
    import os
    import subprocess
    from pathlib import Path

    from test_fp8 import _INTERPRETER_FIX

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_FIX + _KERNELS], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    geglu_line, conv_line = done.stdout.split("\n")[:2]
    nans, saturated, differ = geglu_line.split()
    assert int(nans) == 0 and int(saturated) > 50 and float(differ) <= 0.01
    assert float(conv_line) < 1e-5


# ---- sage_core.layout_pass on hand-built graphs -------------------------------------------------------------------
def _graph(values: list[Any], conv_reads: bool = True) -> tuple[torch.fx.Graph, list[torch.fx.Node]]:
    """An FX graph with one aten.cat per value (its meta["val"], none where None), each read by a convolution
    (else by a sum)."""
    graph = torch.fx.Graph()
    a = graph.placeholder("a")
    weight = graph.placeholder("weight")
    cats, outputs = [], []
    for value in values:
        cat = graph.call_function(torch.ops.aten.cat.default, ([a, a], 1))
        if value is not None:
            cat.meta["val"] = value
        cats.append(cat)
        if conv_reads:
            outputs.append(graph.call_function(torch.ops.aten.convolution.default,
                                               (cat, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)))
        else:
            outputs.append(graph.call_function(torch.ops.aten.sum.default, (cat,)))
    graph.output(tuple(outputs))
    return graph, cats


def _channels_last(*shape: int) -> torch.Tensor:
    """An empty 4-D tensor laid out channels-last."""
    return torch.empty(*shape).to(memory_format=torch.channels_last)


def test_the_pass_pins_every_channels_last_concatenation_not_only_the_first():
    """Each channels-last concatenation a convolution reads is pinned, whatever else reads it."""
    graph, cats = _graph([_channels_last(2, 8, 4, 4), _channels_last(2, 16, 4, 4)])
    with graph.inserting_before(next(iter(graph.find_nodes(op="output")))):
        graph.call_function(torch.ops.aten.sum.default, (cats[0],))  # a GroupNorm's reads beside the convolution's
    ChannelsLastConcat()(graph)
    assert [n.meta.get("inductor_realize_to_strides") for n in cats] == [True, True]


def test_the_pass_leaves_concatenations_that_are_also_contiguous_strided_otherwise_or_unknown():
    """A 1x1 image (channels-last and contiguous both), a transposed NCHW layout (neither) and nodes without a
    tensor value are left alone."""
    transposed = torch.empty(2, 8, 4, 5).transpose(2, 3)  # not contiguous, not channels-last
    graph, _ = _graph([_channels_last(2, 8, 1, 1), transposed, None, (_channels_last(2, 8, 4, 4),)])
    assert channels_last_concats(graph) == []
    only_sum, _ = _graph([_channels_last(2, 8, 4, 4)], conv_reads=False)
    assert channels_last_concats(only_sum) == []
