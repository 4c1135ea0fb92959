"""The grouped dataset of SAGE training (paper Sec. 3.1): groups of 2 to 5 semantically similar captions.

Construction, as in the paper:
  1. embed every caption (pooled CLIP text embeddings of a pipeline's text encoder, as the paper; or, offline
     and model-free, a TF-IDF + LSA embedding for text-only statistics)
  2. a similarity graph: one node per caption, an edge when tau_min < cos(e_i, e_j) < tau_max
  3. groups = the cliques of 2 to 5 members of that graph

Bounded cost. The graph keeps, per caption, its `max_degree` most similar in-range neighbours (an edge stays when
either end keeps it), so it has at most M * max_degree edges. Cliques are enumerated depth-first from each
caption v over its higher-numbered neighbours (most similar first, ties by index), so every clique is found from
its lowest member only, and at most `max_cliques_per_node` are emitted per caption. Work is therefore
O(M * max_cliques_per_node * max_degree) on top of the O(M^2 D) blockwise similarity pass. Everything is
deterministic: same captions, embedder and config give the same file.

File format (JSON, `FORMAT` / `VERSION`): `items` (id, caption, image reference: a world example
{"world": {"seed", "split", "index"}}, a COCO image id {"coco_image_id": n}, or a file {"path": ...}) and
`groups` (lists of 2..5 item ids, all pairwise in range). `load_grouped_dataset` checks the schema and raises
`DatasetError` with the reason.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from sage_core.grouping import normalize

FORMAT = "sage-grouped-dataset"
VERSION = 1
MIN_GROUP, MAX_GROUP = 2, 5
COCO_CAPTIONS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco_captions_val2017.json"


class DatasetError(ValueError):
    """A grouped dataset file that is missing or malformed; the message says what and where."""


@dataclass(frozen=True)
class GroupingParams:
    """How the similarity graph and its cliques are built."""

    tau_min: float = 0.6
    tau_max: float = 0.9
    min_size: int = MIN_GROUP
    max_size: int = MAX_GROUP
    max_degree: int = 32  # most similar in-range neighbours a caption keeps (bounds the edges)
    max_cliques_per_node: int = 16  # cliques enumerated from each caption as their lowest member
    max_groups: int | None = None  # overall cap (None: no cap)
    block: int = 2048  # rows of the similarity matrix held at once

    def __post_init__(self) -> None:
        for name in ("tau_min", "tau_max"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a cosine similarity in [-1, 1], got {v}")
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tau_min must be < tau_max, got tau_min={self.tau_min} >= tau_max={self.tau_max}")
        if not MIN_GROUP <= self.min_size <= self.max_size <= MAX_GROUP:
            raise ValueError(
                f"group sizes must satisfy {MIN_GROUP} <= min_size <= max_size <= {MAX_GROUP} (a group of one "
                f"shares nothing), got min_size={self.min_size}, max_size={self.max_size}"
            )
        if self.max_degree < 1 or self.max_cliques_per_node < 1 or self.block < 1:
            raise ValueError("max_degree, max_cliques_per_node and block must be >= 1")
        if self.max_groups is not None and self.max_groups < 1:
            raise ValueError(f"max_groups must be >= 1 or None, got {self.max_groups}")


@dataclass
class GroupedDataset:
    """Captions (with image references) and groups of item ids."""

    items: list[dict[str, Any]]
    groups: list[list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def captions(self, group: Sequence[int]) -> list[str]:
        """The captions of a group's members."""
        return [self.items[i]["caption"] for i in group]

    def to_json(self) -> dict[str, Any]:
        """The on-disk JSON object."""
        return {"format": FORMAT, "version": VERSION, "meta": self.meta, "items": self.items, "groups": self.groups}


