"""Similarity-adaptive sharing depth and hierarchical grouping.

A group's branch point follows from how similar its members are: `DepthSchedule` maps the group's smallest
pairwise cosine similarity to the fraction of steps it shares. Hierarchical grouping nests tighter sub-groups
inside looser ones: a loose group shares the first few steps, each tighter sub-group continues together from
there for more steps, and every prompt branches from its tightest group. Every level runs batched with
`sage_core.sampler.advance`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sage_core.grouping import GroupingConfig, group_by_similarity, normalize
from sage_core.sampler import (
    SHARED_CONDITIONS,
    BranchPoint,
    SamplingConfig,
    UNetCounter,
    advance,
    check_uncond,
    uncond_of,
)


@dataclass(frozen=True)
class DepthSchedule:
    """Piecewise-linear map from a group's smallest pairwise similarity to its sharing ratio beta.

    `points` are (similarity, share) pairs with similarities increasing and shares non-decreasing; below the
    first similarity the share is 0 (no sharing), above the last it stays at the last share."""

    points: tuple[tuple[float, float], ...] = ((0.70, 0.0), (0.80, 0.2), (0.90, 0.4), (0.97, 0.5))

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a depth schedule needs at least one (similarity, share) point")
        sims = [s for s, _ in self.points]
        shares = [b for _, b in self.points]
        if sims != sorted(sims) or len(set(sims)) != len(sims):
            raise ValueError(f"similarities must increase strictly, got {sims}")
        if shares != sorted(shares) or not all(0.0 <= b <= 1.0 for b in shares):
            raise ValueError(f"shares must be non-decreasing and in [0, 1], got {shares}")

    def share_for(self, similarity: float) -> float:
        """beta for a group whose least similar pair has cosine `similarity`."""
        sims = [s for s, _ in self.points]
        if similarity < sims[0]:
            return 0.0
        i = bisect.bisect_right(sims, similarity)
        if i >= len(sims):
            return self.points[-1][1]
        (s0, b0), (s1, b1) = self.points[i - 1], self.points[i]
        return b0 + (b1 - b0) * (similarity - s0) / (s1 - s0)

    def shared_steps(self, similarity: float, steps: int) -> int:
        """The number of steps a group with this smallest similarity shares out of `steps`."""
        return round(self.share_for(similarity) * steps)


@dataclass
class GroupNode:
    """A group at one level of the hierarchy: it runs steps [parent.depth, depth) on its members' mean
    embedding, starting from its parent's latent (or from noise at the root)."""

    members: list[int]
    depth: int
    min_similarity: float
    children: list[GroupNode] = field(default_factory=list)
    parent: GroupNode | None = field(default=None, repr=False)

    def start(self) -> int:
        """Schedule index this node starts from."""
        return self.parent.depth if self.parent is not None else 0


def min_pairwise(unit: np.ndarray, members: Sequence[int]) -> float:
    """Smallest cosine similarity between two members (1.0 for a singleton)."""
    if len(members) < 2:
        return 1.0
    sims = unit[list(members)] @ unit[list(members)].T
    return float(sims[np.triu_indices(len(members), k=1)].min())


def flat_plan(groups: Sequence[Sequence[int]], embeddings: np.ndarray, depth: int) -> list[GroupNode]:
    """Algorithm 1's one-level plan: every group shares the same `depth` steps."""
    unit = normalize(embeddings)
    return [GroupNode(list(g), depth, min_pairwise(unit, g)) for g in groups]


def hierarchical_groups(
    embeddings: np.ndarray,
    taus: Sequence[float],
    max_sizes: Sequence[int],
    schedule: DepthSchedule,
    steps: int,
) -> list[GroupNode]:
    """Roots of a hierarchy: groups at taus[0] (at most max_sizes[0] members), each split at taus[1], and so
    on. A node's depth is the schedule's depth for its smallest pairwise similarity, never less than its
    parent's; sub-groups that would add no shared step are folded into their parent."""
    if len(taus) != len(max_sizes) or not taus:
        raise ValueError("give one max group size per tau level")
    if list(taus) != sorted(taus):
        raise ValueError(f"taus must go from loose to tight, got {list(taus)}")
    unit = normalize(embeddings)

    def build(members: list[int], level: int, parent: GroupNode | None) -> list[GroupNode]:
        local = group_by_similarity(unit[members], GroupingConfig(tau=taus[level], max_group_size=max_sizes[level]))
        nodes = []
        for group in local:
            ids = [members[i] for i in group]
            sim = min_pairwise(unit, ids)
            floor = parent.depth if parent is not None else 0
            node = GroupNode(ids, max(floor, schedule.shared_steps(sim, steps)), sim, parent=parent)
            if len(ids) > 1 and level + 1 < len(taus):
                node.children = fold(build(ids, level + 1, node), node)
            nodes.append(node)
        return nodes

    return build(list(range(unit.shape[0])), 0, None)


