"""Semantic grouping: the pairwise threshold, group size cap, determinism, singletons, scale."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sage_core.grouping import (
    GroupingConfig,
    group_by_similarity,
    nearest_neighbours,
    normalize,
    pairwise_similarities,
    pipeline_text_embeddings,
    text_embeddings,
    token_keys,
)


def clustered(n_clusters: int, per: int, dim: int = 64, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    return (np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_clusters * per, dim))).astype(np.float32)


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("max_size", [2, 5])
def test_every_pair_meets_tau_and_groups_partition(tau, max_size):
    emb = clustered(30, 7, noise=0.6)
    groups = group_by_similarity(emb, GroupingConfig(tau=tau, max_group_size=max_size))
    assert sorted(m for g in groups for m in g) == list(range(len(emb)))
    for g in groups:
        assert 1 <= len(g) <= max_size
        assert all(s >= tau - 1e-6 for s in pairwise_similarities(emb, g))


def test_clusters_are_found_and_unrelated_prompts_are_singletons():
    emb = np.concatenate([clustered(4, 3, noise=0.1), np.eye(64, dtype=np.float32)[:5] * 3])
    groups = group_by_similarity(emb, GroupingConfig(tau=0.8, max_group_size=5))
    assert groups[:4] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert groups[4:] == [[12], [13], [14], [15], [16]]


def test_deterministic_and_order_stable():
    emb = clustered(50, 4, noise=0.5, seed=3)
    cfg = GroupingConfig(tau=0.7)
    assert group_by_similarity(emb, cfg) == group_by_similarity(emb.copy(), cfg)


def test_many_copies_fill_groups_past_the_candidate_list():
    """100 copies of one prompt in one window: every group is full, though each seed's 64 nearest neighbours
    include prompts already grouped (before the fix: 35 groups, not 20)."""
    emb = np.tile(np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32), (100, 1))
    groups = group_by_similarity(emb, GroupingConfig(tau=0.9, max_group_size=5))
    assert [len(g) for g in groups] == [5] * 20


@pytest.mark.parametrize("candidates", [1, 3, 8])
def test_a_short_candidate_list_groups_as_well_as_a_full_one(candidates):
    """The candidate list bounds the work, not the result: a seed that runs out of candidates scans the rest."""
    emb = np.concatenate([clustered(6, 12, noise=0.2, seed=5), clustered(20, 2, noise=0.5, seed=6)])
    full = group_by_similarity(emb, GroupingConfig(tau=0.75, max_group_size=5, candidates=len(emb)))
    short = group_by_similarity(emb, GroupingConfig(tau=0.75, max_group_size=5, candidates=candidates))
    assert short == full


def test_empty_and_bad_input():
    assert group_by_similarity(np.zeros((0, 8), np.float32), GroupingConfig()) == []
    assert group_by_similarity(np.ones((1, 8), np.float32), GroupingConfig()) == [[0]]
    with pytest.raises(ValueError):
        group_by_similarity(np.ones(8, np.float32), GroupingConfig())
    with pytest.raises(ValueError):
        GroupingConfig(tau=1.5)
    with pytest.raises(ValueError):
        GroupingConfig(max_group_size=0)


def test_pipeline_embeddings_group_paraphrases(tiny_pipe):
    emb = pipeline_text_embeddings(tiny_pipe, ["a red circle", "a red circle", "zebra on a bicycle"])
    assert emb.shape == (3, tiny_pipe.text_encoder.config.hidden_size)
    groups = group_by_similarity(emb, GroupingConfig(tau=0.999))
    assert [0, 1] in groups


def test_one_text_encoder_pass_gives_the_pipelines_own_embeddings(tiny_pipe):
    """The edge worker encodes once for both conditioning and grouping: the token embeddings are diffusers'
    encode_prompt's (a prompt past 77 tokens truncated the same way) and the pooled ones CLIP's pooler output."""
    import torch

    prompts = ["a red circle", "", "a blue square " * 30]
    cond, pooled = text_embeddings(tiny_pipe, prompts)
    want, _ = tiny_pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    assert torch.equal(cond, want)
    ids = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(pooled, tiny_pipe.text_encoder(ids.input_ids).pooler_output)
    np.testing.assert_array_equal(pipeline_text_embeddings(tiny_pipe, prompts, batch_size=3), pooled.numpy())


def test_token_keys_tell_texts_apart_as_the_text_encoder_reads_them(tiny_pipe):
    """Texts with one key have one embedding; every other pair has two keys."""
    long = " ".join(["red"] * 100)
    texts = ["", "  ", "Blurry, low quality", "blurry,low quality", "blurry", long, long + " but blue"]
    keys = token_keys(tiny_pipe.tokenizer, texts)
    assert keys[:2] == ["", ""] and keys[2] == keys[3] and keys[5] == keys[6]  # the last past CLIP's 77 tokens
    assert len(set(keys)) == 4 and token_keys(tiny_pipe.tokenizer, []) == []
    embeddings = text_embeddings(tiny_pipe, texts)[0]
    for i in range(len(texts)):
        for j in range(i):
            alike = torch.allclose(embeddings[i], embeddings[j], rtol=0, atol=1e-6)
            assert alike == (keys[i] == keys[j]), (texts[i], texts[j])


def test_grouping_scales():
    """10,000 prompts of 768-dim embeddings: printed, not asserted (timing belongs to benchmarks)."""
    emb = clustered(2000, 5, dim=768, noise=0.3)
    start = time.perf_counter()
    groups = group_by_similarity(emb, GroupingConfig(tau=0.8))
    print(f"grouped 10,000 prompts in {time.perf_counter() - start:.2f} s into {len(groups)} groups")
    assert len(groups) == 2000


@pytest.mark.parametrize("candidates", [1, 64])
def test_a_pair_exactly_at_tau_groups_and_one_just_below_does_not(candidates):
    """'Similarity >= tau' holds at equality: e1 and (1, 1, 1, 1) are exactly 0.5 alike in float32, the two copies of
    (1, 1, 1, 1) exactly 1.0. With candidates=1 the second copy is found by the scan past the candidate list."""
    emb = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=np.float32)
    assert group_by_similarity(emb, GroupingConfig(tau=0.5, candidates=candidates)) == [[0, 1, 2]]
    assert group_by_similarity(emb, GroupingConfig(tau=0.5000001, candidates=candidates)) == [[0], [1, 2]]
    copies = np.tile(np.array([[2, 0, 0, 0]], dtype=np.float32), (3, 1))  # unit rows exactly e1: cosine 1.0
    assert group_by_similarity(copies, GroupingConfig(tau=1.0, candidates=candidates)) == [[0, 1, 2]]


@pytest.mark.parametrize("block", [1, 2, 3, 7])
def test_the_similarity_block_size_does_not_change_the_groups(block):
    """Rows are compared block by block; each row's own similarity is masked at its place in the whole table, so
    no row is its own neighbour and the neighbour lists and groups are those of one block."""
    emb = clustered(6, 4, noise=0.4, seed=2)
    unit = normalize(emb)
    whole = nearest_neighbours(unit, 0.7, 3, block=len(emb))
    lists = nearest_neighbours(unit, 0.7, 3, block=block)
    assert all(row not in lst for row, lst in enumerate(lists))
    assert [lst.tolist() for lst in lists] == [lst.tolist() for lst in whole]
    want = group_by_similarity(emb, GroupingConfig(tau=0.7, candidates=3, block=len(emb)))
    assert group_by_similarity(emb, GroupingConfig(tau=0.7, candidates=3, block=block)) == want


def test_pairwise_similarities_are_the_pairs_only():
    """Every pair once, in (i, j) order with i < j; no self-similarity (the report's mean similarity reads them)."""
    emb = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 2, 0, 0]], dtype=np.float32)
    assert pairwise_similarities(emb, [0, 1, 2]) == [0.5, 0.0, 0.5]
    assert pairwise_similarities(emb, [1]) == []
