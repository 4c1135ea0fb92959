"""Similarity-adaptive depth and hierarchical grouping: schedule, nesting, execution and exact counting."""

from __future__ import annotations

import numpy as np
import pytest

from sage_core.adaptive import (
    DepthSchedule,
    flat_plan,
    hierarchical_groups,
    leaf_of,
    levels,
    min_pairwise,
    plan_evaluations,
)
from sage_core.generate import generate
from sage_core.grouping import GroupingConfig, normalize
from sage_core.sampler import SamplingConfig


def test_schedule_interpolates_and_clamps():
    s = DepthSchedule(((0.6, 0.0), (0.8, 0.2), (0.9, 0.4)))
    assert s.share_for(0.5) == 0.0 and s.share_for(0.6) == 0.0
    assert s.share_for(0.7) == pytest.approx(0.1) and s.share_for(0.85) == pytest.approx(0.3)
    assert s.share_for(0.99) == 0.4
    assert s.shared_steps(0.9, 30) == 12
    lifted = DepthSchedule(((0.5, 0.1), (0.99, 0.6)))  # a first point with a share above 0
    assert lifted.share_for(0.5) == 0.1 and lifted.share_for(0.4999) == 0.0 and lifted.share_for(0.99) == 0.6
    one = DepthSchedule(((0.8, 0.3),))
    assert one.share_for(0.8) == 0.3 and one.share_for(0.9) == 0.3 and one.share_for(0.79) == 0.0


@pytest.mark.parametrize("points", [(), ((0.8, 0.2), (0.7, 0.3)), ((0.7, 0.5), (0.8, 0.2)), ((0.7, 1.5),)])
def test_bad_schedules_are_refused(points):
    with pytest.raises(ValueError):
        DepthSchedule(points)


def nested_embeddings(seed: int = 0) -> np.ndarray:
    """3 topics x 2 sub-topics x 2 near-copies: loose groups per topic, tight pairs inside."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(3):
        topic = rng.normal(size=32)
        for _ in range(2):
            sub = topic + 0.5 * rng.normal(size=32)
            rows += [sub + 0.05 * rng.normal(size=32) for _ in range(2)]
    return np.stack(rows).astype(np.float32)


def test_hierarchy_nests_and_depth_grows_with_similarity():
    emb = nested_embeddings()
    schedule = DepthSchedule(((0.5, 0.1), (0.99, 0.6)))
    roots = hierarchical_groups(emb, taus=(0.6, 0.95), max_sizes=(8, 5), schedule=schedule, steps=20)
    unit = normalize(emb)
    assert sorted(m for r in roots for m in r.members) == list(range(len(emb)))
    for level_nodes in levels(roots):
        for node in level_nodes:
            assert node.min_similarity == pytest.approx(min_pairwise(unit, node.members))
            if node.parent is not None:
                assert set(node.members) <= set(node.parent.members) and node.depth > node.parent.depth
    assert any(r.children for r in roots), "tight pairs should form sub-groups inside the loose groups"
    assert all(leaf.depth >= 1 for leaf in leaf_of(roots).values())


def test_a_level_that_adds_no_step_keeps_its_tighter_sub_groups():
    """Two tight pairs (0.96 inside) 0.78 apart: the 0.75 level regroups all four at the root's depth and is folded
    into the root, but the pairs it would have split at 0.9 still share their deeper steps."""
    c, s = 0.99, (1 - 0.99**2) ** 0.5
    a, b = np.array([1.0, 0, 0, 0]), np.array([0.8, 0.6, 0, 0])
    e3, e4 = np.eye(4)[2], np.eye(4)[3]
    emb = np.stack([c * a + s * e3, c * a - s * e3, c * b + s * e4, c * b - s * e4]).astype(np.float32)
    two = hierarchical_groups(emb, taus=(0.6, 0.9), max_sizes=(16, 5), schedule=DepthSchedule(), steps=20)
    three = hierarchical_groups(emb, taus=(0.6, 0.75, 0.9), max_sizes=(16, 8, 5), schedule=DepthSchedule(), steps=20)
    assert [[n.members for n in lv] for lv in levels(three)] == [[[0, 1, 2, 3]], [[0, 1], [2, 3]]]
    assert {m: n.depth for m, n in leaf_of(three).items()} == {m: n.depth for m, n in leaf_of(two).items()}
    assert all(leaf.depth == 10 and leaf.parent is three[0] for leaf in leaf_of(three).values())


def test_hierarchical_plan_runs_and_counts_exactly(tiny_pipe):
    prompts = [f"a red circle number {i}" for i in range(6)]
    config = SamplingConfig(steps=8, guidance=7.5)
    emb = nested_embeddings()[:6]
    roots = hierarchical_groups(
        emb, taus=(0.6, 0.95), max_sizes=(8, 5), schedule=DepthSchedule(((0.5, 0.1), (0.99, 0.6))), steps=8
    )
    result = generate(tiny_pipe, prompts, config, GroupingConfig(), plan=roots)
    assert result.counter.total == 2 * plan_evaluations(roots, 8)
    assert any(r.children for r in roots), "the plan should nest sub-groups"
    # every node's steps and its members' branch steps are counted under the index of its root group (the report's
    # per-group evaluations), not under the node's own position in the plan
    assert {r: result.counter.by_label[r] for r in range(len(roots))} == {
        r: 2 * plan_evaluations([root], 8) for r, root in enumerate(roots)}
    assert result.images.shape[0] == 6 and np.isfinite(result.images).all()


def test_flat_plan_is_algorithm_one(tiny_pipe):
    prompts = ["a red circle", "a red disc", "a blue square"]
    config = SamplingConfig(steps=6, share=0.5)
    groups = [[0, 1], [2]]
    a = generate(tiny_pipe, prompts, config, GroupingConfig(), groups=groups)
    plan = flat_plan(groups, a.pooled, config.branch_step())
    b = generate(tiny_pipe, prompts, config, GroupingConfig(), plan=plan)
    assert np.array_equal(a.images, b.images)
    assert plan_evaluations(plan, 6) * 2 == a.counter.total == 2 * (3 + 2 * 3 + 6)


def test_caps_and_deliveries_account_every_step_once():
    from sage_core.adaptive import cap_depths, deliveries

    emb = nested_embeddings()
    roots = hierarchical_groups(
        emb, taus=(0.6, 0.95), max_sizes=(8, 5), schedule=DepthSchedule(((0.5, 0.1), (0.99, 0.6))), steps=20
    )
    shared = plan_evaluations(roots, 20) - sum(20 - leaf.depth for leaf in leaf_of(roots).values())
    out = deliveries(roots)
    assert sorted(m for d in out for m in d.members) == list(range(len(emb)))
    assert sum(d.server_steps for d in out) == shared
    caps = [3] * len(emb)
    caps[0] = 1
    cap_depths(roots, caps)
    for level_nodes in levels(roots):
        for node in level_nodes:
            assert node.depth <= max(min(caps[m] for m in node.members), node.start())
            assert node.depth >= node.start()


def test_a_group_that_shares_no_step_shares_no_noise():
    """Roots left at depth 0 (below the schedule's first similarity, or capped there by a member's share) split:
    their sub-groups become roots and their other members singletons, each starting from its own seed."""
    from sage_core.adaptive import GroupNode, cap_depths, unshared_roots

    loose = GroupNode([0, 1, 2, 3], 0, 0.65)
    tight = GroupNode([1, 3], 6, 0.95, parent=loose)
    loose.children = [tight]
    deep = GroupNode([4, 5], 3, 0.9)
    roots = unshared_roots([loose, deep])
    assert [(r.members, r.depth, r.parent) for r in roots] == [([0], 0, None), ([1, 3], 6, None), ([2], 0, None),
                                                              ([4, 5], 3, None)]
    capped = cap_depths(roots, [30, 0, 30, 30, 30, 30])
    assert [(r.members, r.depth) for r in capped] == [([0], 0), ([1], 0), ([3], 0), ([2], 0), ([4, 5], 3)]


def test_adaptive_plan_below_the_schedule_equals_independent_sampling(tiny_pipe):
    """Two prompts 0.65 alike: the default schedule gives their group no shared step, so each image is the one
    independent sampling makes with its own seed (before the fix, prompt 1 started from prompt 0's noise)."""
    from sage_core.policy import SharingPolicy, plan_window

    emb = np.linalg.cholesky(np.array([[1.0, 0.65], [0.65, 1.0]])).astype(np.float32)
    roots = plan_window(emb, SharingPolicy(mode="adaptive"), 6)
    assert [r.members for r in roots] == [[0], [1]]
    prompts = ["a red circle on the left", "a blue square at the top"]
    config = SamplingConfig(steps=6, guidance=7.5)
    shared = generate(tiny_pipe, prompts, config, GroupingConfig(), seed=5, plan=roots)
    alone = generate(tiny_pipe, prompts, config, GroupingConfig(), seed=5, groups=[[0], [1]])
    assert shared.seeds == alone.seeds == [5, 6]
    assert np.array_equal(shared.images, alone.images)


def test_floor_depths_raises_a_plan_to_start_deeper():
    """A root started from a cached latent at step 5 ends no earlier, nor do its sub-groups end before it."""
    from sage_core.adaptive import GroupNode, floor_depths

    root = GroupNode([0, 1, 2], 3, 0.8)
    child = GroupNode([0, 1], 4, 0.9, parent=root)
    deep = GroupNode([2], 9, 1.0, parent=root)
    root.children = [child, deep]
    floor_depths(root, 5)
    assert (root.depth, child.depth, deep.depth) == (5, 5, 9)


def test_each_level_keeps_its_own_group_size_cap():
    """Six near-copies inside a looser topic: level 0 (cap 8) holds all eight prompts, level 1 (cap 3) splits the
    copies into groups of at most 3, each sharing more steps than the topic (the two looser prompts are level-1
    singletons)."""
    rng = np.random.default_rng(4)
    topic = rng.normal(size=32)
    copy = topic + 0.3 * rng.normal(size=32)
    rows = [copy + 0.02 * rng.normal(size=32) for _ in range(6)] + [topic + 0.5 * rng.normal(size=32) for _ in range(2)]
    emb = np.stack(rows).astype(np.float32)
    roots = hierarchical_groups(emb, taus=(0.5, 0.95), max_sizes=(8, 3), schedule=DepthSchedule(((0.5, 0.1),
                                (0.99, 0.6))), steps=20)
    assert [r.members for r in roots] == [list(range(8))]
    subs = [n for n in levels(roots)[1] if len(n.members) > 1]
    assert sorted(m for n in subs for m in n.members) == list(range(6))
    assert [len(n.members) for n in subs] == [3, 3] and all(n.depth > roots[0].depth for n in subs)


def test_a_nodes_own_steps_go_to_the_delivery_of_its_first_member():
    """The edge worker subtracts a root's cached steps from the delivery holding the root's first member: that one
    must own the root's steps."""
    from sage_core.adaptive import GroupNode, deliveries

    root = GroupNode([0, 1, 2], 4, 0.8)
    root.children = [GroupNode([1, 2], 10, 0.95, parent=root)]
    out = deliveries([root])
    assert [(d.members, d.server_steps) for d in out] == [((0,), 4), ((1, 2), 6)]
