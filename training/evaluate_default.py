"""Evaluation report of a text-to-image pipeline on held-out captions of the world, independent sampling.

For n held-out captions (split "heldout", a seed stream the model never trained on) it generates one image per
caption (DDIM, 30 steps, CFG 7.5 by default) and scores them with the judges of training/judges.py, next to
two sets of real renders: A, the held-out scenes themselves, and B, other scenes matching the same captions
(the real-vs-real reference for FID).

    sage-train evaluate-default --n 1000 --out runs/eval_default

writes runs/eval_default/report.json, grid.png (held-out prompts: generated next to the real render) and
samples.png (a fixed set of prompts, the README's grid).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sage_core.config_types import check_at_least, check_fields
from training import judges, world
from training.run_checks import check_device, writable_dir

ACCEPTANCE = {"shape": 0.90, "color": 0.90, "position": 0.80}  # oracle accuracy targets of the H100 model


@dataclass
class EvalConfig:
    """One evaluation run."""

    model: str | None = None  # pipeline folder; None = the shipped default model
    n: int = 1000
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    batch_size: int = 50
    device: str = "cpu"
    num_threads: int = 2
    out: str = "runs/eval_default"
    max_group: int = 5
    grid_rows: int = 12

    def __post_init__(self) -> None:
        check_fields(self)
        if self.n < 10:
            raise ValueError(f"n must be at least 10, got {self.n}")
        check_at_least(self, 1, "batch_size", "steps", "num_threads", "max_group", "grid_rows")


def semantic_groups(examples: list[world.Example], max_group: int = 5) -> list[list[int]]:
    """Groups of 2..max_group held-out captions with the same scene kind, first shape and first color
    (world-level stand-in for the paper's similarity groups, used for the diversity column)."""
    buckets: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        a = e.scene.attributes()
        buckets[(e.scene.kind, a["shape"], a["color"])].append(i)
    groups = []
    for idx in buckets.values():
        for k in range(0, len(idx), max_group):
            chunk = idx[k:k + max_group]
            if len(chunk) >= 2:
                groups.append(chunk)
    return groups


@torch.no_grad()
def generate(pipe, prompts: list[str], cfg: EvalConfig) -> np.ndarray:
    """float images (N, 64, 64, 3) in [0, 1]; batch b uses generator seed cfg.seed + b."""
    out = []
    for b, i in enumerate(tqdm(range(0, len(prompts), cfg.batch_size), desc="generate", mininterval=10)):
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + b)
        res = pipe(prompts[i:i + cfg.batch_size], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                   generator=gen, output_type="np")
        out.append(np.asarray(res.images, dtype=np.float32))
    return np.concatenate(out)


def score_set(images, examples, groups, oracle, clip, real_feats: np.ndarray | None) -> dict:
    """All judge numbers for one image set."""
    preds, feats = judges.oracle_outputs(oracle, images)
    acc = judges.prompt_fidelity(preds, examples)
    by_kind = {}
    for kind in world.KINDS:
        sel = [i for i, e in enumerate(examples) if e.scene.kind == kind]
        if sel:
            by_kind[kind] = judges.prompt_fidelity({k: v[sel] for k, v in preds.items()}, [examples[i] for i in sel])
    clip_emb = clip.image_embeddings(images)
    text_emb = clip.text_embeddings([e.caption for e in examples])
    out = {
        "oracle_accuracy": acc,
        "oracle_accuracy_by_kind": by_kind,
        "clip_score": float((clip_emb * text_emb).sum(-1).mean()),
        "diversity_clip": judges.diversity(clip_emb.numpy(), groups) if groups else None,
        "diversity_oracle": judges.diversity(feats, groups) if groups else None,
    }
    if real_feats is not None:
        out["fid_oracle_vs_real"] = judges.frechet_distance(feats, real_feats)
    return out, feats


