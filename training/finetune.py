"""LoRA fine-tuning of a pipeline's UNet on a grouped dataset: SAGE (Algorithm 2, L_SAGE) or standard.

One typed `FinetuneConfig` per run. Each step draws `batch_groups` groups of the grouped dataset (the paper:
batch 4, AdamW, constant lr 1e-4) and takes one AdamW step on
  method "sage":      L_SAGE (training/losses.py): one shared noise per group, t_s ~ U{t*..T-1}, t_b ~ U{0..t*}
  method "standard":  the plain noise-prediction loss on every member of the same groups (own noise, t ~ U{0..T-1})
so both methods see the same captions and images in the same order for the same number of steps.

Only the LoRA parameters train; the VAE and text encoder are frozen (images are encoded once, captions per step).
`out_dir` holds `checkpoint.pt` (LoRA, AdamW, RNG states, step, loss log; written atomically every
`checkpoint_every` steps, on Ctrl-C (as of the last completed step, with the RNG states from before the
interrupted step's draws) and at the end), `train_log.json`, and `adapter/` (diffusers LoRA format, written at the
end). Running again with the same config resumes from the checkpoint and finishes the same steps; a checkpoint of
other settings (`RESUME_KEYS`, the differing values named), trained on other data (the dataset file's SHA-256,
whatever path names it) or another base model (its fingerprint), or already past `steps`, is refused.

One command: `sage-train finetune --config training/configs/sage_finetune_default_cpu.yaml` (or `_h100.yaml`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sage_core.config_files import read_mapping
from sage_core.config_types import check_at_least, check_fields, differences, from_mapping
from sage_core.models import model_fingerprint
from training.grouped_dataset import GroupedDataset, load_grouped_dataset
from training.lora import LoraSettings, add_lora, lora_state_dict, save_adapter, set_lora_state_dict
from training.losses import GroupBatch, SageLossConfig, branch_timestep, sage_loss, standard_loss
from training.run_checks import check_device, writable_dir

METHODS = ("sage", "standard")
CHECKPOINT = "checkpoint.pt"
# fields that must match for a checkpoint to be resumed (others, e.g. steps or device, may change); the dataset is
# checked by its content (RunIdentity), not by the path that names it
RESUME_KEYS = ("method", "model", "batch_groups", "lr", "weight_decay", "grad_clip", "seed", "share",
               "sampler_steps", "loss", "lora")
LOSS_KEYS = ("lambda1", "lambda2", "weighting", "snr_gamma", "soft_target_grad")


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs."""

    dataset: str = "runs/sage/world_groups_train.json"
    out_dir: str = "runs/sage/sage_ft"
    model: str | None = None  # pipeline folder; None: the shipped default model
    method: str = "sage"
    steps: int = 2000
    batch_groups: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # 0: off
    seed: int = 0
    share: float = 0.3  # beta the run is trained for: sets t* (paper: beta = 30 %)
    sampler_steps: int = 30  # T of the DDIM sampler the adapter will run under
    lambda1: float = 1.0
    lambda2: float = 1.0
    weighting: str = "constant"
    snr_gamma: float = 5.0
    soft_target_grad: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    checkpoint_every: int = 100
    log_every: int = 10
    max_minutes: float = 0.0  # 0: no limit; otherwise stop (with a checkpoint) after this long
    device: str = "cpu"
    num_threads: int = 1
    bf16_autocast: bool = True  # on CUDA only
    encode_batch_size: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.steps < 1 or self.batch_groups < 1:
            raise ValueError(f"steps and batch_groups must be >= 1, got {self.steps}, {self.batch_groups}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"share must be in [0, 1), got {self.share}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        check_at_least(self, 1, "sampler_steps", "encode_batch_size")
        check_at_least(self, 0, "weight_decay", "grad_clip", "max_minutes")
        SageLossConfig(**self.loss_knobs())  # the loss knobs' ranges, checked now rather than after loading a model

    def loss_knobs(self) -> dict[str, Any]:
        """The fields of Eq. 3 this config sets (t* comes from the pipeline's schedule)."""
        return {k: getattr(self, k) for k in LOSS_KEYS}

    def loss_config(self, scheduler_config: dict) -> SageLossConfig:
        """The L_SAGE knobs, with t* from the sampler schedule of this pipeline."""
        return SageLossConfig(
            branch_t=branch_timestep(scheduler_config, self.sampler_steps, self.share),
            num_train_timesteps=int(scheduler_config["num_train_timesteps"]),
            **self.loss_knobs(),
        )


def load_config(path: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
    """A FinetuneConfig from YAML/JSON (unknown keys are an error), with non-None overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_mapping(path)
    data |= {k: v for k, v in overrides.items() if v is not None}
    return from_mapping(FinetuneConfig, data)


# ----------------------------------------------------------------------------------------------- data
def model_resolution(pipe) -> int:
    """Image side the pipeline generates (UNet sample size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def item_images(dataset: GroupedDataset, ids: list[int], size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] images of the items: world renders or files; COCO items are text-only."""
    from PIL import Image

    out = []
    for i in ids:
        ref = dataset.items[i]["image"]
        if "world" in ref:
            from training import world

            w = ref["world"]
            img = world.render_scene(world.make_example(int(w["seed"]), str(w["split"]), int(w["index"])).scene)
        elif "path" in ref:
            img = np.asarray(Image.open(ref["path"]).convert("RGB"))
        else:
            raise ValueError(f"item {i} has no image (COCO captions here are text-only); SAGE training needs images")
        if img.shape[0] != size or img.shape[1] != size:
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
        out.append(img)
    return np.stack(out)


@torch.no_grad()
def encode_latents(pipe, images: np.ndarray, batch_size: int, progress: bool = False) -> torch.Tensor:
    """VAE posterior means x scaling_factor, float32 on CPU: [n, C, h, w] (a tqdm bar when `progress`)."""
    vae, dev = pipe.vae, pipe.vae.device
    chunks = []
    for lo in tqdm(range(0, len(images), batch_size), desc="VAE encoding", unit="batch", disable=not progress):
        x = torch.from_numpy(images[lo : lo + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        post = vae.encode(x.to(dev, vae.dtype)).latent_dist
        chunks.append((post.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(chunks)


@dataclass
class TrainData:
    """Everything a step draws from: groups, their items' latents and token ids."""

    groups: list[list[int]]
    latents: torch.Tensor  # [items used, C, h, w]
    token_ids: torch.Tensor  # [items used, 77]
    row_of: dict[int, int]  # item id -> row in latents / token_ids


def dataset_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of the dataset file's bytes. It covers world items (rendered from the seeds the file names),
    not the bytes of image files that items name by path."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class RunIdentity:
    """What a run trains on, by content rather than by path: stored with every checkpoint and checked on resume."""

    dataset_sha256: str
    base_model_fingerprint: str

    @classmethod
    def of(cls, cfg: FinetuneConfig, pipe) -> RunIdentity:
        """The identity of `cfg.dataset` as it is now and of `pipe` (call before LoRA layers are added)."""
        return cls(dataset_fingerprint(cfg.dataset), model_fingerprint(pipe))


def prepare_data(pipe, cfg: FinetuneConfig, dataset: GroupedDataset, identity: RunIdentity,
                 log: Callable[[str], None]) -> TrainData:
    """Encode every used item's image once (cached in out_dir by dataset file and model) and tokenize captions."""
    used = sorted({i for g in dataset.groups for i in g})
    row_of = {item: r for r, item in enumerate(used)}
    ids = pipe.tokenizer([dataset.items[i]["caption"] for i in used], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    key = f"{identity.dataset_sha256[:16]}_{identity.base_model_fingerprint}"
    cache = Path(cfg.out_dir) / f"latents_{key}.pt"
    if cache.is_file():
        latents = torch.load(cache, weights_only=True)
    else:
        log(f"encoding {len(used)} images with the VAE")
        latents = encode_latents(pipe, item_images(dataset, used, model_resolution(pipe)), cfg.encode_batch_size,
                                 cfg.progress)
        _atomic_save(latents, cache)
    return TrainData(dataset.groups, latents, ids, row_of)


def make_batch(pipe, data: TrainData, group_ids: list[int], device: torch.device) -> GroupBatch:
    """Member latents, text embeddings (frozen encoder) and group index of the chosen groups."""
    rows = [data.row_of[i] for g in group_ids for i in data.groups[g]]
    index = [k for k, g in enumerate(group_ids) for _ in data.groups[g]]
    with torch.no_grad():
        cond = pipe.text_encoder(data.token_ids[rows].to(device))[0]
    return GroupBatch(data.latents[rows].to(device), cond.float(), torch.tensor(index, device=device))


# ----------------------------------------------------------------------------------------------- checkpoints
def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume_signature(cfg: FinetuneConfig) -> dict[str, Any]:
    """The config fields a checkpoint must agree on."""
    d = asdict(cfg)
    d["loss"] = cfg.loss_knobs()
    d["lora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["lora"].items()}
    return {k: d[k] for k in RESUME_KEYS}


@dataclass
class TrainState:
    """What a checkpoint restores."""

    step: int
    log: list[dict[str, float]]
    elapsed_s: float


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block ends, then raise KeyboardInterrupt, so
    an optimizer update and the step count that records it happen together or not at all. Off the main thread
    (where signal handlers cannot be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def rng_states(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The generators' states now (what a checkpoint stores, and what an interrupted step started from)."""
    return {k: g.get_state() for k, g in gens.items()}


def save_checkpoint(path: Path, cfg: FinetuneConfig, identity: RunIdentity, unet, optim,
                    rng: dict[str, torch.Tensor], state: TrainState) -> None:
    """LoRA tensors, AdamW state, RNG states, step, loss log and the run's identity, atomically."""
    _atomic_save({
        "step": state.step,
        "lora": lora_state_dict(unet),
        "optimizer": optim.state_dict(),
        "generators": rng,
        "signature": json.dumps(resume_signature(cfg), sort_keys=True),
        "identity": asdict(identity),
        "log": state.log,
        "elapsed_s": state.elapsed_s,
    }, path)


def check_identity(path: Path, stored: dict[str, str] | None, identity: RunIdentity) -> None:
    """Refuse to resume a checkpoint trained on other data or another base model. Rule for checkpoints written
    before identities were stored (no "identity" entry): refused as well, since their data cannot be checked and
    an equal path proves nothing; such a run has to start over."""
    start_over = "delete the checkpoint, use a new out_dir or pass --no-resume to start over"
    if stored is None:
        raise ValueError(f"checkpoint {path} has no record of its training data (an older version wrote it), so "
                         f"resuming could mix data; {start_over}")
    diff = [f"{k.replace('_', ' ')} {str(stored.get(k))[:12]} -> {v[:12]}" for k, v in asdict(identity).items()
            if stored.get(k) != v]
    if diff:
        raise ValueError(f"checkpoint {path} was trained on other data or another base model than the config names "
                         f"now ({'; '.join(diff)}); {start_over}")


def check_signature(path: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse a checkpoint whose stored settings differ from the config's in any of RESUME_KEYS, naming each
    differing field with the checkpoint's and the config's value (a field an older checkpoint did not record shows
    as 'not recorded')."""
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as stored
    diff = differences(stored, wanted)
    if diff:
        raise ValueError(f"checkpoint {path} was made with another config ({'; '.join(diff)}); use a new out_dir, "
                         "delete the checkpoint or pass --no-resume")


def load_checkpoint(path: Path, cfg: FinetuneConfig, identity: RunIdentity, unet, optim,
                    gens: dict[str, torch.Generator]) -> TrainState:
    """Restore a checkpoint written by `save_checkpoint` for the same config, dataset contents and base model."""
    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    check_signature(path, json.loads(ckpt.get("signature") or "{}"), resume_signature(cfg))
    check_identity(path, ckpt.get("identity"), identity)
    set_lora_state_dict(unet, ckpt["lora"])
    optim.load_state_dict(ckpt["optimizer"])
    for k, g in gens.items():
        g.set_state(ckpt["generators"][k])
    return TrainState(int(ckpt["step"]), list(ckpt["log"]), float(ckpt["elapsed_s"]))


# ----------------------------------------------------------------------------------------------- training
def load_base(cfg: FinetuneConfig):
    """The base pipeline in float32 on the configured device."""
    from sage_core.models import load_pipeline

    return load_pipeline(cfg.model, device=cfg.device)


def train_step(pipe, data: TrainData, cfg: FinetuneConfig, loss_cfg: SageLossConfig, gens: dict[str, torch.Generator],
               alphas: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Draw groups and noises, return the loss of the configured method."""
    group_ids = torch.randint(0, len(data.groups), (cfg.batch_groups,), generator=gens["data"]).tolist()
    batch = make_batch(pipe, data, group_ids, device)
    shape = batch.latents.shape[1:]
    if cfg.method == "sage":
        noise = torch.randn((batch.num_groups, *shape), generator=gens["noise"]).to(device)
        t_s = torch.randint(loss_cfg.branch_t, loss_cfg.num_train_timesteps, (batch.num_groups,),
                            generator=gens["noise"]).to(device)
        t_b = torch.randint(0, loss_cfg.branch_t + 1, (batch.num_groups,), generator=gens["noise"]).to(device)
        return sage_loss(pipe.unet, alphas, batch, loss_cfg, noise, t_s, t_b)
    m = batch.latents.shape[0]
    noise = torch.randn((m, *shape), generator=gens["noise"]).to(device)
    t = torch.randint(0, loss_cfg.num_train_timesteps, (m,), generator=gens["noise"]).to(device)
    return standard_loss(pipe.unet, alphas, batch, loss_cfg, noise, t)


def finetune(
    cfg: FinetuneConfig,
    pipe=None,
    resume: bool = True,
    step_callback: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or resume) a fine-tuning run; returns the adapter folder. `pipe` overrides loading `cfg.model`
    (tests pass tiny pipelines); `step_callback(step, loss)` runs after every completed step."""
    # 1. set-up: threads, model, LoRA, data, optimizer
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.num_threads)
    dataset = load_grouped_dataset(cfg.dataset)  # fail fast, before loading a model
    if pipe is None:
        check_device(cfg.device)
    out = writable_dir(cfg.out_dir)
    pipe = pipe if pipe is not None else load_base(cfg)
    device = pipe.unet.device
    identity = RunIdentity.of(cfg, pipe)
    params = add_lora(pipe.unet, cfg.lora)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # constant lr, as the paper
    gens = {"data": torch.Generator().manual_seed(cfg.seed), "noise": torch.Generator().manual_seed(cfg.seed + 1)}
    # 2. resume (before encoding the images: a refused checkpoint costs nothing)
    ckpt_path = out / CHECKPOINT
    state = TrainState(0, [], 0.0)
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, cfg, identity, pipe.unet, optim, gens)
        if state.step > cfg.steps:
            raise ValueError(f"checkpoint {ckpt_path} is at step {state.step}, past steps {cfg.steps}; ask for "
                             f"steps >= {state.step} to finish it, or start over with --no-resume or a new out_dir")
        log(f"resumed {ckpt_path} at step {state.step}")
    data = prepare_data(pipe, cfg, dataset, identity, log)
    loss_cfg = cfg.loss_config(dict(pipe.scheduler.config))
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    # 3. the loop
    pipe.unet.train()
    autocast = device.type == "cuda" and cfg.bf16_autocast
    started, start_elapsed = time.monotonic(), state.elapsed_s
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"{cfg.method} LoRA", disable=not cfg.progress)
    running: list[float] = []
    step_start_rng: dict[str, torch.Tensor] | None = None  # set while a step is under way
    try:
        while state.step < cfg.steps:
            step_start_rng = rng_states(gens)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, terms = train_step(pipe, data, cfg, loss_cfg, gens, alphas, device)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            with deferred_interrupt():  # a Ctrl-C here waits for the update: never a half-updated LoRA
                optim.step()
                state.step += 1
                step_start_rng = None
            state.elapsed_s = start_elapsed + time.monotonic() - started
            running.append(float(loss.detach()))
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                state.log.append({"step": state.step, "loss": float(np.mean(running)), "elapsed_s": state.elapsed_s}
                                 | terms)
                bar.set_postfix(loss=f"{np.mean(running):.4f}")
                running = []
            if state.step % cfg.checkpoint_every == 0:
                save_checkpoint(ckpt_path, cfg, identity, pipe.unet, optim, rng_states(gens), state)
            if step_callback is not None:
                step_callback(state.step, float(loss.detach()))
            if cfg.max_minutes > 0 and time.monotonic() - started > cfg.max_minutes * 60:
                log(f"time limit of {cfg.max_minutes} min reached at step {state.step}")
                break
    except KeyboardInterrupt:  # mid-step, the generators have made that step's draws: store the states before them
        rng = step_start_rng if step_start_rng is not None else rng_states(gens)
        save_checkpoint(ckpt_path, cfg, identity, pipe.unet, optim, rng, state)
        log(f"interrupted: checkpoint at step {state.step} in {ckpt_path}; run again to resume")
        raise
    finally:
        bar.close()
    # 4. save: checkpoint, log, adapter
    save_checkpoint(ckpt_path, cfg, identity, pipe.unet, optim, rng_states(gens), state)
    info = asdict(identity) | {"method": cfg.method, "steps_done": state.step, "steps": cfg.steps,
                               "train_seconds": round(state.elapsed_s, 1),
                               "config": {"dataset": cfg.dataset} | resume_signature(cfg),
                               "branch_t": loss_cfg.branch_t}
    (out / "train_log.json").write_text(json.dumps(info | {"log": state.log}, indent=1), encoding="utf-8")
    adapter = save_adapter(pipe.unet, out / "adapter", cfg.lora, info)
    log(f"{cfg.method}: {state.step}/{cfg.steps} steps in {state.elapsed_s:.0f} s; adapter in {adapter}")
    return adapter