# ----------------------------------------------------------------------------------------------- graph
def similarity_edges(unit: np.ndarray, params: GroupingParams) -> list[tuple[int, int, float]]:
    """Edges (i < j, similarity) with tau_min < sim < tau_max, each node keeping its `max_degree` most similar
    in-range neighbours (ties by index); an edge is kept when either end keeps it."""
    m = unit.shape[0]
    table = torch.from_numpy(np.ascontiguousarray(unit))
    kept: dict[tuple[int, int], float] = {}
    for lo in range(0, m, params.block):
        sims = table[lo : lo + params.block] @ table.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + lo] = -torch.inf
        in_range = (sims > params.tau_min) & (sims < params.tau_max)
        masked = torch.where(in_range, sims, torch.full_like(sims, -torch.inf))
        k = min(params.max_degree, m - 1) if m > 1 else 0
        if k == 0:
            continue
        vals, idx = torch.topk(masked, k=k, dim=1, sorted=True)
        for r, (vrow, irow) in enumerate(zip(vals.numpy(), idx.numpy(), strict=True)):
            i = lo + r
            for v, j in zip(vrow, irow, strict=True):
                if not np.isfinite(v):
                    break
                key = (min(i, int(j)), max(i, int(j)))
                kept[key] = float(v)
    return [(i, j, s) for (i, j), s in sorted(kept.items())]


def similarity_graph(embeddings: np.ndarray | torch.Tensor, params: GroupingParams) -> nx.Graph:
    """The caption graph of the paper: nodes 0..M-1, edges with tau_min < cosine < tau_max (weight = sim)."""
    unit = normalize(embeddings)
    graph = nx.Graph()
    graph.add_nodes_from(range(unit.shape[0]))
    graph.add_weighted_edges_from(similarity_edges(unit, params))
    return graph


def _ordered_higher_neighbours(graph: nx.Graph, v: int) -> list[int]:
    """Neighbours u > v of v, most similar first, ties by index."""
    nbrs = [(u, graph[v][u]["weight"]) for u in graph[v] if u > v]
    return [u for u, _ in sorted(nbrs, key=lambda x: (-x[1], x[0]))]


def cliques_from(graph: nx.Graph, v: int, params: GroupingParams) -> Iterator[list[int]]:
    """Cliques of min_size..max_size members whose lowest member is v, depth-first, at most
    `max_cliques_per_node` of them."""
    budget = params.max_cliques_per_node
    stack: list[tuple[list[int], list[int]]] = [([v], _ordered_higher_neighbours(graph, v))]
    # explicit stack in pre-order: pop the last pushed; push children in reverse to keep order
    while stack and budget > 0:
        clique, cands = stack.pop()
        if len(clique) >= params.min_size:
            yield sorted(clique)
            budget -= 1
            if budget == 0:
                return
        if len(clique) >= params.max_size:
            continue
        children = []
        for i, u in enumerate(cands):
            rest = [w for w in cands[i + 1 :] if graph.has_edge(u, w)]
            children.append((clique + [u], rest))
        stack.extend(reversed(children))


def enumerate_groups(graph: nx.Graph, params: GroupingParams) -> list[list[int]]:
    """All bounded cliques, caption by caption in index order (deterministic)."""
    groups: list[list[int]] = []
    for v in sorted(graph.nodes):
        for clique in cliques_from(graph, v, params):
            groups.append(clique)
            if params.max_groups is not None and len(groups) >= params.max_groups:
                return groups
    return groups


def build_groups(embeddings: np.ndarray | torch.Tensor, params: GroupingParams) -> tuple[list[list[int]], nx.Graph]:
    """Groups (cliques of the similarity graph) and the graph."""
    graph = similarity_graph(embeddings, params)
    return enumerate_groups(graph, params), graph


def group_stats(groups: Sequence[Sequence[int]], graph: nx.Graph) -> dict[str, Any]:
    """Counts a report needs: groups, edges, captions covered, size histogram, mean size."""
    sizes = Counter(len(g) for g in groups)
    covered = len({i for g in groups for i in g})
    return {
        "groups": len(groups),
        "edges": graph.number_of_edges(),
        "captions": graph.number_of_nodes(),
        "captions_in_a_group": covered,
        "size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
        "mean_size": float(np.mean([len(g) for g in groups])) if groups else 0.0,
    }


