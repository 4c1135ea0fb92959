"""The policy-quality benchmark runs end to end on the tiny model (no quality assertions: tiny weights are random)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_policy_quality import main


def test_policies_are_served_through_the_worker_and_counted(tmp_path):
    schedule = tmp_path / "calibration.json"
    schedule.write_text(json.dumps({"schedule": [[0.5, 0.0], [0.9, 0.5]]}), encoding="utf-8")
    result = main(["--n", "6", "--window", "3", "--steps", "4", "--model", "tiny", "--policies",
                   "independent,adaptive", "--depth-schedule", str(schedule), "--json", str(tmp_path / "q.json")])
    independent, adaptive = result["rows"]
    assert independent["step_saving"] == 0.0 and independent["server_steps"] == 0
    assert independent["device_steps"] == 6 * 4
    assert adaptive["server_steps"] + adaptive["device_steps"] == pytest.approx((1 - adaptive["step_saving"]) * 24)
    assert (tmp_path / "q.json").is_file()


def test_psnr_and_unknown_policies():
    import numpy as np

    from benchmarks.bench_policy_quality import psnr

    a = np.zeros((2, 4, 4, 3))
    assert psnr(a, a) == float("inf")
    assert psnr(a + 0.1, a) == pytest.approx(20.0)  # mse 0.01 of a unit peak
    assert psnr(np.full((1, 2), 255, np.uint8), np.zeros((1, 2), np.uint8)) == pytest.approx(0.0)
    with pytest.raises(SystemExit):
        main(["--policies", "adaptive,greedy"])


def test_the_devices_run_their_own_model_not_the_worker_s_compiled_one(monkeypatch):
    # a compiled worker changes its pipeline's UNet in place (fused, quantized): stand-in that does so drastically
    import copy

    import numpy as np
    import torch

    import edge_server.worker as worker_module
    from benchmarks.bench_policy_quality import POLICIES, serve_stream

    prompts = ["a red circle", "a blue square", "a green triangle"]
    clean, _ = serve_stream(POLICIES["independent"], prompts, 3, 2, "tiny")

    def changes_the_pipeline_s_unet(pipe, config):
        served = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            pipe.unet.conv_out.weight.zero_()
        return served, ""

    monkeypatch.setattr(worker_module, "serving_unet", changes_the_pipeline_s_unet)
    changed, _ = serve_stream(POLICIES["independent"], prompts, 3, 2, "tiny")
    np.testing.assert_array_equal(changed, clean)  # nothing shared: every step ran on the devices' own model


def test_noise_seed_moves_the_noise_draws_only():
    import numpy as np

    from benchmarks.bench_policy_quality import POLICIES, serve_stream

    prompts = ["a red circle", "a blue square"]
    base, counts = serve_stream(POLICIES["independent"], prompts, 2, 2, "tiny")
    same, _ = serve_stream(POLICIES["independent"], prompts, 2, 2, "tiny", noise_seed=5000)
    moved, moved_counts = serve_stream(POLICIES["independent"], prompts, 2, 2, "tiny", noise_seed=6000)
    np.testing.assert_array_equal(same, base)
    assert not np.array_equal(moved, base) and moved_counts == counts
    with pytest.raises(SystemExit):
        main(["--noise-seed", "-1"])
