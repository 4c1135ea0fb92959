"""Fixed UNet batch buckets for compiled serving: same rows out as the bare UNet, and the worker uses them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from sage_core.codec import CodecSpec, LatentCodec
from sage_core.models import tiny_pipeline
from sage_core.unet_buckets import COMPILE_MODES, BucketedUNet, bucket_for, fuse_layout, warm_buckets


def _inputs(pipe, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    c = torch.randn(n, 77, cfg.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, c


def test_bucket_choice():
    assert bucket_for(1, (4, 8)) == 4 and bucket_for(5, (4, 8)) == 8 and bucket_for(8, (4, 8)) == 8
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(9, (4, 8))
    with pytest.raises(ValueError, match="positive"):
        BucketedUNet(None, [])


@pytest.mark.parametrize("n", [1, 3, 4, 7, 11])
def test_padded_and_split_calls_give_the_bare_unets_rows(n):
    pipe = tiny_pipeline(seed=0)
    bucketed = BucketedUNet(pipe.unet, (2, 4))  # 11 rows: pieces of 4, 4 and 3 (padded to 4)
    x, t, c = _inputs(pipe, n)
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        got = bucketed(x, t, encoder_hidden_states=c, return_dict=False)[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    expected = {1: 1, 3: 1, 4: 0, 7: 1, 11: 1}  # 1 -> 2, 3 -> 4, 7 -> 4 + 4, 11 -> 4 + 4 + 4
    assert bucketed.padded_rows == expected[n]


def test_warm_calls_each_bucket_once():
    pipe = tiny_pipeline(seed=0)
    calls = []
    unet = pipe.unet

    class Recording:
        dtype, device, config = unet.dtype, unet.device, unet.config

        def __call__(self, x, *args, **kwargs):
            calls.append(x.shape[0])
            return unet(x, *args, **kwargs)

    lines: list[str] = []
    seconds = warm_buckets(BucketedUNet(Recording(), (4, 2)), int(unet.config.sample_size), report=lines.append)
    assert calls == [2, 4] and len(seconds) == 2
    assert lines[0] == "warming UNet bucket 2 (1/2)" and lines[2] == "warming UNet bucket 4 (2/2)"
    assert lines[3].startswith("UNet bucket 4 ready in ")


def test_every_bucket_compiles_past_dynamo_s_recompile_limit():
    # Dynamo compiles at most 8 shapes of one function and runs the rest eagerly without an error: a warm-up of
    # 10 buckets must still leave 10 compiled variants (a cheap compiled stand-in for the UNet: the "eager" backend)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    unet = tiny_pipeline(seed=0).unet

    def forward(x, t, encoder_hidden_states, return_dict=False):
        return (x * 2.0 + encoder_hidden_states.mean(),)

    class Compiled:
        dtype, device, config = unet.dtype, unet.device, unet.config
        __call__ = staticmethod(torch.compile(forward, backend="eager", dynamic=False))

    torch._dynamo.reset()
    try:
        warm_buckets(BucketedUNet(Compiled(), range(1, 11)), 4)
        assert len(_debug_get_cache_entry_list(forward.__code__)) == 10
        assert torch._dynamo.config.recompile_limit == 8  # raised for the warm-up only
    finally:
        torch._dynamo.reset()


def test_the_unet_s_compiled_variants_are_counted():
    from sage_core.unet_buckets import compiled_variants

    unet = tiny_pipeline(seed=0).unet
    compiled = torch.compile(unet, backend="eager", dynamic=False)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            for rows in (1, 2):
                x = torch.randn(rows, unet.config.in_channels, 8, 8)
                compiled(x, 10, encoder_hidden_states=torch.randn(rows, 77, unet.config.cross_attention_dim))
        assert compiled_variants() == 2
    finally:
        torch._dynamo.reset()


def test_worker_with_buckets_serves_the_same_latents():
    from edge_server.config import COMPILE_MODES as CONFIG_MODES
    from edge_server.config import ServerConfig
    from edge_server.worker import BucketJob, BucketSettings, EdgeWorker, MemberSpec

    assert CONFIG_MODES == COMPILE_MODES  # the front end validates what sage_core accepts
    threads = torch.get_num_threads()
    plain = EdgeWorker(ServerConfig(model="tiny", dtype="float32", adapter="none", ray_num_cpus=1))
    padded = EdgeWorker(ServerConfig(model="tiny", dtype="float32", adapter="none", ray_num_cpus=1,
                                     unet_buckets=(4, 16)))
    torch.set_num_threads(threads)
    assert isinstance(padded.unet, BucketedUNet) and plain.unet is plain.pipe.unet
    prompts = ["a red circle", "a red circle on the left", "a blue square", "two green stars", "a cat"]
    members = tuple(MemberSpec(p, 10 + i, 0.5, "fp32", True) for i, p in enumerate(prompts))
    job = BucketJob(BucketSettings(6, 7.5, "ddim", 32, 32), members)
    a = plain._run_bucket(job, threading.Event())
    b = padded._run_bucket(job, threading.Event())
    assert [g.members for g in a] == [g.members for g in b]
    codec = LatentCodec(CodecSpec("fp32"))

    def latent(group):
        payload = group.payloads["fp32"]
        return codec.decode(payload.data[: payload.frame_sizes[0]])

    for ga, gb in zip(a, b, strict=True):
        assert ga.server_steps == gb.server_steps and ga.branch_step == gb.branch_step
        torch.testing.assert_close(latent(gb), latent(ga), rtol=1e-4, atol=1e-5)
    assert padded.unet.padded_rows > 0


def test_bad_compile_settings_are_config_errors(tmp_path):
    from edge_server.config import ConfigError, build_config

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="compile_cache must be a folder"):
        build_config(None, {"compile_cache": str(tmp_path / "a_file")})
    assert build_config(None, {"compile_cache": str(tmp_path / "new")}).compile_cache == str(tmp_path / "new")

    with pytest.raises(ConfigError, match="unet_compile must be one of"):
        build_config(None, {"unet_compile": "fast"})
    with pytest.raises(ConfigError, match="unet_buckets must be"):
        build_config(None, {"unet_buckets": "8,x"})
    with pytest.raises(ConfigError, match="positive batch sizes"):
        build_config(None, {"unet_buckets": "0,8"})
    with pytest.raises(ConfigError, match="attention_backend must be one of"):
        build_config(None, {"attention_backend": "fastest"})
    with pytest.raises(ConfigError, match="cudnn_benchmark needs unet_buckets"):
        build_config(None, {"cudnn_benchmark": True})
    assert build_config(None, {"cudnn_benchmark": True, "unet_buckets": "64"}).cudnn_benchmark
    assert build_config(None, {"unet_buckets": "8,16"}).unet_buckets == (8, 16)


def test_fused_projections_and_channels_last_keep_the_outputs():
    pipe = tiny_pipeline(seed=0)
    x, t, c = _inputs(pipe, 3)
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        fused = fuse_layout(pipe.unet)
        got = fused(x, t, encoder_hidden_states=c, return_dict=False)[0]
    assert any(getattr(m, "fused_projections", False) for m in fused.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_unet_with_unmerged_lora_layers_is_not_fused(tmp_path):
    from lora_fixtures import make_lora

    from sage_core.adapters import load_adapter

    pipe = tiny_pipeline(seed=0)
    load_adapter(pipe, make_lora(tmp_path / "lora"))
    with pytest.raises(ValueError, match="LoRA"):
        fuse_layout(pipe.unet)


@pytest.mark.gpu
@pytest.mark.parametrize(("mode", "graphs", "tuning", "channels_last"),
                         [("default", False, "none", True), ("reduce-overhead", True, "none", True),
                          ("reduce-overhead", True, "light", False)])
def test_compiled_buckets_match_eager_on_the_gpu(mode, graphs, tuning, channels_last, monkeypatch):
    import torch._inductor.config as inductor

    from sage_core.unet_buckets import TUNING_LEVELS, compile_unet

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions alone differ by ~1e-3
    pipe = tiny_pipeline(seed=0).to("cuda")
    x, t, c = (v.to("cuda") for v in _inputs(pipe, 6))
    x2 = torch.randn_like(x)
    with torch.inference_mode():
        want = pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        want2 = pipe.unet(x2, t, encoder_hidden_states=c, return_dict=False)[0]
    # compile_unet sets the tuning options process-wide: restored after the test (monkeypatch would delete them)
    with inductor.patch({name: getattr(inductor, name) for name in TUNING_LEVELS[tuning]}):
        compiled = BucketedUNet(compile_unet(pipe.unet, mode, tuning, channels_last=channels_last), (4, 8),
                                graphs=graphs)
        warm_buckets(compiled, int(pipe.unet.config.sample_size))
    with torch.inference_mode():
        got = compiled(x, t, encoder_hidden_states=c)[0]
        got2 = compiled(x2, t, encoder_hidden_states=c)[0]  # a replay must not overwrite the first output
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got2, want2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("level", ["light", "full"])
def test_inductor_tuning_sets_the_diffusion_options_and_reports_the_old_ones(level):
    import torch._inductor.config as inductor

    from sage_core.unet_buckets import inductor_tuning

    before = {name: getattr(inductor, name) for name in ("conv_1x1_as_mm", "coordinate_descent_tuning")}
    old = inductor_tuning(level)
    try:
        assert inductor.conv_1x1_as_mm
        if level == "light":
            assert set(old) == {"conv_1x1_as_mm"}
            assert inductor.coordinate_descent_tuning == before["coordinate_descent_tuning"]
        else:
            assert set(old) == {"conv_1x1_as_mm", "coordinate_descent_tuning",
                                "coordinate_descent_check_all_directions", "epilogue_fusion"}
            assert inductor.coordinate_descent_tuning and not inductor.epilogue_fusion
        assert inductor_tuning("none") == {}
    finally:
        for name, value in old.items():
            setattr(inductor, name, value)
    with pytest.raises(ValueError, match="tuning must be one of none, light, full"):
        inductor_tuning("fast")


def test_tuning_levels_are_validated_by_the_front_end_and_the_old_switch_still_reads():
    from edge_server.config import ConfigError, build_config
    from sage_core.names import TUNING_LEVEL_NAMES as CONFIG_LEVELS
    from sage_core.unet_buckets import TUNING_LEVELS, compile_unet

    assert CONFIG_LEVELS == tuple(TUNING_LEVELS)  # the front end validates (sage_core.names) what sage_core accepts
    compiled = {"unet_compile": "default"}
    assert build_config(None, {**compiled, "unet_compile_tuning": "light"}).unet_compile_tuning == "light"
    assert build_config(None, {**compiled, "unet_compile_tuning": True}).unet_compile_tuning == "full"
    assert build_config(None, {"unet_compile_tuning": False}).unet_compile_tuning == "none"
    with pytest.raises(ConfigError, match="unet_compile_tuning must be one of none, light, full, got 'fast'"):
        build_config(None, {**compiled, "unet_compile_tuning": "fast"})
    for eager_only in ({"unet_compile_tuning": "light"}, {"unet_channels_last": False}):  # would change nothing
        with pytest.raises(ConfigError, match="they need unet_compile"):
            build_config(None, eager_only)
    assert not build_config(None, {**compiled, "unet_channels_last": False}).unet_channels_last
    unet = tiny_pipeline(seed=0).unet
    assert compile_unet(unet, "none") is unet
    for eager_only in ({"tuning": "light"}, {"channels_last": False}):
        with pytest.raises(ValueError, match="they need a compile mode"):
            compile_unet(unet, "none", **eager_only)


def test_fuse_layout_leaves_the_memory_layout_when_asked():
    kept = fuse_layout(tiny_pipeline(seed=0).unet, channels_last=False)
    assert any(getattr(m, "fused_projections", False) for m in kept.modules())
    assert kept.conv_in.weight.is_contiguous()
    assert not kept.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    moved = fuse_layout(tiny_pipeline(seed=0).unet)  # the default: channels-last
    assert moved.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_attention_backend_keeps_the_output_and_refuses_what_cannot_run():
    from edge_server.config import ATTENTION_BACKENDS as CONFIG_BACKENDS
    from sage_core.unet_buckets import ATTENTION_BACKENDS, AttentionBackendUNet, with_attention

    assert CONFIG_BACKENDS == ATTENTION_BACKENDS  # the front end validates what sage_core accepts
    pipe = tiny_pipeline(seed=0)
    x, t, c = _inputs(pipe, 3)
    assert with_attention(pipe.unet, "auto") is pipe.unet
    pinned = with_attention(pipe.unet, "math")
    with torch.inference_mode():
        want = pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        got = pinned(x, t, encoder_hidden_states=c, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        AttentionBackendUNet(pipe.unet, "fastest")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot run on cpu"):
            AttentionBackendUNet(pipe.unet, "cudnn")


def test_fp8_is_refused_where_it_cannot_run_and_without_a_compile():
    from edge_server.config import QUANTIZE_MODES as CONFIG_QUANTIZE
    from edge_server.config import ConfigError, build_config
    from sage_core.unet_buckets import QUANTIZE_MODES, compile_unet, fp8_linear, quantize_unet

    assert CONFIG_QUANTIZE == QUANTIZE_MODES  # the front end validates what sage_core accepts
    with pytest.raises(ConfigError, match="unet_quantize must be one of"):
        build_config(None, {"unet_quantize": "int3", "unet_compile": "default"})
    with pytest.raises(ConfigError, match="unet_quantize needs unet_compile"):
        build_config(None, {"unet_quantize": "fp8"})
    assert build_config(None, {"unet_quantize": "fp8", "unet_compile": "default"}).unet_quantize == "fp8"
    pipe = tiny_pipeline(seed=0)
    assert quantize_unet(pipe.unet, "none") is pipe.unet
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_unet(pipe.unet, "int3")
    with pytest.raises(ValueError, match="needs a compile mode"):
        compile_unet(pipe.unet, "none", quantize="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="compute capability 8.9 or newer .* on cpu"):
            quantize_unet(pipe.unet, "fp8")
    rowwise_config = build_config(None, {"unet_quantize": "fp8-rowwise", "unet_compile": "default"})
    assert rowwise_config.unet_quantize == "fp8-rowwise"
    rowwise = quantize_unet(tiny_pipeline(seed=0).unet, "fp8-rowwise")  # this torch has float8 GEMMs on the CPU
    assert any("Fp8" in type(m).__name__ for m in rowwise.modules())
    with pytest.raises(ValueError, match="fp8-static needs a calibration run"):
        quantize_unet(tiny_pipeline(seed=0).unet, "fp8-static")
    assert build_config(None, {"unet_quantize": "fp8-static", "unet_compile": "default"}).unet_quantize == "fp8-static"
    assert fp8_linear(torch.nn.Linear(320, 1280)) and not fp8_linear(torch.nn.Linear(4, 320))
    assert not fp8_linear(torch.nn.Conv2d(320, 320, 1))


def test_torchao_float8_config_leaves_inductor_settings_alone(monkeypatch):
    """torchao's configs change TorchInductor's settings for the whole process unless told not to; a stand-in
    torchao.quantization records how the config was built (torchao is an optional extra, absent on CI)."""
    import types

    from sage_core.unet_buckets import torchao_float8_config

    built = []
    fake = types.ModuleType("torchao.quantization")
    fake.PerRow, fake.PerTensor = (lambda: "row"), (lambda: "tensor")
    fake.Float8DynamicActivationFloat8WeightConfig = lambda **kwargs: built.append(kwargs) or kwargs
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    assert torchao_float8_config(torch.float16) == {"granularity": "tensor", "set_inductor_config": False}
    assert torchao_float8_config(torch.bfloat16)["granularity"] == "row"
    assert len(built) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["fp8", "fp8-rowwise", "fp8-static", "fp8-static-geglu"])
def test_fp8_compiled_unet_stays_close_to_the_half_precision_one(quantize):
    import torch._inductor.config as inductor

    from sage_core.fp8 import Fp8GegluFeedForward, Fp8Linear, Fp8StaticLinear
    from sage_core.unet_buckets import FP8_CAPABILITY, STATIC_MODES, compile_unet, unet_calibration

    if quantize == "fp8":
        pytest.importorskip("torchao", reason="fp8 needs torchao (pip install 'sage-edge[fp8]')")
    if torch.cuda.get_device_capability() < FP8_CAPABILITY:
        pytest.skip("needs float8 tensor cores")
    pipe = tiny_pipeline(seed=0).to("cuda", torch.float16)
    x, t, c = (v.to("cuda") for v in _inputs(pipe, 8))
    x, c = x.half(), c.half()
    with torch.inference_mode():
        want = pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0].float()
    tuning = inductor.coordinate_descent_tuning
    with inductor.patch(max_autotune_gemm_backends=inductor.max_autotune_gemm_backends):  # compile_unet sets it
        calibrate = unet_calibration(torch.randn(4, 77, c.shape[-1]), x.shape[-1]) if quantize in STATIC_MODES \
            else None
        fp8 = compile_unet(pipe.unet, "default", quantize=quantize,  # as the worker does it, outside inference mode
                           calibrate=calibrate)
        assert inductor.coordinate_descent_tuning == tuning  # torchao's recommended settings stay off
        with torch.inference_mode():
            got = fp8(x, t, encoder_hidden_states=c, return_dict=False)[0].float()
    if quantize == "fp8":
        linears = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
        assert any("float8" in type(m.weight).__name__.lower() for m in linears)  # torchao's Float8Tensor weights
    else:
        kind = {"fp8-static": Fp8StaticLinear, "fp8-static-geglu": Fp8GegluFeedForward}.get(quantize, Fp8Linear)
        assert any(isinstance(m, kind) for m in pipe.unet.modules())
    relative = ((got - want).norm() / want.norm()).item()
    print(f"{quantize} against fp16, relative L2 difference of the UNet's output: {relative:.4f}")
    # float8 e4m3 keeps 3 mantissa bits: a few per cent per layer, not a different function (which would be ~1.4)
    assert relative < 0.2


_COMPILE_IN_A_NEW_PROCESS = """
import json, sys, torch
from sage_core.unet_buckets import CacheCounts, use_compile_cache
use_compile_cache(sys.argv[1])
before = CacheCounts.now()
net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).eval()
with torch.inference_mode():
    torch.compile(net, dynamic=False)(torch.randn(2, 4, 8, 8))
print(json.dumps(vars(CacheCounts.now().since(before))))
"""


@pytest.mark.slow
def test_a_new_process_loads_what_an_earlier_one_compiled_from_the_compile_cache(tmp_path):
    from sage_core.unet_buckets import use_compile_cache

    cache = tmp_path / "nested" / "cache"

    def compile_once() -> dict:
        out = subprocess.run([sys.executable, "-c", _COMPILE_IN_A_NEW_PROCESS, str(cache)], capture_output=True,
                             text=True, timeout=240, cwd=Path(__file__).parents[1], check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    assert compile_once() == {"hits": 0, "misses": 1}  # an empty cache: compiled, and stored in the folder
    assert any(cache.iterdir())
    assert compile_once() == {"hits": 1, "misses": 0}  # a restart loads it
    libraries = list(cache.rglob("*.so"))
    assert libraries  # the compiled kernels of this CPU graph
    for library in libraries:  # as a process stopped mid-compile leaves them
        library.write_bytes(b"")
    assert compile_once() == {"hits": 1, "misses": 0}  # removed at start, built again from their sources
    assert all(library.stat().st_size > 0 for library in libraries)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        use_compile_cache(tmp_path / "a_file")