def disjoint_groups(groups: Sequence[Sequence[int]], n: int, seed: int = 0) -> list[list[int]]:
    """Up to n groups with no shared member (a partition of part of the prompts, as the sampler needs), picked
    greedily in a seeded random order so their sizes follow the dataset's."""
    order = np.random.default_rng(seed).permutation(len(groups))
    used: set[int] = set()
    out: list[list[int]] = []
    for gi in order:
        g = list(groups[gi])
        if used.isdisjoint(g):
            out.append(g)
            used.update(g)
            if len(out) >= n:
                break
    return out


# ----------------------------------------------------------------------------------------------- embedders
def tfidf_embeddings(captions: Sequence[str], dim: int = 256, seed: int = 0) -> np.ndarray:
    """A model-free text embedding (TF-IDF of word uni+bigrams, then LSA to `dim`), deterministic by seed.
    Used for text-only statistics where no CLIP weights exist; the paper uses CLIP text embeddings."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(captions)
    dim = min(dim, tfidf.shape[1] - 1)
    return TruncatedSVD(n_components=dim, random_state=seed).fit_transform(tfidf).astype(np.float32)


def pipeline_embeddings(captions: Sequence[str], model: str | None) -> np.ndarray:
    """Pooled CLIP text embeddings of a pipeline folder's text encoder (None: the shipped default model)."""
    from sage_core.grouping import pipeline_text_embeddings
    from sage_core.models import load_pipeline

    return pipeline_text_embeddings(load_pipeline(model), captions)


def make_embedder(kind: str, model: str | None = None) -> Callable[[Sequence[str]], np.ndarray]:
    """'pipeline' (the paper's CLIP text embeddings of `model`) or 'tfidf' (model-free)."""
    if kind == "pipeline":
        return lambda caps: pipeline_embeddings(caps, model)
    if kind == "tfidf":
        return tfidf_embeddings
    raise ValueError(f"unknown embedder {kind!r}; choose 'pipeline' or 'tfidf'")


