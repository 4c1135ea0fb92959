"""Benchmark figures a mutation audit found unchecked by the fast tests: the serving benchmark's per-row and stream
figures (GPU-seconds and images per second, step and time savings, edge overhead, bytes per image, the floor),
its timers (best of the repeats, after a warm-up), its printed columns and JSON; the codec benchmark's SNR, PSNR,
timings, seed averages, image rows and byte budget; the load benchmark's latency percentiles, counts and exit
statuses; the shared result helpers; and the caption stream's policy, sampling settings and embeddings.

All fast and offline: the figures are computed from hand-made timings, groups and frames (a fake clock, fake
workers, fake codecs and clients), no model is loaded and no server is started."""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import benchmarks.bench_codec as bench_codec
import benchmarks.bench_load as bench_load
import benchmarks.bench_serving as bench_serving
from benchmarks.bench_codec import ImageRow, LatentRow
from benchmarks.bench_serving import Row
from benchmarks.results import positive_int_list, write_json


class FakeClock:
    """time.perf_counter's stand-in: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock behind time.perf_counter (the benchmarks read it through the time module)."""
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


# ------------------------------------------------------------------------------------------------------
# bench_serving: timers
# ------------------------------------------------------------------------------------------------------


def test_timed_is_the_best_of_the_repeats_after_an_uncounted_warm_up(clock: FakeClock) -> None:
    durations = iter([0.5, 3.0, 2.0, 1.0])  # the warm-up is the fastest here: it must not count
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        clock.advance(next(durations))

    assert bench_serving.timed(fn, "cpu", 3) == pytest.approx(1.0)
    assert len(calls) == 4


def test_unet_ms_per_sample_is_milliseconds_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_serving, "sample_inputs", lambda unet, rows: (None, None, None))
    monkeypatch.setattr(bench_serving, "timed", lambda fn, device, repeats: 0.5)
    assert bench_serving.unet_ms_per_sample(None, 4, "cpu", 3) == pytest.approx(125.0)


class FakeUNet:
    """A UNet that takes 1 s (fake clock) per call."""

    device = "cpu"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.clock.advance(1.0)
        return sample


class FakeEdgeWorker:
    """An edge worker whose windows make two UNet calls (4 and 2 rows) plus host time that changes per window."""

    def __init__(self, clock: FakeClock, host_s: Sequence[float]) -> None:
        self.clock, self.host_s, self.runs = clock, list(host_s), 0
        self.unet = FakeUNet(clock)
        self.pipe = SimpleNamespace(unet=self.unet)

    def _run_bucket(self, job: object, cancel: threading.Event) -> tuple:
        self.unet(torch.zeros(4, 1))
        self.unet(torch.zeros(2, 1))
        self.clock.advance(self.host_s[self.runs])
        self.runs += 1
        return ("window", self.runs - 1)


def test_timed_edge_path_keeps_the_fastest_window_s_own_figures(clock: FakeClock) -> None:
    worker = FakeEdgeWorker(clock, host_s=[0.5, 3.0, 2.0, 1.0])  # window 0 is the warm-up
    bare = worker.unet
    wall, unet_s, rows, groups = bench_serving.timed_edge_path(worker, object(), 3)
    assert (wall, unet_s, rows, groups) == (pytest.approx(3.0), pytest.approx(2.0), pytest.approx(3.0), ("window", 3))
    assert worker.runs == 4 and worker.unet is bare


# ------------------------------------------------------------------------------------------------------
# bench_serving: one batch size's row
# ------------------------------------------------------------------------------------------------------


def group(members: Sequence[int], branch_step: int, server_steps: int, frame_bytes: int) -> SimpleNamespace:
    """A GroupResult's stand-in with one fp16 payload."""
    return SimpleNamespace(members=tuple(members), branch_step=branch_step, server_steps=server_steps,
                           payloads={"fp16": SimpleNamespace(data=b"x" * frame_bytes)})


GROUPS = (group((0, 1, 2), 4, 4, 100), group((3, 4), 4, 4, 80), group((5,), 2, 2, 60))  # 6 images, steps 10


