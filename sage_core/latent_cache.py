"""Reuse of shared latents across batching windows.

The edge server keeps the intermediate latents of recent groups at several depths. A new request whose text
embedding is close enough to a cached group's conditioning starts from that group's latent at the depth its
similarity allows (the same `DepthSchedule` that sets a group's own depth), so the shared part costs no GPU
steps. Entries are found only under identical settings (model fingerprint, steps, size, guidance, scheduler,
negative prompt)
and, when a request names a seed, only with that seed. Memory is bounded; the least recently used entry goes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from sage_core.adaptive import DepthSchedule
from sage_core.sampler import BranchPoint


@dataclass(frozen=True)
class CacheSettings:
    """Everything that must match exactly for a cached latent to be valid for a request."""

    fingerprint: str
    steps: int
    height: int
    width: int
    guidance: float
    guidance_end: float | None
    scheduler: str
    negative_prompt: str = ""  # guidance's unconditional half, by its tokens (grouping.token_keys): a latent made
    #                            under another one differs


@dataclass
class CacheEntry:
    """One group's trajectory: its conditioning direction, noise seed and latents by depth."""

    settings: CacheSettings
    direction: np.ndarray  # unit vector of the group's mean pooled embedding
    seed: int
    points: dict[int, BranchPoint]
    nbytes: int


@dataclass(frozen=True)
class CacheHit:
    """A usable cached latent: start the request at `point` (depth `point.step`)."""

    entry: CacheEntry
    point: BranchPoint
    similarity: float


@dataclass
class CacheStats:
    """Counters for metrics: lookups that hit or missed, evictions, current size."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    steps_saved: int = 0
    depth_histogram: dict[int, int] = field(default_factory=dict)

    def hit_rate(self) -> float:
        """Hits over lookups (0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def point_bytes(point: BranchPoint) -> int:
    """Memory a branch point holds."""
    tensors = [point.latents, *point.solver_state.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def unit_vector(direction: np.ndarray) -> np.ndarray:
    """`direction` scaled to length 1, as float32."""
    v = np.asarray(direction, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("a cache key direction must be a finite, non-zero vector")
    return v / norm


class LatentCache:
    """Bounded LRU store of shared latents, looked up by conditioning similarity."""

    def __init__(self, max_bytes: int, schedule: DepthSchedule, min_depth: int = 1) -> None:
        if max_bytes < 0 or min_depth < 1:
            raise ValueError("max_bytes must be >= 0 and min_depth >= 1")
        self.max_bytes = max_bytes
        self.schedule = schedule
        self.min_depth = min_depth
        self.stats = CacheStats()
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self._next_id = 0

    def lookup(
        self, settings: CacheSettings, direction: np.ndarray, seed: int | None = None, max_depth: int | None = None
    ) -> CacheHit | None:
        """The deepest cached point this request may start from (at most `max_depth`), or None. `seed` set:
        only that seed's noise."""
        query = unit_vector(direction)
        best: tuple[int, float, int] | None = None
        for key, entry in self._entries.items():
            if entry.settings != settings or (seed is not None and entry.seed != seed):
                continue
            similarity = float(entry.direction @ query)
            allowed = self.schedule.shared_steps(similarity, settings.steps)
            if max_depth is not None:
                allowed = min(allowed, max_depth)
            depth = max((d for d in entry.points if d <= allowed), default=0)
            if depth >= self.min_depth and (best is None or (depth, similarity) > best[:2]):
                best = (depth, similarity, key)
        if best is None:
            self.stats.misses += 1
            return None
        depth, similarity, key = best
        self._entries.move_to_end(key)
        self.stats.hits += 1
        self.stats.steps_saved += depth
        self.stats.depth_histogram[depth] = self.stats.depth_histogram.get(depth, 0) + 1
        entry = self._entries[key]
        return CacheHit(entry, entry.points[depth], similarity)

    def insert(self, settings: CacheSettings, direction: np.ndarray, seed: int, points: dict[int, BranchPoint]) -> bool:
        """Keep a group's latents (depth -> point); False when it cannot fit in the budget at all."""
        for depth, point in points.items():
            if point.step != depth or not 0 < depth <= settings.steps:
                raise ValueError(f"point at step {point.step} filed under depth {depth}")
        nbytes = sum(point_bytes(p) for p in points.values())
        if not points or nbytes > self.max_bytes:
            return False
        entry = CacheEntry(settings, unit_vector(direction), seed, dict(points), nbytes)
        self._entries[self._next_id] = entry
        self._next_id += 1
        self.stats.bytes += nbytes
        self.stats.entries = len(self._entries)
        while self.stats.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.stats.bytes -= old.nbytes
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)
        return True

    def __len__(self) -> int:
        return len(self._entries)
