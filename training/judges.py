"""Judges of generated images that need no downloaded network, all trained on the procedural world.

- `AttributeOracle`: a small CNN with one head per world attribute (shape, color, size, position, count,
  background, second shape/color, relation axis). `prompt_fidelity` scores an image against exactly the
  attributes its prompt mentions (per-attribute accuracy).
- `frechet_distance` on the oracle's penultimate features: FID-oracle (generated vs real renders).
- `ClipJudge`: an open_clip model. The shipped one is a small ViT/transformer CLIP built from open_clip's
  custom model-config API (`open_clip.add_model_config`) and trained contrastively on the world; the same
  code path loads a real open_clip checkpoint file (`ClipJudge.load("ViT-B-32", "/path/to/open_clip.bin")`).
  The CLIP score is the mean cosine similarity of image and caption embeddings (as in the paper's table).
- `diversity`: mean pairwise feature distance (1 - cosine of CLIP image embeddings) inside each group.

Weights live in training/assets/judges/ (safetensors); `sage-train judges` retrains them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training import world
from training.run_checks import check_device, writable_dir

JUDGES_DIR = Path(__file__).resolve().parent / "assets" / "judges"
ORACLE_FILE = "oracle.safetensors"
CLIP_MODEL_NAME = "sage-world-clip"
CLIP_CONFIG_FILE = f"{CLIP_MODEL_NAME}.json"
CLIP_WEIGHTS_FILE = f"{CLIP_MODEL_NAME}.safetensors"
WORLD_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
FEATURE_DIM = 256


# ----------------------------------------------------------------------------------------------- images
def to_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any of uint8 (N,H,W,3), float [0,1] (N,H,W,3) or float (N,3,H,W) in [0,1] -> float (N,3,64,64) in [0,1]."""
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images with 4 dims, got shape {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected RGB images, got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] != world.IMAGE_SIZE or x.shape[-2] != world.IMAGE_SIZE:
        x = F.interpolate(x, size=(world.IMAGE_SIZE, world.IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.clamp(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild corruptions so judges also read imperfect generated images: noise, blur, brightness."""
    n = x.shape[0]
    noise_level = torch.rand(n, 1, 1, 1, generator=gen) * 0.06
    x = x + noise_level * torch.randn(x.shape, generator=gen)
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        x[blur] = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5))
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- oracle
class AttributeOracle(nn.Module):
    """CNN with coordinate channels and one classification head per world attribute."""

    def __init__(self, width: int = 32, stem: bool = True) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        # a full-resolution stem keeps the detail that tells small stars, crosses and hearts apart
        self.stem = block(5, w // 2, 1) if stem else nn.Identity()
        self.body = nn.Sequential(
            block(w // 2 if stem else 5, w, 2),  # 32x32
            block(w, 2 * w, 2),  # 16x16
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),  # 8x8
            block(4 * w, 4 * w, 1),
            block(4 * w, 4 * w, 2),  # 4x4
        )
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in world.ATTRIBUTE_CLASSES.items()})
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, world.IMAGE_SIZE), torch.linspace(-1, 1, world.IMAGE_SIZE),
                                indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 256) of images in [0, 1], shape (N, 3, 64, 64)."""
        x = torch.cat([x * 2 - 1, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.neck(self.body(self.stem(x)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute."""
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def load_oracle(path: str | Path | None = None, device: str = "cpu") -> AttributeOracle:
    """The trained oracle (default: the shipped weights)."""
    path = Path(path) if path is not None else JUDGES_DIR / ORACLE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no oracle weights at {path}: run `sage-train judges`")
    state = load_file(str(path))
    model = AttributeOracle(stem=any(k.startswith("stem.") for k in state))
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def oracle_outputs(oracle: AttributeOracle, images, batch_size: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predicted class index per attribute and the feature matrix, for a batch of images."""
    device = next(oracle.parameters()).device
    x = to_float_images(images)
    preds: dict[str, list[np.ndarray]] = {k: [] for k in world.ATTRIBUTE_CLASSES}
    feats = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        f = oracle.features(xb)
        feats.append(f.cpu().numpy().astype(np.float64))
        for k, head in oracle.heads.items():
            preds[k].append(head(f).argmax(-1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)


def prompt_fidelity(predictions: dict[str, np.ndarray], examples: Sequence[world.Example]) -> dict[str, float]:
    """Per-attribute accuracy of the predictions against what each prompt mentions, plus 'all' (every
    mentioned attribute right) and 'mean' (mean over mentioned attributes)."""
    labels = world.label_arrays(examples, mentioned_only=True)
    out: dict[str, float] = {}
    correct_all = np.ones(len(examples), dtype=bool)
    hits, total = 0, 0
    for k, y in labels.items():
        mask = y >= 0
        if not mask.any():
            continue
        right = predictions[k][mask] == y[mask]
        out[k] = float(right.mean())
        correct_all[np.flatnonzero(mask)[~right]] = False
        hits, total = hits + int(right.sum()), total + int(mask.sum())
    out["all"] = float(correct_all.mean())
    out["mean"] = hits / max(1, total)
    return out


def per_image_hits(
    predictions: dict[str, np.ndarray], examples: Sequence[world.Example]
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: how many of the attributes its prompt mentions the oracle reads right, and how many it mentions."""
    labels = world.label_arrays(examples, mentioned_only=True)
    hits = np.zeros(len(examples))
    total = np.zeros(len(examples))
    for k, y in labels.items():
        mask = y >= 0
        hits += mask & (predictions[k] == y)
        total += mask
    return hits, total


# ----------------------------------------------------------------------------------------------- FID
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (numpy only, no scipy)."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {feats_a.shape} and {feats_b.shape}")
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("need at least two samples per feature set")
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    # tr(sqrt(s1 s2)) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1))), all symmetric PSD
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------- CLIP
def register_world_clip(judges_dir: Path = JUDGES_DIR) -> str:
    """Register the world CLIP's config with open_clip (custom model-config API); returns its name."""
    import open_clip

    cfg_path = judges_dir / CLIP_CONFIG_FILE
    if cfg_path.exists():
        open_clip.add_model_config(cfg_path)
    else:  # not shipped yet (e.g. while training): register the in-code config from a temporary file
        tmp = Path(tempfile.mkdtemp(prefix="sage-world-clip-")) / CLIP_CONFIG_FILE
        tmp.write_text(json.dumps(WORLD_CLIP_CONFIG, indent=1), encoding="utf-8")
        open_clip.add_model_config(tmp)
    return CLIP_MODEL_NAME


class ClipJudge:
    """An open_clip model with its preprocessing and tokenizer: CLIP score and image embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int, mean, std, device: str) -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.device = device

    @classmethod
    def load(cls, model_name: str | None = None, checkpoint: str | Path | None = None,
             device: str = "cpu") -> ClipJudge:
        """The shipped world CLIP (no arguments), or any open_clip architecture with a checkpoint file."""
        import open_clip

        if model_name is None:
            model_name = register_world_clip()
            checkpoint = checkpoint or JUDGES_DIR / CLIP_WEIGHTS_FILE
        if checkpoint is None or not Path(checkpoint).exists():
            raise FileNotFoundError(f"no open_clip checkpoint at {checkpoint}")
        model = open_clip.create_model(model_name, pretrained=str(checkpoint), device=device)
        vcfg = model.visual
        size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        mean = getattr(vcfg, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(vcfg, "image_std", None) or open_clip.OPENAI_DATASET_STD
        return cls(model, open_clip.get_tokenizer(model_name), int(size), mean, std, device)

    def preprocess(self, images) -> torch.Tensor:
        """Images (any layout to_float_images accepts) -> normalized model input."""
        x = to_float_images(images)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, images, batch_size: int = 256) -> torch.Tensor:
        """L2-normalized image embeddings (N, D)."""
        x = self.preprocess(images)
        out = [self.model.encode_image(x[i:i + batch_size].to(self.device)).float().cpu()
               for i in range(0, len(x), batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalized text embeddings (N, D)."""
        out = [self.model.encode_text(self.tokenizer(list(captions[i:i + batch_size])).to(self.device)).float().cpu()
               for i in range(0, len(captions), batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    def scores(self, images, captions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each image with its own caption."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return (self.image_embeddings(images) * self.text_embeddings(captions)).sum(-1).numpy()

    def score(self, images, captions: Sequence[str]) -> float:
        """CLIP score: mean cosine similarity of images and their captions."""
        return float(self.scores(images, captions).mean())


# ----------------------------------------------------------------------------------------------- diversity
def diversity(features: np.ndarray | torch.Tensor, groups: Sequence[Sequence[int]]) -> float:
    """Mean over groups (of 2+ images) of the mean pairwise cosine distance of their features."""
    f = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float64), dim=-1)
    per_group = []
    for g in groups:
        if len(g) < 2:
            continue
        fg = f[list(g)]
        sim = fg @ fg.T
        iu = torch.triu_indices(len(g), len(g), offset=1)
        per_group.append(float((1 - sim[iu[0], iu[1]]).mean()))
    if not per_group:
        raise ValueError("diversity needs at least one group with two or more images")
    return float(np.mean(per_group))


# ----------------------------------------------------------------------------------------------- training
@dataclass
class JudgeTrainConfig:
    """Training of both judges on freshly rendered world images."""

    seed: int = 0
    device: str = "cpu"
    num_threads: int = 1
    out_dir: str = str(JUDGES_DIR)
    oracle_steps: int = 2000
    oracle_batch: int = 64
    oracle_lr: float = 2e-3
    clip_steps: int = 1500
    clip_batch: int = 96
    clip_lr: float = 1e-3
    val_size: int = 1000
    max_minutes_each: float = 0.0  # 0 = no time limit


def _world_batch(split: str, start: int, n: int, seed: int) -> tuple[torch.Tensor, list[world.Example]]:
    """Rendered examples start..start+n of a split, as float images in [0, 1]."""
    ex = world.make_examples(n, seed, split, start)
    return to_float_images(world.render_examples(ex)), ex


def train_oracle(cfg: JudgeTrainConfig) -> tuple[AttributeOracle, dict[str, float]]:
    """Train the attribute oracle; returns it and its per-attribute accuracy on held-out renders."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = AttributeOracle().to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.oracle_lr, weight_decay=1e-4)
    limit = cfg.max_minutes_each * 60 if cfg.max_minutes_each > 0 else math.inf
    start = time.monotonic()
    model.train()
    for step in tqdm(range(cfg.oracle_steps), desc="oracle", mininterval=5):
        if time.monotonic() - start > limit:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.oracle_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.oracle_steps))
        x, ex = _world_batch("judge_train", step * cfg.oracle_batch, cfg.oracle_batch, cfg.seed)
        labels = world.label_arrays(ex)
        logits = model(augment(x, gen).to(cfg.device))
        loss = sum(F.cross_entropy(logits[k], torch.from_numpy(y).to(cfg.device), ignore_index=-1)
                   for k, y in labels.items() if (y >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    x, ex = _world_batch("judge_val", 0, cfg.val_size, cfg.seed)
    preds, _ = oracle_outputs(model, x)
    return model, prompt_fidelity(preds, ex)


def train_world_clip(cfg: JudgeTrainConfig) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train the world CLIP contrastively; returns the model and held-out retrieval accuracy / CLIP scores."""
    import open_clip

    name = register_world_clip(Path(cfg.out_dir))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = open_clip.create_model(name, device=cfg.device)
    tokenizer = open_clip.get_tokenizer(name)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05, betas=(0.9, 0.98))
    limit = cfg.max_minutes_each * 60 if cfg.max_minutes_each > 0 else math.inf
    start = time.monotonic()
    model.train()
    for step in tqdm(range(cfg.clip_steps), desc="clip", mininterval=5):
        if time.monotonic() - start > limit:
            break
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = cfg.clip_lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.clip_steps))
        x, ex = _world_batch("judge_train", 10_000_000 + step * cfg.clip_batch, cfg.clip_batch, cfg.seed)
        x = ((augment(x, gen) - mean) / std).to(cfg.device)
        text = tokenizer([e.caption for e in ex]).to(cfg.device)
        img_f, txt_f, scale = model(x, text)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    judge = ClipJudge(model, tokenizer, 64, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, cfg.device)
    x, ex = _world_batch("judge_val", 0, cfg.val_size, cfg.seed)
    return model, clip_sanity(judge, x, ex)


def clip_sanity(judge: ClipJudge, images, examples: Sequence[world.Example]) -> dict[str, float]:
    """CLIP score of matched vs shuffled captions and image->text top-1 retrieval within the set."""
    captions = [e.caption for e in examples]
    im, tx = judge.image_embeddings(images), judge.text_embeddings(captions)
    sim = im @ tx.T
    matched = float(sim.diag().mean())
    shuffled = float(sim.roll(1, dims=1).diag().mean())
    top1 = float((sim.argmax(1) == torch.arange(len(captions))).float().mean())
    return {"clip_matched": matched, "clip_shuffled": shuffled, "retrieval_top1": top1}


def train_judges(cfg: JudgeTrainConfig, only: Sequence[str] = ("oracle", "clip")) -> dict:
    """Train the judges named in `only` and write weights, config and metrics.json to cfg.out_dir
    (files are replaced atomically, so readers never see a half-written judge)."""
    bad = set(only) - {"oracle", "clip"}
    if bad or not only:
        raise ValueError(f"only must name oracle and/or clip, got {list(only)}")
    check_device(cfg.device)
    torch.set_num_threads(cfg.num_threads)
    out = writable_dir(cfg.out_dir)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics.setdefault("config", {})
    if "oracle" in only:
        oracle, oracle_acc = train_oracle(cfg)
        _save_atomic({k: v.contiguous() for k, v in oracle.state_dict().items()}, out / ORACLE_FILE)
        print("oracle accuracy on held-out renders:", json.dumps(oracle_acc))
        metrics["oracle"] = oracle_acc
    if "clip" in only:
        clip, clip_metrics = train_world_clip(cfg)
        (out / CLIP_CONFIG_FILE).write_text(json.dumps(WORLD_CLIP_CONFIG, indent=1), encoding="utf-8")
        _save_atomic({k: v.detach().contiguous() for k, v in clip.state_dict().items()}, out / CLIP_WEIGHTS_FILE)
        print("world CLIP on held-out renders:", json.dumps(clip_metrics))
        metrics["clip"] = clip_metrics
    metrics["config"] |= asdict(cfg) | {"out_dir": "training/assets/judges"}
    metrics_path.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file to a temporary sibling, then rename over `path`."""
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def refresh_metrics(judges_dir: Path = JUDGES_DIR, val_size: int = 1000, seed: int = 0) -> dict:
    """Recompute metrics.json's held-out numbers from the judge files on disk."""
    x, ex = _world_batch("judge_val", 0, val_size, seed)
    path = judges_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["oracle"] = prompt_fidelity(oracle_outputs(load_oracle(judges_dir / ORACLE_FILE), x)[0], ex)
    metrics["clip"] = clip_sanity(ClipJudge.load(None, judges_dir / CLIP_WEIGHTS_FILE), x, ex)
    path.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics
