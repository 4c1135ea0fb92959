"""The default-model training script (a few CPU steps of a tiny config) and the shipped default model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sage_core.models import DEFAULT_MODEL_DIR, SD15_SCHEDULER_CONFIG, load_pipeline
from training import default_model as dm
from training import world

TINY = {
    "n_train_scenes": 48,
    "sample_every_minutes": 0,
    "checkpoint_minutes": 100,
    "log_every": 1,
    "scaling_samples": 48,
    "encode_batch_size": 16,
    "vae": {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "steps": 2, "batch_size": 4, "crop_size": 32,
            "full_every": 2},
    "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "unet": {"block_out_channels": [16, 32], "cross_attention_levels": [False, True], "norm_num_groups": 8,
             "attention_head_dim": 4},
    "diffusion": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
}


def _tiny_config(tmp_path: Path, **extra) -> dm.DefaultModelConfig:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY | {"work_dir": str(tmp_path / "work"), "output_dir": str(tmp_path / "out")}))
    return dm.load_config(path, **extra)


def test_training_script_runs_a_few_cpu_steps_and_saves_a_loadable_sd_pipeline(tmp_path):
    cfg = _tiny_config(tmp_path)
    logs: list[str] = []
    out = dm.train_default_model(cfg, log=logs.append)
    assert any("vae: done at step 2" in m for m in logs) and any("unet: done at step 2" in m for m in logs)
    pipe = load_pipeline(out)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    for key, value in SD15_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.text_encoder.config.max_position_embeddings == 77
    # the VAE's scaling factor is the measured 1/std of latents, not diffusers' default
    assert pipe.vae.config.scaling_factor != 0.18215 and pipe.vae.config.scaling_factor > 0
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    img = pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
    # resuming continues from the checkpoint instead of starting over
    cfg2 = _tiny_config(tmp_path, **{"diffusion.steps": 3, "stages": ["unet"]})
    logs.clear()
    dm.train_default_model(cfg2, log=logs.append)
    assert any("resumed at step 2" in m for m in logs) and any("unet: done at step 3" in m for m in logs)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown setting bogus \(known: checkpoint_minutes,"):
        _tiny_config(tmp_path, bogus=1)
    with pytest.raises(ValueError, match="same length"):
        _tiny_config(tmp_path, **{"unet.cross_attention_levels": [True]})
    with pytest.raises(ValueError, match="stages"):
        _tiny_config(tmp_path, stages=["vae", "lora"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"vae.bogus": 1}, r"^unknown setting vae.bogus \(known: batch_size,"),
        ({"vae.lr": "fast"}, r"^vae.lr must be a number, got 'fast'$"),
        ({"unet.layers_per_block": 1.5}, r"^unet.layers_per_block must be an integer, got 1.5$"),
        ({"text": 3}, r"^text must be a mapping of TextConfig fields, got 3$"),
    ],
)
def test_config_errors_name_the_key_by_its_dotted_path(tmp_path, extra, message):
    """The default-model config had its own reader: an unknown key was named by its class ('unknown VaeConfig
    keys'), and a value of the wrong type (vae.lr: fast) passed unchecked into the run."""
    with pytest.raises(ValueError, match=message):
        _tiny_config(tmp_path, **extra)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["default-model", "--config", "{tmp}/none.yaml"], "config file {tmp}/none.yaml does not exist"),
        (["default-model", "--config", "{tmp}/bad.yaml"], "is not valid YAML"),
        (["evaluate-default", "--n", "0", "--out", "{tmp}/e"], "n must be at least 10"),
        (["finetune", "--config", "{tmp}/bad.yaml"], "is not valid YAML"),
        (["finetune", "--num-threads", "0"], "num_threads must be >= 1"),
        (["replicate", "--num-threads", "0"], "num_threads must be >= 1"),
        (["groups", "--embedder", "tfidf", "--num-threads", "0"], "--num-threads must be >= 1"),
        (["groups", "--embedder", "tfidf", "--n", "20", "--out", "{tmp}"], "is a folder; give a file"),
    ],
)
def test_sage_train_bad_input_is_a_one_line_error(tmp_path, args, message):
    from typer.testing import CliRunner

    from training.cli import app

    (tmp_path / "bad.yaml").write_text("steps: [1\n", encoding="utf-8")
    res = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and message.format(tmp=tmp_path) in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_shipped_configs_load():
    root = Path(dm.__file__).parent / "configs"
    for name in ("default_model.yaml", "default_model_cpu.yaml", "default_model_finetune.yaml"):
        cfg = dm.load_config(root / name)
        assert cfg.unet.block_out_channels and cfg.text.hidden_size == 128
    assert dm.load_config(root / "default_model.yaml").device == "cuda"
    # the fine-tune config continues the shipped model: its architecture matches that folder's
    ft = dm.load_config(root / "default_model_finetune.yaml")
    assert ft.stages == ("unet",) and ft.train_kind_weights == (0.3, 0.1, 0.6)
    assert (Path(dm.__file__).parents[1] / ft.diffusion.init_from).resolve() == DEFAULT_MODEL_DIR.resolve()
    ft.diffusion.init_from = str(DEFAULT_MODEL_DIR)
    assert dm.init_pipeline_dir(ft) == DEFAULT_MODEL_DIR


