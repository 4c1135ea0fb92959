"""The paper's Table 1, Fig. 3 and Fig. 4 on a pipeline, its standard-FT adapter and its SAGE-FT adapter.

Evaluation prompts are held-out captions of the procedural world, grouped exactly as the training set (the
similarity graph of the base model's text embeddings, cliques of 2..5), then a disjoint subset of `n_groups`
groups is drawn (seeded). Every row uses the same prompts, groups and seeds: group g's shared noise is the
noise its first member gets under independent sampling (sage_core.generate: seed + prompt index).

Rows (Table 1): independent sampling (every prompt its own noise and all T steps) for Pre-trained and Standard FT;
shared sampling at beta = 20/30/40 % for Pre-trained, Standard FT, SAGE FT. Columns: FID on the oracle's features
(generated vs the real renders of the same scenes), CLIP score (world CLIP), prompt fidelity (oracle: share of the
mentioned attributes right), within-group diversity (mean pairwise 1 - cosine of CLIP image embeddings inside a
group; the paper uses LPIPS) and the measured cost saving (1 - UNet evaluations / those of independent sampling).

Intervals: 95 % percentile bootstrap over groups (the same resamples for every row, so differences between rows
are paired); `diff_sage_vs_standard` gives the interval of SAGE FT - Standard FT per sharing ratio.
Fig. 3: the same at beta = 30 % on groups from other similarity ranges; Fig. 4: shared steps 0..T/2 on the
table's groups. Results, per-row caches and plots go to `out`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sage_core.config_files import read_mapping
from sage_core.config_types import check_at_least, check_fields, from_mapping
from training import world
from training.grouped_dataset import GroupingParams, build_groups, disjoint_groups
from training.run_checks import check_device, writable_dir

MODELS = ("pretrained", "standard", "sage")
MODEL_LABELS = {"pretrained": "Pre-trained", "standard": "Standard FT", "sage": "SAGE FT"}


@dataclass
class ReplicateConfig:
    """One replication run."""

    model: str | None = None  # base pipeline folder; None: the shipped default model
    standard_adapter: str = "runs/sage/standard_ft/adapter"
    sage_adapter: str = "runs/sage/sage_ft/adapter"
    out: str = "docs/results/sage_training"
    cache: str = "runs/sage/replicate_cache"
    eval_items: int = 3000  # held-out captions the evaluation groups are drawn from
    n_groups: int = 100
    tau_min: float = 0.6
    tau_max: float = 0.9
    shares: tuple[float, ...] = (0.2, 0.3, 0.4)
    fig3_ranges: tuple[tuple[float, float], ...] = ()
    fig3_share: float = 0.3
    fig4_shared_steps: tuple[int, ...] = (3, 6, 9, 12, 15)
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    chunk_groups: int = 25  # groups generated per UNet batch
    bootstrap: int = 1000
    fid_bootstrap: int = 200
    device: str = "cpu"
    num_threads: int = 1
    parts: tuple[str, ...] = ("table", "fig3", "fig4")
    progress: bool = True  # a tqdm bar over the images of each part's rows

    def __post_init__(self) -> None:
        check_fields(self)
        GroupingParams(tau_min=self.tau_min, tau_max=self.tau_max)
        for lo, hi in self.fig3_ranges:
            GroupingParams(tau_min=lo, tau_max=hi)
        if self.n_groups < 2:
            raise ValueError(f"n_groups must be >= 2, got {self.n_groups}")
        check_at_least(self, 1, "num_threads", "steps", "chunk_groups", "bootstrap", "fid_bootstrap", "eval_items")
        if any(not 0 <= s < 1 for s in (*self.shares, self.fig3_share)):
            raise ValueError(f"shares and fig3_share must be in [0, 1), got {list(self.shares)}, {self.fig3_share}")
        if any(not 0 <= k <= self.steps for k in self.fig4_shared_steps):
            raise ValueError(f"fig4_shared_steps must be in [0, steps={self.steps}], got "
                             f"{list(self.fig4_shared_steps)}")
        bad = set(self.parts) - {"table", "fig3", "fig4"}
        if bad:
            raise ValueError(f"unknown parts {sorted(bad)}; choose from table, fig3, fig4")


def load_config(path: str | Path | None = None, **overrides: Any) -> ReplicateConfig:
    """A ReplicateConfig from YAML (lists become tuples: sage_core.config_types), with non-None overrides."""
    data = (read_mapping(path) if path else {}) | {k: v for k, v in overrides.items() if v is not None}
    return from_mapping(ReplicateConfig, data)


# ----------------------------------------------------------------------------------------------- prompts
@dataclass
class EvalSet:
    """Prompts (world examples) and disjoint groups over them (indices into `examples`)."""

    name: str
    examples: list[world.Example]
    groups: list[list[int]]
    tau: tuple[float, float]
    available_groups: int


def eval_set(pipe, cfg: ReplicateConfig, tau: tuple[float, float], pool: list[world.Example],
             pooled: np.ndarray) -> EvalSet:
    """Disjoint groups from the similarity graph of held-out captions, re-indexed to their members only."""
    params = GroupingParams(tau_min=tau[0], tau_max=tau[1])
    groups, _ = build_groups(pooled, params)
    chosen = disjoint_groups(groups, cfg.n_groups, seed=cfg.seed)
    members = [i for g in chosen for i in g]
    remap = {old: new for new, old in enumerate(members)}
    return EvalSet(f"tau_{tau[0]}_{tau[1]}", [pool[i] for i in members], [[remap[i] for i in g] for g in chosen],
                   tau, len(groups))


# ----------------------------------------------------------------------------------------------- generation
def load_models(cfg: ReplicateConfig) -> dict[str, Any]:
    """Pre-trained, Standard FT and SAGE FT pipelines (adapters checked against the base)."""
    from sage_core.models import load_pipeline
    from training.lora import load_adapter

    pipes = {"pretrained": load_pipeline(cfg.model, device=cfg.device)}
    for name, folder in (("standard", cfg.standard_adapter), ("sage", cfg.sage_adapter)):
        pipe = load_pipeline(cfg.model, device=cfg.device)
        load_adapter(pipe, folder)
        pipes[name] = pipe
    return pipes


def generate_row(pipe, es: EvalSet, shared_steps: int, independent: bool, cfg: ReplicateConfig) -> dict[str, Any]:
    """uint8 images of every prompt and the UNet evaluations used, generated group chunk by chunk (a tqdm bar over
    the row's images when cfg.progress)."""
    from sage_core.generate import generate
    from sage_core.grouping import GroupingConfig
    from sage_core.sampler import SamplingConfig

    sampling = SamplingConfig(steps=cfg.steps, guidance=cfg.guidance, share=0.0, shared_steps=shared_steps)
    images: np.ndarray | None = None
    used, independent_evals = 0, 0
    bar = tqdm(total=len(es.examples), desc=f"{es.name} k={shared_steps}", unit="img", leave=False,
               disable=not cfg.progress)
    for lo in range(0, len(es.groups), cfg.chunk_groups):
        chunk = es.groups[lo : lo + cfg.chunk_groups]
        members = [i for g in chunk for i in g]
        local = {m: j for j, m in enumerate(members)}
        groups = [[local[m]] for m in members] if independent else [[local[m] for m in g] for g in chunk]
        res = generate(pipe, [es.examples[m].caption for m in members], sampling, GroupingConfig(),
                       seed=cfg.seed + members[0], groups=groups)
        # seeds: seed + members[0] + local index = seed + global index (members are consecutive)
        if images is None:
            images = np.zeros((len(es.examples), *res.images.shape[1:]), np.uint8)
        images[members] = (np.clip(res.images, 0, 1) * 255).round().astype(np.uint8)
        used += res.counter.total
        independent_evals += res.independent_evaluations()
        bar.update(len(members))
    bar.close()
    return {"images": images, "unet_evals": used, "independent_evals": independent_evals}


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class Judges:
    """The attribute oracle and the world CLIP."""

    oracle: Any
    clip: Any

    @classmethod
    def load(cls) -> Judges:
        from training import judges

        return cls(judges.load_oracle(), judges.ClipJudge.load())


def per_item_scores(images: np.ndarray, es: EvalSet, jd: Judges) -> dict[str, np.ndarray]:
    """Per-image CLIP score, oracle hits/totals over the mentioned attributes, oracle features, CLIP image
    embeddings."""
    from training import judges

    preds, feats = judges.oracle_outputs(jd.oracle, images)
    hits, total = judges.per_image_hits(preds, es.examples)
    img_emb = jd.clip.image_embeddings(images)
    txt_emb = jd.clip.text_embeddings([e.caption for e in es.examples])
    return {"clip": (img_emb * txt_emb).sum(-1).numpy(), "hits": hits, "total": total, "feats": feats,
            "clip_emb": img_emb.numpy()}


def group_diversity(clip_emb: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Per group: mean pairwise (1 - cosine) of its images' CLIP embeddings."""
    out = []
    for g in groups:
        e = clip_emb[list(g)]
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        iu = np.triu_indices(len(g), k=1)
        out.append(float((1 - (e @ e.T)[iu]).mean()))
    return np.asarray(out)


def row_metrics(s: dict[str, np.ndarray], real_feats: np.ndarray, groups: Sequence[Sequence[int]],
                group_sel: np.ndarray) -> dict[str, float]:
    """The table's columns on a (re)sample of groups (indices into `groups`, repeats allowed)."""
    from training import judges

    idx = np.asarray([i for gi in group_sel for i in groups[gi]])
    div = group_diversity(s["clip_emb"], [groups[gi] for gi in group_sel])
    return {
        "fid": judges.frechet_distance(s["feats"][idx], real_feats[idx]),
        "clip": float(s["clip"][idx].mean()),
        "fidelity": float(s["hits"][idx].sum() / max(1, s["total"][idx].sum())),
        "diversity": float(div.mean()),
    }


def bootstrap(rows: dict[str, dict], real_feats: np.ndarray, groups: list[list[int]], cfg: ReplicateConfig,
              ) -> dict[str, dict[str, list[float]]]:
    """Per row and metric: bootstrap draws over groups (the same resamples for every row)."""
    rng = np.random.default_rng([cfg.seed, 7])
    n = len(groups)
    draws = rng.integers(0, n, size=(cfg.bootstrap, n))
    out: dict[str, dict[str, list[float]]] = {}
    for name, s in rows.items():
        acc: dict[str, list[float]] = {"fid": [], "clip": [], "fidelity": [], "diversity": []}
        for b, sel in enumerate(draws):
            if b < cfg.fid_bootstrap:
                m = row_metrics(s, real_feats, groups, sel)
            else:  # FID is the slow one: fewer draws
                m = row_metrics_no_fid(s, groups, sel)
            for k, v in m.items():
                acc[k].append(v)
        out[name] = acc
    return out


def row_metrics_no_fid(s: dict[str, np.ndarray], groups: Sequence[Sequence[int]], sel: np.ndarray) -> dict:
    """row_metrics without FID."""
    idx = np.asarray([i for gi in sel for i in groups[gi]])
    return {"clip": float(s["clip"][idx].mean()),
            "fidelity": float(s["hits"][idx].sum() / max(1, s["total"][idx].sum())),
            "diversity": float(group_diversity(s["clip_emb"], [groups[gi] for gi in sel]).mean())}


def interval(values: Sequence[float]) -> list[float]:
    """95 % percentile interval."""
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# ----------------------------------------------------------------------------------------------- runs
def cache_key(cfg: ReplicateConfig, base_fingerprint: str) -> str:
    """Rows are reused only for the same base model (its weights' fingerprint, so a model retrained at the same path
    gets new rows), adapters (their bytes), prompts and sampler settings."""
    import hashlib

    from training.lora import ADAPTER_FILE

    h = hashlib.sha256()
    for folder in (cfg.standard_adapter, cfg.sage_adapter):
        f = Path(folder) / ADAPTER_FILE
        h.update(f.read_bytes() if f.is_file() else b"-")
    h.update(json.dumps([cfg.model, base_fingerprint, cfg.eval_items, cfg.n_groups, cfg.steps, cfg.guidance,
                         cfg.seed, cfg.chunk_groups]).encode())
    return h.hexdigest()[:12]


def run_rows(specs: list[tuple[str, str, int, bool]], es: EvalSet, pipes: dict, jd: Judges, cfg: ReplicateConfig,
             log=print) -> dict[str, dict]:
    """Generate and score rows (name, model, shared_steps, independent), reusing cached rows."""
    from sage_core.models import model_fingerprint

    cache = Path(cfg.cache) / cache_key(cfg, model_fingerprint(pipes["pretrained"])) / es.name
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    bar = tqdm(total=len(specs), desc=f"{es.name} rows", unit="row", disable=not cfg.progress)
    for name, model, k, independent in specs:
        bar.set_postfix_str(name)
        path = cache / f"{model}_k{k}_{'independent' if independent else 'shared'}.npz"
        if path.is_file():
            data = dict(np.load(path))
        else:
            t0 = time.perf_counter()
            gen = generate_row(pipes[model], es, k, independent, cfg)
            data = per_item_scores(gen["images"], es, jd) | {
                "images": gen["images"], "unet_evals": np.asarray(gen["unet_evals"]),
                "independent_evals": np.asarray(gen["independent_evals"]),
                "seconds": np.asarray(time.perf_counter() - t0)}
            np.savez_compressed(path, **data)
            log(f"{es.name} {name}: {float(data['seconds']):.0f} s")
        out[name] = data
        bar.update(1)
    bar.close()
    return out


def summarize(rows: dict[str, dict], es: EvalSet, jd_real_feats: np.ndarray, cfg: ReplicateConfig) -> dict:
    """Point estimates, intervals, measured savings and paired differences."""
    all_groups = np.arange(len(es.groups))
    boots = bootstrap(rows, jd_real_feats, es.groups, cfg)
    summary: dict[str, Any] = {}
    for name, s in rows.items():
        point = row_metrics(s, jd_real_feats, es.groups, all_groups)
        summary[name] = {
            "point": point,
            "ci95": {k: interval(v) for k, v in boots[name].items()},
            "cost_saving_measured": 1 - float(s["unet_evals"]) / float(s["independent_evals"]),
            "seconds": float(s["seconds"]),
        }
    return {"rows": summary, "boots": boots}


def paired_diffs(boots: dict, a: str, b: str) -> dict[str, dict[str, Any]]:
    """a - b per metric: mean of the bootstrap differences and its 95 % interval."""
    out = {}
    for k in boots[a]:
        d = np.asarray(boots[a][k]) - np.asarray(boots[b][k][: len(boots[a][k])])
        out[k] = {"mean": float(d.mean()), "ci95": interval(d)}
    return out


def table_specs(cfg: ReplicateConfig) -> list[tuple[str, str, int, bool]]:
    """Table 1's rows: (name, model, shared steps, independent)."""
    specs = [("independent/pretrained", "pretrained", 0, True), ("independent/standard", "standard", 0, True)]
    for share in cfg.shares:
        k = round(share * cfg.steps)
        specs += [(f"shared{int(round(share * 100))}/{m}", m, k, False) for m in MODELS]
    return specs


def fmt(point: float, ci: list[float], digits: int) -> str:
    return f"{point:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def table_markdown(summary: dict, cfg: ReplicateConfig, es: EvalSet, diffs: dict) -> str:
    """Table 1 in markdown with 95 % intervals, and the paired SAGE - Standard differences."""
    lines = [
        f"Groups: {len(es.groups)} disjoint groups ({len(es.examples)} prompts) of held-out captions, "
        f"tau in ({es.tau[0]}, {es.tau[1]}); DDIM {cfg.steps} steps, CFG {cfg.guidance}; 95 % bootstrap intervals "
        "over groups.",
        "",
        "| Sampling scheme | Model | FID-oracle ↓ | CLIP ↑ | Prompt fidelity ↑ | Div. ↑ | Cost saving (measured) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        scheme, model = name.split("/")
        scheme_txt = "Independent" if scheme == "independent" else f"Shared (beta = {scheme[6:]} %)"
        p, c = row["point"], row["ci95"]
        lines.append(f"| {scheme_txt} | {MODEL_LABELS[model]} | {fmt(p['fid'], c['fid'], 2)} | "
                     f"{fmt(p['clip'], c['clip'], 4)} | {fmt(p['fidelity'], c['fidelity'], 3)} | "
                     f"{fmt(p['diversity'], c['diversity'], 4)} | {100 * row['cost_saving_measured']:.1f} % |")
    lines += ["", "SAGE FT - Standard FT under shared sampling (paired bootstrap, mean [95 % interval]):", "",
              "| beta | FID-oracle (negative = SAGE better) | CLIP | Prompt fidelity | Div. |", "|---|---|---|---|---|"]
    for share, d in diffs.items():
        lines.append(f"| {share} % | " + " | ".join(fmt(d[k]["mean"], d[k]["ci95"], 4 if k != "fid" else 2)
                                                    for k in ("fid", "clip", "fidelity", "diversity")) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(path: Path, x_labels: list[str], series: dict[str, list[dict]], metrics: Sequence[str], title: str,
               xlabel: str) -> None:
    """One panel per metric, one line per model, 95 % intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"fid": "FID-oracle ↓", "clip": "CLIP ↑", "fidelity": "Prompt fidelity ↑", "diversity": "Diversity ↑"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    x = np.arange(len(x_labels))
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        for j, (model, rows) in enumerate(series.items()):
            y = np.array([r["point"][metric] for r in rows])
            lo = np.array([r["ci95"][metric][0] for r in rows])
            hi = np.array([r["ci95"][metric][1] for r in rows])
            ax.errorbar(x + (j - 1) * 0.06, y, yerr=[np.maximum(y - lo, 0), np.maximum(hi - y, 0)], marker="o",
                        capsize=3, label=MODEL_LABELS[model])
        ax.set_xticks(x, x_labels, rotation=20 if len(x_labels[0]) > 4 else 0)
        ax.set_title(names[metric])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replicate(cfg: ReplicateConfig, pipes: dict | None = None, jd: Judges | None = None, log=print) -> dict:
    """Run the configured parts; write results.json, table.md, fig3.png, fig4.png to cfg.out."""
    # 1. models, judges, the held-out prompt pool and its embeddings
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.num_threads)
    from sage_core.grouping import pipeline_text_embeddings

    if pipes is None:
        check_device(cfg.device)
    out = writable_dir(cfg.out)
    pipes = pipes or load_models(cfg)
    jd = jd or Judges.load()
    pool = world.make_examples(cfg.eval_items, cfg.seed, "heldout")
    pooled = pipeline_text_embeddings(pipes["pretrained"], [e.caption for e in pool])
    from training import judges

    def real_feats(es: EvalSet) -> np.ndarray:
        return judges.oracle_outputs(jd.oracle, world.render_examples(es.examples))[1]

    results: dict[str, Any] = {"config": asdict(cfg)}
    # 2. Table 1
    es = eval_set(pipes["pretrained"], cfg, (cfg.tau_min, cfg.tau_max), pool, pooled)
    log(f"table groups: {len(es.groups)} of {es.available_groups} available, {len(es.examples)} prompts")
    feats_real = real_feats(es)
    table_summary = None
    if "table" in cfg.parts or "fig4" in cfg.parts:
        rows = run_rows(table_specs(cfg), es, pipes, jd, cfg, log)
        table_summary = summarize(rows, es, feats_real, cfg)
        diffs = {int(round(s * 100)): paired_diffs(table_summary["boots"], f"shared{int(round(s * 100))}/sage",
                                                   f"shared{int(round(s * 100))}/standard") for s in cfg.shares}
        results["table"] = {"groups": es.groups, "n_prompts": len(es.examples),
                            "rows": table_summary["rows"], "diff_sage_vs_standard": diffs}
        (out / "table.md").write_text(table_markdown(table_summary, cfg, es, diffs), encoding="utf-8")
    # 3. Fig. 4: shared steps on the table's groups
    if "fig4" in cfg.parts:
        specs = [(f"k{k}/{m}", m, k, False) for k in cfg.fig4_shared_steps for m in MODELS]
        summ = summarize(run_rows(specs, es, pipes, jd, cfg, log), es, feats_real, cfg)
        results["fig4"] = {"shared_steps": list(cfg.fig4_shared_steps), "rows": summ["rows"],
                           "diff_sage_vs_standard": {k: paired_diffs(summ["boots"], f"k{k}/sage", f"k{k}/standard")
                                                     for k in cfg.fig4_shared_steps}}
        series = {m: [summ["rows"][f"k{k}/{m}"] for k in cfg.fig4_shared_steps] for m in MODELS}
        plot_sweep(out / "fig4_shared_steps.png", [str(k) for k in cfg.fig4_shared_steps], series,
                   ("clip", "fidelity", "diversity"), f"Fig. 4: shared sampling vs shared steps (T = {cfg.steps}), "
                   f"{len(es.groups)} groups, tau in {es.tau}", "shared steps T - T*")
    # 4. Fig. 3: similarity ranges at fig3_share
    if "fig3" in cfg.parts and cfg.fig3_ranges:
        k = round(cfg.fig3_share * cfg.steps)
        fig3: dict[str, Any] = {"share": cfg.fig3_share, "ranges": {}}
        series = {m: [] for m in MODELS}
        for rng_ in cfg.fig3_ranges:
            es3 = eval_set(pipes["pretrained"], cfg, tuple(rng_), pool, pooled)
            summ = summarize(run_rows([(f"k{k}/{m}", m, k, False) for m in MODELS], es3, pipes, jd, cfg, log),
                             es3, real_feats(es3), cfg)
            fig3["ranges"][f"{rng_[0]}-{rng_[1]}"] = {
                "groups": len(es3.groups), "available_groups": es3.available_groups, "rows": summ["rows"],
                "diff_sage_vs_standard": paired_diffs(summ["boots"], f"k{k}/sage", f"k{k}/standard")}
            for m in MODELS:
                series[m].append(summ["rows"][f"k{k}/{m}"])
        results["fig3"] = fig3
        plot_sweep(out / "fig3_similarity.png", [f"({lo},{hi})" for lo, hi in cfg.fig3_ranges], series,
                   ("fid", "clip", "fidelity", "diversity"),
                   f"Fig. 3: shared sampling (beta = {cfg.fig3_share:.0%}) vs similarity range of the groups",
                   "(tau_min, tau_max)")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return results
