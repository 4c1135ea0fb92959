"""Simulator behaviour a mutation audit found unchecked, each pinned by a small scenario computed by hand: a step
table whose UNet pass costs 10 ms per sample at any batch and whose VAE costs 5 ms per image, constant links, one
device class, embeddings chosen so that the grouping is known. All fast: no prompt file, no embedder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sage_core.policy import SharingPolicy
from simulation.config import ConfigError, SimConfig, config_from_dict
from simulation.engine import (
    ModeResult,
    SimResult,
    WindowPlan,
    WindowPlanner,
    load_step_table,
    run_server,
    simulate,
)
from simulation.metrics import summarize
from simulation.workload import Workload

UNET_S = 0.010  # the table's seconds per UNet sample, at any batch
VAE_S = 0.005  # the table's seconds per decoded image
DEV_UNET_S, DEV_VAE_S, DEV_TEXT_S = 0.100, 0.400, 0.010  # the device class


def table_file(tmp_path: Path, **extras: Any) -> Path:
    """A step-times file holding the linear table 'lin' (plus `extras`: text, latent encoding, window overhead, or
    another VAE row)."""
    path = tmp_path / "steps.json"
    table = {"unet_ms_per_sample": {"1": UNET_S * 1e3}, "vae_ms_per_image": {"1": VAE_S * 1e3}, **extras}
    path.write_text(json.dumps({"lin": table}), encoding="utf-8")
    return path


def sim_cfg(tmp_path: Path, *, extras: dict[str, Any] | None = None, **overrides: Any) -> SimConfig:
    """T = 10 steps, beta = 0.4 (k = 4), CFG (2 samples a step), window 0.5 s, one worker, the linear table."""
    data: dict[str, Any] = {
        "requests": 1,
        "modes": ["sage", "server", "device", "sage_server"],
        "sampling": {"steps": 10, "share": 0.4, "guidance": 7.5},
        "grouping": {"tau": 0.9, "max_group_size": 4},
        "server": {"window_s": 0.5, "max_window_requests": 8, "gpu_workers": 1, "step_table": "lin",
                   "step_times_file": str(table_file(tmp_path, **(extras or {})))},
        "codec": {"latent_shape": [4, 8, 8], "request_bytes": 1000, "overhead_bytes": 500, "image_bytes": 20_000},
        "devices": [{"name": "phone", "unet_ms_per_sample": DEV_UNET_S * 1e3, "vae_decode_ms": DEV_VAE_S * 1e3,
                     "text_encode_ms": DEV_TEXT_S * 1e3, "power_w": 2.0, "radio_j_per_mb": 1.0}],
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return config_from_dict(data)


def workload(arrival: list[float], rtt_s: float | list[float] = 0.02, bandwidth: float = 1e6,
             loss: float = 0.0, prompt_ids: list[int] | None = None) -> Workload:
    """Requests at `arrival` over constant links (bandwidth in bytes/s); prompt i by default (all distinct)."""
    n = len(arrival)
    ids = list(range(n)) if prompt_ids is None else prompt_ids
    return Workload(
        arrival_s=np.asarray(arrival, dtype=np.float64),
        prompt_ids=np.asarray(ids, dtype=np.int64),
        device_ids=np.zeros(n, dtype=np.int64),
        bandwidth_bps=np.full(n, float(bandwidth)),
        rtt_s=np.broadcast_to(np.asarray(rtt_s, dtype=np.float64), (n,)).copy(),
        loss=np.full(n, float(loss)),
        prompts=tuple(f"prompt {i}" for i in range(max(ids) + 1)),
    )


def distinct(count: int) -> np.ndarray:
    """Orthogonal embeddings: no two prompts ever group."""
    return np.eye(count, dtype=np.float32)


def run(cfg: SimConfig, wl: Workload, emb: np.ndarray | None = None) -> SimResult:
    """simulate with distinct embeddings unless given."""
    return simulate(cfg.replace(requests=wl.n), wl, distinct(len(wl.prompts)) if emb is None else emb)


def singles() -> WindowPlanner:
    """Independent sampling of one step: every request alone."""
    return WindowPlanner(np.zeros((1, 2), dtype=np.float32), None, steps=1, cap=1)


def constant_job(seconds: float) -> Callable[[WindowPlan], float]:
    """A job of `seconds` whatever the window."""
    return lambda plan: seconds


# ------------------------------------------------------------------------------------------------ step table
@pytest.mark.parametrize(
    ("extras", "message"),
    [
        ({"unet_ms_per_sample": {"1": 0.0}}, "times > 0"),
        ({"window_overhead_ms": -1.0}, "window_overhead_ms must be a number >= 0"),
        ({"latent_encode_ms_per_group": -0.5}, "latent_encode_ms_per_group must be a number >= 0"),
    ],
)
def test_step_tables_refuse_zero_pass_times_and_negative_extras(tmp_path, extras, message):
    """A pass of 0 ms would make batching free, a negative overhead would shorten every job."""
    cfg = sim_cfg(tmp_path, extras=extras)
    with pytest.raises(ConfigError, match=message):
        load_step_table(cfg)


# ------------------------------------------------------------------------------------------------ the server
def test_a_window_that_waited_for_the_worker_finishes_a_job_after_it_started():
    """One worker, 1 s jobs: the second request's window closes at 0.1 s but starts when the worker frees at 1 s,
    so it finishes at 2 s (not 1.1 s, a job run before the worker was free)."""
    tr = run_server(np.array([0.0, 0.1]), np.zeros(2, dtype=np.int64), 0.0, 8, 1, singles(), constant_job(1.0))
    assert tr.bounds.tolist() == [0, 1, 2]
    assert tr.close_s.tolist() == pytest.approx([0.0, 0.1])
    assert tr.dispatch_s.tolist() == pytest.approx([0.0, 1.0])
    assert tr.finish_s.tolist() == pytest.approx([1.0, 2.0])


def test_progress_reports_the_last_request():
    """401 requests report every 2nd request: the last window (400 -> 401) still reports 401 of 401."""
    seen: list[tuple[int, int]] = []
    arr = np.arange(401, dtype=np.float64)
    run_server(arr, np.zeros(401, dtype=np.int64), 0.0, 1, 1, singles(), constant_job(0.5),
               lambda done, total: seen.append((done, total)))
    assert seen[-1] == (401, 401)
    assert all(b[0] > a[0] for a, b in zip(seen, seen[1:], strict=False))


# ----------------------------------------------------------------------------------------------- the planner
def test_a_pair_exactly_at_tau_is_grouped():
    """Two identical prompts have cosine similarity exactly 1: at tau = 1 they group (every pair must reach tau),
    so the planner's no-pair shortcut must not skip them."""
    emb = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    planner = WindowPlanner(emb, SharingPolicy(tau=1.0, max_group_size=3, share=1.0), steps=10, cap=4)
    plan = planner(np.array([0, 1]))
    assert plan.groups == [[0, 1]] and plan.depth.tolist() == [4, 4] and plan.deliveries == 1


