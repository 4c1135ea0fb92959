"""The row-wise float8 layers (sage_core.fp8): what they compute, which layers they replace, where they refuse."""

from __future__ import annotations

import copy

import pytest
import torch

from sage_core.fp8 import (
    FP8_MAX,
    Fp8Conv1x1,
    Fp8Linear,
    check_scaled_mm,
    float8_layer,
    quantize_rows,
    to_float8_rowwise,
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
