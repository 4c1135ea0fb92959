"""A caption stream for `bench_serving --stream`: the first requests of a simulator config's workload (COCO
captions in the simulator's arrival order), their grouping embeddings and the sharing policy, in one .npz.

The GPU machine cannot load the MiniLM embedder, and a random-weight SD text encoder groups nothing, so the
embeddings are computed here (on the CPU, from the simulator's embedding cache when it has them) and carried:

    python -m benchmarks.coco_stream --config simulation/configs/policies_coco.yaml --policy adaptive \\
        --requests 128 --out runs/coco_stream.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.results import exit_on, output_file


def stream_meta(cfg, policy: str, config_path: str) -> dict:
    """The edge server settings of the policy (as edge_server.config.build_config takes them), the sampling
    settings and a one-line description of the load."""
    g = cfg.grouping
    return {
        "config": config_path,
        "policy_name": policy,
        "policy": {"sharing": g.sharing, "tau": g.tau, "max_group_size": g.max_group_size,
                   "adaptive_taus": list(g.adaptive_taus), "adaptive_max_sizes": list(g.adaptive_max_sizes),
                   "depth_schedule": [list(p) for p in g.depth_schedule], "cache_mb": g.cache_mb},
        "steps": cfg.sampling.steps,
        "share": cfg.sampling.share,
        "guidance": cfg.sampling.guidance,
        "description": f"{cfg.prompts.dataset} captions, {cfg.prompts.order} order, {cfg.prompts.embedder} "
                       f"embeddings, {policy} policy, Poisson {cfg.arrivals.rate:g} req/s",
    }


def make_stream(config_path: str, policy: str, requests: int, out: str) -> dict:
    """Write the stream file; returns its meta."""
    from simulation.config import ConfigError, load_config, policy_config
    from simulation.workload import build_workload, embed_prompts, load_prompts

    with exit_on(ConfigError):  # a missing config, data set or embedder package: one line
        base = load_config(config_path)
        names = [p.name for p in base.policies]
        if policy not in names:
            raise ConfigError(f"{config_path} has no policy {policy!r} (it has {', '.join(names) or 'none'})")
        cfg = policy_config(base, names.index(policy))
        pool = load_prompts(cfg)
        emb = embed_prompts(cfg, pool)
    ids = build_workload(cfg, pool, requests).prompt_ids
    meta = stream_meta(cfg, policy, config_path)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, prompts=np.array([pool[i] for i in ids]), embeddings=emb[ids].astype(np.float32),
             meta=np.array(json.dumps(meta)))
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="simulation/configs/policies_coco.yaml")
    parser.add_argument("--policy", default="adaptive", help="a policy name of the config's `policies:`")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--out", default="runs/coco_stream.npz")
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):  # numpy would add it, and the file would not be where it was asked for
        parser.error(f"--out must name a .npz file, got {args.out!r}")
    if args.requests < 1:
        parser.error(f"--requests must be >= 1, got {args.requests}")
    try:
        output_file(args.out)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--out: {exc}")
    meta = make_stream(args.config, args.policy, args.requests, args.out)
    print(f"wrote {args.out}: {args.requests} requests ({meta['description']})")


if __name__ == "__main__":
    main()