def test_a_window_without_pairs_still_uses_the_cache():
    """With a latent cache, a window of two unrelated prompts is planned (not short-cut): its latents are filed,
    and the next window's repeat of one of them starts from the cache."""
    emb = distinct(3)
    planner = WindowPlanner(emb, SharingPolicy(mode="adaptive", share=1.0), steps=10, cap=4, cache_bytes=2**20,
                            latent_shape=(1, 4, 8, 8))
    first = planner(np.array([0, 1]))
    second = planner(np.array([0, 2]))
    assert first.lookups == 2 and first.hits == 0
    assert second.lookups == 2 and second.hits == 1 and second.cached_steps == 4


# ------------------------------------------------------------------------------------------------- the links
def test_goodput_is_the_bandwidth_less_lost_packets_when_tcp_is_not_the_limit():
    """1 MB/s with 1 % loss on a 1 ms link: TCP's loss-limited rate is far above, so 99 % of the bandwidth."""
    from simulation.engine import goodput_bps

    wl = workload([0.0], rtt_s=0.001, bandwidth=1e6, loss=0.01)
    assert goodput_bps(wl, 1460)[0] == pytest.approx(0.99e6)


def test_goodput_on_a_lossy_long_link_is_the_mathis_rate():
    """1 GB/s with 1 % loss on a 100 ms link: MSS / RTT * sqrt(3/2) / sqrt(p) (Mathis et al. 1997)."""
    from simulation.engine import goodput_bps

    wl = workload([0.0], rtt_s=0.1, bandwidth=1e9, loss=0.01)
    assert goodput_bps(wl, 1460)[0] == pytest.approx(1460 / 0.1 * np.sqrt(3 / 2) / np.sqrt(0.01))


def test_the_server_sees_requests_in_order_of_arrival_at_the_server(tmp_path):
    """Request 0 leaves first but over a 2 s RTT; request 1 leaves 0.1 s later over 20 ms and reaches the server
    first. Each gets its own window, closing 0.5 s after it reached the server, and no queue (jobs take 80 ms)."""
    wl = workload([0.0, 0.1], rtt_s=[2.0, 0.02])
    res = run(sim_cfg(tmp_path, modes=["sage"]), wl)
    sage = res.modes["sage"]
    assert sage.window_sizes.tolist() == [1, 1]
    assert sage.uplink_s.tolist() == pytest.approx([1.0 + 0.001, 0.01 + 0.001])
    assert sage.window_wait_s.tolist() == pytest.approx([0.5, 0.5])
    assert sage.queue_wait_s.tolist() == pytest.approx([0.0, 0.0])
    assert sage.gpu_job_s.tolist() == pytest.approx([4 * 2 * UNET_S] * 2)



