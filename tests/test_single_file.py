"""Single-file checkpoints: an SD v1.x .safetensors file in the original (LDM/CompVis) layout loads offline into
the same pipeline as its diffusers folder; anything else (pickles, other families, LoRAs, garbled files, tensors
left over) is a one-line ModelError. The files here are made from tiny pipelines by `ldm_state_dict`, the inverse
of diffusers' LDM -> diffusers converters (test code, written from the installed forward converters in the manner of
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, for any number of levels and layers)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sage_core import models
from sage_core.models import (
    ModelError,
    SingleFileConfig,
    check_pipeline_folder,
    folder_fingerprint,
    folder_sha256,
    load_pipeline,
    model_fingerprint,
    read_single_file_config,
    tiny_pipeline,
    verify_pin,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ diffusers -> original LDM layout

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], rest) -> dict[str, torch.Tensor]:
    """Each key by its first matching (diffusers, ldm) prefix, the remainder through `rest(prefix, remainder,
    tensor)`; every key must match one."""
    out = {}
    for key, tensor in state.items():
        hf, ldm = next((p for p in prefixes if key.startswith(p[0])), (None, None))
        assert hf is not None, f"no LDM name for {key}"
        name, tensor = rest(hf, key[len(hf):], tensor)
        out[ldm + name] = tensor
    return out


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel's state dict in the LDM layout (input_blocks / middle_block /
    output_blocks), for its own number of levels and layers per block."""
    state, cfg = unet.state_dict(), unet.config
    per, levels = cfg.layers_per_block, len(cfg.block_out_channels)
    prefixes = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
                ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                ("mid_block.resnets.1.", "middle_block.2.")]  # fmt: skip
    for i in range(levels):
        for j in range(per):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (per + 1) + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (per + 1) + j + 1}.1."))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
        for j in range(per + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (per + 1) + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (per + 1) + j}.1."))
        after = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in state) else 1  # after the attention
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{after}."))

    def rest(hf, name, tensor):
        if ".resnets." in hf:
            head, _, tail = name.partition(".")
            name = f"{UNET_RESNET[head]}.{tail}"
        return name, tensor

    return _rename(state, prefixes, rest)


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state dict in the LDM layout (encoder.down.i.block.j, decoder.up.(n-1-i), mid
    attention as 1x1 convolutions)."""
    levels = len(vae.config.block_out_channels)
    prefixes = [(k, k) for k in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                 "quant_conv.", "post_quant_conv.")]  # fmt: skip
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.conv_norm_out.", f"{part}.norm_out."),
                     (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                     (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                     (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]  # fmt: skip
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")]  # fmt: skip

    def rest(hf, name, tensor):
        if ".resnets." in hf:
            name = name.replace("conv_shortcut", "nin_shortcut")
        if ".attentions." in hf:
            head, _, tail = name.rpartition(".")
            name = f"{VAE_ATTENTION[head]}.{tail}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        return name, tensor

    return _rename(vae.state_dict(), prefixes, rest)


def ldm_state_dict(pipe, schedule: bool = True) -> dict[str, torch.Tensor]:
    """The pipeline as an SD v1.x single-file checkpoint: UNet, VAE, CLIP text encoder under their LDM prefixes,
    CLIP's position ids and (with `schedule`) LatentDiffusion's noise-schedule buffers, as the real files hold."""
    out = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(pipe.unet).items()}
    out |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(pipe.vae).items()}
    for key, tensor in pipe.text_encoder.state_dict().items():
        out[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = tensor
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if schedule:
        betas = pipe.scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        out |= {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
                "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float()}  # fmt: skip
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def write_configs(pipe, folder: Path) -> Path:
    """A configs-only folder of the pipeline (what `load_pipeline(file, config=...)` reads)."""
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.scheduler.save_config(folder / "scheduler")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def write_header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A float16 safetensors file with these tensors, all zeros, written sparse (the header and a hole): an SD v1.5
    sized file without its 2 GB of data on disk. Only its header is ever read here."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-v1.safetensors"
    save_file(ldm_state_dict(tiny), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_configs(tiny, tmp_path_factory) -> Path:
    return write_configs(tiny, tmp_path_factory.mktemp("configs") / "tiny")


@pytest.fixture
def tiny_as_default(monkeypatch, tiny_configs):
    """SD v1.5's configs replaced by the tiny ones, as the built-in default (no digest): how the CLIs, which take no
    config folder, load a tiny file."""
    cfg = dataclasses.replace(read_single_file_config(tiny_configs), digest=None, source="SD v1.5's configs")
    monkeypatch.setattr(models, "sd15_single_file_config", lambda: cfg)
    return cfg


def _copy_with(tmp_path: Path, source: Path, name: str, edit) -> Path:
    from safetensors.torch import load_file

    tensors = load_file(str(source))
    edit(tensors)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------------------------- tests


def test_the_inverse_writes_sd15_key_names():
    """The test's LDM layout is the real one: on SD v1.5's architectures it gives the keys diffusers identifies SD
    v1 and SD 2 by (one of them 768 wide), 686 UNet tensors, LDM names of the up-/downsamplers and VAE blocks."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    pipe = models.sd15_architecture_pipeline(dtype=torch.float32, device="meta")
    unet = unet_to_ldm(pipe.unet)
    full = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    assert CHECKPOINT_KEY_NAMES["v1"] in full and len(unet) == 686
    assert full[CHECKPOINT_KEY_NAMES["v2"]].shape == (320, 768)
    assert infer_diffusers_model_type(full) == "v1"
    assert {"output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "input_blocks.3.0.op.weight",
            "middle_block.1.proj_in.weight", "out.2.weight"} <= unet.keys()  # fmt: skip
    vae = vae_to_ldm(pipe.vae)
    assert {"encoder.down.3.block.1.conv2.weight", "decoder.up.0.block.0.nin_shortcut.weight",
            "decoder.up.3.upsample.conv.weight", "encoder.mid.attn_1.q.weight"} <= vae.keys()  # fmt: skip
    assert vae["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_single_file_loads_the_same_pipeline(tiny, tiny_file, tiny_configs):
    """tiny pipeline -> original-layout single file -> load_pipeline(file, config=...): every weight equal, the
    same scheduler config, and the same latents for a fixed seed."""
    pipe = load_pipeline(tiny_file, config=tiny_configs)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(tiny, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), f"{name}.{key}"
            assert ours[key].device.type == "cpu" and ours[key].dtype == torch.float32
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(pipe.scheduler.config) == public(tiny.scheduler.config)
    assert pipe.tokenizer("a red circle").input_ids == tiny.tokenizer("a red circle").input_ids

    def sample(p):
        out = p("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt")
        return out.images

    assert torch.equal(sample(pipe), sample(tiny))


def test_half_precision(tiny_file, tiny_configs):
    pipe = load_pipeline(tiny_file, dtype=torch.float16, config=tiny_configs)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


def test_a_float16_file_loads_as_float32(tiny, tiny_configs, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in ldm_state_dict(tiny).items()}, str(path))
    pipe = load_pipeline(path, config=tiny_configs)
    assert pipe.unet.dtype == torch.float32
    assert torch.equal(pipe.unet.conv_in.weight, tiny.unet.conv_in.weight.half().float())


