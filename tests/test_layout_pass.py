"""The channels-last concat pass (sage_core.layout_pass) and what TorchInductor writes for an H100 without one
(benchmarks.fake_h100): the pass pins only what it should, changes no value, and the code Inductor writes for the
up blocks and for each float8 mode has no transposing kernel and launches each float8 kernel once per layer."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from sage_core.layout_pass import ChannelsLastConcat, channels_last_concats

# the stand-in H100 replaces torch.cuda's answers while it lowers; in a process with a real GPU the GPU-marked tests
# compile for real, and nothing should see the stand-in's answers
without_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in H100 is for machines without a GPU")


class _UpBlock(torch.nn.Module):
    """An up block's resnet as diffusers runs it: a skip concatenation read by a GroupNorm and a 1x1 shortcut
    convolution (960 -> 320 channels in SD v1.5's top up block; 96 -> 32 here)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        self.resnet = ResnetBlock2D(in_channels=3 * channels, out_channels=channels, temb_channels=4 * channels,
                                    groups=8)
        self.conv_out = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.resnet(torch.cat([self.conv_in(x), skip], dim=1), temb))


def _up_inputs(rows: int = 2, side: int = 8, channels: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 2 * channels, side, side, generator=g).to(memory_format=torch.channels_last)
    skip = torch.randn(rows, channels, side, side, generator=g).to(memory_format=torch.channels_last)
    return x, skip, torch.randn(rows, 4 * channels, generator=g)