def test_each_request_keeps_its_own_shared_depth_when_the_server_sees_another_order(tmp_path):
    """Adaptive sharing, T = 20, k = 9. Request 0 leaves first over a 2 s RTT and is alone: depth k. Requests 1
    and 2 (cosine 0.905) reach the server first and form a pair: the schedule's share 0.4 + 0.1 * 0.005 / 0.07
    of 20 steps, 8. The device runs T - depth steps of its own request."""
    cfg = sim_cfg(tmp_path, modes=["sage"], sampling={"steps": 20, "share": 0.45}, grouping={"sharing": "adaptive"})
    emb = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.905, np.sqrt(1 - 0.905**2), 0.0]], dtype=np.float32)
    sage = run(cfg, workload([0.0, 0.1, 0.1], rtt_s=[2.0, 0.02, 0.02]), emb).modes["sage"]
    assert sage.window_sizes.tolist() == [2, 1]
    assert sage.depth.tolist() == [9, 8, 8]
    assert sage.unet_evals_device == 2 * (11 + 12 + 12)
    assert sage.device_s.tolist() == pytest.approx([DEV_TEXT_S + r * 2 * DEV_UNET_S + DEV_VAE_S for r in (11, 12, 12)])


def test_the_gpu_busy_span_runs_from_the_first_dispatch_to_the_last_finish(tmp_path):
    """Requests at 0 and 10 s, each its own window of 4 passes of 20 ms: 0.08 GPU-s each, the span from the first
    dispatch (0.511 s) to the last finish (10.591 s)."""
    sage = run(sim_cfg(tmp_path, modes=["sage"]), workload([0.0, 10.0])).modes["sage"]
    assert sage.gpu_seconds == pytest.approx(2 * 0.08)
    assert sage.gpu_busy_span_s == pytest.approx(10.0 + 0.08)

# ------------------------------------------------------------------------------------------ one request by hand
EXTRAS = {"text_encode_ms_per_prompt": 2.0, "latent_encode_ms_per_group": 3.0, "window_overhead_ms": 7.0}
SERVER = {"job_overhead_ms": 11.0, "step_delay_ms": 1.0}
FIXED_S = 0.002 + 0.007 + 0.011  # one prompt's text encoding, the window's and the job's overheads


def test_one_request_in_every_mode_by_hand(tmp_path):
    """One request over 20 ms RTT at 1 MB/s. Server: every UNet pass costs 10 ms per sample plus the 1 ms step
    delay; the window adds text encoding, overheads and, where a latent is sent, its encoding. sage: 4 shared
    steps, then 6 steps and the decode on the device (its text encoding overlaps the wait); server and
    sage_server: 10 steps and the decode on the server, an image down; device: everything on the device."""
    cfg = sim_cfg(tmp_path, extras=EXTRAS, server=SERVER)
    res = run(cfg, workload([0.0]))
    up, pass_s = 0.01 + 1000 / 1e6, 2 * UNET_S + 0.001
    latent_down = 0.01 + (res.latent_bytes + 500) / 1e6
    image_down = 0.01 + 20_500 / 1e6
    device_branch = 6 * 2 * DEV_UNET_S + DEV_VAE_S
    sage, server, both, device = (res.modes[m] for m in ("sage", "server", "sage_server", "device"))
    assert sage.gpu_job_s[0] == pytest.approx(4 * pass_s + 0.003 + FIXED_S)
    assert sage.latency_s[0] == pytest.approx(up + 0.5 + sage.gpu_job_s[0] + latent_down + device_branch)
    assert sage.device_s[0] == pytest.approx(DEV_TEXT_S + device_branch)
    assert sage.energy_j[0] == pytest.approx(2.0 * sage.device_s[0] + (res.latent_bytes + 500 + 1000) * 1e-6)
    for m in (server, both):
        assert m.gpu_job_s[0] == pytest.approx(10 * pass_s + VAE_S + FIXED_S), m.name
        assert m.latency_s[0] == pytest.approx(up + 0.5 + m.gpu_job_s[0] + image_down), m.name
        assert m.device_s[0] == 0.0 and m.energy_j[0] == pytest.approx(21_500 * 1e-6), m.name
        assert m.gpu_seconds == pytest.approx(m.gpu_job_s[0]), m.name
    assert device.latency_s[0] == pytest.approx(DEV_TEXT_S + 10 * 2 * DEV_UNET_S + DEV_VAE_S)
    assert device.energy_j[0] == pytest.approx(2.0 * device.latency_s[0])
    assert sage.window_wait_s[0] == pytest.approx(0.5) and sage.queue_wait_s[0] == 0.0


def test_the_device_starts_its_steps_once_it_has_encoded_its_prompt(tmp_path):
    """A slow text encoder (5 s) on the device: the latent is there long before, so the device's 6 steps and
    decode start at 5 s after the request, not when the latent arrived."""
    cfg = sim_cfg(tmp_path, modes=["sage"], devices=[{"name": "slow", "unet_ms_per_sample": 100.0,
                                                      "vae_decode_ms": 400.0, "text_encode_ms": 5000.0}])
    sage = run(cfg, workload([0.0])).modes["sage"]
    assert sage.latency_s[0] == pytest.approx(5.0 + 6 * 2 * DEV_UNET_S + DEV_VAE_S)
    assert sage.device_s[0] == pytest.approx(5.0 + 6 * 2 * DEV_UNET_S + DEV_VAE_S)


