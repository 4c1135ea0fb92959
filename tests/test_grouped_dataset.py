"""Grouped dataset: the similarity graph, bounded clique enumeration, the file format and its errors."""

from __future__ import annotations

import itertools
import json

import networkx as nx
import numpy as np
import pytest

from training.grouped_dataset import (
    COCO_CAPTIONS,
    DatasetError,
    GroupedDataset,
    GroupingParams,
    build_dataset,
    build_groups,
    coco_items,
    disjoint_groups,
    enumerate_groups,
    load_grouped_dataset,
    parse_ranges,
    save_grouped_dataset,
    similarity_graph,
    world_items,
)


def _random_embeddings(n: int = 60, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, d))
    return centers[rng.integers(0, 5, n)] + 0.6 * rng.normal(size=(n, d))


def _cos(e: np.ndarray) -> np.ndarray:
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    return u @ u.T


def test_edges_are_exactly_the_pairs_inside_the_open_range() -> None:
    angles = np.deg2rad([0.0, 10.0, 60.0, 90.0])
    e = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # cos: 0.985 (0-1), 0.5 (0-2), 0.0 (0-3) ...
    g = similarity_graph(e, GroupingParams(tau_min=0.4, tau_max=0.9))
    sims = _cos(e)
    want = {(i, j) for i, j in itertools.combinations(range(4), 2) if 0.4 < sims[i, j] < 0.9}
    assert {tuple(sorted(x)) for x in g.edges} == want
    assert (0, 1) not in want  # too similar: above tau_max


def test_groups_are_cliques_in_range_and_match_networkx_when_unbounded() -> None:
    e = _random_embeddings()
    params = GroupingParams(tau_min=0.5, tau_max=0.97, max_degree=100, max_cliques_per_node=10**6)
    groups, graph = build_groups(e, params)
    sims = _cos(e)
    for g in groups:
        assert 2 <= len(g) <= 5 and g == sorted(g)
        assert all(0.5 < sims[i, j] < 0.97 for i, j in itertools.combinations(g, 2))
    want = {tuple(sorted(c)) for c in nx.enumerate_all_cliques(graph) if 2 <= len(c) <= 5}
    assert {tuple(g) for g in groups} == want
    assert len(groups) == len(want)  # no duplicates


def test_enumeration_is_bounded_and_deterministic() -> None:
    e = _random_embeddings(80, seed=1)
    params = GroupingParams(tau_min=0.3, tau_max=0.99, max_degree=6, max_cliques_per_node=3)
    a, graph = build_groups(e, params)
    b, _ = build_groups(e.copy(), params)
    assert a == b
    assert graph.number_of_edges() <= 80 * 6  # each caption keeps at most max_degree of its edges
    lowest = [g[0] for g in a]
    assert max(lowest.count(v) for v in set(lowest)) <= 3
    capped = enumerate_groups(graph, GroupingParams(tau_min=0.3, tau_max=0.99, max_cliques_per_node=3, max_groups=7))
    assert capped == a[:7]


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="tau_min must be < tau_max"):
        GroupingParams(tau_min=0.9, tau_max=0.9)
    with pytest.raises(ValueError, match="tau_min must be < tau_max"):
        GroupingParams(tau_min=0.95, tau_max=0.6)
    with pytest.raises(ValueError, match="group of one"):
        GroupingParams(min_size=1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        GroupingParams(tau_min=-2)
    with pytest.raises(ValueError, match="tau_min:tau_max"):
        parse_ranges("0.6-0.9")
    assert parse_ranges("0.6:0.9,0.7:0.95") == [(0.6, 0.9), (0.7, 0.95)]


def test_world_dataset_round_trip(tmp_path) -> None:
    items = world_items(30, seed=0, split="train")
    e = _random_embeddings(30, seed=2)
    ds = build_dataset(items, e, GroupingParams(tau_min=0.5, tau_max=0.99), {"source": "world"})
    assert ds.groups and ds.meta["stats"]["groups"] == len(ds.groups)
    path = save_grouped_dataset(ds, tmp_path / "g.json")
    back = load_grouped_dataset(path)
    assert back.groups == ds.groups and back.items == ds.items
    assert back.captions(back.groups[0]) == [items[i]["caption"] for i in ds.groups[0]]
    assert back.items[3]["image"] == {"world": {"seed": 0, "split": "train", "index": 3}}


def _write(tmp_path, data) -> str:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def _valid() -> dict:
    return GroupedDataset(world_items(4), [[0, 1], [1, 2, 3]]).to_json()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["groups"].append([2]), "group 2 has 1 member"),
        (lambda d: d["groups"].append([0, 1, 2, 3, 0, 1]), "group 2 has 6 member"),
        (lambda d: d["groups"].append([0, 9]), r"item\(s\) \[9\] outside"),
        (lambda d: d["groups"].append([1, 1]), "repeats a member"),
        (lambda d: d.update(format="something"), "not a grouped dataset"),
        (lambda d: d.update(version=7), "unsupported version"),
        (lambda d: d.update(groups=[]), "no groups"),
        (lambda d: d["items"][1].update(caption=""), "item 1 has no caption"),
        (lambda d: d["items"][2].pop("image"), "item 2: 'image'"),
        (lambda d: d.pop("items"), "must be lists"),
    ],
)
def test_malformed_datasets_get_clear_errors(tmp_path, mutate, message) -> None:
    data = _valid()
    mutate(data)
    with pytest.raises(DatasetError, match=message):
        load_grouped_dataset(_write(tmp_path, data))


def test_missing_and_non_json_files(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_grouped_dataset(tmp_path / "none.json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_grouped_dataset(_write(tmp_path, "{not json"))
    with pytest.raises(DatasetError, match="top level"):
        load_grouped_dataset(_write(tmp_path, [1, 2]))


def test_disjoint_groups_share_no_member() -> None:
    groups = [[0, 1], [1, 2], [2, 3, 4], [5, 6], [0, 6], [7, 8, 9]]
    chosen = disjoint_groups(groups, 10, seed=3)
    members = [i for g in chosen for i in g]
    assert len(members) == len(set(members))
    assert disjoint_groups(groups, 10, seed=3) == chosen
    assert len(disjoint_groups(groups, 2, seed=3)) == 2


@pytest.mark.skipif(not COCO_CAPTIONS.is_file(), reason="shared COCO captions not present")
def test_coco_captions_are_text_only_items() -> None:
    items = coco_items(limit=20)
    assert len(items) == 20 and all(set(it["image"]) == {"coco_image_id"} for it in items)
    assert all(it["caption"] == " ".join(it["caption"].split()) for it in items)


def test_groups_command_writes_a_dataset_and_refuses_bad_ranges(tmp_path) -> None:
    import typer
    from typer.testing import CliRunner

    from training.sage_cli import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "g.json"
    res = CliRunner().invoke(app, ["groups", "--source", "world", "--n", "80", "--embedder", "tfidf",
                                   "--tau-min", "0.3", "--tau-max", "0.95", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert load_grouped_dataset(out).groups
    bad = CliRunner().invoke(app, ["groups", "--embedder", "tfidf", "--tau-min", "0.9", "--tau-max", "0.6"])
    assert bad.exit_code == 2 and "tau_min must be < tau_max" in bad.output
    missing = CliRunner().invoke(app, ["finetune", "--dataset", str(tmp_path / "none.json"),
                                       "--out-dir", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