def test_the_ema_copy_is_not_loaded(tiny, tiny_configs, tmp_path):
    """A model_ema.* copy of the UNet (flattened names, as LDM's LitEma writes them) is left, as diffusers does by
    default: the UNet's own weights load."""
    state = ldm_state_dict(tiny)
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + 1
    state["model_ema.num_updates"] = torch.tensor(7)
    path = tmp_path / "with-ema.safetensors"
    save_file(state, str(path))
    pipe = load_pipeline(path, config=tiny_configs)
    assert torch.equal(pipe.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_the_sd15_configs_are_the_default(tiny_file):
    """Without a config folder the file is checked against SD v1.5's configs: the tiny one does not fit them."""
    for load in (load_pipeline, check_pipeline_folder):
        with pytest.raises(ModelError, match=r"its UNet does not fit SD v1\.5's configs \(give its own configs with "
                                             r"--model-config\): .*tensors missing"):
            load(tiny_file)


def test_an_sd15_shaped_file_passes_the_default_check(tmp_path):
    """A file with SD v1.5's tensors and shapes in the LDM layout (its data a sparse hole: only the header is read)
    fits the built-in configs, UNet, VAE and text encoder; one tensor of another shape does not."""
    pipe = models.sd15_architecture_pipeline(dtype=torch.float32, device="meta")
    shapes = {k: tuple(v.shape) for k, v in ldm_state_dict_meta(pipe).items()}
    check_pipeline_folder(write_header_only(tmp_path / "sd15.safetensors", shapes))
    shapes["first_stage_model.decoder.conv_out.weight"] = (3, 128, 1, 1)
    with pytest.raises(ModelError, match=r"its VAE does not fit SD v1\.5's configs .*: 1 of another shape \(e\.g\. "
                                         r"decoder\.conv_out\.weight \(3, 128, 1, 1\) where \(3, 128, 3, 3\)"):
        check_pipeline_folder(write_header_only(tmp_path / "sd15-bad.safetensors", shapes))


def ldm_state_dict_meta(pipe) -> dict[str, torch.Tensor]:
    """`ldm_state_dict` of a pipeline on the meta device (no clone of data that is not there)."""
    out = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(pipe.unet).items()}
    out |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(pipe.vae).items()}
    out |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    return out


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"v1-5-pruned-emaonly{suffix}"
    path.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelError, match=rf"is a pickle checkpoint \({suffix}\): refused, safetensors only"):
        load_pipeline(path)
    with pytest.raises(ModelError, match="pickle checkpoint"):  # also where it is not there: no unpickling ever
        load_pipeline(tmp_path / f"missing{suffix}")