# ---------------------------------------------------------------------------------- one window of three, by hand
def test_a_window_of_three_with_one_group_by_hand(tmp_path):
    """Prompts a, a, b at once: one group {a, a} and b alone, 2 latents sent. The VAE table decodes 2 images in
    8 ms (4 ms each beyond). sage: 4 passes over 2 trajectories, 3 prompts encoded, 2 latents encoded.
    sage_server: those, then 6 passes over 3 trajectories and 3 decodes. server: 10 passes over 3."""
    cfg = sim_cfg(tmp_path, extras={**EXTRAS, "vae_ms_per_image": {"1": 5.0, "2": 4.0}}, server=SERVER)
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    res = run(cfg, workload([0.0, 0.0, 0.0], prompt_ids=[0, 0, 1]), emb)
    fixed = 3 * 0.002 + 0.007 + 0.011
    sage, server, both = (res.modes[m] for m in ("sage", "server", "sage_server"))
    assert sage.window_sizes.tolist() == [3] and sorted(sage.group_sizes.tolist()) == [1, 2]
    assert sage.deliveries == 2 and sage.depth.tolist() == [4, 4, 4]
    assert sage.gpu_seconds == pytest.approx(4 * (4 * UNET_S + 0.001) + 2 * 0.003 + fixed)
    assert both.gpu_seconds == pytest.approx(4 * (4 * UNET_S + 0.001) + 6 * (6 * UNET_S + 0.001) + 0.012 + fixed)
    assert server.gpu_seconds == pytest.approx(10 * (6 * UNET_S + 0.001) + 0.012 + fixed)
    assert (sage.unet_evals_server, sage.unet_evals_device) == (2 * 4 * 2, 2 * 6 * 3)
    assert (both.unet_evals_server, both.unet_evals_device) == (2 * (4 * 2 + 6 * 3), 0)
    assert both.job_batch_samples.tolist() == pytest.approx([2 * (8 + 18) / (4 + 6)])  # samples per UNet pass
    assert server.job_batch_samples.tolist() == pytest.approx([6.0])


def test_a_window_of_unrelated_prompts_sends_and_encodes_a_latent_each(tmp_path):
    """Two unrelated prompts at once (the planner's no-pair shortcut): 2 latents sent, each encoded (3 ms), after
    4 passes over both trajectories."""
    cfg = sim_cfg(tmp_path, modes=["sage"], extras=EXTRAS, server=SERVER)
    sage = run(cfg, workload([0.0, 0.0])).modes["sage"]
    assert sage.window_sizes.tolist() == [2] and sage.group_sizes.tolist() == [1, 1]
    assert sage.deliveries == 2
    assert sage.gpu_seconds == pytest.approx(4 * (4 * UNET_S + 0.001) + 2 * 0.003 + 2 * 0.002 + 0.007 + 0.011)

# --------------------------------------------------------------------------------------------------- summaries
def mode_result(name: str, latency: list[float], **fields: Any) -> ModeResult:
    """A ModeResult with the given latencies, every per-request array a distinct known constant unless given."""
    n = len(latency)
    arrays = {"uplink_s": 0.1, "window_wait_s": 0.2, "queue_wait_s": 0.3, "gpu_job_s": 0.4, "downlink_s": 0.5,
              "device_s": 0.6, "energy_j": 0.7, "bytes_down": 800.0, "bytes_up": 900.0}
    data: dict[str, Any] = {k: np.full(n, v) for k, v in arrays.items()}
    data.update(fields)
    return ModeResult(name=name, latency_s=np.asarray(latency, dtype=np.float64), **data)


def fake_result(tmp_path: Path, modes: dict[str, ModeResult], **cfg: Any) -> SimResult:
    """A SimResult of `modes` (all of one length) under sim_cfg."""
    n = next(iter(modes.values())).latency_s.shape[0]
    config = sim_cfg(tmp_path, requests=n, modes=list(modes), **cfg)
    return SimResult(config, n, modes, latent_bytes=1000, latent_bytes_source="test", step_table="lin")


def test_latency_quantiles_and_maximum_are_of_the_latencies(tmp_path):
    """Latencies 1..100 s: numpy's linear percentiles are 50.5, 95.05 and 99.01; the maximum is 100."""
    res = fake_result(tmp_path, {"device": mode_result("device", list(np.arange(1.0, 101.0)))})
    lat = summarize(res)["modes"]["device"]["latency_s"]
    assert lat == pytest.approx({"p50": 50.5, "p95": 95.05, "p99": 99.01, "mean": 50.5, "max": 100.0})


def test_a_request_exactly_at_the_slo_meets_it(tmp_path):
    """slo_s = 10: 10.0 s meets it, 10.5 s does not."""
    res = fake_result(tmp_path, {"device": mode_result("device", [10.0, 10.5])}, slo_s=10.0)
    assert summarize(res)["modes"]["device"]["slo_violations"] == 0.5


def test_the_breakdown_and_bytes_come_from_their_own_arrays(tmp_path):
    """Each breakdown entry is the mean of its own per-request array; bytes up are the request's."""
    res = fake_result(tmp_path, {"device": mode_result("device", [1.0, 2.0])})
    s = summarize(res)["modes"]["device"]
    assert s["breakdown_mean_s"] == pytest.approx(
        {"uplink": 0.1, "window_wait": 0.2, "queue_wait": 0.3, "gpu_job": 0.4, "downlink": 0.5, "device": 0.6}
    )
    assert (s["bytes_down_per_image"], s["bytes_up_per_image"]) == (800.0, 900.0)


