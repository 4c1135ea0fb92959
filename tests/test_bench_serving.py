"""The serving benchmark's CPU fallback runs and reports consistent figures (no timing assertions)."""

from __future__ import annotations

import pytest

from benchmarks.bench_serving import main


def test_cpu_fallback_reports_every_batch(tmp_path):
    out = tmp_path / "bench.json"
    result = main(
        [
            "--model",
            "tiny",
            "--batches",
            "3",
            "--steps",
            "5",
            "--windows",
            "1",
            "--repeats",
            "1",
            "--codec",
            "fp32",
            "--json",
            str(out),
            "--profile",
            str(tmp_path / "profile.txt"),
            "--unet-sweep",
            "2,4",
            "--kernel-profile",
            str(tmp_path / "kernels.txt"),
            "--peak-tflops",
            "0.001",  # a CPU has no default peak: the floor is printed only when one is given
        ]
    )
    assert out.is_file()
    kernels = result["kernel_profile"]  # at the sweep's largest batch
    assert kernels["rows"] == 4 and "convolution" in kernels["kinds_ms_per_sample"]
    assert "UNet forward at 4 rows on cpu" in (tmp_path / "kernels.txt").read_text()
    assert set(result["unet_sweep"]) == {2, 4} and all(ms > 0 for ms in result["unet_sweep"].values())
    profile = (tmp_path / "profile.txt").read_text()
    assert "edge path, 3 prompts" in profile and "_run_bucket" in profile
    (row,) = result["rows"]
    assert row["batch"] == 3 and row["unet_ms_per_sample"] > 0
    flop = result["environment"]["unet_flop_per_sample"]
    assert row["floor_fraction"] == pytest.approx(flop / 1e9 * 1000.0 / row["unet_ms_per_sample"])
    # 3 prompts of one paraphrase-identical group (mean group 2.8 -> 1 distinct prompt): k = 2 shared steps once
    assert row["shared_unet_evaluations"] == 2 * 2
    assert row["step_saving"] == pytest.approx(1 - (2 + 3 * 3) / (3 * 5))
    assert row["bytes_per_image"] > 0
    assert row["independent_images_per_s"] == pytest.approx(3 / row["independent_s"])
    assert row["edge_images_per_s"] == pytest.approx(1 / row["shared_gpu_s_per_image"])


def test_the_floor_counts_the_timed_models_flops():
    # the floor was SD v1.5's 0.84 TFLOP for any model: the shipped model on a CPU read as 17 % of its floor
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.bench_serving import FLOP_PER_UNET_SAMPLE_512, counted_flops, unet_flop_per_sample
    from sage_core.models import SD15_UNET, tiny_pipeline

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET).config
    assert unet_flop_per_sample(sd15) == FLOP_PER_UNET_SAMPLE_512  # DESIGN.md's figure, as before
    assert 0.78e12 < counted_flops(sd15) < 0.84e12  # torch's count: matmuls, convolutions, attention
    tiny = tiny_pipeline(seed=0).unet.config
    assert unet_flop_per_sample(tiny) == pytest.approx(0.84e12 * counted_flops(tiny) / counted_flops(sd15))
    assert unet_flop_per_sample(tiny) < 1e-4 * FLOP_PER_UNET_SAMPLE_512


def test_bad_batch_lists_are_refused_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--unet-sweep", "8,0"])
    assert "--unet-sweep takes positive whole numbers" in capsys.readouterr().err


def test_a_caption_stream_runs_through_both_paths(tmp_path):
    import yaml

    from benchmarks.coco_stream import make_stream

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red bus on a street", "a red bus in a city street", "a cat on a sofa",
                                  "a dog in the park", "two dogs in a park", "a plate of pasta"]), encoding="utf-8")
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({
        "requests": 8, "prompts": {"dataset": str(prompts), "embedder": "hashed"},
        "sampling": {"steps": 4, "share": 0.5, "guidance": 7.5},
        "grouping": {"sharing": "flat", "tau": 0.3, "max_group_size": 4},
        "policies": [{"name": "flat", "grouping": {"sharing": "flat"}}],
    }), encoding="utf-8")
    stream = tmp_path / "stream.npz"
    meta = make_stream(str(config), "flat", 8, str(stream))
    assert meta["steps"] == 4 and meta["policy"]["tau"] == 0.3
    result = main(["--model", "tiny", "--batches", "", "--codec", "fp32", "--stream", str(stream),
                   "--stream-window", "4", "--stream-windows", "2"])
    s = result["stream"]
    assert s["stream"]["requests"] == 8
    totals = s["totals"]
    # with sharing, the server runs fewer than all steps and the devices the rest of each trajectory
    assert 0 < totals["server_evals"] < 8 * 4 * 2
    assert totals["server_evals"] + totals["device_evals"] <= 8 * 4 * 2
    assert s["step_saving"] == pytest.approx(1 - (totals["server_evals"] + totals["device_evals"]) / 64)
    assert s["independent_gpu_s_per_image"] > 0 and s["edge_gpu_s_per_image"] > 0