def save_grid(path: Path, prompts: list[str], generated: np.ndarray, real: np.ndarray, rows: int) -> None:
    """Two columns of (prompt, generated, real) rows, enlarged 2x."""
    from PIL import Image, ImageDraw

    rows = min(rows * 2, len(prompts))
    half = math.ceil(rows / 2)
    cell, text_w = 128, 270
    canvas = Image.new("RGB", (2 * (text_w + 2 * cell + 20), half * (cell + 6) + 20), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("generated", "real render")):
        for col in range(2):
            draw.text((col * (text_w + 2 * cell + 20) + text_w + c * cell + 30, 4), title, fill=(0, 0, 0))
    for k in range(rows):
        col, r = divmod(k, half)
        x0, y0 = col * (text_w + 2 * cell + 20), 20 + r * (cell + 6)
        words, lines, line = prompts[k].split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 42:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for j, t in enumerate(lines[:4]):
            draw.text((x0 + 4, y0 + 40 + 14 * j), t, fill=(0, 0, 0))
        for c, img in enumerate((generated[k], real[k])):
            arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img
            canvas.paste(Image.fromarray(arr).resize((cell, cell), Image.NEAREST), (x0 + text_w + c * cell + 10, y0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def run_evaluation(cfg: EvalConfig) -> dict:
    """Generate, judge and write report.json and grid.png to cfg.out; returns the report."""
    from sage_core.models import DEFAULT_MODEL_DIR, load_pipeline, model_fingerprint

    check_device(cfg.device)
    torch.set_num_threads(cfg.num_threads)
    out = writable_dir(cfg.out)
    # 1. held-out captions and two real render sets
    examples = world.make_examples(cfg.n, cfg.seed, "heldout")
    prompts = [e.caption for e in examples]
    rng = np.random.default_rng([cfg.seed, 99])
    real_a = world.render_examples(examples)
    real_b = world.render_examples([world.resample_for_caption(e, rng) for e in examples])
    groups = semantic_groups(examples, cfg.max_group)
    train_captions = {e.caption for e in world.make_examples(20000, 0, "train")}
    # 2. generate (cached per model fingerprint and settings, so a judge problem never costs the generation)
    pipe = load_pipeline(cfg.model, device=cfg.device)
    key = f"{model_fingerprint(pipe)}-{cfg.n}-{cfg.seed}-{cfg.steps}-{cfg.guidance}-{cfg.batch_size}"
    cache = out / f"generated-{key}.npz"
    if cache.exists():
        cached = np.load(cache)
        generated, gen_seconds = cached["images"].astype(np.float32) / 255.0, float(cached["seconds"])
    else:
        t0 = time.perf_counter()
        generated = generate(pipe, prompts, cfg)
        gen_seconds = time.perf_counter() - t0
        np.savez(cache, images=(generated * 255).round().astype(np.uint8), seconds=gen_seconds)
        generated = np.load(cache)["images"].astype(np.float32) / 255.0  # score exactly what is cached
    # 3. judge
    oracle = judges.load_oracle(device="cpu")
    clip = judges.ClipJudge.load()
    _, feats_a = judges.oracle_outputs(oracle, real_a)
    gen_scores, _ = score_set(generated, examples, groups, oracle, clip, feats_a)
    ref_a, _ = score_set(real_a, examples, groups, oracle, clip, None)
    ref_b, _ = score_set(real_b, examples, groups, oracle, clip, feats_a)
    report = {
        "config": asdict(cfg),
        "model": str(cfg.model or DEFAULT_MODEL_DIR),
        "model_fingerprint": model_fingerprint(pipe),
        "n_groups_for_diversity": len(groups),
        "heldout_captions_also_in_first_20k_train_captions": float(np.mean([p in train_captions for p in prompts])),
        "generation_seconds": round(gen_seconds, 1),
        "generated": gen_scores,
        "real_heldout_scenes": ref_a,
        "real_other_scenes_same_captions": ref_b,
    }
    acc = gen_scores["oracle_accuracy"]
    report["acceptance"] = {k: {"value": acc.get(k), "target": v, "met": acc.get(k, 0.0) >= v}
                            for k, v in ACCEPTANCE.items()}
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    save_grid(out / "grid.png", prompts, generated, real_a, cfg.grid_rows)
    from training.default_model import sample_grid

    sample_grid(pipe, out / "samples.png", seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance)
    print(json.dumps({k: report[k] for k in ("generated", "real_heldout_scenes", "real_other_scenes_same_captions")},
                     indent=1))
    return report