def measured_row(monkeypatch: pytest.MonkeyPatch, argv: list[str], device: str = "cpu",
                 flop_per_sample: float = 1e9) -> tuple[Row, list[int]]:
    """measure() on 6 prompts with hand-made timings (UNet 2 ms per sample, stock 3 s, edge path 1.5 s of which
    1 s UNet) and GROUPS; also the UNet batches it timed."""
    unet_batches: list[int] = []

    def per_sample(unet: object, batch: int, device: str, repeats: int) -> float:
        unet_batches.append(batch)
        return 2.0

    job = SimpleNamespace(settings=SimpleNamespace(steps=10))
    monkeypatch.setattr(bench_serving, "unet_ms_per_sample", per_sample)
    monkeypatch.setattr(bench_serving, "bucket_job", lambda *args: job)
    monkeypatch.setattr(bench_serving, "timed", lambda fn, device, repeats: 3.0)
    monkeypatch.setattr(bench_serving, "timed_edge_path", lambda worker, job, repeats: (1.5, 1.0, 7.0, GROUPS))
    worker = SimpleNamespace(unet=None, pipe=SimpleNamespace(unet=SimpleNamespace(device=device)))
    args = bench_serving.parse_args(["--model", "tiny", "--steps", "10", "--codec", "fp16", *argv])
    return bench_serving.measure(args, worker, 6, None, flop_per_sample), unet_batches


def test_a_row_s_figures_from_its_timings_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    row, unet_batches = measured_row(monkeypatch, ["--peak-tflops", "1"])
    assert unet_batches == [12]  # the UNet timed at the window's CFG rows
    assert row.unet_ms_per_sample == 2.0 and row.floor_fraction == pytest.approx(0.5)  # 1 ms at peak / 2 ms
    assert row.independent_gpu_s_per_image == pytest.approx(0.5) and row.independent_images_per_s == pytest.approx(2)
    assert row.shared_gpu_s_per_image == pytest.approx(0.25) and row.edge_images_per_s == pytest.approx(4.0)
    assert (row.edge_path_s, row.edge_unet_s, row.edge_unet_rows) == (1.5, 1.0, 7.0)
    assert row.shared_unet_evaluations == (4 + 4 + 2) * 2 and row.independent_server_evaluations == 6 * 10 * 2
    # devices: 6 steps for each of 5 members, 8 for the singleton, with CFG
    assert row.step_saving == pytest.approx(1 - (20 + (6 * 5 + 8) * 2) / 120)
    assert row.gpu_time_saving == pytest.approx(0.5) and row.edge_overhead == pytest.approx(0.5)
    assert row.bytes_per_image == pytest.approx((100 * 3 + 80 * 2 + 60) / 6)  # every member gets its group's frame


def test_guidance_1_runs_no_cfg_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    row, _ = measured_row(monkeypatch, ["--guidance", "1"])
    assert row.shared_unet_evaluations == 10 and row.independent_server_evaluations == 60


def test_the_floor_s_peak_is_the_gpu_s_and_a_cpu_has_none_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, _ = measured_row(monkeypatch, [])
    assert cpu.floor_fraction is None
    gpu, _ = measured_row(monkeypatch, [], device="cuda:0", flop_per_sample=1.6e12)  # 2 ms at 800 TFLOP/s
    assert gpu.floor_fraction == pytest.approx(1.0)


def test_the_unet_sweep_and_the_attention_sweep_time_the_rows_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import sage_core.unet_buckets

    def per_sample(unet: object, rows: int, device: str, repeats: int) -> float:
        if unet == "flash":
            raise RuntimeError("no flash kernel for this shape\nmore")
        return float(rows)

    monkeypatch.setattr(bench_serving, "unet_ms_per_sample", per_sample)
    monkeypatch.setattr(sage_core.unet_buckets, "with_attention", lambda unet, backend: backend)
    worker = SimpleNamespace(unet=None, pipe=SimpleNamespace(unet=SimpleNamespace(device="cpu")))
    args = bench_serving.parse_args(["--model", "tiny", "--unet-sweep", "2,8", "--batches", "3,5",
                                     "--attention-sweep", "math,flash"])
    assert bench_serving.unet_sweep(worker, args) == {2: 2.0, 8: 8.0}  # rows as given (CFG included)
    sweep = bench_serving.attention_sweep(worker, args)
    assert sweep["math"] == {3: 6.0, 5: 10.0}  # prompts per window, timed at their CFG rows
    assert sweep["flash"] == {3: "unavailable: no flash kernel for this shape", 5: sweep["flash"][3]}


