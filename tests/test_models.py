"""Model loading: the offline CLIP tokenizer, folder checks (safetensors only), fingerprints."""

from __future__ import annotations

import shutil

import pytest
import torch

from sage_core.models import (
    ModelError,
    build_clip_tokenizer,
    check_pipeline_folder,
    folder_fingerprint,
    load_pipeline,
    model_fingerprint,
    tiny_pipeline,
)


def test_tokenizer_ids_match_open_clip_and_sd():
    import open_clip

    tok = build_clip_tokenizer()
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ["a photo of a cat", "Two DOGS, running!! über café 123", "a red circle left of a blue square"]:
        assert tok(text).input_ids == [49406, *reference.encode(text), 49407]
    # ids SD v1.5's tokenizer gives for "a photo of a cat" (openai/clip-vit-large-patch14 vocabulary)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("hi", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny"
    tiny_pipeline(seed=1).save_pretrained(path, safe_serialization=True)
    return path


def test_load_roundtrip_keeps_weights_and_fingerprint_is_content_based(saved, tmp_path):
    pipe = load_pipeline(saved, dtype=torch.float32)
    ref = tiny_pipeline(seed=1)
    assert torch.equal(pipe.unet.conv_in.weight, ref.unet.conv_in.weight)
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    assert folder_fingerprint(copy) == folder_fingerprint(saved) == model_fingerprint(pipe)
    other = tmp_path / "other"
    tiny_pipeline(seed=2).save_pretrained(other, safe_serialization=True)
    assert folder_fingerprint(other) != folder_fingerprint(saved)


def test_load_half_precision(saved):
    pipe = load_pipeline(saved, dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


def test_missing_folder():
    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline("/nonexistent/sd15")


def test_not_a_pipeline(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a diffusers pipeline"):
        check_pipeline_folder(tmp_path)


def test_missing_component(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(ModelError, match="missing vae/"):
        check_pipeline_folder(bad)


def test_pickle_only_is_refused(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    (bad / "text_encoder" / "model.safetensors").rename(bad / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors only"):
        load_pipeline(bad)


def test_in_memory_fingerprint_tracks_weights():
    a, b = tiny_pipeline(seed=0), tiny_pipeline(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    c = tiny_pipeline(seed=0)
    with torch.no_grad():
        c.unet.conv_in.weight.add_(1e-3)
    assert model_fingerprint(c) != model_fingerprint(a)


def test_sd15_architecture_has_sd15_sizes():
    """Built on the meta device (no memory): parameter counts of SD v1.5's UNet, VAE and CLIP ViT-L/14 text."""
    from sage_core.models import sd15_architecture_pipeline

    pipe = sd15_architecture_pipeline(dtype=torch.float32, device="meta")
    count = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")}
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.unet.config.sample_size == 64