def fold(children: Sequence[GroupNode], parent: GroupNode) -> list[GroupNode]:
    """The sub-groups of `parent` that add shared steps: one no deeper than `parent` is folded into it, its own
    (deeper) sub-groups becoming `parent`'s."""
    out = []
    for child in children:
        if child.depth > parent.depth:
            out.append(child)
            continue
        for grandchild in child.children:
            grandchild.parent = parent
        out.extend(child.children)
    return out


def leaf_of(roots: Sequence[GroupNode]) -> dict[int, GroupNode]:
    """For every prompt, the deepest node it belongs to (where its branch phase starts)."""
    out: dict[int, GroupNode] = {}

    def visit(node: GroupNode) -> None:
        for m in node.members:
            out[m] = node
        for child in node.children:
            visit(child)

    for root in roots:
        visit(root)
    return out


def levels(roots: Sequence[GroupNode]) -> list[list[GroupNode]]:
    """Nodes by level, roots first (parents before their children)."""
    out: list[list[GroupNode]] = []
    frontier = list(roots)
    while frontier:
        out.append(frontier)
        frontier = [c for n in frontier for c in n.children]
    return out


def root_index(roots: Sequence[GroupNode]) -> dict[int, int]:
    """id(node) -> index of its root, for every node of a plan."""
    return {id(n): r for r, root in enumerate(roots) for level in levels([root]) for n in level}


def floor_depths(node: GroupNode, floor: int) -> None:
    """Raise depths so no node ends before its parent (after a root starts deeper, from a cached latent)."""
    node.depth = max(node.depth, floor)
    for child in node.children:
        floor_depths(child, node.depth)


def cap_depths(roots: Sequence[GroupNode], caps: Sequence[int]) -> list[GroupNode]:
    """Limit each node's depth to the smallest cap of its members (a request may ask to share less), keeping
    every node at least as deep as its parent; returns the plan's roots, those left sharing nothing split up
    (`unshared_roots`)."""

    def visit(node: GroupNode, floor: int) -> None:
        node.depth = max(floor, min(node.depth, min(caps[m] for m in node.members)))
        for child in node.children:
            visit(child, node.depth)

    for root in roots:
        visit(root, 0)
    return unshared_roots(roots)


def unshared_roots(roots: Sequence[GroupNode]) -> list[GroupNode]:
    """The plan with every root group that shares no step split up: its sub-groups become roots (split in turn)
    and its other members singletons, in order of their first member. A group that shares no step must not
    share its initial noise either: each prompt then starts from its own seed, as independent sampling does."""
    out: list[GroupNode] = []
    for root in roots:
        if root.depth > 0 or len(root.members) == 1:
            out.append(root)
            continue
        parts: list[GroupNode] = []
        for child in root.children:
            child.parent = None
            parts += unshared_roots([child])
        grouped = {m for child in root.children for m in child.members}
        parts += [GroupNode([m], 0, 1.0) for m in root.members if m not in grouped]
        out += sorted(parts, key=lambda n: min(n.members))
    return out


@dataclass(frozen=True)
class Delivery:
    """Prompts that receive the same latent: those whose deepest group is `node`. `server_steps` are the
    trajectory steps of the plan attributed to this delivery (each node's own steps counted exactly once)."""

    node: GroupNode
    members: tuple[int, ...]
    server_steps: int