@pytest.mark.parametrize("sweep, batches, rows", [("", "8,16", 32), ("2,4", "8", 4), ("", "", 2)])
def test_the_kernel_profile_s_rows(sweep: str, batches: str, rows: int) -> None:
    assert bench_serving.profile_rows(argparse.Namespace(unet_sweep=sweep, batches=batches)) == rows


def test_a_kernel_profiler_failure_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import benchmarks.kernel_profile

    def fail(unet: object, inputs: tuple) -> None:
        raise RuntimeError("CUPTI unavailable\ndetails")

    monkeypatch.setattr(benchmarks.kernel_profile, "profile_unet", fail)
    monkeypatch.setattr(bench_serving, "sample_inputs", lambda unet, rows: ())
    args = argparse.Namespace(unet_sweep="2", batches="", kernel_profile=str(tmp_path / "k.txt"))
    assert bench_serving.kernel_profile(SimpleNamespace(unet=None), args) == {"error": "CUPTI unavailable\ndetails"}
    assert not (tmp_path / "k.txt").exists()


# ------------------------------------------------------------------------------------------------------
# bench_serving: the caption stream
# ------------------------------------------------------------------------------------------------------


def stream_file(tmp_path: Path, prompts: int, guidance: float = 7.5) -> Path:
    """A stream file of `prompts` distinct captions, steps 4, share 0.5, `guidance`, a flat policy."""
    path = tmp_path / "stream.npz"
    meta = {"policy": {"sharing": "flat", "tau": 0.9, "max_group_size": 4, "cache_mb": 0.0}, "steps": 4,
            "share": 0.5, "guidance": guidance, "description": "hand-made"}
    np.savez(path, prompts=np.array([f"caption {i}" for i in range(prompts)]),
             embeddings=np.eye(prompts, 8, dtype=np.float32), meta=np.array(json.dumps(meta)))
    return path


@pytest.mark.parametrize("prompts, requests, guidance", [
    (6, 6, 7.5), (10, 8, 7.5),  # a short file; a long one cut at 2 windows of 4
    (6, 6, 1.0),  # no classifier-free guidance: one UNet sample per step (the counts were doubled regardless)
])
def test_stream_figures_from_hand_made_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prompts: int,
                                               requests: int, guidance: float) -> None:
    stock_calls: list[dict] = []
    jobs: list[tuple] = []

    def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
        fn()
        return 2.0  # per window of the stock pipeline

    def bucket_job(worker: object, batch: list[str], steps: int, share: float, guidance: float, codec: str):
        jobs.append((len(batch), steps, share, guidance))
        return SimpleNamespace(settings=SimpleNamespace(steps=steps), members=batch)

    def edge_path(worker: object, job: SimpleNamespace, repeats: int) -> tuple:
        return 1.0, 0.6, 8.0, (group(range(len(job.members)), 2, 2, 10),)

    monkeypatch.setattr(bench_serving, "timed", timed)
    monkeypatch.setattr(bench_serving, "bucket_job", bucket_job)
    monkeypatch.setattr(bench_serving, "timed_edge_path", edge_path)
    path = stream_file(tmp_path, prompts, guidance)
    args = bench_serving.parse_args(["--model", "tiny", "--stream", str(path), "--stream-window", "4",
                                     "--stream-windows", "2", "--codec", "fp16"])
    worker = SimpleNamespace(pipe=SimpleNamespace(unet=SimpleNamespace(device="cpu")))

    def stock(batch: list[str], **kwargs: Any) -> None:
        stock_calls.append({"n": len(batch), **kwargs})

    r = bench_serving.measure_stream(args, worker, stock)
    sizes = [4, requests - 4]
    assert [j[0] for j in jobs] == sizes and {j[1:] for j in jobs} == {(4, 0.5, guidance)}  # the file's settings
    assert [c["n"] for c in stock_calls] == sizes
    assert {(c["num_inference_steps"], c["guidance_scale"]) for c in stock_calls} == {(4, guidance)}
    assert r["stream"]["requests"] == requests and r["stream"]["window"] == 4
    cfg = 2 if guidance > 1 else 1
    independent = requests * 4 * cfg
    device = (4 - 2) * requests * cfg
    assert r["totals"] == {"independent_s": 4.0, "edge_s": 2.0, "edge_unet_s": pytest.approx(1.2),
                           "server_evals": 2 * 2 * cfg, "device_evals": device}
    assert r["independent_gpu_s_per_image"] == pytest.approx(4.0 / requests)
    assert r["edge_gpu_s_per_image"] == pytest.approx(2.0 / requests)
    assert r["server_gpu_time_saving"] == pytest.approx(0.5)
    assert r["step_saving"] == pytest.approx(1 - (4 * cfg + device) / independent)
    assert r["server_step_saving"] == pytest.approx(1 - 4 * cfg / independent)
    assert r["edge_overhead"] == pytest.approx(0.8 / 1.2)
    assert worker.embedder(["caption 1"]).tolist() == [np.eye(prompts, 8)[1].tolist()]  # the file's embeddings


