"""The procedural world: determinism, ground truth, captions and their semantic structure."""

from __future__ import annotations

import time

import numpy as np
import pytest

from training import world


def test_examples_are_deterministic_by_seed_split_and_index():
    a = world.make_examples(50, seed=3, split="train")
    b = world.make_examples(50, seed=3, split="train")
    assert [e.caption for e in a] == [e.caption for e in b]
    assert np.array_equal(world.render_examples(a), world.render_examples(b))
    other_seed = world.make_examples(50, seed=4, split="train")
    other_split = world.make_examples(50, seed=3, split="heldout")
    assert [e.caption for e in a] != [e.caption for e in other_seed]
    assert [e.caption for e in a] != [e.caption for e in other_split]
    # example i does not depend on how many came before it
    assert world.make_examples(5, seed=3, split="train", start=45)[0].caption == a[45].caption


def test_render_shape_dtype_and_speed():
    ex = world.make_examples(1000, seed=0)
    t0 = time.perf_counter()
    imgs = world.render_examples(ex)
    dt = time.perf_counter() - t0
    assert imgs.shape == (1000, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and imgs.dtype == np.uint8
    assert dt < 2.0, f"rendering 1000 images took {dt:.2f}s"


def test_all_kinds_and_values_occur():
    ex = world.make_examples(3000, seed=1)
    kinds = {e.scene.kind for e in ex}
    assert kinds == set(world.KINDS)
    attrs = [e.scene.attributes() for e in ex]
    for key, classes in world.ATTRIBUTE_CLASSES.items():
        seen = {a[key] for a in attrs if key in a}
        assert seen == set(classes), f"{key}: missing {set(classes) - seen}"


def test_pixels_follow_ground_truth_color_and_position():
    rng = np.random.default_rng(0)
    for position in world.POSITIONS:
        scene = world.sample_single(rng, shape="square", color="red", size="large", position=position,
                                    background="black")
        img = world.render_scene(scene).astype(int)
        obj = scene.objects[0]
        assert np.abs(img[int(obj.cy), int(obj.cx)] - np.array(obj.rgb)).max() <= 2
        corner = img[0 if obj.cy > 32 else 63, 0 if obj.cx > 32 else 63]
        assert np.abs(corner - np.array(scene.background_rgb)).max() <= 2
        # the object's mass centre sits in the named 3x3 cell
        red = (img[..., 0] > 150) & (img[..., 1] < 100)
        ys, xs = np.nonzero(red)
        row, col = int(ys.mean() // (64 / 3)), int(xs.mean() // (64 / 3))
        assert world.POSITIONS[row * 3 + col] == position


def test_object_color_never_equals_background():
    for e in world.make_examples(2000, seed=2):
        assert all(o.color != e.scene.background for o in e.scene.objects)


def test_pair_ground_truth_is_canonical_left_to_right_and_top_to_bottom():
    rng = np.random.default_rng(1)
    for relation in world.RELATIONS:
        scene = world.sample_pair(rng, shape="circle", color="red", shape2="square", color2="blue",
                                  relation=relation, background="white")
        subj, ref = scene.objects
        a = scene.attributes()
        if relation == "left of":
            assert subj.cx < ref.cx and a["shape"] == "circle" and a["relation"] == "horizontal"
        if relation == "right of":
            assert subj.cx > ref.cx and a["shape"] == "square" and a["shape2"] == "circle"
        if relation == "above":
            assert subj.cy < ref.cy and a["color"] == "red" and a["relation"] == "vertical"
        if relation == "below":
            assert subj.cy > ref.cy and a["color"] == "blue" and a["color2"] == "red"


def test_captions_mention_what_they_claim():
    for e in world.make_examples(500, seed=5):
        labels = e.prompt_labels()
        text = e.caption
        assert e.scene.objects[0].color in text
        if "background" in labels:
            assert labels["background"] in text
        if "position" in labels and e.scene.kind == "single":
            assert any(p in text for p in world.POSITION_PHRASES[labels["position"]]) or labels["position"] in text
        if e.scene.kind == "pair":
            assert any(p in text for p in world.RELATION_PHRASES[str(e.scene.relation)])
        assert set(labels) <= world.DEFINED_ATTRIBUTES[e.scene.kind]


def test_captions_are_varied_and_articles_are_correct():
    captions = [e.caption for e in world.make_examples(2000, seed=6)]
    assert len(set(captions)) > 1000
    assert not any(" a orange" in c or c.startswith("a orange") for c in captions)
    assert any(" an orange" in c or c.startswith("an orange") for c in captions)


def test_paraphrase_keeps_scene_and_mentions_but_changes_words():
    rng = np.random.default_rng(0)
    changed = 0
    for e in world.make_examples(200, seed=7):
        p = world.paraphrase(e, rng)
        assert p.scene == e.scene and p.prompt_labels() == e.prompt_labels()
        changed += p.caption != e.caption
    assert changed > 50


def test_vary_attribute_changes_exactly_that_attribute():
    rng = np.random.default_rng(0)
    base = world.sample_single(rng, shape="star", color="blue", size="small", position="center",
                               background="gray")
    for attr in ("shape", "color", "size", "position", "background"):
        new = world.vary_attribute(base, attr, rng)
        a, b = base.attributes(), new.attributes()
        diff = {k for k in a if a[k] != b[k]}
        assert diff == {attr}
    with pytest.raises(ValueError):
        world.vary_attribute(base, "mood", rng)


def test_resample_for_caption_keeps_the_prompt_labels():
    rng = np.random.default_rng(0)
    for e in world.make_examples(500, seed=8, split="heldout"):
        r = world.resample_for_caption(e, rng)
        assert r.prompt_labels() == e.prompt_labels() and r.caption == e.caption


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="split"):
        world.make_example(0, "nope", 0)
    with pytest.raises(ValueError, match="kind"):
        world.sample_scene(rng, "triple")
    with pytest.raises(ValueError, match="count"):
        world.sample_count(rng, count=5)
    with pytest.raises(ValueError, match="background"):
        world.sample_single(rng, color="white", background="white")


def test_label_arrays_mask_unmentioned_attributes():
    ex = world.make_examples(300, seed=9)
    full = world.label_arrays(ex)
    mentioned = world.label_arrays(ex, mentioned_only=True)
    for k in full:
        assert np.all((mentioned[k] == -1) | (mentioned[k] == full[k]))
    assert (mentioned["background"] == -1).sum() > (full["background"] == -1).sum()