def test_per_request_csv_columns_hold_their_own_values(tmp_path):
    """requests.csv: the queue wait column is the queue wait, not the window wait."""
    import csv

    from simulation.metrics import write_requests_csv

    res = fake_result(tmp_path, {"device": mode_result("device", [1.0])})
    path = tmp_path / "requests.csv"
    write_requests_csv(res, path)
    row = next(csv.DictReader(path.open(encoding="utf-8")))
    assert {k: float(row[k]) for k in ("latency_s", "window_wait_s", "queue_wait_s", "gpu_job_s", "downlink_s")} == {
        "latency_s": 1.0, "window_wait_s": 0.2, "queue_wait_s": 0.3, "gpu_job_s": 0.4, "downlink_s": 0.5}


def test_savings_against_the_baselines(tmp_path):
    """GPU-s per image 0.25 against the server's 1.0 saves 75 %; device energy 2 J against 8 J saves 75 %."""
    n = 4
    modes = {
        "sage": mode_result("sage", [1.0] * n, energy_j=np.full(n, 2.0), gpu_seconds=1.0, gpu_busy_span_s=1.0),
        "server": mode_result("server", [1.0] * n, energy_j=np.full(n, 1.0), gpu_seconds=4.0, gpu_busy_span_s=4.0),
        "device": mode_result("device", [1.0] * n, energy_j=np.full(n, 8.0)),
    }
    s = summarize(fake_result(tmp_path, modes))["modes"]
    assert s["sage"]["gpu_saving_vs_server"] == pytest.approx(0.75) and s["server"]["gpu_saving_vs_server"] == 0.0
    assert s["sage"]["device_energy_saving_vs_device"] == pytest.approx(0.75)
    assert s["server"]["device_energy_saving_vs_device"] == pytest.approx(0.875)


def test_gpu_utilization_counts_every_worker(tmp_path):
    """2 workers busy 3 GPU-s in total over a 2 s span: 75 % utilization."""
    modes = {"server": mode_result("server", [1.0], gpu_seconds=3.0, gpu_busy_span_s=2.0)}
    res = fake_result(tmp_path, modes, server={"gpu_workers": 2})
    assert summarize(res)["modes"]["server"]["gpu_utilization"] == pytest.approx(0.75)


def test_grouped_summary_figures_by_hand(tmp_path):
    """6 requests in groups of 3, 2 and 1 (T = 10, k = 4, CFG), 7 latents sent, 3 of 4 cache lookups hit:
    5 of the 6 requests share; 4 + 4 + 4 = 12 server steps are 2 per image; the ideal saving is 0.4 * (1 - 1/2)
    at the mean group size 2, 0.4 * (1 - 1/4) with full groups of 4; window sizes 1, 1, 1, 1, 2 have p95 1.8."""
    n = 6
    sage = mode_result(
        "sage", [1.0] * n, group_sizes=np.array([3, 2, 1]), depth=np.full(n, 4), unet_evals_server=2 * 12,
        unet_evals_device=2 * 6 * n, deliveries=7, cache_lookups=4, cache_hits=3,
        window_sizes=np.array([1, 1, 1, 1, 2]),
    )
    s = summarize(fake_result(tmp_path, {"sage": sage}))
    m = s["modes"]["sage"]
    assert m["requests_in_shared_groups"] == pytest.approx(5 / 6)
    assert m["group_size_hist"] == {"1": 1, "2": 1, "3": 1, "4": 0}
    assert m["server_steps_per_image"] == pytest.approx(2.0) and m["device_steps_per_image"] == pytest.approx(6.0)
    assert m["deliveries_per_image"] == pytest.approx(7 / 6)
    assert m["cache"]["hit_rate"] == pytest.approx(0.75)
    assert m["ideal_saving"] == pytest.approx(0.4 * (1 - 1 / 2))
    assert m["ideal_saving_full_groups"] == pytest.approx(0.4 * (1 - 1 / 4))
    assert s["windows"]["p95_requests"] == pytest.approx(1.8)


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"requests": 0}, "requests must be >= 1, got 0"),
        ({"slo_s": 0.0}, "slo_s must be > 0, got 0.0"),
        ({"arrivals": {"burst": {"on_fraction": 0.0}}}, "arrivals.burst.on_fraction must lie in (0, 1)"),
        ({"arrivals": {"burst": {"factor": 0.5}}}, "arrivals.burst.factor must be >= 1, got 0.5"),
        ({"arrivals": {"process": "bursty", "burst": {"factor": 10.0, "on_fraction": 0.1}}}, "factor * on_fraction"),
        ({"arrivals": {"diurnal": {"amplitude": 1.0}}}, "arrivals.diurnal.amplitude must lie in [0, 1), got 1.0"),
        ({"prompts": {"zipf_s": 0.0}}, "prompts.zipf_s must be > 0, got 0.0"),
        ({"sampling": {"steps": 0}}, "sampling.steps must be >= 1, got 0"),
        ({"sampling": {"guidance": -1.0}}, "sampling.guidance must be >= 0, got -1.0"),
        ({"server": {"max_window_requests": 0}}, "server.max_window_requests must be >= 1, got 0"),
        ({"server": {"job_overhead_ms": -1.0}}, "server.job_overhead_ms must be >= 0, got -1.0"),
        ({"codec": {"latent_shape": [4, 0, 8]}}, "codec.latent_shape must be positive"),
        ({"network": {"bandwidth_mbps": {"dist": "constant", "value": 0.0}}}, "network.bandwidth_mbps must lie in"),
        ({"network": {"mss_bytes": 0}}, "network.mss_bytes must be > 0, got 0"),
        ({"network": {"loss": {"dist": "choice", "values": [0.0, 0.1], "weights": [0.0, 0.0]}}},
         "network.loss.weights must not all be 0"),
        ({"devices": [{"name": "a", "power_w": -1.0}]}, "devices[0].power_w must be >= 0, got -1.0"),
        ({"devices": [{"name": "a", "radio_j_per_mb": -1.0}]}, "devices[0].radio_j_per_mb must be >= 0, got -1.0"),
        ({"devices": [{"name": "a", "share": 0.0}, {"name": "b", "share": 0.0}]}, "the shares must not all be 0"),
        ({"sweep": {"rate": [5.0, 0.0]}}, "sweep.rate values must be > 0"),
        ({"sweep": {"share": [0.5, 1.5]}}, "sweep.share values must lie in [0, 1]"),
        ({"sweep": {"window_s": [-1.0]}}, "sweep.window_s values must be >= 0"),
        ({"sweep": {"requests": 0}}, "sweep.requests must be >= 1, got 0"),
        ({"policies": [{"name": "a"}, {"name": "a"}]}, "policies need distinct, non-empty names"),
    ],
)
def test_out_of_range_settings_are_refused(tmp_path, override, message):
    """Each setting outside its documented range is a one-line ConfigError naming it."""
    with pytest.raises(ConfigError) as err:
        sim_cfg(tmp_path, **override)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        {"server": {"window_s": 0.0}},  # the edge server's --max-wait-ms 0: no batching wait
        {"network": {"rtt_ms": {"dist": "uniform", "low": 30.0, "high": 30.0}}},
        {"network": {"rtt_ms": {"dist": "lognormal", "median": 30.0, "sigma": 0.0}}},
        {"arrivals": {"burst": {"factor": 1.0}}},
    ],
)
def test_settings_on_the_edge_of_their_range_are_accepted(tmp_path, override):
    """window_s 0, a uniform of one value, a lognormal without spread, bursts at the base rate."""
    sim_cfg(tmp_path, **override)


