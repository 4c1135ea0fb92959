"""Does a SAGE adapter help the default model? Prompt fidelity (attribute oracle) of the base model and of the
model with the adapter, with independent sampling and with shared sampling of paraphrase groups, on held-out
captions (each group: a caption and two paraphrases of the same scene, so sharing has the best case).

    python -m benchmarks.bench_adapter_fidelity --groups 40 --json docs/results/sage_training/adapter_fidelity.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.results import write_json

ATTRIBUTES = ("shape", "color", "position", "all", "mean")


def paraphrase_groups(n_groups: int, seed: int, size: int = 3) -> tuple[list, list[list[int]]]:
    """Held-out examples in groups: each caption followed by `size - 1` paraphrases of its scene."""
    from training import world

    rng = np.random.default_rng(seed)
    examples, groups = [], []
    for e in world.make_examples(n_groups, seed, "heldout"):
        members = [e] + [world.paraphrase(e, rng) for _ in range(size - 1)]
        groups.append(list(range(len(examples), len(examples) + len(members))))
        examples.extend(members)
    return examples, groups


def fidelity(pipe, oracle, examples, groups, share: float, chunk: int = 10) -> dict[str, float]:
    """Oracle prompt fidelity of shared sampling (share 0: independent) over the groups, `chunk` groups a batch."""
    from sage_core.generate import generate
    from sage_core.grouping import GroupingConfig
    from sage_core.sampler import SamplingConfig
    from training.judges import oracle_outputs, prompt_fidelity

    config = SamplingConfig(steps=30, guidance=7.5, share=share)
    prompts = [e.caption for e in examples]
    images = []
    for lo in range(0, len(groups), chunk):
        part = groups[lo : lo + chunk]
        members = [m for g in part for m in g]
        local = [[members.index(m) for m in g] for g in part]
        result = generate(pipe, [prompts[m] for m in members], config, GroupingConfig(), seed=lo, groups=local)
        images.append(result.images)
    predictions, _ = oracle_outputs(oracle, np.concatenate(images))
    scores = prompt_fidelity(predictions, examples)
    return {k: round(scores[k], 4) for k in ATTRIBUTES if k in scores}


def main(argv: list[str] | None = None) -> dict:
    from sage_core.adapters import DEFAULT_ADAPTER_DIR, load_adapter
    from sage_core.models import load_pipeline, model_fingerprint
    from training.judges import load_oracle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--shares", default="0,0.4", help="comma-separated sharing ratios (0: independent)")
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER_DIR))
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    oracle = load_oracle()
    examples, groups = paraphrase_groups(args.groups, seed=0)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result: dict = {"model_fingerprint": model_fingerprint(pipe), "adapter": args.adapter,
                    "prompts": len(examples), "groups": len(groups), "rows": []}
    for label in ("base", "adapter"):
        if label == "adapter":
            load_adapter(pipe, args.adapter)
        for share in (float(s) for s in args.shares.split(",")):
            start = time.perf_counter()
            row = {"model": label, "share": share, **fidelity(pipe, oracle, examples, groups, share)}
            result["rows"].append(row)
            print(f"{label:8s} share {share:.2f}: " + "  ".join(f"{k} {row[k]:.3f}" for k in ATTRIBUTES if k in row)
                  + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