# ------------------------------------------------------------------------------------------------------
# bench_serving: what it prints and writes
# ------------------------------------------------------------------------------------------------------


def hand_row(batch: int = 8) -> Row:
    """A Row whose figures all differ."""
    values = {f.name: 0.1 * (i + 1) for i, f in enumerate(fields(Row))}
    return Row(**{**values, "batch": batch, "shared_unet_evaluations": 10, "independent_server_evaluations": 20,
                  "step_saving": 0.2, "gpu_time_saving": 0.5, "bytes_per_image": 1234.0})


def test_printed_columns_line_up_with_the_header(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"device": "cpu", "dtype": "float32", "torch": "x", "diffusers": "y", "unet_compile_tuning": "none",
           "unet_channels_last": True}
    bench_serving.print_header(env)
    r = hand_row()
    bench_serving.print_row(r)
    header, line = capsys.readouterr().out.splitlines()[-2:]
    cells = dict(zip([c.strip() for c in header.split("  ") if c.strip()], line.split(), strict=True))
    assert cells["edge s"] == f"{r.edge_path_s:.3f}" and cells["edge UNet s"] == f"{r.edge_unet_s:.3f}"
    assert cells["step saving"] == "20.0%" and cells["time saving"] == "50.0%" and cells["bytes/img"] == "1234"
    assert cells["indep GPU-s/img"] == f"{r.independent_gpu_s_per_image:.4f}"
    assert cells["floor"] == f"{r.floor_fraction:.1%}" and bench_serving.floor_text(0.375) == "37.5%"


def test_the_stream_line_names_each_path_s_figure(capsys: pytest.CaptureFixture[str]) -> None:
    bench_serving.print_stream({"stream": {"file": "s.npz", "requests": 8, "window": 4, "description": "d"},
                                "step_saving": 0.25, "independent_gpu_s_per_image": 0.5, "edge_gpu_s_per_image": 0.125,
                                "server_gpu_time_saving": 0.75, "edge_overhead": 0.1})
    out = capsys.readouterr().out
    assert "independent 0.5000, edge path 0.1250 (75.0% less)" in out and "steps saved (server + devices) 25.0%" in out


def run_measurements(monkeypatch: pytest.MonkeyPatch, argv: list[str], seen: list[list[int]]) -> dict:
    """run_measurements with hand-made rows and stream; `seen` gets the batches --json held as each row began."""
    args = bench_serving.parse_args(["--model", "tiny", "--batches", "2,3", *argv])

    def measure(args: argparse.Namespace, worker: object, b: int, stock: object, flop: float) -> Row:
        written = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"rows": []}
        seen.append([r["batch"] for r in written["rows"]])
        return hand_row(b)

    monkeypatch.setattr(bench_serving, "print_header", lambda env: None)
    monkeypatch.setattr(bench_serving, "stock_pipeline", lambda worker: None)
    monkeypatch.setattr(bench_serving, "measure", measure)
    monkeypatch.setattr(bench_serving, "measure_stream", lambda args, worker, stock: {"step_saving": 0.25})
    monkeypatch.setattr(bench_serving, "print_stream", lambda r: None)
    bench_serving.run_measurements(args, None, {"environment": {"unet_flop_per_sample": 1.0}, "rows": []})
    return json.loads(Path(args.json).read_text())


