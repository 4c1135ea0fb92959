"""The run report: groups, similarities, UNet evaluations used versus independent sampling, and the saving."""

from __future__ import annotations

from collections.abc import Sequence

from sage_core.generate import GenerationResult, saving_closed_form
from sage_core.grouping import GroupingConfig, pairwise_similarities


def group_entry(result: GenerationResult, gi: int, members: list[int]) -> dict:
    """One group's line of the report: its members, similarities, evaluations and saving (measured and the
    closed form beta * (1 - 1/N))."""
    config = result.config
    sims = pairwise_similarities(result.pooled, members)
    used = result.counter.by_label[gi]
    independent = result.independent_evaluations(len(members))
    return {
        "id": gi,
        "members": members,
        "seed": result.seeds[gi],
        "min_similarity": min(sims) if sims else 1.0,
        "mean_similarity": sum(sims) / len(sims) if sims else 1.0,
        "shared_steps": config.branch_step(),
        "unet_evaluations": used,
        "independent_evaluations": independent,
        "saving": 1.0 - used / independent,
        "saving_closed_form": saving_closed_form(config.branch_step(), config.steps, len(members)),
        "grid": f"groups/group_{gi:03d}.png",
    }


def prompt_entry(index: int, prompt: str, group: int, ignored_tokens: int | None) -> dict:
    """A prompt's entry in the report; `ignored_tokens`, when the text encoder read only the prompt's start."""
    entry = {"index": index, "prompt": prompt, "group": group, "image": f"images/{index:04d}.png"}
    return entry if ignored_tokens is None else {**entry, "ignored_tokens": ignored_tokens}


def build_report(
    result: GenerationResult, prompts: Sequence[str], model_name: str, seconds: float, grouping: GroupingConfig,
    seed: int, fingerprint: str, ignored_tokens: dict[int, int] | None = None, negative_ignored_tokens: int = 0,
) -> dict:
    """A JSON-ready dict describing the run, with every setting that made it (`grouping`, the base `seed`, the
    model's `fingerprint`). `ignored_tokens`: how many tokens the text encoder ignored of each prompt too long for
    it (sage_core.generate.overlong_prompts); those prompts' entries say so, and the settings say it of the
    negative prompt (`negative_ignored_tokens`)."""
    config = result.config
    groups = [group_entry(result, gi, g) for gi, g in enumerate(result.groups)]
    group_of = {m: g["id"] for g in groups for m in g["members"]}
    independent = result.independent_evaluations()
    return {
        "model": model_name,
        "model_fingerprint": fingerprint,
        "settings": {
            "steps": config.steps,
            "share": config.share,
            "shared_steps": config.branch_step(),
            "guidance": config.guidance,
            "scheduler": config.scheduler,
            "shared_condition": config.shared_condition,
            "negative_prompt": config.negative_prompt,
            **({"negative_prompt_ignored_tokens": negative_ignored_tokens} if negative_ignored_tokens else {}),
            "tau": grouping.tau,
            "max_group": grouping.max_group_size,
            "seed": seed,
        },
        "prompts": [prompt_entry(i, p, group_of[i], (ignored_tokens or {}).get(i)) for i, p in enumerate(prompts)],
        "groups": groups,
        "totals": {
            "prompts": len(prompts),
            "groups": len(groups),
            "mean_group_size": len(prompts) / len(groups),
            "unet_evaluations": result.counter.total,
            "independent_evaluations": independent,
            "saving": 1.0 - result.counter.total / independent,
            "seconds": seconds,
        },
    }


def image_metadata(report: dict, index: int) -> dict:
    """What `sage-edge generate` writes into prompt `index`'s PNG: its prompt, its group and the settings that made
    it, keyed as a device's images are (device_client.client), so `read_metadata` reads either."""
    entry = report["prompts"][index]
    group = report["groups"][entry["group"]]
    settings = report["settings"]
    return {
        "mode": "local-shared",
        "prompt": entry["prompt"],
        "negative_prompt": settings["negative_prompt"],
        "index": index,
        "seed": group["seed"],
        "group_id": group["id"],
        "group_size": len(group["members"]),
        "min_similarity": round(float(group["min_similarity"]), 6),
        "branch_step": settings["shared_steps"],
        "total_steps": settings["steps"],
        "scheduler": settings["scheduler"],
        "guidance": settings["guidance"],
        "shared_condition": settings["shared_condition"],
        "model": report["model"],
        "model_fingerprint": report["model_fingerprint"],
        **({"ignored_tokens": entry["ignored_tokens"]} if "ignored_tokens" in entry else {}),
        **{k: v for k, v in settings.items() if k == "negative_prompt_ignored_tokens"},
    }
