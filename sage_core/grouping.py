"""Semantic grouping (Algorithm 1, line 2): partition prompts so every pair inside a group is similar.

Cost: one similarity pass over row blocks, O(M^2 * D) multiply-adds and O(M * block) memory, then a greedy pass
over each prompt's `candidates` nearest neighbours, O(M * candidates * max_group_size), plus an O(M * D) scan for a
seed whose neighbour list ran out before its group was full. On the 2-core CPU
10,000 prompts of 768-dim embeddings take about a second (see tests/test_grouping.py::test_grouping_scales).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Embedder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class GroupingConfig:
    """How prompts are grouped: every pair in a group has cosine similarity >= tau."""

    tau: float = 0.8
    max_group_size: int = 5
    candidates: int = 64  # nearest neighbours of a seed prompt considered for its group
    block: int = 2048  # rows of the similarity matrix held at once

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must lie in [-1, 1] (a cosine similarity), got {self.tau}")
        if self.max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {self.max_group_size}")
        if self.candidates < 1 or self.block < 1:
            raise ValueError("candidates and block must be >= 1")


def normalize(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, as float32 numpy (zero rows stay zero)."""
    e = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings
    e = np.asarray(e, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [prompts, dim] array, got shape {e.shape}")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norms, 1e-12)


def nearest_neighbours(unit: np.ndarray, tau: float, candidates: int, block: int) -> list[np.ndarray]:
    """For each row, the indices of up to `candidates` other rows with similarity >= tau, most similar first
    (ties by index)."""
    m = unit.shape[0]
    k = min(candidates, max(m - 1, 1))
    table = torch.from_numpy(unit)
    out: list[np.ndarray] = []
    for lo in range(0, m, block):
        sims = table[lo : lo + block] @ table.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + lo] = -torch.inf
        vals, idx = torch.topk(sims, k=min(k, m), dim=1, sorted=True)
        for v, i in zip(vals.numpy(), idx.numpy(), strict=True):
            keep = v >= tau
            v, i = v[keep], i[keep]
            out.append(i[np.lexsort((i, -v))])
    return out


def remaining_neighbours(unit: np.ndarray, seed: int, tau: float, skip: np.ndarray) -> np.ndarray:
    """Every row not in `skip` (nor the seed) with similarity >= tau to the seed, most similar first (ties by index):
    the rest of a seed's neighbour list once its first `candidates` are used up."""
    sims = unit @ unit[seed]
    keep = sims >= tau
    keep[skip] = False
    keep[seed] = False
    idx = np.flatnonzero(keep)
    return idx[np.lexsort((idx, -sims[idx]))]


def group_by_similarity(embeddings: np.ndarray | torch.Tensor, config: GroupingConfig) -> list[list[int]]:
    """Greedy, deterministic grouping: in input order, each ungrouped prompt seeds a group and takes its most
    similar ungrouped neighbours that are >= tau to EVERY member, up to max_group_size. Prompts that fit
    nowhere are singletons. Groups are returned in order of their first member; members ascending.

    A seed first walks its `candidates` nearest neighbours; if they run out before its group is full and more
    prompts may be >= tau (the list was cut at `candidates`), it scans the rest: the limit bounds the work, not
    the groups (many copies of one prompt in a large window fill their groups)."""
    unit = normalize(embeddings)
    m = unit.shape[0]
    if m == 0:
        return []
    neighbours = nearest_neighbours(unit, config.tau, config.candidates, config.block)
    cut = min(config.candidates, m - 1)  # a list this long may have been cut short
    assigned = np.zeros(m, dtype=bool)
    groups: list[list[int]] = []
    for seed in range(m):
        if assigned[seed]:
            continue
        members = [seed]
        assigned[seed] = True
        extend_group(members, neighbours[seed], unit, assigned, config)
        if len(members) < config.max_group_size and cut < m - 1 and len(neighbours[seed]) == cut:
            walked = assigned.copy()
            walked[neighbours[seed]] = True
            rest = remaining_neighbours(unit, seed, config.tau, skip=walked)
            extend_group(members, rest, unit, assigned, config)
        groups.append(sorted(members))
    return groups


def extend_group(
    members: list[int], candidates: np.ndarray, unit: np.ndarray, assigned: np.ndarray, config: GroupingConfig
) -> None:
    """Add candidates, in order, that are ungrouped and >= tau to every member, until the group is full."""
    for j in candidates:
        if len(members) >= config.max_group_size:
            return
        if assigned[j] or np.any(unit[members] @ unit[j] < config.tau):
            continue
        members.append(int(j))
        assigned[j] = True


def pairwise_similarities(embeddings: np.ndarray | torch.Tensor, members: Sequence[int]) -> list[float]:
    """Cosine similarities of every pair in a group (empty for a singleton)."""
    unit = normalize(embeddings)[list(members)]
    sims = unit @ unit.T
    iu = np.triu_indices(len(members), k=1)
    return [float(x) for x in sims[iu]]


@torch.no_grad()
def text_embeddings(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """From one tokenizer call and one text-encoder pass: the token-level embeddings c^m [M, L, D] in the text
    encoder's dtype, exactly as StableDiffusionPipeline.encode_prompt computes them (no CLIP skip), and the pooled
    embeddings [M, D] the grouping compares (the text encoder's pooler_output: the paper says "CLIP embeddings",
    and the pooled one is this project's reading)."""
    device = pipe.text_encoder.device
    tokens = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    out = pipe.text_encoder(tokens.input_ids.to(device), attention_mask=mask)
    return out[0].to(pipe.text_encoder.dtype), out.pooler_output


def token_keys(tokenizer, texts: Sequence[str]) -> list[str]:
    """Each text as the text encoder reads it: its token ids up to the tokenizer's length, as one string, and "" for
    a text with no tokens (as the empty one). Texts with one key have one embedding: CLIP's tokenizer reads
    "Blurry " as "blurry", and texts alike up to their 77th token alike."""
    if not texts:
        return []
    tokens = tokenizer([*texts, ""], max_length=tokenizer.model_max_length, truncation=True).input_ids
    *ids, empty = tokens
    return ["" if row == empty else " ".join(map(str, row)) for row in ids]


def pipeline_text_embeddings(pipe, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Pooled CLIP text embeddings [M, D] (float32, on the host) from the pipeline's own text encoder."""
    chunks = [
        text_embeddings(pipe, prompts[lo : lo + batch_size])[1].float().cpu().numpy()
        for lo in range(0, len(prompts), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, pipe.text_encoder.config.hidden_size), np.float32)


def pipeline_embedder(pipe) -> Embedder:
    """An Embedder bound to a pipeline's text encoder."""
    return lambda prompts: pipeline_text_embeddings(pipe, prompts)
