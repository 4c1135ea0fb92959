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
        ]
    )
    assert out.is_file()
    (row,) = result["rows"]
    assert row["batch"] == 3 and row["unet_ms_per_sample"] > 0
    # 3 prompts of one paraphrase-identical group (mean group 2.8 -> 1 distinct prompt): k = 2 shared steps once
    assert row["shared_unet_evaluations"] == 2 * 2
    assert row["step_saving"] == pytest.approx(1 - (2 + 3 * 3) / (3 * 5))
    assert row["bytes_per_image"] > 0
