"""The depth-schedule calibration's pure parts: pair sampling by similarity and the schedule it derives."""

from __future__ import annotations

import numpy as np

from benchmarks.calibrate_depth import calibrated_steps, depth_schedule_points, sample_pairs
from sage_core.adaptive import DepthSchedule


def test_pairs_fall_in_their_bin():
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(60, 8))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    pairs = sample_pairs(unit, 0.3, 0.6, 10, rng)
    assert 0 < len(pairs) <= 10 and len(set(pairs)) == len(pairs)
    assert all(i < j and 0.3 <= float(unit[i] @ unit[j]) < 0.6 for i, j in pairs)
    assert sample_pairs(unit, 1.5, 2.0, 10, rng) == []


def test_largest_depth_within_tolerance_never_falls_with_similarity():
    ks = [0, 6, 12, 18]
    drops = [
        [0.0, 0.05, 0.10, 0.20],  # least similar: nothing shared within 1 point
        [0.0, 0.00, 0.005, 0.03],  # 12 steps
        [0.0, 0.02, 0.00, 0.00],  # 18 within tolerance (the 6-step drop is noise above it)
        [0.0, 0.00, 0.00, 0.009],  # 18
    ]
    assert calibrated_steps(ks, drops, 0.01) == [0, 12, 18, 18]
    assert calibrated_steps(ks, [[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.5]], 0.01) == [0, 0]  # capped from above


def test_schedule_points_never_exceed_a_bins_calibrated_share():
    bins = [[0.5, 0.6], [0.6, 0.7], [0.7, 0.8], [0.8, 1.01]]
    depths = [0, 6, 12, 18]
    schedule = DepthSchedule(tuple(tuple(p) for p in depth_schedule_points(bins, depths, 30)))
    for (lo, hi), k in zip(bins, depths, strict=True):
        for s in np.linspace(lo, min(hi, 1.0) - 1e-6, 7):
            assert schedule.share_for(float(s)) <= k / 30 + 1e-9