def test_lr_schedule_and_min_snr():
    assert dm.lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert dm.lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert dm.lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert dm.lr_factor(20, 100, 10, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    sched = dm.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012)
    w = dm.min_snr_weights(sched, torch.tensor([0, 500, 999]), 5.0)
    assert w[0] < 1e-2 and w[-1] == pytest.approx(1.0)


def test_shipped_default_model_is_an_sd15_class_pipeline_under_64mb():
    if not (DEFAULT_MODEL_DIR / "model_index.json").exists():
        pytest.fail(f"the default model is missing at {DEFAULT_MODEL_DIR}")
    assert dm.pipeline_megabytes(DEFAULT_MODEL_DIR) <= 64
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for comp in ("unet", "vae", "text_encoder"):
        files = list((DEFAULT_MODEL_DIR / comp).glob("*.safetensors"))
        assert len(files) == 1 and "fp16" not in files[0].name
        with safe_open(str(files[0]), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in list(f.keys())[:5])
    pipe = load_pipeline()
    assert pipe.vae.config.scaling_factor != 0.18215
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    img = pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 64, 64, 3) and np.isfinite(img).all()


def test_parallel_rendering_gives_the_same_scenes_and_worker_batches_are_well_formed(tmp_path):
    serial = dm.render_training_data(_tiny_config(tmp_path), chunk=10)
    parallel = dm.render_training_data(_tiny_config(tmp_path, data_workers=2), chunk=10)
    assert torch.equal(serial.images, parallel.images) and len(parallel.examples) == 48
    assert [e.caption for e in serial.examples] == [e.caption for e in parallel.examples]
    tok = dm.build_clip_tokenizer()
    batches = dm.CaptionBatches(serial.examples, tok, batch_size=8, dropout=0.5, seed=0)
    for workers in (0, 2):
        loader = dm.caption_loader(batches, workers, pin=False)
        seen = [next(loader) for _ in range(6)]
        for idx, ids in seen:
            assert idx.shape == (8,) and ids.shape == (8, 77) and int(idx.max()) < 48
            assert (ids[:, 0] == 49406).all()  # every caption starts with BOS, dropped ones too
        empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        dropped = sum(int(torch.equal(row, empty)) for _, ids in seen for row in ids)
        assert 0 < dropped < 48  # caption dropout near one half, not all or nothing