def test_a_compiled_worker_s_stock_baseline_runs_a_stock_unet_of_its_own():
    from types import SimpleNamespace

    from benchmarks.bench_serving import stock_pipeline
    from sage_core.models import tiny_pipeline
    from sage_core.unet_buckets import fuse_layout

    pipe = tiny_pipeline(seed=0)
    eager = SimpleNamespace(pipe=pipe, config=SimpleNamespace(unet_compile="none"))
    assert stock_pipeline(eager).unet is pipe.unet  # nothing changed it
    fuse_layout(pipe.unet)  # what compile_unet does to the worker's pipeline, in place
    compiled = SimpleNamespace(pipe=pipe, config=SimpleNamespace(unet_compile="default"))
    stock = stock_pipeline(compiled)
    assert stock.unet is not pipe.unet and stock.unet.config == pipe.unet.config
    assert not any(hasattr(m, "to_qkv") for m in stock.unet.modules())  # diffusers' own layout, not fused
    assert any(hasattr(m, "to_qkv") for m in pipe.unet.modules())
    assert stock.text_encoder is pipe.text_encoder and stock.unet.dtype == pipe.unet.dtype


def test_the_header_says_a_compiled_run_s_stock_column_runs_a_unet_of_its_own(capsys):
    from benchmarks.bench_serving import print_header

    env = {"device": "cpu", "dtype": "float32", "torch": "x", "diffusers": "y", "unet_compile_tuning": "none",
           "unet_channels_last": True}
    print_header({**env, "unet_compile": "none"})
    assert "note:" not in capsys.readouterr().out
    print_header({**env, "unet_compile": "reduce-overhead", "unet_quantize": "fp8-rowwise"})
    out = capsys.readouterr().out
    assert "fused and quantized its pipeline's UNet in place" in out and "of their own" in out


@pytest.mark.parametrize("argv", [["--windows", "0"], ["--repeats", "0"], ["--stream-window", "0"],
                                  ["--mean-group", "0"], ["--peak-tflops", "0"], ["--share", "1.5"]])
def test_settings_that_give_no_figures_are_refused_before_the_model_loads(argv, capsys):
    # --windows 0 used to print a 100 % step saving from no window at all; --mean-group 0 a ZeroDivisionError
    from benchmarks.bench_serving import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny", *argv])
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("cuda, model", [(False, "default"), (True, "sd15-random")])
def test_the_default_model_fits_the_machine(monkeypatch, capsys, cuda, model):
    # SD v1.5's architectures at batches up to 64 took hours on a 2-core CPU: without a GPU the default is the
    # shipped model, and the run says so
    from benchmarks.bench_serving import parse_args

    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    assert parse_args([]).model == model
    assert ("no CUDA GPU" in capsys.readouterr().err) is not cuda
    assert parse_args(["--model", "tiny"]).model == "tiny"


def test_a_stream_file_is_checked_before_the_windows_run(tmp_path, capsys):
    import json

    import numpy as np

    from benchmarks.bench_serving import parse_args

    with pytest.raises(SystemExit):  # used to fail with a traceback after every batch had been measured
        parse_args(["--stream", str(tmp_path / "missing.npz")])
    assert "not a stream file" in capsys.readouterr().err
    cached = tmp_path / "cached.npz"  # the policy's cache used to be dropped without a word
    np.savez(cached, prompts=np.array(["a"]), embeddings=np.zeros((1, 4), np.float32),
             meta=np.array(json.dumps({"policy": {"sharing": "adaptive", "cache_mb": 64}})))
    with pytest.raises(SystemExit):
        parse_args(["--stream", str(cached)])
    assert "64 MiB latent cache" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--out", "stream"], "must name a .npz file"),
                                           (["--requests", "0"], "--requests must be >= 1")])
def test_coco_stream_refuses_an_out_numpy_would_rename(capsys, args, message):
    from benchmarks.coco_stream import main as coco_stream

    with pytest.raises(SystemExit):
        coco_stream(args)
    assert message in capsys.readouterr().err


def test_a_model_that_does_not_load_is_bad_input_exit_2(tmp_path, capsys):
    """A missing model folder ended the benchmark with exit code 1; like every other tool's bad input it is 2 now,
    with the reason on stderr."""
    from benchmarks.bench_serving import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "nope")])
    assert exc.value.code == 2 and f"error: model folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
