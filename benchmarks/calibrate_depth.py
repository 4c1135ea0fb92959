"""Calibrate the adaptive policy's depth schedule (similarity -> shared steps) on the default model with the judges.

    python -m benchmarks.calibrate_depth --pairs 24 --json docs/results/policies/depth_calibration.json

Caption pairs of the world's `test` split are binned by the cosine similarity of the model's own pooled text
embeddings (what the edge server groups by). Each pair is sampled as a group of two that shares its first k DDIM
steps (one shared noise, sage_core.generate), for every k in --ks; k = 0 is independent sampling of the same
prompts with the same seeds. The attribute oracle scores every image against its own caption. A bin's calibrated
depth is the largest k whose mean fidelity stays within --tolerance of k = 0; the schedule is made monotone from
the top bin down (a less similar bin never shares more than a more similar one), as DepthSchedule needs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from benchmarks.results import output_file, positive_int, write_json


def sample_pairs(unit: np.ndarray, lo: float, hi: float, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to n distinct pairs (i < j) whose cosine similarity lies in [lo, hi)."""
    sims = unit @ unit.T
    i, j = np.nonzero(np.triu((sims >= lo) & (sims < hi), k=1))
    pick = rng.choice(len(i), size=min(n, len(i)), replace=False) if len(i) else np.zeros(0, dtype=int)
    return [(int(i[p]), int(j[p])) for p in pick]


def calibrated_steps(ks: Sequence[int], drops: Sequence[Sequence[float]], tolerance: float) -> list[int]:
    """Per bin (rows of `drops`, one column per k, bins from least to most similar): the largest k whose
    fidelity drop is <= tolerance, then capped from the top bin down so that depth never falls with similarity."""
    best = [max((k for k, d in zip(ks, row, strict=True) if d <= tolerance), default=0) for row in drops]
    for b in range(len(best) - 2, -1, -1):
        best[b] = min(best[b], best[b + 1])
    return best


def depth_schedule_points(bins: Sequence[Sequence[float]], depths: Sequence[int], steps: int) -> list[list[float]]:
    """DepthSchedule points (similarity, share) that never share more than a bin's calibrated depth: each bin's
    share sits at its upper edge, so the linear interpolation inside a bin stays between the bin below and it."""
    return [[min(float(hi), 1.0), k / steps] for (_, hi), k in zip(bins, depths, strict=True)]


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, n: int = 1000) -> list[float]:
    """95 % percentile interval of the mean (training.replicate.interval over resampled means)."""
    from training.replicate import interval

    if len(values) == 0:
        return [float("nan"), float("nan")]
    return interval(values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1))


def pair_fidelity(pipe, oracle, examples, pairs, k: int, steps: int, seed: int) -> np.ndarray:
    """Per image (pair members in order): share of its caption's attributes the oracle reads right."""
    from sage_core.generate import generate
    from sage_core.grouping import GroupingConfig
    from sage_core.sampler import SamplingConfig
    from training import judges

    chosen = [examples[m] for pair in pairs for m in pair]
    config = SamplingConfig(steps=steps, guidance=7.5, shared_steps=k)
    groups = [[2 * p, 2 * p + 1] for p in range(len(pairs))] if k > 0 else [[i] for i in range(len(chosen))]
    result = generate(pipe, [e.caption for e in chosen], config, GroupingConfig(), seed=seed, groups=groups)
    preds, _ = judges.oracle_outputs(oracle, result.images)
    hits, total = judges.per_image_hits(preds, chosen)
    return hits / np.maximum(total, 1)


def number_list(text: str, kind: type = float) -> list:
    """argparse type of comma-separated numbers ('0.5,0.6' or '0,6,12')."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; bins and depths it cannot calibrate are refused here, before the model loads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=positive_int, default=2000, help="test-split captions to draw pairs from")
    parser.add_argument("--pairs", type=positive_int, default=24, help="pairs per similarity bin")
    parser.add_argument("--bins", type=number_list, default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.01],
                        help="bin edges of pair similarity, increasing (default 0.5,0.6,0.7,0.8,0.9,1.01)")
    parser.add_argument("--ks", type=lambda text: number_list(text, int), default=[0, 6, 12, 18],
                        help="shared steps to try, 0 (independent sampling) always added (default 0,6,12,18)")
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest fidelity drop allowed")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", type=output_file, default=None)
    args = parser.parse_args(argv)
    if len(args.bins) < 2 or any(a >= b for a, b in pairwise(args.bins)):
        parser.error(f"--bins needs at least two increasing edges, got {args.bins}")
    if not all(0 <= k <= args.steps for k in args.ks):
        parser.error(f"--ks must lie in [0, --steps={args.steps}], got {args.ks}")
    args.ks = sorted(set(args.ks) | {0})
    return args


def main(argv: list[str] | None = None) -> dict:
    """Measure fidelity per (similarity bin, shared steps) and derive the schedule."""
    from sage_core.grouping import normalize, pipeline_text_embeddings
    from sage_core.models import load_pipeline
    from training import judges, world

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    edges, ks = args.bins, args.ks
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    oracle = judges.load_oracle()
    examples = world.make_examples(args.pool, seed=args.seed, split="test")
    unit = normalize(pipeline_text_embeddings(pipe, [e.caption for e in examples]))
    rng = np.random.default_rng(args.seed)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        pairs = sample_pairs(unit, lo, hi, args.pairs, rng)
        if not pairs:
            print(f"[{lo:.2f}, {hi:.2f}): no pairs in the pool", flush=True)
            continue
        start = time.perf_counter()
        fid = {k: pair_fidelity(pipe, oracle, examples, pairs, k, args.steps, args.seed) for k in ks}
        row = {"bin": [lo, hi], "pairs": len(pairs), "fidelity": {}, "drop": {}, "drop_ci95": {}}
        for k in ks:
            diff = (fid[0] - fid[k]).reshape(-1, 2).mean(axis=1)  # per pair, paired with independent sampling
            row["fidelity"][str(k)] = float(fid[k].mean())
            row["drop"][str(k)] = float(diff.mean())
            row["drop_ci95"][str(k)] = bootstrap_ci(diff, rng)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        cells = "  ".join(f"k={k}: {row['fidelity'][str(k)]:.3f}" for k in ks)
        print(f"[{lo:.2f}, {hi:.2f}) {len(pairs):3d} pairs  {cells}  ({row['seconds']:.0f} s)", flush=True)
    if not rows:
        raise SystemExit(f"error: no bin of {edges} holds a pair of the {args.pool} captions; nothing calibrated")
    depths = calibrated_steps(ks, [[r["drop"][str(k)] for k in ks] for r in rows], args.tolerance)
    schedule = depth_schedule_points([r["bin"] for r in rows], depths, args.steps)
    print("calibrated depth schedule (similarity, share):", schedule, flush=True)
    return write_json({"settings": vars(args), "rows": rows, "depths": depths, "schedule": schedule}, args.json)


if __name__ == "__main__":
    main()