def test_train_kind_weights_change_the_training_mix_only(tmp_path):
    pairs = dm.render_training_data(_tiny_config(tmp_path, train_kind_weights=[0, 0, 2]))
    assert {e.scene.kind for e in pairs.examples} == {"pair"} and len(pairs.examples) == 48
    mixed = dm.render_training_data(_tiny_config(tmp_path))
    assert {e.scene.kind for e in mixed.examples} == {"single", "count", "pair"}
    # unset weights draw exactly the world's own mix, so existing splits (held-out, judges) stay as they were
    default = world.make_examples(600, 0, "heldout")
    assert [e.caption for e in default] == [e.caption for e in world.make_examples(600, 0, "heldout",
                                                                                    kind_weights=world.KIND_WEIGHTS)]
    share = np.mean([e.scene.kind == "pair" for e in world.make_examples(600, 0, "train", kind_weights=(3, 1, 6))])
    assert 0.5 < share < 0.7 and 0.2 < np.mean([e.scene.kind == "pair" for e in default]) < 0.4
    for bad in ([1, 2], [-1, 1, 1], [0, 0, 0], "abc"):
        with pytest.raises(ValueError, match="train_kind_weights"):
            _tiny_config(tmp_path, train_kind_weights=bad)


def _tiny_pipeline_folder(tmp_path: Path, scaling_factor: float = 0.5) -> Path:
    """A random pipeline of the TINY architecture saved like a trained one (fp16)."""
    cfg = _tiny_config(tmp_path)
    torch.manual_seed(3)
    vae = dm.build_vae(cfg)
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = dm.build_pipeline(vae, dm.build_text_encoder(cfg), dm.build_unet(cfg), dm.build_clip_tokenizer())
    return dm.save_pipeline(pipe, tmp_path / "init")


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_init_from_continues_a_pipeline_and_a_checkpoint_wins_on_resume(tmp_path):
    init = _tiny_pipeline_folder(tmp_path)
    start = {"stages": ["unet"], "diffusion.init_from": str(init), "diffusion.steps": 0}
    logs: list[str] = []
    out = dm.train_default_model(_tiny_config(tmp_path, **start), log=logs.append)
    assert any("starting from" in m for m in logs) and not any("vae: done" in m for m in logs)
    assert not (tmp_path / "work" / "vae_final").exists()  # no VAE stage: the VAE is init_from's
    before, saved = _unet_weights(init), _unet_weights(out)
    assert before.keys() == saved.keys() and all(torch.equal(before[k], saved[k]) for k in before)
    logs.clear()
    out = dm.train_default_model(_tiny_config(tmp_path, **start | {"diffusion.steps": 2}), log=logs.append)
    assert any("resumed at step 0" in m for m in logs) and any("unet: done at step 2" in m for m in logs)
    assert not any("starting from" in m for m in logs)
    after = _unet_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pipe = load_pipeline(out)
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.vae.config.block_out_channels == [8, 16, 16]


def test_a_resumed_run_with_more_steps_goes_on_from_the_learning_rate_it_reached(tmp_path):
    """Resuming with another diffusion.steps put the rate on the new total's cosine at once: 3 steps done of 3 (the
    last at 0.55 x lr), then 6 steps: the 4th ran at 0.69 x lr, up again. Now the rate decays on from the 0.55 it
    reached to the final fraction at the new total (the data draws follow the step reached, not the total)."""
    init = _tiny_pipeline_folder(tmp_path)
    start = {"stages": ["unet"], "diffusion.init_from": str(init), "diffusion.steps": 3}
    logs: list[str] = []
    dm.train_default_model(_tiny_config(tmp_path, **start), log=logs.append)
    dm.train_default_model(_tiny_config(tmp_path, **start | {"diffusion.steps": 6}), log=logs.append)
    assert any("resuming with another step count (diffusion.steps: 3 -> 6)" in m for m in logs), logs
    rates = [float(re.search(r" lr (\S+) ", m).group(1)) / 5e-4 for m in logs if m.startswith("unet step ")]
    assert rates == pytest.approx([1.0, 1.0, 0.55, 0.55, 0.4375, 0.2125], abs=0.005)
    assert dm.lr_factor(5, 6, 1, 0.1, anchor=(3, 0.55, 0.0)) == pytest.approx(0.2125)