@pytest.mark.parametrize(("steps", "share"), [(30, 0.45), (10, 0.25), (20, 0.375), (7, 0.5)])
def test_shared_steps_round_as_the_sampler_rounds(tmp_path, steps, share):
    """k = round(beta T), as sage_core's SamplingConfig.branch_step: 13.5 -> 14 (round half to even), 2.5 -> 2."""
    from sage_core.sampler import SamplingConfig

    cfg = sim_cfg(tmp_path, sampling={"steps": steps, "share": share})
    assert cfg.sampling.shared_steps == SamplingConfig(steps=steps, share=share).branch_step()
    assert cfg.sampling.shared_steps == round(share * steps)


# ---------------------------------------------------------------------------------------------------- workload
def test_draws_keep_the_median_and_the_weights():
    """A lognormal without spread is its median; a choice with weights 0 and 1 always draws the second value; a
    uniform of one value is that value."""
    from simulation.config import Dist
    from simulation.workload import draw

    rng = np.random.default_rng(0)
    assert draw(Dist("lognormal", median=50.0, sigma=0.0), 5, rng).tolist() == [50.0] * 5
    assert draw(Dist("choice", values=(1.0, 2.0), weights=(0.0, 1.0)), 50, rng).tolist() == [2.0] * 50
    assert draw(Dist("uniform", low=3.0, high=3.0), 3, rng).tolist() == [3.0] * 3


def test_device_shares_and_uniform_prompts(tmp_path):
    """Device classes with shares 0 and 1: every request is of the second; uniform prompts over a pool of 2 draw
    both (each with probability 1/2, over 200 requests)."""
    cfg = sim_cfg(tmp_path, requests=200, prompts={"order": "uniform"},
                  devices=[{"name": "never", "share": 0.0}, {"name": "always", "share": 1.0}])
    from simulation.workload import build_workload

    wl = build_workload(cfg, ["a", "b"])
    assert set(wl.device_ids.tolist()) == {1}
    assert set(wl.prompt_ids.tolist()) == {0, 1}


def test_prompt_limit_keeps_that_many_prompts(tmp_path):
    """prompts.limit = 2 keeps the file's first 2 prompts."""
    from simulation.workload import load_prompts

    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert load_prompts(sim_cfg(tmp_path, prompts={"dataset": str(path), "limit": 2})) == ["one", "two"]


