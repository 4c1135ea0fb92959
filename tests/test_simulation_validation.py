"""Validation harness and step-table measurement: counting, comparison, server flags, measured tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulation.config import config_from_dict
from simulation.measure import measure_pipeline, write_table
from simulation.validation import compare, real_totals, server_args


def record(group, branch_step=8, device_evals=24, latency=2.0, wire=2200):
    return {
        "id": 0,
        "latency_s": latency,
        "start_delay_s": 0.0,
        "group_id": group,
        "group_size": 1,
        "branch_step": branch_step,
        "total_steps": 20,
        "guidance": 7.5,
        "payload_bytes": wire - 200,
        "wire_bytes": wire,
        "device_unet_evals": device_evals,
        "timings_ms": {"server_queue_wait": 100.0, "server_shared_phase": 900.0, "branch_phase": 500.0},
    }


def test_real_totals_count_each_group_once():
    recs = [record("w1-g0", latency=1.0), record("w1-g0", latency=3.0), record("w2-g0", latency=2.0)]
    recs.append({"id": 3, "latency_s": 9.0, "start_delay_s": 0.5, "error": "UNAVAILABLE: gone"})
    t = real_totals(recs)
    assert t["groups"] == 2 and t["errors"] == 1 and t["mean_group_size"] == 1.5
    assert t["unet_evals_server"] == 2 * 2 * 8  # two groups, 8 shared steps, CFG
    assert t["unet_evals_device"] == 3 * 24
    assert t["latency_p50_s"] == 2.0 and t["bytes_per_image"] == 2200
    assert t["max_start_delay_s"] == 0.5


def test_compare_applies_each_tolerance():
    real = {"unet_evals": 1000, "bytes_per_image": 2000.0, "latency_p50_s": 2.0}
    ok = compare({"unet_evals": 1090, "bytes_per_image": 1850.0, "latency_p50_s": 2.45}, real)
    assert ok["pass"] and ok["checks"]["latency_p50_s"]["rel_diff"] == pytest.approx(0.225)
    bad = compare({"unet_evals": 1110, "bytes_per_image": 2000.0, "latency_p50_s": 2.0}, real)
    assert not bad["pass"] and not bad["checks"]["unet_evals"]["ok"]


def test_server_flags_mirror_the_simulated_settings():
    cfg = config_from_dict(
        {
            "server": {"window_s": 0.25, "max_window_requests": 12, "gpu_workers": 2, "step_delay_ms": 40.0},
            "grouping": {"tau": 0.75, "max_group_size": 4},
            "sampling": {"steps": 20, "share": 0.3},
            "codec": {"mode": "int8"},
        }
    )
    args = server_args(cfg, "tiny")
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--max-wait-ms"] == "250" and flags["--max-batch"] == "12" and flags["--num-workers"] == "2"
    assert flags["--tau"] == "0.75" and flags["--max-group-size"] == "4"
    assert flags["--default-steps"] == "20" and flags["--default-share"] == "0.3"
    assert flags["--codecs"] == "int8" and flags["--worker-step-delay-ms"] == "40" and flags["--model"] == "tiny"


def test_measured_table_loads_in_the_engine(tiny_pipe, tmp_path):
    from simulation.engine import load_step_table

    table, device = measure_pipeline(tiny_pipe, batches=(1, 2), steps=4, share=0.5, repeats=1)
    assert set(table["unet_ms_per_sample"]) == {"2", "4"}
    assert all(v > 0 for v in table["unet_ms_per_sample"].values()) and device["unet_ms_per_sample"] > 0
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"other": {"unet_ms_per_sample": {"2": 1.0}, "vae_ms_per_image": {"1": 1.0}}}))
    write_table(path, "cpu_test", table)
    assert set(json.loads(path.read_text())) == {"other", "cpu_test"}
    cfg = config_from_dict({"server": {"step_table": "cpu_test", "step_times_file": str(path)}})
    st = load_step_table(cfg)
    assert st.unet_seconds(np.array([2]))[0] == pytest.approx(2 * table["unet_ms_per_sample"]["2"] / 1e3)
    assert st.latent_encode_ms_per_group == pytest.approx(table["latent_encode_ms_per_group"])