def test_missing_and_other_files(tmp_path):
    with pytest.raises(ModelError, match="model file .*missing.safetensors does not exist"):
        load_pipeline(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="is a file but not a .safetensors checkpoint"):
        load_pipeline(tmp_path / "notes.txt")


def _zeros(*shape):
    return torch.zeros(shape, dtype=torch.float16)


@pytest.mark.parametrize(
    "tensors, found",
    [
        ({"foo": _zeros(3)}, r"it has no UNet \(model\.diffusion_model\.\*\), no VAE .*, no text encoder .* "
                             r"\(1 tensors, e\.g\. foo\)"),
        ({}, "it holds no tensors"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _zeros(4, 8),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _zeros(8, 4)},
         r"it looks like a LoRA file \(2 tensors, no full model\)"),
        ({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": _zeros(320, 1024),
          "cond_stage_model.model.token_embedding.weight": _zeros(10, 8),
          "first_stage_model.decoder.conv_out.weight": _zeros(3, 8, 3, 3)},
         r"it is a Stable Diffusion 2\.x checkpoint \(OpenCLIP text encoder, cross-attention 1024\)"),
        ({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": _zeros(320, 1024)},
         r"it is a Stable Diffusion 2\.x checkpoint"),
        ({"model.diffusion_model.input_blocks.0.0.weight": _zeros(320, 4, 3, 3),
          "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": _zeros(8),
          "conditioner.embedders.1.model.positional_embedding": _zeros(77, 8)},
         r"it is a Stable Diffusion XL checkpoint \(xl_base\)"),
        ({"model.diffusion_model.input_blocks.0.0.weight": _zeros(320, 9, 3, 3),
          "first_stage_model.decoder.conv_out.weight": _zeros(3, 8, 3, 3),
          "cond_stage_model.transformer.text_model.final_layer_norm.weight": _zeros(8)},
         r"it is an SD v1\.x inpainting checkpoint \(a 9-channel UNet input\)"),
        ({"model.diffusion_model.input_blocks.0.0.weight": _zeros(320, 4, 3, 3)},
         r"it has no VAE \(first_stage_model\.\*\), no text encoder"),
    ],
    ids=["random", "empty", "lora", "sd2", "sd2-unet", "sdxl", "inpainting", "unet-only"],
)
def test_other_checkpoints_are_refused_saying_what_they_are(tmp_path, tensors, found):
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelError, match="is not a Stable Diffusion v1.x checkpoint: " + found):
        load_pipeline(path)