@pytest.mark.parametrize(
    ("first", "second", "rates"),
    [  # the step count extended under a 10-minute limit: the 4th step ran at 0.46 (time 3/10 of the stage), down
        ({"diffusion.steps": 3}, {"diffusion.steps": 6}, [1.0, 0.978, 0.55, 0.55, 0.4375, 0.2125]),
        # the time limit raised once reached (3 -> 6 minutes): the 4th step ran at 0.41 (steps 3/5), up
        ({"diffusion.max_minutes": 3}, {"diffusion.max_minutes": 6}, [1.0, 0.775, 0.325, 0.325, 0.26875, 0.15625]),
    ],
)
def test_a_resumed_time_limited_run_goes_on_from_the_learning_rate_it_reached(tmp_path, monkeypatch, first, second,
                                                                             rates):
    """With diffusion.max_minutes set, time progress was measured over the whole stage: resumed with more steps
    (a new anchor) the rate stepped down at once to the curve's point for the time already used, and resumed
    with a raised limit it jumped up. Now time progress, as step progress, counts from where the run resumed, so
    the rate goes on from the one reached. A fake clock moves a minute per training step."""
    clock = [0.0]

    class Watch:
        def __init__(self, already: float = 0.0) -> None:
            self.start = clock[0] - already

        def seconds(self) -> float:
            return clock[0] - self.start

    def ticking(*args: object) -> torch.Tensor:  # min_snr_weights runs once a step, after the rate is set
        clock[0] += 60
        return real(*args)

    real = dm.min_snr_weights
    monkeypatch.setattr(dm, "Stopwatch", Watch)
    monkeypatch.setattr(dm, "min_snr_weights", ticking)
    start = {"stages": ["unet"], "diffusion.init_from": str(_tiny_pipeline_folder(tmp_path)), "diffusion.steps": 6,
             "diffusion.max_minutes": 10} | first
    logs: list[str] = []
    dm.train_default_model(_tiny_config(tmp_path, **start), log=logs.append)
    dm.train_default_model(_tiny_config(tmp_path, **start | second), log=logs.append)
    assert any("unet: resumed at step 3" in m for m in logs), logs
    if "diffusion.max_minutes" in second:
        assert any("another time limit (max_minutes: 3 -> 6)" in m for m in logs), logs
    got = [float(re.search(r" lr (\S+) ", m).group(1)) / 5e-4 for m in logs if m.startswith("unet step ")]
    assert got == pytest.approx(rates, abs=0.005)
    # a checkpoint from before the time was anchored, (step, factor) only, resumes as it did: time counted from 0
    old = {"step": 5, "seconds": 240.0, "lr_anchor": [3, 0.55]}
    assert dm.resumed_anchor(old, {}, 5e-4, 6, 1, "diffusion.steps", 10.0) == (3, 0.55, 0.0)


def test_init_from_errors_are_clear(tmp_path):
    init = _tiny_pipeline_folder(tmp_path)
    with pytest.raises(ValueError, match="not a pipeline folder"):
        dm.train_default_model(_tiny_config(tmp_path, stages=["unet"], **{"diffusion.init_from": str(tmp_path)}))
    # same parameter shapes, other attention heads: still another architecture
    other = _tiny_config(tmp_path, stages=["unet"], **{"diffusion.init_from": str(init), "unet.attention_head_dim": 8})
    with pytest.raises(ValueError, match="unet in .* another architecture .*attention_head_dim: config 8 vs folder 4"):
        dm.init_pipeline_dir(other)
    with pytest.raises(ValueError, match="unet stage only"):
        _tiny_config(tmp_path, **{"diffusion.init_from": str(init)})