# ----------------------------------------------------------------------------------------------- sources
def world_items(n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """Items of the procedural world: captions with a reference that renders their image."""
    from training import world

    return [
        {"id": i, "caption": ex.caption, "image": {"world": {"seed": seed, "split": split, "index": i}}}
        for i, ex in enumerate(world.make_examples(n, seed, split))
    ]


def coco_items(path: str | Path = COCO_CAPTIONS, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of an MS COCO captions JSON (text only: image ids, no pixels), in annotation-id order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"COCO captions file {path} does not exist")
    try:
        anns = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is not a COCO captions JSON (needs 'annotations'): {exc}") from exc
    anns = sorted(anns, key=lambda a: a["id"])[:limit]
    return [
        {"id": i, "caption": " ".join(a["caption"].split()), "image": {"coco_image_id": int(a["image_id"])}}
        for i, a in enumerate(anns)
    ]


def build_dataset(
    items: list[dict[str, Any]], embeddings: np.ndarray, params: GroupingParams, meta: dict[str, Any] | None = None
) -> GroupedDataset:
    """A grouped dataset from items and their caption embeddings."""
    if len(items) != len(embeddings):
        raise ValueError(f"{len(items)} items but {len(embeddings)} embeddings")
    groups, graph = build_groups(embeddings, params)
    meta = dict(meta or {}) | {"params": asdict(params), "stats": group_stats(groups, graph)}
    return GroupedDataset(items, groups, meta)


# ----------------------------------------------------------------------------------------------- file I/O
def save_grouped_dataset(dataset: GroupedDataset, path: str | Path) -> Path:
    """Write the dataset as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dataset.to_json(), separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_item(i: int, item: Any) -> None:
    if not isinstance(item, dict):
        raise DatasetError(f"item {i} is not an object")
    if item.get("id") != i:
        raise DatasetError(f"item {i} has id {item.get('id')!r}; ids must be 0..N-1 in order")
    if not isinstance(item.get("caption"), str) or not item["caption"].strip():
        raise DatasetError(f"item {i} has no caption (a non-empty string)")
    image = item.get("image")
    if not isinstance(image, dict) or not ({"world", "coco_image_id", "path"} & set(image)):
        raise DatasetError(f"item {i}: 'image' must be an object with 'world', 'coco_image_id' or 'path'")
    if "world" in image:
        ref = image["world"]
        if not isinstance(ref, dict) or not {"seed", "split", "index"} <= set(ref):
            raise DatasetError(f"item {i}: a world image reference needs seed, split and index")


def _check_group(g: int, group: Any, n_items: int) -> None:
    if not isinstance(group, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in group):
        raise DatasetError(f"group {g} is not a list of item ids")
    if not MIN_GROUP <= len(group) <= MAX_GROUP:
        raise DatasetError(
            f"group {g} has {len(group)} member(s); a group needs {MIN_GROUP} to {MAX_GROUP} (a group of one "
            "shares nothing)"
        )
    if len(set(group)) != len(group):
        raise DatasetError(f"group {g} repeats a member: {group}")
    bad = [x for x in group if not 0 <= x < n_items]
    if bad:
        raise DatasetError(f"group {g} refers to item(s) {bad} outside 0..{n_items - 1}")


def parse_grouped_dataset(data: Any, source: str = "<memory>") -> GroupedDataset:
    """Check the schema of a loaded JSON object and return the dataset; DatasetError says what is wrong."""
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: not a grouped dataset (the top level must be a JSON object)")
    if data.get("format") != FORMAT:
        raise DatasetError(f"{source}: not a grouped dataset (format is {data.get('format')!r}, expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise DatasetError(f"{source}: unsupported version {data.get('version')!r} (this code reads {VERSION})")
    items, groups = data.get("items"), data.get("groups")
    if not isinstance(items, list) or not isinstance(groups, list):
        raise DatasetError(f"{source}: 'items' and 'groups' must be lists")
    if not groups:
        raise DatasetError(f"{source}: the dataset has no groups")
    try:
        for i, item in enumerate(items):
            _check_item(i, item)
        for g, group in enumerate(groups):
            _check_group(g, group, len(items))
    except DatasetError as exc:
        raise DatasetError(f"{source}: {exc}") from None
    return GroupedDataset(items, [list(g) for g in groups], dict(data.get("meta") or {}))


def load_grouped_dataset(path: str | Path) -> GroupedDataset:
    """Read and check a grouped dataset file."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"grouped dataset {path} is a folder; give the dataset's JSON file")
    if not path.is_file():
        raise DatasetError(f"grouped dataset {path} does not exist (build one with `sage-train groups`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    return parse_grouped_dataset(data, str(path))


# ----------------------------------------------------------------------------------------------- stats
def parse_ranges(text: str) -> list[tuple[float, float]]:
    """'0.6:0.9,0.7:0.95' -> [(0.6, 0.9), (0.7, 0.95)] (each checked by GroupingParams)."""
    out = []
    for part in text.split(","):
        try:
            lo, hi = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"bad similarity range {part!r}; write tau_min:tau_max, e.g. 0.6:0.9") from None
        GroupingParams(tau_min=lo, tau_max=hi)
        out.append((lo, hi))
    return out


def range_stats(
    embeddings: np.ndarray, ranges: Sequence[tuple[float, float]], base: GroupingParams
) -> list[dict[str, Any]]:
    """Group statistics of one embedding set for each (tau_min, tau_max), other params from `base`."""
    rows = []
    for lo, hi in ranges:
        params = GroupingParams(**(asdict(base) | {"tau_min": lo, "tau_max": hi}))
        groups, graph = build_groups(embeddings, params)
        rows.append({"tau_min": lo, "tau_max": hi} | group_stats(groups, graph))
    return rows


def similarity_quantiles(embeddings: np.ndarray, sample: int = 2000, seed: int = 0) -> dict[str, float]:
    """Quantiles of pairwise cosine similarity over a random sample of captions (to pick tau ranges)."""
    unit = normalize(embeddings)
    idx = np.random.default_rng(seed).choice(len(unit), size=min(sample, len(unit)), replace=False)
    sims = unit[idx] @ unit[idx].T
    vals = sims[np.triu_indices(len(idx), k=1)]
    return {f"q{q}": float(np.quantile(vals, q / 100)) for q in (50, 90, 99, 99.9)}