def test_truncated_and_garbled_files_are_refused(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbled": bytes(range(256)) * 64, "header-cut": data[:40],
             "empty": b""}  # fmt: skip
    for name, raw in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(ModelError, match="is not a readable safetensors file"):
            load_pipeline(path)


def test_leftover_and_missing_tensors_are_refused(tiny_file, tiny_configs, tmp_path):
    """No partial loads: a tensor no component takes, one the converter leaves unused, one missing."""
    def extra(t):
        t["model.diffusion_model.extra_head.weight"] = torch.zeros(2)

    def stray(t):
        t["embedding_manager.embedder.weight"] = torch.zeros(2)

    def missing(t):
        del t["first_stage_model.decoder.up.0.block.0.conv1.weight"]

    def clip_missing(t):
        del t["cond_stage_model.transformer.text_model.final_layer_norm.bias"]

    cases = {extra: r"conversion left 1 UNet tensors unused \(e\.g\. model\.diffusion_model\.extra_head\.weight\)",
             stray: r"1 tensors that are no part of .* \(e\.g\. embedding_manager\.embedder\.weight\)",
             missing: r"its VAE does not fit the configs in .*: 1 tensors missing \(e\.g\. "
                      r"decoder\.up_blocks\.1\.resnets\.0\.conv1\.weight\)",
             clip_missing: r"its text encoder does not fit .*: 1 tensors missing \(e\.g\. final_layer_norm\.bias\)"}
    for edit, message in cases.items():
        path = _copy_with(tmp_path, tiny_file, f"{edit.__name__}.safetensors", edit)
        with pytest.raises(ModelError, match=message):
            load_pipeline(path, config=tiny_configs)


def test_another_noise_schedule_is_refused(tiny_file, tiny_configs, tmp_path):
    path = _copy_with(tmp_path, tiny_file, "betas.safetensors", lambda t: t.update(betas=t["betas"] * 1.1))
    with pytest.raises(ModelError, match=r"another noise schedule .* \(its betas differ\)"):
        load_pipeline(path, config=tiny_configs)
    no_schedule = tmp_path / "no-schedule.safetensors"  # files without the buffers load
    save_file(ldm_state_dict(tiny_pipeline(seed=0), schedule=False), str(no_schedule))
    load_pipeline(no_schedule, config=tiny_configs)


def test_a_schedule_stored_in_bfloat16_loads(tiny_file, tiny_configs, tmp_path):
    """bfloat16 rounds the betas by up to 0.4 %: the same schedule, stored in a bfloat16 file, is not another one."""
    path = _copy_with(tmp_path, tiny_file, "bf16.safetensors", lambda t: t.update(betas=t["betas"].bfloat16()))
    load_pipeline(path, config=tiny_configs)
    path = _copy_with(tmp_path, tiny_file, "bf16-other.safetensors",
                      lambda t: t.update(betas=(t["betas"] * 1.05).bfloat16()))
    with pytest.raises(ModelError, match="another noise schedule"):
        load_pipeline(path, config=tiny_configs)