def workload_body(tmp_path: Path, times: list[float]) -> tuple[Path, dict[str, Any]]:
    """A workload file of requests at `times` and its JSON body."""
    from simulation.workload import write_workload_file

    path = tmp_path / "w.json"
    write_workload_file(path, sim_cfg(tmp_path), workload(times))
    return path, json.loads(path.read_text())


def test_workload_files_take_simultaneous_requests_and_refuse_negative_times(tmp_path):
    """Two requests at the same instant are a burst, not an error; a first request before 0 is refused even when
    the times never decrease."""
    from simulation.workload import read_workload_file

    path, body = workload_body(tmp_path, [0.5, 0.5, 1.0])
    _, wl = read_workload_file(path)
    assert wl.arrival_s.tolist() == [0.5, 0.5, 1.0]
    body["requests"][0]["t"] = -1.0
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="arrival times must be >= 0"):
        read_workload_file(path)


def test_a_workload_files_unknown_device_class_is_a_config_error(tmp_path):
    """A request from a device class the config does not list is refused by name (it was a KeyError)."""
    from simulation.workload import read_workload_file

    path, body = workload_body(tmp_path, [0.0, 1.0])
    body["requests"][1]["device"] = "tablet"
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="device class 'tablet' is not in the config's devices"):
        read_workload_file(path)


# ------------------------------------------------------------------------------------------------------- sweep
def test_the_base_slice_takes_the_smaller_of_two_equally_near_values():
    """The config's beta 0.4 was not swept, 0.3 and 0.5 were: the smaller one is shown, and said to be."""
    from simulation.sweep import base_slice

    rows = [{"share": 0.3, "tau": 0.5}, {"share": 0.5, "tau": 0.5}]
    share, tau, share_label, tau_label = base_slice(rows, 0.4, 0.5)
    assert (share, tau) == (0.3, 0.5)
    assert share_label == "beta 0.3 (nearest swept to the config's 0.4)" and tau_label == "tau 0.5"


def test_the_offline_ideal_uses_the_group_size_cap_the_steps_and_the_limit(tmp_path):
    """Prompts a, b alternating, 8 requests, groups of at most 2: mean group size 2 offline, and the ideal saving
    beta (1 - 1/2) with beta = k / T = round(0.45 * 10) / 10 = 0.4 (the steps a run shares, not 0.45). Only the
    first `limit` requests count: a, a, a in groups of at most 2 give 3 / 2."""
    from simulation.sweep import offline_mean_group_size, run_sweep

    cfg = sim_cfg(tmp_path, modes=["sage"], sampling={"steps": 10, "share": 0.45},
                  grouping={"max_group_size": 2}, prompts={"order": "sequential"}, sweep={"requests": 8})
    rows = run_sweep(cfg, ["a", "b"], distinct(2))
    assert len(rows) == 1
    assert rows[0]["offline_mean_group_size"] == 2.0
    assert rows[0]["offline_ideal_saving"] == pytest.approx(0.4 * (1 - 1 / 2))
    assert offline_mean_group_size(distinct(2), np.array([0, 0, 0, 1]), cfg, limit=3) == 1.5


def test_a_sweep_point_sets_its_window_and_load(tmp_path):
    """Each point's window, load, tau and beta replace the base config's."""
    from simulation.sweep import point_config

    point = {"rate": 7.0, "window_s": 2.0, "tau": 0.3, "share": 0.2}
    pcfg = point_config(sim_cfg(tmp_path, sweep={"requests": 9}), point)
    assert (pcfg.arrivals.rate, pcfg.server.window_s, pcfg.grouping.tau, pcfg.sampling.share) == (7.0, 2.0, 0.3, 0.2)
    assert pcfg.requests == 9


# -------------------------------------------------------------------------------------------------- validation
def test_the_comparison_is_symmetric_and_inclusive():
    """A simulator 50 % low fails as one 50 % high does; exactly 10 % off passes a 10 % tolerance; latency is
    allowed 25 %, not more."""
    from simulation.validation import compare

    real = {"unet_evals": 1000, "bytes_per_image": 2000.0, "latency_p50_s": 2.0}
    assert not compare({**real, "unet_evals": 500}, real)["pass"]
    assert not compare({**real, "bytes_per_image": 1000.0}, real)["pass"]
    assert compare({**real, "unet_evals": 1100}, real)["pass"]
    assert not compare({**real, "latency_p50_s": 2.6}, real)["pass"]
    assert compare({**real, "latency_p50_s": 1.5}, real)["pass"]


def replay_record(group: str, latency: float, guidance: float = 7.5) -> dict[str, Any]:
    """One replayed request: 8 shared steps, 24 device evaluations, 100 ms queue wait."""
    return {"id": 0, "latency_s": latency, "start_delay_s": 0.0, "group_id": group, "group_size": 1,
            "branch_step": 8, "total_steps": 20, "guidance": guidance, "payload_bytes": 2000, "wire_bytes": 2200,
            "device_unet_evals": 24, "timings_ms": {"server_queue_wait": 100.0, "server_shared_phase": 900.0,
                                                    "branch_phase": 500.0}}


