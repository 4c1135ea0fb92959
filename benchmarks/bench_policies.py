"""Sampler steps saved on an open prompt stream by each sharing policy, windows of a fixed size.

    python -m benchmarks.bench_policies --dataset coco --window 64 --prompts 8192 \\
        --json docs/results/policies/coco_w64.json

Prompts are drawn in random order (seeded) from the dataset in ../shared/datasets and embedded as the simulator
does (--embedder, MiniLM by default, cached under ~/.cache/sage-edge/embeddings). Each policy plans the
stream window by window with sage_core.policy (the edge worker's planner) and counts trajectory steps against
independent sampling. Step counts only: image quality under each policy is measured on the default model
separately.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.results import exit_on, output_file, positive_int, write_json
from sage_core.adaptive import DepthSchedule
from sage_core.latent_cache import LatentCache
from sage_core.policy import SharingPolicy, count_stream

LOOSE_SCHEDULE = ((0.1, 0.15), (0.3, 0.25), (0.5, 0.4), (0.7, 0.5))


def policies(cache_mb: float) -> dict[str, tuple[SharingPolicy, float]]:
    """The policies compared: name -> (policy, cache MiB)."""
    adaptive = SharingPolicy(
        mode="adaptive", taus=(0.1, 0.3, 0.5), max_sizes=(32, 16, 5), schedule=DepthSchedule(LOOSE_SCHEDULE)
    )
    return {
        "flat tau 0.6 beta 0.4 (Algorithm 1)": (SharingPolicy(mode="flat", tau=0.6, share=0.4), 0.0),
        "flat tau 0.5 beta 0.4": (SharingPolicy(mode="flat", tau=0.5, share=0.4), 0.0),
        "adaptive (taus 0.1/0.3/0.5)": (adaptive, 0.0),
        f"adaptive + {cache_mb:g} MiB cache": (adaptive, cache_mb),
    }


def stream(dataset: str, n: int, seed: int, embedder: str = "minilm") -> np.ndarray:
    """Embeddings of `n` prompts of the dataset in a seeded random order; a bad embedder, a missing package or
    data set, or more prompts than the data set holds end the run with one line (exit status 2)."""
    from simulation.config import ConfigError, config_from_dict, repo_root
    from simulation.workload import embed_prompts, load_prompts

    with exit_on(ConfigError):
        cfg = config_from_dict({"prompts": {"dataset": dataset, "embedder": embedder}}, base_dir=repo_root())
        prompts = load_prompts(cfg)
        if n > len(prompts):
            raise ConfigError(f"--prompts {n}: the {dataset} data set holds only {len(prompts)} prompts")
        emb = embed_prompts(cfg, prompts)
    order = np.random.default_rng(seed).permutation(len(prompts))[:n]
    return emb[order]


def main(argv: list[str] | None = None) -> dict:
    """Run every policy on the stream and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="coco", choices=("coco", "diffusiondb"))
    parser.add_argument("--embedder", default="minilm", help="minilm | hashed | pipeline | pipeline:PATH")
    parser.add_argument("--prompts", type=positive_int, default=8192, help="prompts of the stream")
    parser.add_argument("--window", type=positive_int, default=64, help="requests per planning window")
    parser.add_argument("--steps", type=positive_int, default=30, help="sampler steps per trajectory")
    parser.add_argument("--cache-mb", type=float, default=64.0, help="latent cache of the last policy (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts' random order")
    parser.add_argument("--json", type=output_file, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.cache_mb < 0:
        parser.error(f"--cache-mb must be >= 0, got {args.cache_mb:g}")
    emb = stream(args.dataset, args.prompts, args.seed, args.embedder)
    rows = []
    for name, (policy, cache_mb) in policies(args.cache_mb).items():
        start = time.perf_counter()
        cache = LatentCache(int(cache_mb * 2**20), policy.schedule) if cache_mb else None
        count = count_stream(emb, policy, args.window, args.steps, cache=cache)
        row = {
            "policy": name,
            "saving": count.saving(),
            "mean_group_size": float(np.mean(count.group_sizes)),
            "mean_branch_step": float(np.mean(count.leaf_depths)),
            "cache_hit_rate": cache.stats.hit_rate() if cache else None,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        hits = f"  cache hits {row['cache_hit_rate']:.1%}" if cache else ""
        print(
            f"{name:40s} saving {row['saving']:6.1%}  mean group {row['mean_group_size']:.2f}  "
            f"mean branch step {row['mean_branch_step']:.1f}/{args.steps}{hits}"
        )
    result = {"settings": vars(args), "rows": rows}
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
