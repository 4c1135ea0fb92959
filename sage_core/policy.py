"""Sharing policies for a stream of requests: how one batching window is planned.

`flat` is Algorithm 1: groups at one tau (partitioned greedily, the project's choice: the paper does not say
how), one branch point for all. `adaptive`
nests tighter sub-groups inside looser groups and gives every group the depth its similarity allows
(sage_core.adaptive). Either may reuse latents of earlier windows (sage_core.latent_cache). The edge server,
the local tools and the simulator all plan windows with `plan_window`, so they count the same steps (the edge
server through `plan_parts`: `plan_window` for each negative prompt's requests, one part when they share it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sage_core.adaptive import (
    DepthSchedule,
    GroupNode,
    flat_plan,
    floor_depths,
    hierarchical_groups,
    leaf_of,
    levels,
    plan_evaluations,
    root_index,
    unshared_roots,
)
from sage_core.grouping import GroupingConfig, group_by_similarity
from sage_core.latent_cache import CacheHit, CacheSettings, LatentCache
from sage_core.sampler import BranchPoint

POLICY_MODES = ("flat", "adaptive")


@dataclass(frozen=True)
class SharingPolicy:
    """How a window is grouped and how deep each group shares."""

    mode: str = "flat"
    tau: float = 0.8  # flat: pairwise threshold
    max_group_size: int = 5  # flat
    share: float = 0.4  # flat: beta for every group
    taus: tuple[float, ...] = (0.6, 0.75, 0.9)  # adaptive: loose -> tight levels
    max_sizes: tuple[int, ...] = (16, 8, 5)  # adaptive: largest group per level
    schedule: DepthSchedule = field(default_factory=DepthSchedule)

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise ValueError(f"policy mode must be one of {', '.join(POLICY_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share}")
        GroupingConfig(tau=self.tau, max_group_size=self.max_group_size)
        if len(self.taus) != len(self.max_sizes) or not self.taus:
            raise ValueError("adaptive policy: give one max size per tau level")


def plan_window(embeddings: np.ndarray, policy: SharingPolicy, steps: int) -> list[GroupNode]:
    """The grouping plan for one window of prompts (rows of `embeddings`, in arrival order); groups that would
    share no step are split up (`unshared_roots`)."""
    if policy.mode == "flat":
        groups = group_by_similarity(embeddings, GroupingConfig(tau=policy.tau, max_group_size=policy.max_group_size))
        return unshared_roots(flat_plan(groups, embeddings, round(policy.share * steps)))
    return unshared_roots(hierarchical_groups(embeddings, policy.taus, policy.max_sizes, policy.schedule, steps))


def plan_parts(embeddings: np.ndarray, parts: Sequence[Sequence[int]], policy: SharingPolicy,
               steps: int) -> list[GroupNode]:
    """`plan_window` for each part (rows of `embeddings`, e.g. the requests of one negative prompt) on its own, so
    that no group mixes parts; the roots part after part, their members as rows of `embeddings`."""
    roots: list[GroupNode] = []
    for rows in parts:
        part = plan_window(embeddings[list(rows)], policy, steps)
        for root in part:
            renumber(root, rows)
        roots += part
    return roots


def renumber(node: GroupNode, rows: Sequence[int]) -> None:
    """Make a plan's member numbers (0..n-1 of a part) into the part's `rows`, in the node and below it."""
    node.members = [rows[m] for m in node.members]
    for child in node.children:
        renumber(child, rows)


def parts_by(keys: Sequence[object]) -> dict[object, list[int]]:
    """Rows with equal keys, key by key in order of first appearance (rows in order)."""
    parts: dict[object, list[int]] = {}
    for row, key in enumerate(keys):
        parts.setdefault(key, []).append(row)
    return parts


@dataclass
class StreamCount:
    """Trajectory steps a stream cost under a policy versus independent sampling (multiply by 2 for CFG)."""

    prompts: int = 0
    steps_used: int = 0
    steps_independent: int = 0
    groups: int = 0
    group_sizes: list[int] = field(default_factory=list)
    leaf_depths: list[int] = field(default_factory=list)

    def saving(self) -> float:
        """Fraction of sampler steps saved."""
        return 1.0 - self.steps_used / self.steps_independent if self.steps_independent else 0.0


def count_stream(
    embeddings: np.ndarray,
    policy: SharingPolicy,
    window: int,
    steps: int,
    cache: LatentCache | None = None,
    latent_shape: tuple[int, ...] = (1, 4, 64, 64),
) -> StreamCount:
    """Plan a stream window by window (consecutive blocks of `window` prompts) and count its steps; with a
    cache, each root group first looks for a cached latent as the edge worker does (stand-in latents of
    `latent_shape` that hold no memory, so the cache's byte bound counts as for real ones)."""
    if window < 1 or steps < 1:
        raise ValueError("window and steps must be >= 1")
    settings = CacheSettings("count", steps, latent_shape[-2], latent_shape[-1], 0.0, None, "ddim")
    out = StreamCount()
    for w, lo in enumerate(range(0, len(embeddings), window)):
        chunk = embeddings[lo : lo + window]
        roots = plan_window(chunk, policy, steps)
        cached = 0
        if cache is not None:
            cached = sum(reuse_cached(cache, settings, roots, chunk, seed=w, latent_shape=latent_shape))
        add_plan(out, roots, steps, cached)
    return out


def cached_starts(
    cache: LatentCache,
    settings: Sequence[CacheSettings],
    roots: Sequence[GroupNode],
    embeddings: np.ndarray,
    seeds: Sequence[int | None] | None = None,
) -> list[CacheHit | None]:
    """Each root looks for the deepest cached latent its similarity allows, up to its own depth, under its own
    settings (`settings[r]`: its requests' negative prompt is part of them; `seeds[r]`: the seed root r's requests
    named, None: any); a hit raises the root's plan to start there (floor_depths)."""
    hits: list[CacheHit | None] = []
    for r, root in enumerate(roots):
        seed = seeds[r] if seeds is not None else None
        mean = embeddings[root.members].mean(axis=0)
        hit = cache.lookup(settings[r], mean, seed, root.depth) if root.depth else None
        if hit is not None:
            floor_depths(root, hit.point.step)
        hits.append(hit)
    return hits


def file_plan(
    cache: LatentCache,
    settings: Sequence[CacheSettings],
    roots: Sequence[GroupNode],
    embeddings: np.ndarray,
    points: Mapping[int, BranchPoint],
    seeds: Sequence[int],
    starts: Sequence[int],
) -> None:
    """Keep every group's latent of the plan, each level at its own depth (`points`: id(node) -> its point, as
    run_shared_plan returns them), under its members' mean embedding and its root's settings and seed; a group
    whose depth its root's cached start (`starts[r]`) already covers computed nothing new and is not filed again."""
    root_of = root_index(roots)
    for level in levels(roots):
        for node in level:
            r = root_of[id(node)]
            if node.depth > starts[r]:
                mean = embeddings[node.members].mean(axis=0)
                cache.insert(settings[r], mean, seeds[r], {node.depth: points[id(node)]})


def reuse_cached(
    cache: LatentCache,
    settings: CacheSettings,
    roots: Sequence[GroupNode],
    embeddings: np.ndarray,
    seed: int,
    latent_shape: tuple[int, ...],
) -> list[int]:
    """What the edge worker does with its cache around one window (cached_starts, then file_plan), with
    stand-in latents of `latent_shape` that hold no memory but count against the byte bound as real ones;
    returns each root's start step (0: from noise)."""
    per_root = [settings] * len(roots)
    hits = cached_starts(cache, per_root, roots, embeddings)
    starts = [hit.point.step if hit is not None else 0 for hit in hits]
    stand_in = torch.zeros(1).expand(*latent_shape)
    points = {id(n): BranchPoint(stand_in, n.depth) for level in levels(roots) for n in level}
    file_plan(cache, per_root, roots, embeddings, points, [seed] * len(roots), starts)
    return starts


def add_plan(count: StreamCount, roots: Sequence[GroupNode], steps: int, cached_steps: int = 0) -> None:
    """Add one window's plan to a running count (`cached_steps` of it came from the cache, free)."""
    leaves = leaf_of(roots)
    count.prompts += len(leaves)
    count.steps_used += plan_evaluations(roots, steps) - cached_steps
    count.steps_independent += len(leaves) * steps
    count.groups += len(roots)
    count.group_sizes += [len(r.members) for r in roots]
    count.leaf_depths += [leaf.depth for leaf in leaves.values()]


def plan_summary(roots: Sequence[GroupNode]) -> dict:
    """A JSON-ready description of a plan: levels, group sizes and depths."""
    return {
        "levels": [
            [{"members": n.members, "depth": n.depth, "min_similarity": n.min_similarity} for n in lv]
            for lv in levels(roots)
        ],
    }