def test_the_json_holds_every_row_as_it_comes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[int]] = []
    written = run_measurements(monkeypatch, ["--json", str(tmp_path / "bench.json")], seen)
    assert seen == [[], [2]]  # a run cut short keeps the rows it measured
    assert [r["batch"] for r in written["rows"]] == [2, 3] and written["rows"][0]["bytes_per_image"] == 1234.0


def test_the_json_holds_the_stream(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stream = stream_file(tmp_path, 4)
    written = run_measurements(monkeypatch, ["--json", str(tmp_path / "b.json"), "--stream", str(stream)], [])
    assert written["stream"] == {"step_saving": 0.25} and len(written["rows"]) == 2


def test_a_bare_run_has_the_committed_tables_settings() -> None:
    """docs/results/serving's runs leave guidance, share, mean group and codec at their defaults; the docstring's
    H100 command gives these batches and steps."""
    args = bench_serving.parse_args(["--model", "tiny"])
    assert (args.guidance, args.share, args.mean_group, args.codec) == (7.5, 0.4, 2.8, "fp16")
    assert (args.batches, args.steps) == ("8,16,32,64", 30)


@pytest.mark.parametrize("argv, ok", [(["--share", "1"], True), (["--share", "0"], True), (["--steps", "0"], False),
                                      (["--stream-windows", "0"], False)])
def test_serving_settings_at_their_limits(argv: list[str], ok: bool) -> None:
    if ok:
        assert bench_serving.parse_args(["--model", "tiny", *argv])
    else:
        with pytest.raises(SystemExit):
            bench_serving.parse_args(["--model", "tiny", *argv])


# ------------------------------------------------------------------------------------------------------
# bench_codec
# ------------------------------------------------------------------------------------------------------


def test_snr_and_psnr_by_hand() -> None:
    ref = torch.ones(4)
    assert bench_codec.snr_db(ref, torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(10 * math.log10(4))
    assert math.isinf(bench_codec.snr_db(ref, ref.clone()))
    image = np.zeros((2, 2, 3))
    assert bench_codec.psnr_db(image, image + 0.1) == pytest.approx(20.0)  # images in [0, 1]


def test_best_ms_is_the_fastest_repeat_in_milliseconds(clock: FakeClock) -> None:
    durations = iter([3e-3, 1e-3, 2e-3])
    assert bench_codec._best_ms(lambda: clock.advance(next(durations)), 3) == pytest.approx(1.0)


def test_latent_rows_count_the_frame_against_raw_fp16() -> None:
    from sage_core.codec import CodecSpec, LatentCodec

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # its largest int4 error is negative
    rows = {r.mode: r for r in bench_codec.measure_latent("s", 0.4, x, ["fp16", "int4"], 19, 1)}
    for mode, r in rows.items():
        codec = LatentCodec(CodecSpec(mode, 19))
        frame = codec.encode(x)
        error = codec.decode(frame).float() - x
        assert r.bytes == len(frame) and r.raw_fp16_bytes == 2 * 256 and r.shape == (1, 4, 8, 8)
        assert r.max_abs_err == pytest.approx(float(error.abs().max()))
    assert rows["int4"].max_abs_err > float(error.max())  # the error's size, not its sign


def test_latent_rows_are_measured_at_the_level_given() -> None:
    from sage_core.codec import CodecSpec, LatentCodec

    x = torch.linspace(-3, 3, 1024).reshape(1, 4, 16, 16).round()  # compressible: zstd's level shows in the bytes
    sizes = {level: len(LatentCodec(CodecSpec("int4", level)).encode(x)) for level in (1, 19)}
    assert sizes[1] != sizes[19]
    (row,) = bench_codec.measure_latent("s", 0.4, x, ["int4"], 19, 1)
    assert row.bytes == sizes[19]


def latent_row(beta: float, mode: str, nbytes: int, enc: float, dec: float, snr: float, err: float,
               source: str = "synthetic") -> LatentRow:
    """A LatentRow of a BUDGET_SHAPE latent."""
    return LatentRow(source, beta, mode, bench_codec.BUDGET_SHAPE, nbytes, 32768, enc, dec, snr, err)


def test_seed_averages_by_hand() -> None:
    rows = [latent_row(0.2, "int8", 100, 1.0, 5.0, 10.0, 0.1), latent_row(0.2, "int8", 104, 3.0, 7.0, 20.0, 0.3),
            latent_row(0.3, "int8", 50, 9.0, 9.0, 30.0, 0.9)]
    first, second = bench_codec.average_rows(rows)
    assert (first.beta, first.bytes, first.encode_ms, first.decode_ms) == (0.2, 102, 2.0, 6.0)
    assert (first.snr_db, first.max_abs_err) == (15.0, 0.3) and (second.beta, second.bytes) == (0.3, 50)


def test_the_byte_budget_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [latent_row(0.2, "int8", 8000, 1, 1, 1, 1), latent_row(0.3, "int8", 9000, 1, 1, 1, 1),
            latent_row(0.2, "int4", 8192, 1, 1, 1, 1), latent_row(0.3, "int4", 6000, 1, 1, 1, 1),
            latent_row(0.2, "int4", 99999, 1, 1, 1, 1, source="model")]  # a model latent: not the budget's
    assert bench_codec.modes_within_budget(rows, ["int8", "int4"]) == ["int4"]
    bench_codec.print_latent_table(rows[2:3])
    assert "| 8192 | 0.250 | yes |" in capsys.readouterr().out  # 8 KiB exactly fits


def test_branch_points_round_to_the_nearest_step_and_stop_at_the_last() -> None:
    from diffusers import DDIMScheduler

    from sage_core.models import SD15_SCHEDULER_CONFIG

    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    points = bench_codec.branch_timesteps(10, [0.26, 1.0])
    assert points[0.26][0] == int(scheduler.timesteps[3]) and points[1.0][0] == int(scheduler.timesteps[9])
    assert points[0.26][1] == pytest.approx(float(scheduler.alphas_cumprod[points[0.26][0]]))


def test_a_synthetic_branch_latent_keeps_unit_variance() -> None:
    x = bench_codec.synthetic_branch_latent(0.5, 4, 64, seed=0)
    assert 0.9 < float(x.var(dim=(-2, -1)).mean()) < 1.15  # abar z0 + (1 - abar) eps: std 1 (0.75 with 1 - abar)


def test_jpeg_sizes_shrink_with_quality() -> None:
    sizes = bench_codec.image_bytes(bench_codec.synthetic_image(64, 0))
    assert sizes["jpeg_q95"] > sizes["jpeg_q90"] > sizes["jpeg_q75"]


class Frame(bytes):
    """A fake codec's frame: `size` bytes long, carrying the latent it was made from."""

    latent: torch.Tensor


class FakeCodec:
    """A codec whose frames and errors are set per mode and per group (told apart by the latent's value)."""

    SIZES = {0.2: 100, 0.5: 50}
    ERRORS = {"a": {0.2: 0.1, 0.5: 0.01}, "b": {0.2: 0.0, 0.5: 0.0}, "c": {0.2: 0.0, 0.5: 0.1}}

    def __init__(self, spec: tuple[str, int]) -> None:
        self.mode = spec[0]

    @staticmethod
    def key(x: torch.Tensor) -> float:
        return round(float(x.mean()), 1)

    def encode(self, x: torch.Tensor) -> Frame:
        frame = Frame(b"x" * self.SIZES[self.key(x)])
        frame.latent = x
        return frame

    def decode(self, frame: Frame) -> torch.Tensor:
        return frame.latent + self.ERRORS[self.mode][self.key(frame.latent)]


def test_image_rows_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_core.sampler import BranchPoint

    def branch_point(pipe: object, prompts: list[str], beta: float, steps: int, guidance: float, seed: int):
        value = 0.2 if seed == 0 else 0.5  # group 0 of 2 prompts, group 1 of 1
        return BranchPoint(torch.full((1, 4, 2, 2), value), 1), [None] * len(prompts), None, None

    def finish(pipe: object, point: BranchPoint, conds: list, uncond: object, config: object) -> np.ndarray:
        return np.full((len(conds), 2, 2, 3), float(point.latents.mean()))

    monkeypatch.setattr(bench_codec, "model_branch_point", branch_point)
    monkeypatch.setattr(bench_codec, "finish_images", finish)
    monkeypatch.setattr(bench_codec, "LatentCodec", FakeCodec)
    monkeypatch.setattr(bench_codec, "CodecSpec", lambda mode, level: (mode, level))
    latents, images, finished = bench_codec.measure_images(None, ["p0", "p1", "p2"], None, [0.4], ["a", "b", "c"],
                                                           3, 4, 7.5, 2, 1, None)
    rows = {r.mode: r for r in images}
    assert rows["original"] == ImageRow(0.4, "original", 0, math.inf, math.inf, None)
    assert rows["a"].bytes == 75 and rows["a"].psnr_db == pytest.approx((20 + 20 + 40) / 3, abs=1e-3)
    assert rows["a"].min_psnr_db == pytest.approx(20, abs=1e-3)
    assert math.isinf(rows["b"].psnr_db) and math.isinf(rows["b"].min_psnr_db)
    # identical members are left out of the mean (it would be inf), not out of the minimum
    assert rows["c"].psnr_db == pytest.approx(20, abs=1e-3) and rows["c"].min_psnr_db == pytest.approx(20, abs=1e-3)
    assert [(r.mode, r.bytes) for r in latents] == [("a", 75), ("b", 75), ("c", 75)]  # averaged over the groups
    assert finished.shape == (3, 2, 2, 3)


def test_the_image_part_s_results_and_the_finished_image_bytes(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    finished = np.full((2, 8, 6, 3), 0.5)
    image_row = ImageRow(0.4, "int4", 75, 30.0, 20.0, None)
    monkeypatch.setattr(bench_codec, "load_model", lambda path, allow_tiny: (None, "fake pipeline"))
    monkeypatch.setattr(bench_codec, "measure_images", lambda *args: ([], [image_row], finished))
    result = bench_codec.main(["--quick", "--modes", "int4", "--model", "tiny", "--repeats", "1"])
    assert result["images"] == [{"beta": 0.4, "mode": "int4", "bytes": 75, "psnr_db": 30.0, "min_psnr_db": 20.0,
                                 "fidelity": None}]
    assert result["finished_image_bytes"]["model"] == bench_codec.image_bytes(np.full((8, 6, 3), 128, np.uint8))
    assert "| model | 8x6 |" in capsys.readouterr().out


def test_a_bare_codec_run_has_the_committed_result_s_settings() -> None:
    """docs/results/codec/bench_codec_default_model.json was made with the defaults of these."""
    args = bench_codec.parse_args(["--no-images"])
    assert (args.betas, args.steps, args.repeats, args.seeds, args.level, args.size) == ([0.2, 0.3, 0.4], 30, 20, 4,
                                                                                          3, 64)


# ------------------------------------------------------------------------------------------------------
# bench_load
# ------------------------------------------------------------------------------------------------------


class ScriptedClient:
    """DeviceClient's stand-in: even seeds succeed after 60 ms, odd ones fail at once; records what it was asked."""

    asked: list[tuple[str, int]] = []

    def __init__(self, config: object, model: object) -> None:
        self.config = config

    def __enter__(self) -> ScriptedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def request_latent(self, prompt: str, seed: int) -> None:
        from device_client.client import DeviceError

        self.asked.append((prompt, seed))
        if seed % 2:
            raise DeviceError("RESOURCE_EXHAUSTED", "queue full")
        time.sleep(0.06)


def test_load_percentiles_are_of_the_successes_in_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    ScriptedClient.asked = []
    monkeypatch.setattr(bench_load, "DeviceClient", ScriptedClient)
    args = bench_load.parse_args(["--requests", "4", "--concurrency", "1"])
    summary = bench_load.run_load("127.0.0.1:52251", None, args, ["a", "b", "c"])
    assert summary["ok"] == 2 and summary["errors"] == {"RESOURCE_EXHAUSTED": 2} and summary["lost"] == 0
    assert all(v >= 55 for v in summary["latency_ms"].values())  # each success slept 60 ms; the failures took ~0
    assert summary["throughput_rps"] == pytest.approx(4 / summary["wall_s"])
    assert ScriptedClient.asked == [("a", 0), ("b", 1), ("c", 2), ("a", 3)]  # prompts cycle, a seed per request


def test_a_lost_request_is_lost_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    class HangingClient(ScriptedClient):
        def request_latent(self, prompt: str, seed: int) -> None:
            if seed:
                release.wait(5)

    made = bench_load.device_config
    monkeypatch.setattr(bench_load, "DeviceClient", HangingClient)
    monkeypatch.setattr(bench_load, "device_config", lambda args, address=None: replace(made(args, address),
                                                                                         connect_timeout_s=0.05))
    args = bench_load.parse_args(["--requests", "2", "--concurrency", "1", "--timeout", "0.05"])
    try:
        summary = bench_load.run_load("127.0.0.1:52251", None, args, ["a"])
    finally:
        release.set()
    assert (summary["ok"], summary["lost"], summary["errors"]) == (1, 1, {})


def test_load_summary_prints_each_percentile(capsys: pytest.CaptureFixture[str]) -> None:
    bench_load.print_summary({"requests": 3, "ok": 3, "errors": {}, "lost": 0, "error_examples": {},
                              "latency_ms": {"p50": 10.0, "p95": 20.0, "p99": 30.0}, "wall_s": 1.0,
                              "throughput_rps": 3.0})
    assert "latency ms p50=10 p95=20 p99=30; 3.00 requests/s ended over 1.0 s" in capsys.readouterr().out


def test_load_defaults_and_refusals(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_load.parse_args([])
    assert (args.requests, args.concurrency, args.steps, args.model) == (64, 16, 4, "tiny")  # the docstring's run
    monkeypatch.setattr(bench_load, "EdgeServerProcess", None)  # starting one would fail the test
    assert bench_load.main(["--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# results and coco_stream
# ------------------------------------------------------------------------------------------------------


def test_result_helpers_edge_cases(tmp_path: Path) -> None:
    for text in ("", " , "):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int_list(text)
    assert positive_int_list("8, 32") == [8, 32]
    assert write_json({"a": 1}, "") == {"a": 1}  # no path: nothing written


def test_a_stream_of_the_second_policy(tmp_path: Path) -> None:
    import yaml

    from benchmarks.coco_stream import make_stream
    from simulation.config import load_config, policy_config
    from simulation.workload import embed_prompts, load_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of thing number {i}" for i in range(12)), encoding="utf-8")
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({
        "requests": 16, "prompts": {"dataset": str(prompts), "embedder": "hashed"},
        "sampling": {"steps": 6, "share": 0.5, "guidance": 5.0},
        "grouping": {"sharing": "flat", "tau": 0.3, "max_group_size": 4},
        "policies": [{"name": "first", "grouping": {"sharing": "flat"}},
                     {"name": "second", "grouping": {"sharing": "adaptive", "tau": 0.6, "max_group_size": 3,
                                                     "cache_mb": 8.0}, "sampling": {"share": 0.7}}],
    }), encoding="utf-8")
    stream = tmp_path / "stream.npz"
    meta = make_stream(str(config), "second", 10, str(stream))
    policy = meta["policy"]
    assert meta["policy_name"] == "second" and (policy["sharing"], policy["tau"], policy["max_group_size"]) == (
        "adaptive", 0.6, 3)
    assert policy["cache_mb"] == 8.0 and (meta["steps"], meta["share"], meta["guidance"]) == (6, 0.7, 5.0)
    cfg = policy_config(load_config(str(config)), 1)
    pool = load_prompts(cfg)
    emb = embed_prompts(cfg, pool)
    with np.load(stream) as data:
        assert len(data["prompts"]) == 10 and data["embeddings"].dtype == np.float32
        for prompt, row in zip(data["prompts"], data["embeddings"], strict=True):
            assert np.allclose(row, emb[pool.index(str(prompt))])  # each caption's own embedding
