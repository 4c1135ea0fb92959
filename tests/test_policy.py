"""Window planning policies and stream step counting."""

from __future__ import annotations

import numpy as np
import pytest

from sage_core.adaptive import DepthSchedule, levels
from sage_core.policy import SharingPolicy, count_stream, parts_by, plan_parts, plan_window


def clusters(n: int, per: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n, 48))
    return (np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n * per, 48))).astype(np.float32)


def test_flat_policy_matches_closed_form_on_tight_clusters():
    emb = clusters(8, 4, noise=0.01)
    count = count_stream(emb, SharingPolicy(mode="flat", tau=0.9, share=0.4), window=32, steps=30)
    assert count.group_sizes == [4] * 8 and count.groups == 8 and count.prompts == 32
    assert count.saving() == pytest.approx(0.4 * (1 - 1 / 4))


def test_windows_split_groups():
    emb = clusters(8, 4, noise=0.01)
    order = np.random.default_rng(1).permutation(len(emb))
    wide = count_stream(emb[order], SharingPolicy(tau=0.9), window=32, steps=30).saving()
    narrow = count_stream(emb[order], SharingPolicy(tau=0.9), window=4, steps=30).saving()
    assert narrow < wide


def test_adaptive_saves_more_on_loose_and_tight_structure():
    rng = np.random.default_rng(2)
    topics = rng.normal(size=(6, 48))
    rows = [t + 0.6 * rng.normal(size=48) for t in topics for _ in range(4)]
    rows += [r + 0.05 * rng.normal(size=48) for r in rows[:8]]
    emb = np.stack(rows).astype(np.float32)
    flat = count_stream(emb, SharingPolicy(mode="flat", tau=0.9, share=0.4), window=64, steps=30)
    adaptive = count_stream(
        emb,
        SharingPolicy(
            mode="adaptive",
            taus=(0.5, 0.9),
            max_sizes=(16, 5),
            schedule=DepthSchedule(((0.5, 0.1), (0.9, 0.4), (0.99, 0.5))),
        ),
        window=64,
        steps=30,
    )
    assert adaptive.saving() > flat.saving() > 0


def test_bad_policies_are_refused():
    with pytest.raises(ValueError):
        SharingPolicy(mode="magic")
    with pytest.raises(ValueError):
        SharingPolicy(share=2.0)
    with pytest.raises(ValueError):
        SharingPolicy(tau=3.0)
    with pytest.raises(ValueError):
        SharingPolicy(mode="adaptive", taus=(0.5,), max_sizes=(4, 4))
    with pytest.raises(ValueError):
        count_stream(clusters(1, 2, 0.1), SharingPolicy(), window=0, steps=30)


def test_plan_window_covers_every_prompt_once():
    emb = clusters(5, 3, noise=0.5)
    for policy in (SharingPolicy(), SharingPolicy(mode="adaptive")):
        roots = plan_window(emb, policy, steps=20)
        assert sorted(m for r in roots for m in r.members) == list(range(len(emb)))


def test_cache_reuses_latents_of_earlier_windows_within_its_byte_budget():
    from sage_core.latent_cache import LatentCache

    emb = clusters(6, 1, noise=0.0)  # six unrelated prompts
    stream = np.concatenate([emb, emb + 1e-4])  # the same six again, in a later window
    policy = SharingPolicy(mode="adaptive", schedule=DepthSchedule(((0.5, 0.2), (0.99, 0.5))))
    plain = count_stream(stream, policy, window=6, steps=20)
    cache = LatentCache(1 << 30, policy.schedule)
    cached = count_stream(stream, policy, window=6, steps=20, cache=cache)
    # each prompt of the second window starts 10 steps in, from its own earlier trajectory
    assert plain.steps_used - cached.steps_used == 6 * 10
    assert cache.stats.hits == 6
    assert len(cache) == 6  # the second window computed nothing new: nothing filed again
    tiny = LatentCache(4 * 64 * 64 * 4, policy.schedule)  # room for one stand-in latent
    count_stream(stream, policy, window=6, steps=20, cache=tiny)
    assert len(tiny) == 1 and tiny.stats.evictions >= 5


def test_flat_plan_depth_is_the_rounded_share_and_share_zero_splits_every_group():
    emb = clusters(4, 3, noise=0.01)
    roots = plan_window(emb, SharingPolicy(mode="flat", tau=0.9, share=0.37), steps=10)
    assert [(r.members, r.depth) for r in roots] == [([0, 1, 2], 4), ([3, 4, 5], 4), ([6, 7, 8], 4), ([9, 10, 11], 4)]
    unshared = plan_window(emb, SharingPolicy(mode="flat", tau=0.9, share=0.0), steps=10)
    assert [(r.members, r.depth) for r in unshared] == [([m], 0) for m in range(12)]  # no shared noise either


