"""Kernel profiles: every kind of kernel a UNet launches is named as such, the totals add up, and a real profile of
the tiny UNet on this CPU says where its time went (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernel_profile import kind_of, one_line, profile_unet, render, summarize

NAMES = {  # kernel names as torch.profiler reports them on an H100 (cuDNN, cuBLASLt, FlashAttention, Inductor)
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1":
        "convolution",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_128x128_32x4_nhwc_align8>":
        "convolution",
    "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT": "GEMM",
    "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off": "GEMM",
    "nvjet_sm90_hsh_128x256_64x4_2x1_v_bz_coopA_bias_TNN": "GEMM",  # as the fifth lease's profile names them
    "nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT": "float8 GEMM",
    "nvjet_sm90_qqb_128x256_128x6_2x1_v_bz_TNT": "float8 GEMM",
    "sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128": "float8 GEMM",
    "geglu_fp8_kernel": "float8 GEMM",  # sage_core.fp8_kernels: two float8 GEMMs and the GEGLU in one
    "conv3x3_fp8_kernel_0": "convolution",  # and its float8 3x3 convolution
    "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false>>": "attention",
    "fmha_cutlassF_f16_aligned_64x64_rf_sm80": "attention",
    "triton_poi_fused_convolution_silu_3": "fused elementwise",  # a convolution's epilogue, not a convolution
    "triton_red_fused_native_group_norm_silu_7": "normalization",
    "triton_per_fused_add_native_layer_norm_12": "normalization",
    "triton_tem_fused_mm_4": "GEMM",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false>": "layout conversion",
    "Memcpy HtoD (Pageable -> Device)": "copy / fill",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::Half>>": "copy / fill",
    "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl<AddFunctor>>": "other",
    "aten::mkldnn_convolution": "convolution",  # on a CPU: ops
    "aten::addmm": "GEMM",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_mm": "float8 GEMM",
    "aten::native_group_norm": "normalization",
    "aten::silu": "other",
    "## Call CompiledFxGraph fcwdk2wnskbj5fxya4q7zutni34 ##": "fused elementwise",  # a CPU graph's own C++ kernels
    "convert_fp16_to_fp32_kernel": "other",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_kind_of_kernel_is_named(name):
    assert kind_of(name) == NAMES[name]


def test_totals_are_per_sample_and_the_top_kernels_come_first():
    times = {"nvjet_hsh_a": (600.0, 6), "sm90_xmma_fprop_b": (1800.0, 9), "fmha_c": (300.0, 3), "Memset": (3.0, 3)}
    p = summarize(times, rows=4, calls=3, wall_s=0.003, device="gpu", top=2)
    assert p.kinds == {"convolution": 0.15, "GEMM": 0.05, "attention": 0.025, "copy / fill": 0.0003}
    assert list(p.kinds) == ["convolution", "GEMM", "attention", "copy / fill"]
    assert p.kernel_ms_per_call == 0.901 and p.wall_ms_per_call == 1.0
    assert p.top == [("sm90_xmma_fprop_b", 0.15, 3.0, "convolution"), ("nvjet_hsh_a", 0.05, 2.0, "GEMM")]
    assert one_line(p.kinds).startswith("convolution 0.150, GEMM 0.050")
    assert "sm90_xmma_fprop_b" in render(p) and "convolution" in render(p)


def test_the_tiny_unet_s_time_is_found_where_it_goes(tiny_pipe):
    unet = tiny_pipe.unet
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.full((2,), 500, dtype=torch.long)
    c = torch.randn(2, 77, unet.config.cross_attention_dim)
    p = profile_unet(unet, (x, t, c), calls=2)
    assert p.device == "cpu" and p.rows == 2 and p.calls == 2
    assert {"convolution", "attention", "GEMM", "normalization"} <= set(p.kinds)
    assert 0 < p.kernel_ms_per_call <= p.wall_ms_per_call * 1.05  # own times on one thread fit in the wall
    assert sum(p.kinds.values()) == pytest.approx(p.kernel_ms_per_call / p.rows, rel=1e-2)
    assert p.as_dict()["top"][0]["ms_per_sample"] == max(k["ms_per_sample"] for k in p.as_dict()["top"])


def test_sd15_s_attention_flops_match_the_formula_and_rates_follow():
    from dataclasses import replace

    from benchmarks.kernel_profile import architecture_gflops

    config = {"sample_size": 64, "cross_attention_dim": 768, "block_out_channels": (320, 640, 1280, 1280),
              "layers_per_block": 2, "attention_head_dim": 8}  # SD v1.5's UNet
    gf = architecture_gflops(config)
    # each transformer block: QK^T and AV over its N tokens (self) and the 77 text tokens (cross), 2 FLOP a MAC:
    # 5 blocks at each of 64x64 / 32x32 / 16x16 (2 down, 3 up), 1 in the middle at 8x8
    blocks = [(4096, 320)] * 5 + [(1024, 640)] * 5 + [(256, 1280)] * 5 + [(64, 1280)]
    assert gf["attention"] == pytest.approx(sum(4 * n * c * (n + 77) for n, c in blocks) / 1e9, rel=1e-6)
    assert 0.78e3 < sum(gf.values()) < 0.86e3 and gf["convolution"] > gf["GEMM"]  # DESIGN.md: about 0.84 TFLOP
    p = replace(summarize({"sm90_xmma_fprop": (4000.0, 1), "nvjet_qq": (1000.0, 1), "fmha": (1000.0, 1)},
                          rows=1, calls=1, wall_s=0.006, device="gpu"), gflops=gf)
    rates = {name: (ms, rate) for name, _, ms, rate in p.rates()}
    assert rates["convolutions + GEMMs"][0] == 5.0 and rates["attention"][1] == pytest.approx(gf["attention"])
    assert rates["all kernels"][1] == pytest.approx(sum(gf.values()) / 6.0)
    assert "TFLOP/s" in render(p) and p.as_dict()["tflops"]["attention"] == pytest.approx(gf["attention"], abs=1e-3)