def test_real_totals_by_hand():
    """Latencies 1, 2 and 9 s (p50 2 s, p95 8.3 s); without guidance one UNet evaluation per shared step;
    queue waits in ms become seconds."""
    from simulation.validation import real_totals

    t = real_totals([replay_record("g0", 1.0), replay_record("g1", 2.0), replay_record("g2", 9.0)])
    assert t["latency_p50_s"] == 2.0 and t["latency_p95_s"] == pytest.approx(8.3)
    assert t["mean_server_queue_wait_s"] == pytest.approx(0.1)
    assert real_totals([replay_record("g0", 1.0, guidance=1.0)])["unet_evals_server"] == 8


def test_sim_totals_by_hand(tmp_path):
    """The simulator's side: p50 of latencies 1, 2, 9 is 2; evaluations on both sides; bytes down per image; the
    server queue wait is the window's wait plus the wait for a worker (0.2 + 0.3 s)."""
    from simulation.validation import sim_totals

    sage = mode_result("sage", [1.0, 2.0, 9.0], unet_evals_server=16, unet_evals_device=72,
                       group_sizes=np.array([2, 1]))
    t = sim_totals(fake_result(tmp_path, {"sage": sage}))
    assert t["latency_p50_s"] == 2.0 and t["latency_p95_s"] == pytest.approx(8.3)
    assert (t["unet_evals"], t["unet_evals_server"], t["unet_evals_device"]) == (88, 16, 72)
    assert t["bytes_per_image"] == 800.0 and t["mean_server_queue_wait_s"] == pytest.approx(0.5)
    assert t["groups"] == 2 and t["mean_group_size"] == 1.5


def test_server_flags_pass_beta_and_a_queue_of_four_windows(tmp_path):
    """beta goes to the edge server as given (it rounds k itself); its queue holds 4 windows, at least 256."""
    from simulation.validation import server_args

    cfg = sim_cfg(tmp_path, sampling={"steps": 10, "share": 0.45}, server={"max_window_requests": 100})
    flags = dict(zip(server_args(cfg, "tiny")[::2], server_args(cfg, "tiny")[1::2], strict=True))
    assert flags["--default-share"] == "0.45" and flags["--max-queue"] == "400"


# ----------------------------------------------------------------------------------------------------- measure
def test_measured_times_are_per_sample_per_step_and_per_image(tiny_pipe, monkeypatch):
    """A clock that advances only inside the measured calls, by 1 ms per UNet sample evaluation (2 per trajectory
    step with CFG), 3 ms per decoded image and 0.5 ms per encoded prompt: the table and the device class read
    back exactly those unit costs, whatever the batch (T = 4, k = 2)."""
    import types

    import sage_core.generate
    import sage_core.grouping
    import sage_core.sampler
    from simulation import measure

    clock = [0.0]
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def costs(fn, ms):
        def timed(*args, **kwargs):
            clock[0] += ms(*args) / 1e3
            return fn(*args, **kwargs)

        return timed

    for module, name, ms in (
        (sage_core.sampler, "shared_phase", lambda u, s, conds, n, un, cfg: 2 * len(conds) * cfg.branch_step()),
        (sage_core.sampler, "branch_phase",
         lambda u, s, pts, c, un, cfg: 2 * len(pts) * (cfg.steps - cfg.branch_step())),
        (sage_core.generate, "decode_latents", lambda pipe, lat: 3.0 * lat.shape[0]),
        (sage_core.generate, "encode_prompts", lambda pipe, prompts: 0.5 * len(prompts)),
    ):
        monkeypatch.setattr(module, name, costs(getattr(module, name), ms))
    table, device = measure.measure_pipeline(tiny_pipe, batches=(1, 2), steps=4, share=0.5, repeats=1)
    assert table["unet_ms_per_sample"] == {"2": 1.0, "4": 1.0}
    assert table["vae_ms_per_image"] == {"1": 3.0, "4": 3.0}
    assert table["text_encode_ms_per_prompt"] == 0.5
    assert device == {"unet_ms_per_sample": 1.0, "vae_decode_ms": 3.0, "text_encode_ms": 0.5}


# ---------------------------------------------------------------------------------------------------- policies
def test_policy_comparison_keeps_policy_settings_per_policy_and_kib_in_the_table(tmp_path):
    """The shared settings leave out what a policy sets (tau, sharing, beta...), which each policy lists as its
    own; the table gives bytes in KiB (3072 B -> 3.0)."""
    from simulation.policies import TABLE_KEYS, comparison, table_markdown

    sage = mode_result("sage", [1.0, 2.0], group_sizes=np.array([1, 1]), depth=np.full(2, 4),
                       window_sizes=np.array([2]), bytes_down=np.full(2, 3072.0))
    server = mode_result("server", [1.0, 2.0], gpu_seconds=1.0)
    report = comparison({"flat": fake_result(tmp_path, {"sage": sage, "server": server})})
    assert not {"tau", "sharing", "share", "cache_mb"} & set(report["settings"])
    assert report["settings"]["window_s"] == 0.5
    assert report["policies"]["flat"]["settings"]["tau"] == 0.9
    head, _, row = table_markdown(report).splitlines()[:3]
    cells = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cells["KiB down/img"] == "3.0" and len(TABLE_KEYS) + 2 == len(cells)