def test_config_folder_errors(tiny_file, tiny_configs, tmp_path):
    with pytest.raises(ModelError, match="config folder .* does not exist"):
        load_pipeline(tiny_file, config=tmp_path / "nope")
    with pytest.raises(ModelError, match="has no unet/config.json"):
        load_pipeline(tiny_file, config=tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not a readable JSON config"):
        load_pipeline(tiny_file, config=tmp_path)
    with pytest.raises(ModelError, match=r"a config folder \(--model-config\) is for a single-file checkpoint"):
        load_pipeline(tiny_configs, config=tiny_configs)


@pytest.mark.parametrize(
    "file, key, message",
    [
        ("text_encoder/config.json", "hidden_size", r"could not read .*text_encoder/config.json: Validation error "
                                                    r"for field 'hidden_size': TypeError: Field 'hidden_size'"),
        ("scheduler/scheduler_config.json", "num_train_timesteps", r"scheduler_config.json does not make a DDIM "
                                                                   r"scheduler: "),
        ("unet/config.json", "block_out_channels", r"the configs in .* do not make a Stable Diffusion pipeline: "),
    ],
    ids=["text-encoder", "scheduler", "unet"],
)
def test_a_wrongly_typed_config_value_is_a_one_line_model_error(tiny_file, tiny_configs, tmp_path, file, key,
                                                                 message):
    """A string where a config wants a number is a ModelError on one line, at the check a server's start and a
    device make: the text encoder's raised huggingface_hub's validation error (no ValueError) and the scheduler's a
    TypeError, which escaped as tracebacks from `sage-edge info` and `sage-edge-server serve`."""
    shutil.copytree(tiny_configs, tmp_path / "configs")
    path = tmp_path / "configs" / file
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: "x"}))
    with pytest.raises(ModelError, match=message) as err:
        check_pipeline_folder(tiny_file, tmp_path / "configs")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400, str(err.value)


def test_fingerprint_and_pin_are_content_based(tiny_file, tiny_configs, tmp_path, tiny_as_default):
    """The pin of a file is the SHA-256 of its bytes, its fingerprint the first 16 digits (with the default configs);
    a copy has the same, one changed byte another; verify_pin checks a file."""
    sha = hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert folder_sha256(tiny_file) == sha and folder_fingerprint(tiny_file) == sha[:16]
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny_file.read_bytes())
    assert model_fingerprint(load_pipeline(copy)) == sha[:16] == model_fingerprint(load_pipeline(tiny_file))
    verify_pin(copy, sha)
    data = bytearray(tiny_file.read_bytes())
    data[-3] ^= 1  # a weight's low bits: still a valid file
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    assert folder_sha256(changed) != sha and model_fingerprint(load_pipeline(changed)) == folder_sha256(changed)[:16]
    with pytest.raises(ModelError, match=f"model file .* does not match its SHA-256 pin: expected {sha}"):
        verify_pin(changed, sha)
    # with an explicit config folder the configs count too: same file, other identity than the default's
    with_configs = model_fingerprint(load_pipeline(tiny_file, config=tiny_configs))
    assert with_configs != sha[:16] and len(with_configs) == 16


def test_server_worker_and_device_load_a_file(tiny_file, tiny_as_default):
    """The server's load_model (with the pin) and the device's DeviceModel take a file where they take a folder."""
    from device_client.client import DeviceModel
    from device_client.config import DeviceConfig
    from edge_server.config import ServerConfig
    from edge_server.worker import load_model

    sha = folder_sha256(tiny_file)
    pipe = load_model(ServerConfig(model=str(tiny_file), model_sha256=sha, dtype="float32"))
    assert model_fingerprint(pipe) == sha[:16]
    with pytest.raises(ModelError, match="does not match its SHA-256 pin"):
        load_model(ServerConfig(model=str(tiny_file), model_sha256="0" * 64, dtype="float32"))
    device = DeviceModel.load(DeviceConfig(model=str(tiny_file), adapter="none"))
    assert device.fingerprint == sha[:16]