def test_roots_look_up_and_file_the_cache_by_their_members_mean_and_their_own_seed():
    """A root whose two members lie either side of a cached group's direction finds it at full depth (its mean is
    that direction; its first member alone is only 0.89 alike); a named seed finds only that seed's latents; each
    root's latents are filed under its own seed."""
    import torch

    from sage_core.adaptive import GroupNode
    from sage_core.latent_cache import CacheSettings, LatentCache
    from sage_core.policy import cached_starts, file_plan
    from sage_core.sampler import BranchPoint

    schedule = DepthSchedule(((0.5, 0.2), (0.99, 0.5)))
    settings = CacheSettings("m", 20, 64, 64, 7.5, None, "ddim")
    e = np.eye(4, dtype=np.float32)
    emb = np.stack([e[0] + 0.5 * e[1], e[0] - 0.5 * e[1], e[2], e[3]])
    cache = LatentCache(1 << 30, schedule)
    cache.insert(settings, e[0], 7, {10: BranchPoint(torch.zeros(1, 4, 8, 8), 10)})

    def starts(seeds):
        roots = [GroupNode([0, 1], 10, 0.6), GroupNode([2], 10, 1.0)]
        return [None if h is None else h.point.step for h in cached_starts(cache, [settings] * 2, roots, emb, seeds)]

    assert starts(None) == [10, None]
    assert starts([7, None]) == [10, None] and starts([8, None]) == [None, None]

    roots = [GroupNode([2], 10, 1.0), GroupNode([3], 10, 1.0)]
    points = {id(r): BranchPoint(torch.zeros(1, 4, 8, 8), 10) for r in roots}
    file_plan(cache, [settings] * 2, roots, emb, points, seeds=[3, 4], starts=[0, 0])
    assert [cache.lookup(settings, e[2], seed) is not None for seed in (3, 4)] == [True, False]
    assert [cache.lookup(settings, e[3], seed) is not None for seed in (3, 4)] == [False, True]


def nested_clusters(seed: int = 0) -> np.ndarray:
    """16 rows: 2 loose clusters (sub-centres at cosine ~0.75), each of 2 tight ones (4 rows at ~0.997)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(2):
        centre = rng.normal(size=48)
        centre /= np.linalg.norm(centre)
        for _ in range(2):
            offset = rng.normal(size=48)
            sub = centre + 0.6 * offset / np.linalg.norm(offset)
            rows += [sub + 0.01 * rng.normal(size=48) for _ in range(4)]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("mode", ["flat", "adaptive"])
def test_plan_parts_never_groups_across_parts_and_numbers_members_as_window_rows(mode):
    """Parts (e.g. negative prompts) interleaved in a window: every node at every level of the plan holds rows of
    one part only, numbered as rows of the window; together the roots hold every row once; one part gives
    plan_window's plan."""
    policy = SharingPolicy(mode=mode, tau=0.9, taus=(0.6, 0.9), max_sizes=(8, 4))
    emb = nested_clusters()
    part_of = [i % 2 for i in range(len(emb))]  # every tight cluster split across both parts
    roots = plan_parts(emb, list(parts_by(part_of).values()), policy, 30)
    nodes = [n for level in levels(roots) for n in level]
    assert any(n.children for n in nodes) == (mode == "adaptive")  # nested plans are renumbered below the roots
    for node in nodes:
        assert len({part_of[m] for m in node.members}) == 1, node.members
        assert node.parent is None or set(node.members) <= set(node.parent.members)
    assert sorted(m for r in roots for m in r.members) == list(range(len(emb)))
    tight = [n.members for n in nodes if not n.children]  # a tight cluster's half in its part, e.g. [0, 2]
    assert all(len(m) == 2 and m[1] - m[0] == 2 and m[0] // 4 == m[1] // 4 for m in tight), tight
    whole = plan_window(emb, policy, 30)
    single = plan_parts(emb, [list(range(len(emb)))], policy, 30)
    assert [[n.members for n in level] for level in levels(single)] == [[n.members for n in level]
                                                                         for level in levels(whole)]


def test_parts_by_keeps_first_appearance_order():
    assert parts_by(["b", "a", "b", "", "a"]) == {"b": [0, 2], "a": [1, 4], "": [3]}