def test_the_pass_pins_only_channels_last_concatenations_a_convolution_reads():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b, c, d, w):
        conv_read = torch.cat([a, b], dim=1)  # channels-last, read by a convolution: pinned
        norm_only = torch.cat([b, a], dim=1)  # channels-last, no convolution reads it
        nchw = torch.cat([c, c], dim=1)  # contiguous
        flat = torch.cat([d, d])  # not 4-D
        return torch.nn.functional.conv2d(conv_read, w), norm_only.sum(), nchw.sum(), flat.sum()

    cl = torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 1, 1).to(memory_format=torch.channels_last)
    gm = make_fx(f, tracing_mode="fake")(cl, cl.clone(), torch.randn(2, 4, 5, 5), torch.randn(3, 4), w)
    cats = [n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert len(cats) == 4
    assert channels_last_concats(gm.graph) == cats[:1]
    ChannelsLastConcat()(gm.graph)
    assert [bool(n.meta.get("inductor_realize_to_strides")) for n in cats] == [True, False, False, False]
    assert ChannelsLastConcat().uuid() == ChannelsLastConcat().uuid()  # one compile cache key per version


def test_compiled_with_the_pass_the_block_computes_what_eager_does():
    import torch._inductor.config as inductor

    seen = []

    class Recording(ChannelsLastConcat):
        def __call__(self, graph):
            seen.extend(channels_last_concats(graph))
            super().__call__(graph)

    torch.manual_seed(0)
    block, inputs = _UpBlock().eval().to(memory_format=torch.channels_last), _up_inputs()
    with torch.inference_mode():
        want = block(*inputs)
        torch._dynamo.reset()
        with inductor.patch({"post_grad_custom_post_pass": Recording(), "force_disable_caches": True}):
            got = torch.compile(block, dynamic=False)(*inputs)
    assert len(seen) == 1  # the skip concatenation, found in the graph Inductor lowers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_unet_turns_the_pass_on_with_channels_last_and_off_without():
    import torch._inductor.config as inductor

    from sage_core.models import tiny_pipeline
    from sage_core.unet_buckets import compile_unet

    # compile_unet sets it process-wide: restored after the test (monkeypatch would delete Inductor's option)
    with inductor.patch({"post_grad_custom_post_pass": None}):
        compile_unet(tiny_pipeline(seed=0).unet, "default")  # torch.compile is lazy: nothing compiles here
        assert isinstance(inductor.post_grad_custom_post_pass, ChannelsLastConcat)
        compile_unet(tiny_pipeline(seed=0).unet, "default", channels_last=False)
        assert inductor.post_grad_custom_post_pass is None


def _lower_up_block(concat_pass: bool):
    import torch._inductor.config as inductor
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.fake_h100 import compile_for_h100, to_fake_cuda

    torch.manual_seed(0)
    block = _UpBlock(channels=64).eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    to_fake_cuda(block, mode)
    for conv in (m for m in block.modules() if isinstance(m, torch.nn.Conv2d)):
        with mode:
            conv.weight = torch.nn.Parameter(conv.weight.to(memory_format=torch.channels_last), requires_grad=False)
    with mode:
        x, skip, temb = (t.to("cuda", torch.float16) for t in _up_inputs(rows=4, side=16, channels=64))
        x, skip = (t.contiguous(memory_format=torch.channels_last) for t in (x, skip))
    with inductor.patch({"post_grad_custom_post_pass": ChannelsLastConcat() if concat_pass else None}):
        return compile_for_h100(block, mode, x, skip, temb)


@without_gpu
def test_inductor_writes_the_up_block_for_an_h100_without_transposing_kernels():
    # On the GPU image's TorchInductor (2.11) the block without the pass writes the concatenation NCHW and
    # transposes it back in a one-dimensional kernel (benchmarks.inductor_h100 under torch 2.11 finds them in the
    # UNet); Inductor 2.14, which this suite runs, keeps it channels-last either way. With the pass, neither has a
    # transposing kernel, and the concatenation is written in the channels-last order.
    pytest.importorskip("triton")
    from benchmarks.fake_h100 import kernel_calls, transposing_kernels

    out = _lower_up_block(concat_pass=True)
    calls = kernel_calls(out.wrapper)
    assert calls and "extern_kernels.convolution(" in out.wrapper  # cuDNN's convolutions, Inductor's kernels around
    assert transposing_kernels(out.kernels) == {}
    cat = next(source for name, source in out.kernels.items() if "cat" in name)
    assert "ynumel" not in cat  # one-dimensional: read and written in the same (channels-last) order


def test_transposing_kernels_are_found():
    from benchmarks.fake_h100 import transposing_kernels

    body = "@triton.jit\ndef k():\n    xnumel = 4096\n    tmp0 = tl.load(in_ptr0 + (x1 + 64*x0 + 4096*x2), None)\n"
    plain = "@triton.jit\ndef k():\n    xnumel = 4096\n    tmp0 = tl.load(in_ptr0 + (x3), None)\n"
    group = "@triton.jit\ndef k():\n    xnumel = 4096\n    tmp0 = tl.load(in_ptr1 + (32*x2 + (x0 // 10)), None)\n"
    found = transposing_kernels({"triton_poi_t_0": body, "triton_poi_p_1": plain, "triton_poi_g_2": group,
                                 "triton_red_t_3": body})
    assert found == {"triton_poi_t_0": 4096}


@without_gpu
@pytest.mark.parametrize("quantize", ["none", "fp8-static-conv"])
def test_each_quantize_mode_lowers_for_an_h100_with_one_launch_per_float8_layer(quantize):
    # Inductor's lowering of the float8 modes (their Triton kernels as user kernels, the float8 GEMMs on ATen), for
    # an H100 target, on the CPU: what used to need the lease's GPU-marked tests to find out
    pytest.importorskip("triton")
    from benchmarks.inductor_h100 import lower

    lowered = lower("tiny64", quantize, rows=4)
    assert lowered.launches > 0 and lowered.extern_calls > 0
    assert lowered.transposed_elements_per_sample == 0
    assert lowered.float8_kernel_launches == lowered.float8_modules
    if quantize == "fp8-static-conv":
        assert lowered.float8_modules == {"geglu_fp8_kernel": 4, "conv3x3_fp8_kernel": 17}
    else:
        assert set(lowered.float8_modules.values()) == {0}


@without_gpu
def test_the_inductor_h100_report_prints_a_row_per_variant_and_writes_json(tmp_path, capsys):
    import json

    pytest.importorskip("triton")
    from benchmarks.inductor_h100 import main

    out = tmp_path / "lowered.json"
    assert main(["--model", "tiny64", "--rows", "2", "--quantize", "none", "--no-concat-pass", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stand-in H100" in printed and "none, no concat pass" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["none", "none, no concat pass"]
    assert all(r["launches"] > 0 and r["mb_per_sample"] for r in results)
    with pytest.raises(SystemExit):
        main(["--rows", "0"])
    assert "--rows must be at least 1" in capsys.readouterr().err