def test_server_device_and_clis_load_a_file_into_a_config_folder(tiny_file, tiny_configs, tmp_path):
    """`model_config` / `--model-config`: a file that does not fit SD v1.5's configs loads into a config folder's
    on the server (load_model, its start check), on a device and in `sage-edge info`, with one fingerprint (the
    file's and the configs' digests) on all of them; refused with a built-in model or a folder model, and a bad
    config folder is a one-line error."""
    from typer.testing import CliRunner

    from device_client.client import DeviceModel
    from device_client.config import DeviceConfig
    from edge_server.cli import app as server_app
    from edge_server.config import ConfigError, ServerConfig
    from edge_server.service import preflight_files
    from edge_server.worker import load_model
    from sage_core.cli import app

    expected = model_fingerprint(load_pipeline(tiny_file, config=tiny_configs))
    server = ServerConfig(model=str(tiny_file), model_config=str(tiny_configs), dtype="float32",
                          model_sha256=folder_sha256(tiny_file))  # the pin stays the file's own SHA-256
    preflight_files(server)
    assert model_fingerprint(load_model(server)) == expected
    device = DeviceModel.load(DeviceConfig(model=str(tiny_file), model_config=str(tiny_configs), adapter="none"))
    assert device.fingerprint == expected
    res = CliRunner().invoke(app, ["info", "--model", str(tiny_file), "--model-config", str(tiny_configs)])
    assert res.exit_code == 0 and json.loads(res.stdout)["fingerprint"] == expected, res.output
    res = CliRunner().invoke(server_app, ["model-sha256", str(tiny_file), "--model-config", str(tiny_configs)])
    assert res.exit_code == 0 and res.stdout.strip() == folder_sha256(tiny_file), res.output  # the pin to give
    with pytest.raises(ConfigError, match=r"its UNet does not fit SD v1.5's configs \(give its own configs with "
                                          r"--model-config\)"):
        preflight_files(ServerConfig(model=str(tiny_file)))  # without the configs
    with pytest.raises(ConfigError, match="model_config is for a single-file model; model 'tiny' is built in"):
        ServerConfig(model="tiny", model_config=str(tiny_configs))
    with pytest.raises(ConfigError, match=r"a config folder \(--model-config\) is for a single-file checkpoint"):
        preflight_files(ServerConfig(model=str(tiny_configs), model_config=str(tiny_configs)))
    with pytest.raises(ValueError, match="model_config is for a single-file model, not the tiny model"):
        DeviceConfig(model="tiny", model_config=str(tiny_configs))
    res = _run("sage_core.cli:main", "info", "--model", str(tiny_file), "--model-config", str(tmp_path / "nope"))
    assert res.returncode == 2 and res.stderr.strip() == f"error: config folder {tmp_path / 'nope'} does not exist " \
        "or is not a folder", res


def test_sage_device_finishes_an_image_from_a_file_and_its_configs(tiny_file, tiny_configs, tmp_path):
    """`sage-device generate --model FILE --model-config DIR` (local sampling, no server) writes its image; with a
    model folder the flag is a one-line error (exit 2)."""
    out = tmp_path / "image.png"
    res = _run("device_client.cli:main", "generate", "a red circle", "-o", str(out), "--model", str(tiny_file),
               "--model-config", str(tiny_configs), "--steps", "2")
    assert res.returncode == 0 and out.is_file(), res
    res = _run("device_client.cli:main", "generate", "a red circle", "-o", str(tmp_path / "other.png"), "--model",
               str(tiny_configs), "--model-config", str(tiny_configs))
    assert res.returncode == 2 and "is for a single-file checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_the_demo_serves_a_file_into_its_configs(tiny_file, tiny_configs, tmp_path):
    """`sage-device demo --model FILE --model-config DIR`: the edge server (a real process) and the device clients
    load the file into the same configs, so they agree on its fingerprint and every request ends with an image; the
    demo's input check refuses the file without the configs (it does not fit SD v1.5's)."""
    from device_client import demo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na small red circle\n")
    with pytest.raises(ModelError, match="does not fit SD v1.5's configs"):
        demo.check_inputs(demo.DemoConfig(prompts, tmp_path / "refused", model=str(tiny_file), adapter="none"))
    report = demo.run_demo(prompts, tmp_path / "demo", n_clients=2, model=str(tiny_file),
                           model_config=str(tiny_configs), adapter="none", steps=2, max_wait_ms=1000)
    assert report["counts"] == {"requests": 2, "ok": 2, "lost": 0, "errors": {}}, report["counts"]
    assert report["server"]["exit_code"] == 0


