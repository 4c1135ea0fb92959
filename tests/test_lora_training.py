"""LoRA fine-tuning on tiny pipelines: adapters in diffusers format, shape checks, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sage_core.models import tiny_pipeline
from training.finetune import FinetuneConfig, finetune, load_config
from training.grouped_dataset import GroupedDataset, save_grouped_dataset, world_items
from training.lora import AdapterMismatchError, LoraSettings, add_lora, check_adapter, load_adapter, save_adapter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory) -> Path:
    items = world_items(12, seed=0, split="train")
    groups = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9, 10], [2, 11]]
    path = tmp_path_factory.mktemp("ds") / "groups.json"
    return save_grouped_dataset(GroupedDataset(items, groups, {"source": "test"}), path)


def _cfg(dataset_path: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(dataset=str(dataset_path), out_dir=str(out), steps=4, batch_groups=2, lr=1e-3, checkpoint_every=2,
                log_every=1, progress=False, lora=LoraSettings(rank=2, alpha=2.0))
    return FinetuneConfig(**(base | kw))


def _unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    c = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([400]), encoder_hidden_states=c).sample


@pytest.mark.parametrize("method", ["sage", "standard"])
def test_finetune_writes_a_diffusers_adapter_that_changes_the_unet(dataset_path, tmp_path, method) -> None:
    adapter = finetune(_cfg(dataset_path, tmp_path / method, method=method), pipe=tiny_pipeline(0), log=lambda s: None)
    weights = load_file(str(adapter / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))
                           for k in weights)
    info = json.loads((adapter / "sage_adapter.json").read_text())
    assert info["method"] == method and info["steps_done"] == 4
    log = json.loads((tmp_path / method / "train_log.json").read_text())["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    pipe = tiny_pipeline(0)
    before = _unet_out(pipe)
    pipe.load_lora_weights(str(adapter))  # what the device client does
    after = _unet_out(pipe)
    assert (after - before).abs().max() > 1e-5


EXTRA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")  # docs/training.md §3


def _random_lora(settings: LoraSettings):
    """A tiny pipeline with a LoRA of `settings` whose every matrix is random (non-zero B)."""
    pipe = tiny_pipeline(0)
    gen = torch.Generator().manual_seed(1)
    for p in add_lora(pipe.unet, settings):
        p.data = torch.randn(p.shape, generator=gen) * 0.1
    return pipe


def _lora_by_module(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft state dict of one adapter keyed by '<module>.lora_A' / '.lora_B' (adapter name stripped)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k.removesuffix(".weight"): v.float() for k, v in state.items()}


@pytest.mark.parametrize("loader", ["load_adapter", "load_lora_weights"])
def test_adapter_with_extra_targets_loads_every_trained_layer(tmp_path, loader) -> None:
    settings = LoraSettings(rank=4, alpha=2.0, target_modules=EXTRA_TARGETS)
    trained = _lora_by_module(_random_lora(settings).unet)
    kinds = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trained}
    assert {"to_q", "to_k", "to_v", "0", "proj_in", "proj_out", "2"} <= kinds
    folder = save_adapter(_random_lora(settings).unet, tmp_path / "a", settings, dtype=torch.float32)
    keys = load_file(str(folder / "pytorch_lora_weights.safetensors")).keys()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)  # one convention only
    assert check_adapter(tiny_pipeline(0).unet, folder) == len(trained) // 2
    pipe = tiny_pipeline(0)
    if loader == "load_adapter":
        load_adapter(pipe, folder)
    else:
        pipe.load_lora_weights(str(folder), adapter_name="sage")
    loaded = _lora_by_module(pipe.unet, "sage")
    assert loaded.keys() == trained.keys()
    for k in trained:
        torch.testing.assert_close(loaded[k], trained[k], msg=k)
    # the alpha survives as well: the adapted UNet computes what the trained one did
    source = _random_lora(settings)
    source.unet.eval()
    torch.testing.assert_close(_unet_out(pipe), _unet_out(source), rtol=1e-4, atol=1e-5)


def test_adapter_file_gets_the_umask_mode(tmp_path) -> None:
    import os

    old = os.umask(0o022)
    try:
        folder = save_adapter(_random_lora(LoraSettings(rank=2)).unet, tmp_path / "m", LoraSettings(rank=2))
    finally:
        os.umask(old)
    assert (folder / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777 == 0o644
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_adapter_for_another_base_model_is_refused_clearly(dataset_path, tmp_path) -> None:
    adapter = finetune(_cfg(dataset_path, tmp_path / "a", steps=1), pipe=tiny_pipeline(0), log=lambda s: None)
    other = tiny_pipeline(0, cross_attention_dim=64)  # attn2.to_k / to_v take 64 features, not 32
    with pytest.raises(AdapterMismatchError, match="another base model.*attn2.to_k.*32 -> .*64"):
        load_adapter(other, adapter)
    assert check_adapter(tiny_pipeline(1).unet, adapter) > 0  # same architecture, other weights: fits
    with pytest.raises(AdapterMismatchError, match="no pytorch_lora_weights"):
        check_adapter(other.unet, tmp_path)


def test_interrupted_run_resumes_from_checkpoint_and_matches_uninterrupted(dataset_path, tmp_path) -> None:
    full = finetune(_cfg(dataset_path, tmp_path / "full"), pipe=tiny_pipeline(0), log=lambda s: None)

    def crash(step: int, loss: float) -> None:
        if step == 3:
            raise RuntimeError("power cut")

    cfg = _cfg(dataset_path, tmp_path / "cut")
    with pytest.raises(RuntimeError, match="power cut"):
        finetune(cfg, pipe=tiny_pipeline(0), step_callback=crash, log=lambda s: None)
    assert not (tmp_path / "cut" / "adapter").exists()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    messages: list[str] = []
    steps_run: list[int] = []
    resumed = finetune(cfg, pipe=tiny_pipeline(0), step_callback=lambda s, _: steps_run.append(s), log=messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)
    assert steps_run == [3, 4]
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    log = json.loads((tmp_path / "cut" / "train_log.json").read_text())["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resume_with_another_config_is_refused(dataset_path, tmp_path) -> None:
    finetune(_cfg(dataset_path, tmp_path / "r", steps=2), pipe=tiny_pipeline(0), log=lambda s: None)
    with pytest.raises(ValueError, match="another config.*method"):
        finetune(_cfg(dataset_path, tmp_path / "r", steps=3, method="standard"), pipe=tiny_pipeline(0),
                 log=lambda s: None)


def test_resume_on_a_dataset_rebuilt_at_the_same_path_is_refused(tmp_path) -> None:
    path = tmp_path / "groups.json"
    items = world_items(6, seed=0, split="train")
    save_grouped_dataset(GroupedDataset(items, [[0, 1, 2], [3, 4, 5]], {}), path)
    finetune(_cfg(path, tmp_path / "r", steps=2), pipe=tiny_pipeline(0), log=lambda s: None)
    save_grouped_dataset(GroupedDataset(items, [[0, 1], [2, 3], [4, 5]], {}), path)  # rebuilt: same path, other data
    with pytest.raises(ValueError, match="other data.*dataset sha256.*--no-resume") as err:
        finetune(_cfg(path, tmp_path / "r", steps=3), pipe=tiny_pipeline(0), log=lambda s: None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="other data.*base model fingerprint"):  # base model retrained in place
        finetune(_cfg(path, tmp_path / "r", steps=3), pipe=tiny_pipeline(1), log=lambda s: None)
    messages: list[str] = []
    finetune(_cfg(path, tmp_path / "r", steps=3), pipe=tiny_pipeline(0), resume=False, log=messages.append)
    assert not any("resumed" in m for m in messages)
    finetune(_cfg(path, tmp_path / "r", steps=4), pipe=tiny_pipeline(0), log=messages.append)  # now it matches
    assert any("resumed" in m and "step 3" in m for m in messages)


def test_checkpoint_without_data_fingerprint_is_refused(dataset_path, tmp_path) -> None:
    finetune(_cfg(dataset_path, tmp_path / "old", steps=2), pipe=tiny_pipeline(0), log=lambda s: None)
    ckpt_path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt.pop("identity", None)  # as written before checkpoints recorded what they were trained on
    torch.save(ckpt, ckpt_path)
    with pytest.raises(ValueError, match="no record of its training data.*--no-resume"):
        finetune(_cfg(dataset_path, tmp_path / "old", steps=3), pipe=tiny_pipeline(0), log=lambda s: None)


def test_bad_configs_and_missing_dataset(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        FinetuneConfig(method="dreambooth")
    with pytest.raises(ValueError, match=r"^unknown setting learning_rate \(known: batch_groups,"):
        load_config(None, learning_rate=1e-4)
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    from training.grouped_dataset import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        finetune(FinetuneConfig(dataset=str(tmp_path / "nope.json"), out_dir=str(tmp_path / "o"), progress=False),
                 pipe=tiny_pipeline(0), log=lambda s: None)



def test_bad_config_files_and_thread_counts_are_value_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid YAML") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    bad.write_text("steps: many\n", encoding="utf-8")
    with pytest.raises(ValueError, match="steps must be an integer, got 'many'"):
        load_config(bad)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        FinetuneConfig(num_threads=0)


def _load_any_config(kind: str, path: Path | None, **overrides):
    """training.finetune's or training.replicate's load_config."""
    from training.replicate import load_config as load_replicate_config

    return (load_config if kind == "finetune" else load_replicate_config)(path, **overrides)


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("finetune", "soft_target_grad: 'false'", "soft_target_grad must be true or false, got 'false'"),
        ("finetune", "weighting: min_snr\nsnr_gamma: 0", "snr_gamma must be > 0, got 0.0"),
        ("finetune", "steps: 2.5", "steps must be an integer, got 2.5"),
        ("finetune", "lora: 8", "lora must be a mapping of LoraSettings fields, got 8"),
        ("finetune", "lora: {rank: 2, bogus: 1}", r"^unknown setting lora.bogus \(known: alpha, dropout,"),
        ("finetune", "lora: {target_modules: to_q}", "lora.target_modules must be a list of strings, got 'to_q'"),
        ("finetune", "batch_groups: 2.5", "batch_groups must be an integer, got 2.5"),
        ("finetune", "sampler_steps: 0", "sampler_steps must be >= 1, got 0"),
        ("finetune", "encode_batch_size: 0", "encode_batch_size must be >= 1, got 0"),
        ("finetune", "lr: fast", "lr must be a number, got 'fast'"),
        ("finetune", "grad_clip: -1", "grad_clip must be >= 0, got -1.0"),
        ("replicate", "n_groups: many", "n_groups must be an integer, got 'many'"),
        ("replicate", "shares: 0.3", "shares must be a list of numbers, got 0.3"),
        ("replicate", "fig3_ranges: [0.4, 0.6]",
         r"fig3_ranges\[0\] must be a list of 2 values \(a number, a number\), got 0.4"),
        ("replicate", "shares: [0.3, 1.5]", r"shares and fig3_share must be in \[0, 1\)"),
        ("replicate", "parts: table", "parts must be a list of strings, got 'table'"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_are_refused_by_name(tmp_path, kind, text, message) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        _load_any_config(kind, path)


def test_numeric_strings_are_read_as_floats_and_lists_as_tuples(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nlora: {rank: 4, alpha: 4, target_modules: [to_q, proj_in]}\n", encoding="utf-8")
    cfg = load_config(path)  # PyYAML reads 1e-4 (no dot) as a string
    assert cfg.lr == 1e-4 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora == LoraSettings(rank=4, alpha=4.0, target_modules=("to_q", "proj_in"))
    assert _load_any_config("replicate", None, fig3_ranges=[[0.4, 0.6]]).fig3_ranges == ((0.4, 0.6),)


def test_ctrl_c_inside_a_step_resumes_to_the_uninterrupted_result(dataset_path, tmp_path) -> None:
    full = finetune(_cfg(dataset_path, tmp_path / "full", checkpoint_every=100), pipe=tiny_pipeline(0),
                    log=lambda s: None)
    cfg = _cfg(dataset_path, tmp_path / "cut", checkpoint_every=100)
    pipe = tiny_pipeline(0)
    calls = {"n": 0}

    def ctrl_c(module, args) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # sage: 2 UNet calls per step, so inside step 3, after its random draws
            raise KeyboardInterrupt

    pipe.unet.register_forward_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, pipe=pipe, log=lambda s: None)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = finetune(cfg, pipe=tiny_pipeline(0), log=lambda s: None)
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ctrl_c_during_the_optimizer_update_waits_for_it(dataset_path, tmp_path, monkeypatch) -> None:
    """A SIGINT inside step 3's AdamW update is held until the update and its step count are done: the checkpoint
    is at step 3, not at step 2 with a half-updated LoRA, and resuming gives the uninterrupted result."""
    import os
    import signal

    full = finetune(_cfg(dataset_path, tmp_path / "full", checkpoint_every=100), pipe=tiny_pipeline(0),
                    log=lambda s: None)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def interrupted_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    cfg = _cfg(dataset_path, tmp_path / "cut", checkpoint_every=100)
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, pipe=tiny_pipeline(0), log=lambda s: None)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = finetune(cfg, pipe=tiny_pipeline(0), log=lambda s: None)
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_grad_clip_is_checked_on_resume_and_recorded(dataset_path, tmp_path) -> None:
    adapter = finetune(_cfg(dataset_path, tmp_path / "g", steps=2), pipe=tiny_pipeline(0), log=lambda s: None)
    assert json.loads((adapter / "sage_adapter.json").read_text())["config"]["grad_clip"] == 1.0
    assert json.loads((tmp_path / "g" / "train_log.json").read_text())["config"]["grad_clip"] == 1.0
    with pytest.raises(ValueError, match=r"another config \(grad_clip: 1.0 -> 0.5\)"):
        finetune(_cfg(dataset_path, tmp_path / "g", steps=3, grad_clip=0.5), pipe=tiny_pipeline(0),
                 log=lambda s: None)
    with pytest.raises(ValueError, match=r"another config \(lr: 0.001 -> 0.002; seed: 0 -> 1\)"):
        finetune(_cfg(dataset_path, tmp_path / "g", steps=3, lr=2e-3, seed=1), pipe=tiny_pipeline(0),
                 log=lambda s: None)


def test_resume_accepts_the_same_dataset_under_another_path(dataset_path, tmp_path, monkeypatch) -> None:
    finetune(_cfg(dataset_path, tmp_path / "p", steps=2), pipe=tiny_pipeline(0), log=lambda s: None)
    monkeypatch.chdir(dataset_path.parent)
    messages: list[str] = []
    finetune(_cfg(Path(dataset_path.name), tmp_path / "p", steps=3), pipe=tiny_pipeline(0), log=messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)


def test_steps_below_the_steps_done_are_refused_without_touching_the_adapter(dataset_path, tmp_path) -> None:
    adapter = finetune(_cfg(dataset_path, tmp_path / "s", steps=3), pipe=tiny_pipeline(0), log=lambda s: None)
    before = (adapter / "sage_adapter.json").read_bytes(), (adapter / "pytorch_lora_weights.safetensors").read_bytes()
    with pytest.raises(ValueError, match="at step 3, past steps 2; ask for steps >= 3"):
        finetune(_cfg(dataset_path, tmp_path / "s", steps=2), pipe=tiny_pipeline(0), log=lambda s: None)
    after = (adapter / "sage_adapter.json").read_bytes(), (adapter / "pytorch_lora_weights.safetensors").read_bytes()
    assert after == before


def test_replicate_rows_and_vae_encoding_show_progress(capsys) -> None:
    from training import world
    from training.finetune import encode_latents
    from training.replicate import EvalSet, ReplicateConfig, generate_row

    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    examples = world.make_examples(5, 0, "heldout")
    es = EvalSet("t", examples, [[0, 1], [2, 3, 4]], (0.6, 0.9), 2)
    cfg = ReplicateConfig(steps=2, fig4_shared_steps=(1,), chunk_groups=1)
    generate_row(pipe, es, 1, False, cfg)
    assert "t k=1" in capsys.readouterr().err  # the row's bar over its images
    encode_latents(pipe, np.zeros((3, 32, 32, 3), np.uint8), batch_size=2, progress=True)
    assert "VAE encoding" in capsys.readouterr().err