def deliveries(roots: Sequence[GroupNode]) -> list[Delivery]:
    """The plan's deliveries, in order of first member; every node's own steps go to the delivery holding its
    first member, so the deliveries' server_steps add up to the plan's shared steps."""
    leaves = leaf_of(roots)
    owned: dict[int, int] = {}
    for level in levels(roots):
        for n in level:
            owner = id(leaves[n.members[0]])
            owned[owner] = owned.get(owner, 0) + n.depth - n.start()
    by_node: dict[int, list[int]] = {}
    nodes: dict[int, GroupNode] = {}
    for m in sorted(leaves):
        by_node.setdefault(id(leaves[m]), []).append(m)
        nodes[id(leaves[m])] = leaves[m]
    return [Delivery(nodes[k], tuple(ms), owned.get(k, 0)) for k, ms in by_node.items()]


def group_condition(cond: torch.Tensor, members: Sequence[int], mode: str) -> torch.Tensor:
    """What a group's shared steps are conditioned on, [1, L, D]: "mean" of its members' token embeddings, or
    "medoid": the embeddings of the member with the highest summed cosine similarity (over the flattened token
    embeddings) to the members, the first such member on a tie."""
    return group_conditions(cond, [members], mode)[0]


def group_conditions(cond: torch.Tensor, groups: Sequence[Sequence[int]], mode: str) -> list[torch.Tensor]:
    """`group_condition` for every group, with the medoids picked on the tensors' device and read back once."""
    if mode not in SHARED_CONDITIONS:
        raise ValueError(f"unknown shared condition {mode!r}; expected one of {', '.join(SHARED_CONDITIONS)}")
    if mode == "mean":
        return [cond[list(g)].mean(dim=0, keepdim=True) for g in groups]
    unit = torch.nn.functional.normalize(cond.flatten(1).float(), dim=1)
    members = [unit[list(g)] for g in groups]
    picks = torch.stack([(m @ m.T).sum(dim=1).argmax() for m in members]).tolist()
    return [cond[g[p]].unsqueeze(0) for g, p in zip(groups, picks, strict=True)]


def plan_nodes(roots: Sequence[GroupNode]) -> tuple[list[GroupNode], list[int | None]]:
    """Every node of a plan, parents before children, and each node's parent as a position in that list."""
    nodes = [n for level in levels(roots) for n in level]
    position = {id(n): i for i, n in enumerate(nodes)}
    return nodes, [None if n.parent is None else position[id(n.parent)] for n in nodes]


def run_shared_plan(
    unet,
    scheduler_config: dict,
    roots: Sequence[GroupNode],
    starts: Sequence[BranchPoint],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    config: SamplingConfig,
    counter: UNetCounter | None = None,
) -> dict[int, BranchPoint]:
    """The shared part of a plan in one batched `advance`: every node on its group condition, the roots from
    `starts` (noise at step 0, or a cached latent), every other node from its parent's end, joining the loop in
    the round its parent finishes (so the plan takes as many UNet calls as its longest chain of shared steps).
    `uncond` is guidance's unconditional embedding, one for all [1, L, D] or one per member [M, L, D] (members'
    negative prompts; a group's members share theirs, and the group runs on its first member's). Evaluations are
    counted under each node's root index. Returns id(node) -> its point."""
    root_of = root_index(roots)
    nodes, parents = plan_nodes(roots)
    begin = [starts[root_of[id(n)]] if n.parent is None else None for n in nodes]
    conds = group_conditions(cond, [n.members for n in nodes], config.shared_condition)
    labels = [root_of[id(n)] for n in nodes]
    if uncond.shape[0] > 1:  # each node on its members' own (check_uncond refuses any other count)
        check_uncond(uncond, cond.shape[0])
    uncond = uncond_of(uncond, [n.members[0] for n in nodes])
    ends = advance(unet, scheduler_config, begin, conds, uncond, config, [n.depth for n in nodes], counter, labels,
                   parents)
    return {id(n): p for n, p in zip(nodes, ends, strict=True)}


def plan_evaluations(roots: Sequence[GroupNode], steps: int) -> int:
    """Trajectory steps the plan costs: each node's own steps plus each prompt's branch steps (x2 with CFG)."""
    shared = sum(n.depth - n.start() for level in levels(roots) for n in level)
    branch = sum(steps - leaf.depth for leaf in leaf_of(roots).values())
    return shared + branch