def test_clis_take_a_file(tiny_file, tiny_as_default):
    """`sage-edge info` and `sage-edge-server model-sha256` given a file (in-process: the tiny configs stand in for
    SD v1.5's)."""
    from typer.testing import CliRunner

    from edge_server.cli import app as server_app
    from sage_core.cli import app

    sha = folder_sha256(tiny_file)
    res = CliRunner().invoke(app, ["info", "--model", str(tiny_file)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["fingerprint"] == sha[:16]
    res = CliRunner().invoke(server_app, ["model-sha256", str(tiny_file)])
    assert res.exit_code == 0 and res.stdout.strip() == sha, res.output


def _run(module_app: str, *args: str) -> subprocess.CompletedProcess:
    module, app = module_app.split(":")
    return subprocess.run([sys.executable, "-c", f"from {module} import {app}; {app}()", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip


@pytest.mark.parametrize(
    "cli, args, message",
    [
        ("sage_core.cli:main", ["info", "--model", "{ckpt}"], "is a pickle checkpoint (.ckpt): refused"),
        ("sage_core.cli:main", ["info", "--model", "{random}"], "is not a Stable Diffusion v1.x checkpoint"),
        ("sage_core.cli:main", ["info", "--model", "{tiny}"], "its UNet does not fit SD v1.5's configs"),
        ("edge_server.cli:main", ["model-sha256", "{random}"], "is not a Stable Diffusion v1.x checkpoint"),
    ],
    ids=["sage-edge-pickle", "sage-edge-random", "sage-edge-not-sd15", "sage-edge-server-random"],
)
def test_cli_bad_file_is_one_line_error(tmp_path, tiny_file, cli, args, message):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    save_file({"foo": torch.zeros(3)}, str(tmp_path / "random.safetensors"))
    fill = {"{ckpt}": str(tmp_path / "model.ckpt"), "{random}": str(tmp_path / "random.safetensors"),
            "{tiny}": str(tiny_file)}  # fmt: skip
    res = _run(cli, *[fill.get(a, a) for a in args])
    assert res.returncode == 2, res
    err = res.stderr.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err, err


def test_single_file_config_is_derived_from_the_sd15_constants():
    cfg = models.sd15_single_file_config()
    assert isinstance(cfg, SingleFileConfig) and cfg.digest is None and cfg.tokenizer_dir is None
    assert cfg.unet == models.SD15_UNET and cfg.vae == models.SD15_VAE
    assert cfg.scheduler == models.SD15_SCHEDULER_CONFIG
    assert cfg.text_encoder.hidden_size == 768 and cfg.text_encoder.hidden_act == "quick_gelu"


def test_the_simulator_and_load_tools_take_a_file_and_its_configs(tiny_file, tiny_configs, tmp_path):
    """`sage-sim measure`, `sage-sim validate` and `benchmarks.bench_load` take `--model-config` as the server and
    the devices do: the measured pipeline has the file's fingerprint in those configs, validate's devices and
    server are given them, and a file without them (or configs beside a built-in model) is refused in one line
    before anything runs."""
    import benchmarks.bench_load as bench_load
    from simulation.config import ConfigError, config_from_dict
    from simulation.measure import load_measured_pipeline
    from simulation.validation import device_config, server_args

    expected = model_fingerprint(load_pipeline(tiny_file, config=tiny_configs))
    assert model_fingerprint(load_measured_pipeline(str(tiny_file), str(tiny_configs))) == expected
    with pytest.raises(ConfigError, match="--model-config is for a single-file --model, not the tiny model"):
        load_measured_pipeline("tiny", str(tiny_configs))
    cfg = config_from_dict({})
    device = device_config(cfg, str(tiny_file), str(tiny_configs))
    assert (device.model, device.model_config) == (str(tiny_file), str(tiny_configs))
    args = server_args(cfg, str(tiny_file), str(tiny_configs))
    assert args[args.index("--model-config") + 1] == str(tiny_configs)
    with pytest.raises(ConfigError, match=r"--model .*: .*does not fit SD v1.5's configs"):
        device_config(cfg, str(tiny_file))
    load = bench_load.parse_args(["--model", str(tiny_file), "--model-config", str(tiny_configs)])
    bench_load.check_inputs(load)
    assert bench_load.device_config(load).model_config == str(tiny_configs)
    from device_client.server_process import EdgeServerProcess  # what the demo and bench_load start

    cmd = EdgeServerProcess(str(tiny_file), ["--max-wait-ms", "5"], model_config=str(tiny_configs)).command()
    assert cmd[cmd.index("--model-config") + 1] == str(tiny_configs) and cmd[cmd.index("--model") + 1] == str(tiny_file)
    with pytest.raises(ModelError, match="does not fit SD v1.5's configs"):
        bench_load.check_inputs(bench_load.parse_args(["--model", str(tiny_file)]))


def test_the_simulators_pipeline_embedder_loads_a_file_into_its_configs(tiny_file, tiny_configs, tmp_path):
    """`prompts.model_config` / `sage-sim embed --model-config`: a `pipeline:FILE` embedder loads a file that does
    not fit SD v1.5's configs into a config folder's, embeds as the server's pipeline does, caches under the
    fingerprint the server gives it (so a later run and `sage-sim check` find the cache) and says in one line what
    is wrong without the configs, with a missing config folder, or with configs beside another embedder."""
    import numpy as np
    import yaml
    from typer.testing import CliRunner

    from sage_core.grouping import pipeline_embedder
    from simulation.cli import main as sim_app
    from simulation.config import ConfigError, config_from_dict
    from simulation.workload import cache_file, cached_embeddings, check_embedder, embed_prompts

    prompts = ["a red circle", "a small red circle", "a blue square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    data = {"prompts": {"dataset": str(tmp_path / "prompts.txt"), "embedder": f"pipeline:{tiny_file}",
                        "model_config": str(tiny_configs), "cache_dir": str(tmp_path / "cache")}}
    cfg = config_from_dict(data)
    pipe = load_pipeline(tiny_file, config=tiny_configs)
    assert check_embedder(cfg, prompts) == "available"
    emb = embed_prompts(cfg, prompts)
    np.testing.assert_allclose(emb, pipeline_embedder(pipe)(prompts), rtol=1e-5, atol=1e-6)
    assert cache_file(cfg, f"pipeline-{model_fingerprint(pipe)}", prompts).is_file()
    np.testing.assert_array_equal(cached_embeddings(cfg, prompts), emb)
    assert check_embedder(cfg, prompts) == "cached"

    without = config_from_dict({"prompts": {**data["prompts"], "model_config": ""}})
    assert cached_embeddings(without, prompts) is None  # another fingerprint: SD v1.5's configs
    with pytest.raises(ConfigError, match=r"^prompts.embedder 'pipeline:.*': .*does not fit SD v1.5's configs"):
        check_embedder(without, prompts)
    with pytest.raises(ConfigError, match=r"does not fit SD v1.5's configs"):
        embed_prompts(without, prompts)
    missing = config_from_dict({"prompts": {**data["prompts"], "model_config": str(tmp_path / "nope")}})
    assert cached_embeddings(missing, prompts) is None
    with pytest.raises(ConfigError, match=r"config folder .*nope does not exist"):
        check_embedder(missing, prompts)
    for embedder in ("hashed", "pipeline", "pipeline:tiny"):
        with pytest.raises(ConfigError, match=r"prompts.model_config is for a single-file checkpoint embedder"):
            config_from_dict({"prompts": {**data["prompts"], "embedder": embedder}})

    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({"prompts": {**data["prompts"], "model_config": "",
                                                  "cache_dir": str(tmp_path / "cli-cache")}}))
    res = CliRunner().invoke(sim_app, ["embed", str(config), "--model-config", str(tiny_configs)])
    assert res.exit_code == 0 and "3 embeddings of dimension" in res.output, res.output
    res = CliRunner().invoke(sim_app, ["embed", str(config)])
    assert res.exit_code == 2 and "does not fit SD v1.5's configs" in res.output, res.output
    res = CliRunner().invoke(sim_app, ["embed", str(config), "--embedder", "hashed", "--model-config", "x"])
    assert res.exit_code == 2 and "prompts.model_config is for a single-file" in res.output, res.output
