"""The cross-window latent cache: settings isolation, seeds, depth by similarity, memory bound, LRU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sage_core.adaptive import DepthSchedule
from sage_core.latent_cache import CacheSettings, LatentCache, point_bytes
from sage_core.sampler import BranchPoint

SETTINGS = CacheSettings("abc123", steps=10, height=64, width=64, guidance=7.5, guidance_end=None, scheduler="ddim")
SCHEDULE = DepthSchedule(((0.8, 0.2), (0.9, 0.4), (0.99, 0.6)))


def points(*depths: int, value: float = 0.0) -> dict[int, BranchPoint]:
    return {d: BranchPoint(torch.full((1, 4, 8, 8), float(value + d)), d) for d in depths}


def direction(angle: float) -> np.ndarray:
    """A unit vector at `angle` radians from e0, in the e0-e1 plane (cosine = cos(angle))."""
    v = np.zeros(16, np.float32)
    v[0], v[1] = np.cos(angle), np.sin(angle)
    return v


@pytest.mark.parametrize(
    "field, value",
    [
        ("fingerprint", "other-model"),
        ("steps", 20),
        ("height", 128),
        ("width", 32),
        ("guidance", 5.0),
        ("guidance_end", 1.0),
        ("scheduler", "euler"),
    ],
)
def test_never_returns_a_latent_made_under_other_settings(field, value):
    cache = LatentCache(1 << 20, SCHEDULE)
    cache.insert(SETTINGS, direction(0.0), seed=1, points=points(2, 4))
    other = dataclasses.replace(SETTINGS, **{field: value})
    assert cache.lookup(other, direction(0.0)) is None
    assert cache.lookup(SETTINGS, direction(0.0)) is not None


def test_depth_follows_similarity():
    cache = LatentCache(1 << 20, SCHEDULE)
    cache.insert(SETTINGS, direction(0.0), seed=1, points=points(2, 4, 6))
    assert cache.lookup(SETTINGS, direction(0.0)).point.step == 6  # cosine 1 -> share 0.6 -> 6 steps
    assert cache.lookup(SETTINGS, direction(np.arccos(0.9))).point.step == 4
    assert cache.lookup(SETTINGS, direction(np.arccos(0.85))).point.step == 2  # 0.3*10 = 3 allowed, 2 stored
    assert cache.lookup(SETTINGS, direction(np.arccos(0.7))) is None
    assert cache.lookup(SETTINGS, direction(0.0), max_depth=5).point.step == 4
    assert cache.lookup(SETTINGS, direction(0.0), max_depth=1) is None
    assert cache.stats.hits == 4 and cache.stats.misses == 2 and cache.stats.steps_saved == 16


def test_requested_seed_is_honoured():
    cache = LatentCache(1 << 20, SCHEDULE)
    cache.insert(SETTINGS, direction(0.0), seed=1, points=points(4))
    assert cache.lookup(SETTINGS, direction(0.0), seed=2) is None
    assert cache.lookup(SETTINGS, direction(0.0), seed=1).entry.seed == 1
    assert cache.lookup(SETTINGS, direction(0.0), seed=None) is not None


def test_memory_bound_and_lru_eviction():
    size = point_bytes(points(4)[4])
    cache = LatentCache(2 * size, SCHEDULE)
    cache.insert(SETTINGS, direction(0.0), seed=1, points=points(4, value=100))
    cache.insert(SETTINGS, direction(1.0), seed=2, points=points(4, value=200))
    assert cache.lookup(SETTINGS, direction(0.0)).entry.seed == 1  # touch entry 1: entry 2 is now oldest
    cache.insert(SETTINGS, direction(2.0), seed=3, points=points(4, value=300))
    assert len(cache) == 2 and cache.stats.evictions == 1 and cache.stats.bytes <= 2 * size
    assert cache.lookup(SETTINGS, direction(1.0), seed=2) is None
    assert cache.lookup(SETTINGS, direction(0.0), seed=1) is not None
    assert not cache.insert(SETTINGS, direction(0.0), seed=4, points=points(2, 4, 6))  # larger than the budget


def test_bad_inserts_are_refused():
    cache = LatentCache(1 << 20, SCHEDULE)
    with pytest.raises(ValueError):
        cache.insert(SETTINGS, direction(0.0), seed=1, points={3: BranchPoint(torch.zeros(1, 4, 8, 8), 2)})
    with pytest.raises(ValueError):
        cache.insert(SETTINGS, np.zeros(16), seed=1, points=points(2))
