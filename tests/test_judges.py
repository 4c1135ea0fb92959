"""Judges: real renders score near the top, and each judge tells a wrong image from a right one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import judges, world

N = 200


@pytest.fixture(scope="module")
def heldout():
    torch.set_num_threads(2)
    ex = world.make_examples(N, seed=11, split="heldout")
    rng = np.random.default_rng(0)
    right = world.render_examples(ex)
    other_same_caption = world.render_examples([world.resample_for_caption(e, rng) for e in ex])
    # a wrong image per caption: the scene with its first color (or, for singles, its shape) changed
    wrong_scenes = [world.vary_attribute(e.scene, "shape" if e.scene.kind == "single" else "color", rng) for e in ex]
    wrong = world.render_examples(wrong_scenes)
    return ex, right, other_same_caption, wrong


@pytest.fixture(scope="module")
def oracle():
    return judges.load_oracle()


@pytest.fixture(scope="module")
def clip():
    return judges.ClipJudge.load()


def test_oracle_reads_real_renders_almost_perfectly(heldout, oracle):
    ex, right, other, _ = heldout
    for images in (right, other):
        preds, feats = judges.oracle_outputs(oracle, images)
        acc = judges.prompt_fidelity(preds, ex)
        assert feats.shape == (N, judges.FEATURE_DIM)
        for key in ("shape", "color", "position", "count", "background", "relation"):
            assert acc[key] >= 0.9, (key, acc)
        assert acc["mean"] >= 0.95, acc


def test_oracle_tells_wrong_from_right(heldout, oracle):
    ex, right, _, wrong = heldout
    acc_right = judges.prompt_fidelity(judges.oracle_outputs(oracle, right)[0], ex)
    acc_wrong = judges.prompt_fidelity(judges.oracle_outputs(oracle, wrong)[0], ex)
    assert acc_right["all"] > 0.85 and acc_wrong["all"] < 0.25
    assert acc_right["mean"] - acc_wrong["mean"] > 0.1


def test_oracle_accepts_float_images_in_either_layout(heldout, oracle):
    _, right, _, _ = heldout
    a = judges.oracle_outputs(oracle, right[:8])[0]["shape"]
    b = judges.oracle_outputs(oracle, right[:8].astype(np.float32) / 255)[0]["shape"]
    c = judges.oracle_outputs(oracle, torch.from_numpy(right[:8]).permute(0, 3, 1, 2).float() / 255)[0]["shape"]
    assert np.array_equal(a, b) and np.array_equal(a, c)
    with pytest.raises(ValueError, match="4 dims"):
        judges.to_float_images(right[0])


def test_fid_oracle_real_vs_real_is_small_and_wrong_is_larger(heldout, oracle):
    _, right, other, wrong = heldout
    fa = judges.oracle_outputs(oracle, right)[1]
    fb = judges.oracle_outputs(oracle, other)[1]
    # a wrong set: every image is a black-background purple render, whatever the caption asked
    rng = np.random.default_rng(1)
    mono = world.render_examples([world.sample_single(rng, color="purple", background="black") for _ in range(N)])
    fm = judges.oracle_outputs(oracle, mono)[1]
    fw = judges.oracle_outputs(oracle, wrong)[1]
    real = judges.frechet_distance(fa, fb)
    assert real < judges.frechet_distance(fa, fm) / 3
    assert real < judges.frechet_distance(fa, fw) * 1.5  # wrong attributes but the same overall distribution
    assert judges.frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-6 * max(1.0, np.trace(np.cov(fa.T))))


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2 + 1
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, trace terms 3 + 12 - 2 * 3 * 2 = 3
    assert judges.frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)
    with pytest.raises(ValueError):
        judges.frechet_distance(a, b[:, :2])


def test_clip_scores_right_captions_above_wrong_ones(heldout, clip):
    ex, right, _, wrong = heldout
    captions = [e.caption for e in ex]
    s_right = clip.scores(right, captions)
    s_wrong = clip.scores(wrong, captions)
    s_shuffled = clip.scores(right, captions[1:] + captions[:1])
    assert (s_right > s_wrong).mean() > 0.8
    assert (s_right > s_shuffled).mean() > 0.9
    assert clip.score(right, captions) > clip.score(wrong, captions) + 0.05


def test_clip_judge_loads_any_open_clip_checkpoint_file_by_name(tmp_path):
    """The path a user with a real open_clip checkpoint takes: architecture name + checkpoint file."""
    import open_clip

    name = "sage-test-tiny-clip"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    model = open_clip.create_model(name)
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    judge = judges.ClipJudge.load(name, tmp_path / "open_clip_pytorch_model.bin")
    imgs = world.render_examples(world.make_examples(3, seed=0))
    s = judge.scores(imgs, ["a red circle", "a blue square", "two stars"])
    assert s.shape == (3,) and np.all(np.abs(s) <= 1.0 + 1e-5)
    with pytest.raises(FileNotFoundError):
        judges.ClipJudge.load(name, tmp_path / "missing.bin")


def test_diversity_is_zero_for_copies_and_positive_for_different_images(clip, heldout):
    _, right, _, _ = heldout
    same = np.repeat(right[:1], 4, axis=0)
    emb_same = clip.image_embeddings(same).numpy()
    emb_diff = clip.image_embeddings(right[:4]).numpy()
    assert judges.diversity(emb_same, [[0, 1, 2, 3]]) == pytest.approx(0.0, abs=1e-5)
    assert judges.diversity(emb_diff, [[0, 1, 2, 3]]) > 0.05
    with pytest.raises(ValueError):
        judges.diversity(emb_diff, [[0]])


def test_shipped_judge_metrics_show_near_perfect_real_render_scores():
    metrics = json.loads((judges.JUDGES_DIR / "metrics.json").read_text())
    assert metrics["oracle"]["mean"] >= 0.97
    assert metrics["clip"]["clip_matched"] > metrics["clip"]["clip_shuffled"] + 0.1
